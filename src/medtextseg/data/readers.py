"""Dataset readers: the LViT folder layout and CSV manifests, both to ``list[Sample]``.

Readers look only at names: which files exist, which text rows exist, and how
they pair up. They never open images (that is :mod:`medtextseg.data.validation`).
A path that is not a dataset at all raises :class:`DatasetError`; every other
problem (an image without a text row, a text row without an image, a missing
mask where masks are required, ...) is collected as a
:class:`~medtextseg.data.validation.Problem` so that all of them can be shown
at once.

LViT layout::

    <root>/Train_Folder/img/*.png         images (Val_Folder, Test_Folder alike)
    <root>/Train_Folder/labelcol/*.png    masks: same stem as the image, or mask_<image>
    <root>/Train_Folder/Train_text.xlsx   columns Image, Description; Image = mask file name

The text table may also sit in ``<root>``; ``Train_Val_text.xlsx`` (QaTa) serves
Train and Val when they have no table of their own. Test images may be TIFF
while masks are PNG: images and masks pair on the stem.

CSV manifest: columns ``image,mask,text,split[,domain]``, paths relative to the
CSV's folder, empty ``mask`` for an unlabeled image.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtextseg.data.io import IMAGE_SUFFIXES, read_image
from medtextseg.data.problems import Problem
from medtextseg.data.sample import SPLITS, Sample

__all__ = [
    "DatasetError",
    "normalise_split",
    "read_contrastive_templates",
    "read_dataset",
    "read_dataset_with_problems",
]

_SPLIT_ALIASES = {
    "train": "Train",
    "training": "Train",
    "val": "Val",
    "valid": "Val",
    "validation": "Val",
    "test": "Test",
    "testing": "Test",
}
_MASK_PREFIX = "mask_"  # QaTa-COV19 names the mask of covid_1.png mask_covid_1.png
_SHARED_TEXT_SPLITS = ("Train", "Val")  # QaTa's Train_Val_text.xlsx serves both
_TEXT_SUFFIXES = (".xlsx", ".csv")
_MANIFEST_REQUIRED = ("image", "mask", "text", "split")
_LAYOUT_HINT = (
    "expected a folder with Train_Folder/, Val_Folder/ and/or Test_Folder/ "
    "(LViT layout: <Split>_Folder/img, <Split>_Folder/labelcol, <Split>_text.xlsx) "
    "or a .csv manifest with columns image,mask,text,split[,domain]"
)


class DatasetError(Exception):
    """The path is not a dataset at all (missing, wrong kind, CSV without the columns)."""


def normalise_split(name: str) -> str | None:
    """``"train"``, ``"VAL"``, ``"validation"``, ... -> one of :data:`SPLITS`; None if unknown."""
    return _SPLIT_ALIASES.get(name.strip().lower())


def _normalise_required(splits: Iterable[str]) -> frozenset[str]:
    if isinstance(splits, str):
        splits = (splits,)
    out = set()
    for name in splits:
        split = normalise_split(name)
        if split is None:
            raise ValueError(f"require_masks_in: unknown split {name!r}; use {SPLITS}")
        out.add(split)
    return frozenset(out)


def read_dataset(path: str | os.PathLike, *, domain: str | None = None) -> list[Sample]:
    """Read a dataset's samples without judging them.

    Unlabeled images (no mask) come back with ``mask_path=None``; images with
    no text row come back with ``text=""``. Call
    :func:`medtextseg.data.validation.validate_dataset` before training.

    Args:
        path: an LViT-layout folder or a ``.csv`` manifest.
        domain: the samples' domain; default: the dataset folder's name
            (LViT) or the CSV's folder name. A manifest's ``domain`` column,
            where filled, wins over both.

    Returns:
        Samples ordered by split (Train, Val, Test) then file name.

    Raises:
        DatasetError: the path is not a dataset (see :func:`read_dataset_with_problems`).
    """
    samples, _ = read_dataset_with_problems(path, domain=domain, require_masks_in=())
    return samples


def read_dataset_with_problems(
    path: str | os.PathLike,
    *,
    domain: str | None = None,
    require_masks_in: Iterable[str] = ("Val", "Test"),
) -> tuple[list[Sample], list[Problem]]:
    """Read a dataset and list what is wrong with its structure.

    Structural problems reported: a split folder without ``img/``; an image
    without a text row (or a split without a text table); a text row without
    an image; an empty description; two rows for one image with different
    descriptions; a text table that cannot be read; an image without a mask in
    a split of ``require_masks_in``; a mask without an image; two masks for one
    image; manifest rows with a missing file, an unknown split or empty text.
    File contents (decodability, sizes, mask values) and duplicate ids are
    checked by :func:`medtextseg.data.validation.check_samples`.

    Args:
        path: an LViT-layout folder or a ``.csv`` manifest.
        domain: see :func:`read_dataset`.
        require_masks_in: splits whose images must all have masks (evaluation
            needs them); images without one in other splits are unlabeled data.

    Returns:
        ``(samples, problems)``. Samples are kept even when a problem concerns
        them (text ``""``, ``mask_path=None``) except where no image file exists.

    Raises:
        DatasetError: path missing, neither a folder with split folders nor a
            ``.csv`` file, or a manifest without the required columns.
        ValueError: an unknown split name in ``require_masks_in``.
    """
    required = _normalise_required(require_masks_in)
    root = Path(path).expanduser().absolute()
    if not root.exists():
        raise DatasetError(f"{root}: does not exist; {_LAYOUT_HINT}")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return _read_manifest(root, domain, required)
        raise DatasetError(f"{root}: not a dataset; {_LAYOUT_HINT}")
    split_dirs = _find_split_dirs(root)
    if not split_dirs:
        raise DatasetError(f"{root}: no split folders found; {_LAYOUT_HINT}")
    return _read_lvit(root, split_dirs, domain or root.name, required)


# --------------------------------------------------------------------------- LViT layout


def _child(parent: Path, name: str, *, want_dir: bool) -> Path | None:
    """``parent/name`` matched case-insensitively (an exact match wins)."""
    exact = parent / name
    if exact.is_dir() if want_dir else exact.is_file():
        return exact
    lowered = name.lower()
    try:
        entries = sorted(os.scandir(parent), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if entry.name.lower() == lowered and (entry.is_dir() if want_dir else entry.is_file()):
            return Path(entry.path)
    return None


def _find_split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split in SPLITS:
        folder = _child(root, f"{split}_Folder", want_dir=True)
        if folder is not None:
            found[split] = folder
    return found


def _list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (no recursion, hidden files skipped), sorted by name."""
    return sorted(
        Path(entry.path)
        for entry in os.scandir(folder)
        if entry.is_file()
        and not entry.name.startswith(".")
        and Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
    )


def _key_stem(key: str) -> str:
    """A text-table key ('mask_x.png', 'x.tif', 'x', 'labelcol/x.png') -> its file stem."""
    name = key.strip().replace("\\", "/").rsplit("/", 1)[-1]
    stem, dot, suffix = name.rpartition(".")
    if dot and f".{suffix.lower()}" in IMAGE_SUFFIXES:
        return stem
    return name


@dataclass
class _TextRow:
    row: int  # 1-based spreadsheet / CSV line number, as the user sees it
    key: str
    text: str


@dataclass
class _TextTable:
    """One ``Image, Description`` table; ``used`` tracks rows matched to an image."""

    path: Path
    rows_by_stem: dict[str, list[_TextRow]] = field(default_factory=dict)
    used: set[int] = field(default_factory=set)

    def lookup(self, stems: Iterable[str]) -> list[_TextRow] | None:
        for stem in stems:
            rows = self.rows_by_stem.get(stem)
            if rows:
                return rows
        return None

    def lookup_ignoring_case(self, stems: Iterable[str]) -> list[_TextRow] | None:
        """Unused rows whose key differs from one of ``stems`` in letter case only."""
        lowered = {stem.lower() for stem in stems}
        for stem, rows in self.rows_by_stem.items():
            if stem.lower() in lowered and not any(r.row in self.used for r in rows):
                return rows
        return None


def _read_sheets(path: Path) -> list[tuple[str | None, list[tuple[int, tuple]]]]:
    """``[(sheet name, [(row number, cell values), ...]), ...]``: every sheet of an .xlsx,
    or the one table of a .csv (name None)."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            return [(None, [(reader.line_num, tuple(cells)) for cells in reader])]
    import openpyxl

    with warnings.catch_warnings():
        # openpyxl warns about harmless things such as a missing default style.
        warnings.simplefilter("ignore")
        workbook = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        return [(sheet.title, list(enumerate(sheet.iter_rows(values_only=True), start=1)))
                for sheet in workbook.worksheets]
    finally:
        workbook.close()


def _cell_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # a numeric file name such as 17 comes back as 17.0
    return str(value).strip()


def _header(rows: list[tuple[int, tuple]]) -> tuple[int | None, list[str]]:
    """Index of the first non-blank row and its lower-cased cells."""
    at = next((i for i, (_, cells) in enumerate(rows) if any(_cell_text(c) for c in cells)), None)
    return at, ([_cell_text(c).lower() for c in rows[at][1]] if at is not None else [])


def _load_text_table(path: Path) -> tuple[_TextTable | None, list[Problem]]:
    problems: list[Problem] = []
    fix_format = f"save {path.name} as a table whose first row names the columns Image, Description"
    try:
        sheets = _read_sheets(path)
    except Exception as exc:  # noqa: BLE001 - openpyxl / zipfile / csv raise many types
        return None, [Problem(path, f"cannot read the text table ({type(exc).__name__}: {exc})",
                              fix_format)]
    # The first sheet with both columns is the table: a workbook may keep it behind an
    # empty or unrelated first sheet.
    found = None
    for name, rows in sheets:
        at, header = _header(rows)
        if at is not None and "image" in header and "description" in header:
            found = (name, rows, at, header)
            break
    if found is None:
        described = []
        for name, rows in sheets:
            at, header = _header(rows)
            where = f" of sheet {name!r}" if name is not None else ""
            if at is None:
                described.append(f"sheet {name!r} is empty" if name is not None else "the table is empty")
            else:
                missing = [c.capitalize() for c in ("image", "description") if c not in header]
                cells = ", ".join(repr(h) for h in header if h) or "nothing"
                described.append(f"no {' and '.join(missing)} column{'s' if len(missing) > 1 else ''} "
                                 f"in row {rows[at][0]}{where} (found {cells})")
        if all(_header(rows)[0] is None for _, rows in sheets):
            message = "the text table is empty" + (
                f" (sheets: {', '.join(repr(n) for n, _ in sheets)})" if sheets and sheets[0][0] is not None else "")
        else:
            message = "; ".join(described)
        return None, [Problem(path, message, fix_format)]
    _, rows, header_at, header = found
    image_col, text_col = header.index("image"), header.index("description")
    table = _TextTable(path)
    for number, cells in rows[header_at + 1:]:
        key = _cell_text(cells[image_col]) if image_col < len(cells) else ""
        text = _cell_text(cells[text_col]) if text_col < len(cells) else ""
        if not key:
            if text:
                problems.append(Problem(
                    path, f"row {number} has a Description but no Image name",
                    f"write the mask file name in column Image of row {number}, or delete it"))
            continue
        table.rows_by_stem.setdefault(_key_stem(key), []).append(_TextRow(number, key, text))
    for rows_of_key in table.rows_by_stem.values():
        texts = {r.text for r in rows_of_key}
        if len(texts) > 1:
            numbers = ", ".join(str(r.row) for r in rows_of_key)
            problems.append(Problem(
                path, f"rows {numbers} all describe {rows_of_key[0].key!r}, differently",
                f"keep one of rows {numbers} and delete the others"))
    return table, problems


def _find_text_table(root: Path, split: str, split_dir: Path) -> Path | None:
    names = [f"{split}_text{suffix}" for suffix in _TEXT_SUFFIXES]
    if split in _SHARED_TEXT_SPLITS:
        names += [f"Train_Val_text{suffix}" for suffix in _TEXT_SUFFIXES]
    for name in names:
        for folder in (split_dir, root):
            found = _child(folder, name, want_dir=False)
            if found is not None:
                return found
    return None


def _same_but_case(path: Path) -> Path | None:
    """A file beside ``path`` whose name differs from it in letter case only."""
    try:
        entries = os.scandir(path.parent)
    except OSError:
        return None
    with entries:
        for entry in entries:
            if entry.name.lower() == path.name.lower() and entry.name != path.name and entry.is_file():
                return Path(entry.path)
    return None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _read_lvit(
    root: Path, split_dirs: dict[str, Path], domain: str, required: frozenset[str]
) -> tuple[list[Sample], list[Problem]]:
    samples: list[Sample] = []
    problems: list[Problem] = []
    tables: dict[Path, _TextTable | None] = {}
    splits_of_table: dict[Path, list[str]] = {}

    for split, split_dir in split_dirs.items():
        img_dir = _child(split_dir, "img", want_dir=True)
        if img_dir is None:
            problems.append(Problem(
                split_dir / "img", f"{split_dir.name} has no img/ folder",
                f"put the {split} images in {_rel(split_dir, root)}/img/ "
                f"or delete the empty {split_dir.name}"))
            continue
        # An empty img/ is not skipped: its masks and text rows are then orphans, and
        # are reported as such (a split a command needs is checked by validate_dataset).
        images = _list_images(img_dir)
        label_dir = _child(split_dir, "labelcol", want_dir=True)
        masks = _list_images(label_dir) if label_dir is not None else []

        masks_by_stem: dict[str, list[Path]] = {}
        for mask in masks:
            masks_by_stem.setdefault(mask.stem, []).append(mask)
        used_masks: set[Path] = set()

        table_path = _find_text_table(root, split, split_dir)
        table = None
        if table_path is None and images:
            problems.append(Problem(
                split_dir / f"{split}_text.xlsx",
                f"no text table for the {split} split (looked for {split}_text.xlsx"
                + (" and Train_Val_text.xlsx" if split in _SHARED_TEXT_SPLITS else "")
                + f" in {_rel(split_dir, root)}/ and the dataset folder)",
                f"create {_rel(split_dir, root)}/{split}_text.xlsx with columns Image, "
                "Description and one row per mask file name"))
        elif table_path is not None:
            if table_path not in tables:
                tables[table_path], table_problems = _load_text_table(table_path)
                problems += table_problems
            splits_of_table.setdefault(table_path, []).append(split)
            table = tables[table_path]

        if label_dir is None and split in required and images:
            problems.append(Problem(
                split_dir / "labelcol", f"{split_dir.name} has no labelcol/ folder, but "
                f"{split} images need masks",
                f"put the {split} masks in {_rel(split_dir, root)}/labelcol/ "
                "(same file names as the images)"))

        for image in images:
            stem = image.stem
            candidates = masks_by_stem.get(stem) or masks_by_stem.get(_MASK_PREFIX + stem) or []
            mask = candidates[0] if candidates else None
            if len(candidates) > 1:
                names = ", ".join(m.name for m in candidates)
                problems.append(Problem(
                    candidates[1], f"{len(candidates)} masks for image {image.name}: {names}",
                    f"keep one of {names} in {_rel(label_dir, root)}/"))
            used_masks.update(candidates)
            if mask is None and label_dir is not None and split in required:
                problems.append(Problem(
                    image, f"no mask in {_rel(label_dir, root)}/ (looked for {stem}.* and "
                    f"{_MASK_PREFIX}{stem}.*); {split} images need masks",
                    f"add the mask as {_rel(label_dir, root)}/{stem}.png, or remove the image"))

            text = ""
            if table is not None:
                stems = ([mask.stem] if mask is not None else []) + [stem, _MASK_PREFIX + stem]
                rows = table.lookup(dict.fromkeys(stems))
                near = table.lookup_ignoring_case(stems) if rows is None else None
                if near is not None:
                    # One line for one mistake, not "no row" plus "row matches no image".
                    table.used.update(r.row for r in near)
                    problems.append(Problem(
                        table.path, f"row {near[0].row} names {near[0].key!r}, but the file is "
                        f"{(mask or image).name!r}: they differ only in letter case",
                        f"write {(mask or image).name!r} in column Image of row {near[0].row}, or rename the file",
                        kind="case-mismatch"))
                elif rows is None:
                    key = mask.name if mask is not None else image.name
                    problems.append(Problem(
                        image, f"no row for {key!r} in {table.path.name}",
                        f"add a row {key!r} with its description to {_rel(table.path, root)}"))
                else:
                    table.used.update(r.row for r in rows)
                    text = rows[0].text
                    if not text:
                        problems.append(Problem(
                            table.path,
                            f"row {rows[0].row} ({rows[0].key!r}) has an empty Description",
                            f"write the description of {rows[0].key!r} in row {rows[0].row}"))
            samples.append(Sample(id=stem, image_path=image, mask_path=mask, text=text,
                                  split=split, domain=domain))

        for mask in masks:
            if mask not in used_masks:
                problems.append(Problem(
                    mask, f"mask has no image in {_rel(img_dir, root)}/",
                    f"add its image to {_rel(img_dir, root)}/ or delete the mask"))

    for table_path, table in tables.items():
        if table is None:
            continue
        folders = " or ".join(
            f"{_rel(split_dirs[split], root)}/img/" for split in splits_of_table[table_path])
        unused = sorted((row for rows in table.rows_by_stem.values() for row in rows
                         if row.row not in table.used), key=lambda row: row.row)
        for row in unused:
            problems.append(Problem(
                table_path, f"row {row.row} ({row.key!r}) matches no image in {folders}",
                f"delete row {row.row} or add the image of {row.key!r}"))

    if not samples:
        problems.append(Problem(
            root, "no images in any <Split>_Folder/img/",
            "put the images in Train_Folder/img/ (and Val_Folder/img/, Test_Folder/img/)"))
    return samples, problems


# --------------------------------------------------------------------------- CSV manifest


def _read_manifest(
    csv_path: Path, domain: str | None, required: frozenset[str]
) -> tuple[list[Sample], list[Problem]]:
    base = csv_path.parent
    default_domain = domain or base.name
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            header = next(reader, None)
            rows = [(reader.line_num, cells) for cells in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: cannot read the manifest ({exc}); {_LAYOUT_HINT}") from exc
    columns = [c.strip().lower() for c in header or []]
    missing = [c for c in _MANIFEST_REQUIRED if c not in columns]
    if missing:
        raise DatasetError(
            f"{csv_path}: manifest lacks column(s) {', '.join(missing)} in its first row "
            f"(found {', '.join(columns) or 'nothing'}); expected image,mask,text,split[,domain]")
    index = {name: columns.index(name) for name in (*_MANIFEST_REQUIRED, "domain")
             if name in columns}

    def cell(cells: list[str], name: str) -> str:
        i = index.get(name)
        return cells[i].strip() if i is not None and i < len(cells) else ""

    samples: list[Sample] = []
    problems: list[Problem] = []
    where = csv_path.name
    for number, cells in rows:
        if not any(c.strip() for c in cells):
            continue
        image_rel, mask_rel = cell(cells, "image"), cell(cells, "mask")
        text, split_raw = cell(cells, "text"), cell(cells, "split")
        split = normalise_split(split_raw)
        if not image_rel:
            problems.append(Problem(csv_path, f"row {number} has no image path",
                                    f"fill in column image of row {number} of {where}, "
                                    "or delete the row"))
            continue
        image = base / image_rel
        if split is None:
            problems.append(Problem(
                csv_path, f"row {number} ({image_rel}): split {split_raw!r} is not "
                "train, val or test", f"set column split of row {number} to train, val or test"))
            continue
        if not image.is_file():
            near = _same_but_case(image)
            problems.append(Problem(
                image, f"image of row {number} of {where} does not exist"
                + (f"; {near.name!r} differs from it only in letter case" if near else ""),
                f"write {near.name!r} in column image of row {number}" if near else
                f"correct column image of row {number} (paths are relative to {base}) or add the file"))
            continue
        mask = None
        if mask_rel:
            mask = base / mask_rel
            if not mask.is_file():
                problems.append(Problem(
                    mask, f"mask of row {number} of {where} does not exist",
                    f"correct column mask of row {number} (paths are relative to {base}), "
                    "add the file, or leave the column empty for an unlabeled image"))
                mask = None
        elif split in required:
            problems.append(Problem(
                image, f"row {number} of {where}: {split} image without a mask; {split} images "
                "need masks", f"fill in column mask of row {number}, or set its split to train "
                "to use it unlabeled"))
        if not text:
            problems.append(Problem(
                csv_path, f"row {number} ({image_rel}) has empty text",
                f"write the description of {image_rel} in column text of row {number}"))
        samples.append(Sample(id=image.stem, image_path=image, mask_path=mask, text=text,
                              split=split, domain=cell(cells, "domain") or default_domain))

    if not samples and not problems:
        problems.append(Problem(csv_path, "the manifest has no rows",
                                "add one row per image: image,mask,text,split"))
    order = {s: i for i, s in enumerate(SPLITS)}
    # Stable sort keeps the manifest's own order within a split.
    samples.sort(key=lambda s: order[s.split])
    return samples, problems


def read_contrastive_templates(folder: str | os.PathLike) -> list[tuple[str, np.ndarray]]:
    """Template masks of the LViT LV loss: ``(description, [H, W] bool)`` per row.

    The folder holds the masks and a table (``LV_loss.xlsx`` or any single
    ``.xlsx``/``.csv``) with columns ``Image, Description``, like
    ``qata_lv_templates/``. Masks may be anti-aliased or palette images: they are
    read as gray levels through their palette and thresholded at half intensity.
    """

    root = Path(folder)
    tables = sorted(p for p in root.glob("*") if p.suffix.lower() in _TEXT_SUFFIXES) if root.is_dir() else []
    preferred = [p for p in tables if p.stem.lower() == "lv_loss"]
    if not (preferred or len(tables) == 1):
        raise DatasetError(f"{root}: expected a folder with template masks and one table (LV_loss.xlsx) with "
                           "columns Image, Description; set semi.lv_templates to such a folder")
    table, problems = _load_text_table((preferred or tables)[0])
    if table is None or problems:
        raise DatasetError("; ".join(f"{p.file}: {p.message} ({p.fix})" for p in problems))
    out = []
    for rows in table.rows_by_stem.values():
        row = rows[0]
        path = root / row.key
        if not path.is_file():
            raise DatasetError(f"{table.path} row {row.row} names {row.key}, which is not in {root}")
        if not row.text:
            raise DatasetError(f"{table.path} row {row.row} has no Description; write the template's text")
        out.append((row.text, read_image(path).astype(np.float32).mean(axis=-1) > 127.5))
    return out
