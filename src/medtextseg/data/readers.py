"""Dataset readers: the LViT folder layout and CSV manifests, both to ``list[Sample]``.

Readers look only at names: which files exist, which text rows exist, and how
they pair up. They never open images (that is :mod:`medtextseg.data.validation`).
A path that is not a dataset at all raises :class:`DatasetError`; every other
problem (an image without a text row, a text row without an image, a missing
mask where masks are required, ...) is collected as a
:class:`~medtextseg.data.problems.Problem` so that all of them can be shown
at once.

LViT layout::

    <root>/Train_Folder/img/*.png         images (Val_Folder, Test_Folder alike)
    <root>/Train_Folder/labelcol/*.png    masks: same stem as the image, or mask_<image>
    <root>/Train_Folder/Train_text.xlsx   columns Image, Description; Image = mask file name

The text table may also sit in ``<root>``; ``Train_Val_text.xlsx`` (QaTa) serves
Train and Val when they have no table of their own. The table is the first
sheet whose header row (the first non-blank row naming the columns, below any
title) has both ``Image`` and ``Description``. Test images may be TIFF while
masks are PNG: images and masks pair on the stem. File names pair exactly; a
pair that differs only in letter case, or an unambiguous misspelling of one name
(``cse_96_1`` for ``case_96_1``, :mod:`medtextseg.data.names`), is still made, and
reported once.

CSV manifest: columns ``image,mask,text,split[,domain]``, paths relative to the
CSV's folder, empty ``mask`` for an unlabeled image.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medtextseg.data.io import IMAGE_SUFFIXES, read_image
from medtextseg.data.names import near_pairs
from medtextseg.data.problems import Problem
from medtextseg.data.sample import SPLITS, Sample
from medtextseg.data.sources import DataArg, DataSources, qualify_ids

__all__ = [
    "DatasetError",
    "check_split_names",
    "explain_missing_split",
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
    return _SPLIT_ALIASES.get(name.strip().lower()) if isinstance(name, str) else None


def check_split_names(names: Iterable[str] | str) -> list[str]:
    """Split names as a user types them -> the canonical names, in order, each once.

    ``["test", "VAL", "validation"]`` -> ``["Test", "Val"]``; a single string is
    one name. Call it where a command takes split names (``evaluate --split``),
    before any data is read.

    Raises:
        ValueError: ``"unknown split 'Nosuch'; use Train, Val or Test"`` for a
            name that is none of :data:`SPLITS` or their aliases.
    """
    if isinstance(names, str):
        names = [names]
    out: list[str] = []
    for name in names:
        split = normalise_split(name)
        if split is None:
            raise ValueError(f"unknown split {name!r}; use {', '.join(SPLITS[:-1])} or {SPLITS[-1]}")
        if split not in out:
            out.append(split)
    return out


def _normalise_required(splits: Iterable[str]) -> frozenset[str]:
    return frozenset(check_split_names(splits))


def read_dataset(path: DataArg, *, domain: str | None = None) -> list[Sample]:
    """Read a dataset's samples without judging them.

    Unlabeled images (no mask) come back with ``mask_path=None``; images with
    no text row come back with ``text=""``. Call
    :func:`medtextseg.data.validation.validate_dataset` before training.

    Args:
        path: an LViT-layout folder or a ``.csv`` manifest, or several of them
            (a composite dataset, see :mod:`medtextseg.data.sources`).
        domain: the samples' domain (one root only); default: a ``name=PATH``
            name, else the dataset folder's name (LViT) or the CSV's folder
            name. A manifest's ``domain`` column, where filled, wins.
            Samples of more than one domain get qualified ids (``cxr/case_1``).

    Returns:
        Samples ordered by split (Train, Val, Test) then file name.

    Raises:
        DatasetError: the path is not a dataset (see :func:`read_dataset_with_problems`).
    """
    samples, _ = read_dataset_with_problems(path, domain=domain, require_masks_in=())
    return samples


def read_dataset_with_problems(
    path: DataArg,
    *,
    domain: str | None = None,
    require_masks_in: Iterable[str] = ("Val", "Test"),
) -> tuple[list[Sample], list[Problem]]:
    """Read a dataset and list what is wrong with its structure.

    Structural problems reported: a split folder without ``img/`` (and a
    ``masks/``-like folder where ``labelcol/`` should be); an image without a
    text row (or a split without a text table); a text row without an image; an
    empty description; two rows for one image with different descriptions; a
    text table that cannot be read or has no ``Image``/``Description`` header in
    any sheet; an image without a mask in a split of ``require_masks_in``; a
    mask without an image; two masks for one image; a file name that differs
    from its mask's or its text row's only in letter case, or by one unambiguous
    misspelling (one problem; the pair is still made); manifest rows with a missing file, an unknown split or
    empty text. Masks and text rows without an image are reported even when a
    split's ``img/`` is empty or missing. File contents (decodability, sizes,
    mask values) and duplicate ids are checked by
    :func:`medtextseg.data.validation.check_samples`; splits a command needs by
    :func:`medtextseg.data.validation.validate_dataset`.

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
    try:
        sources = DataSources.parse(path)
    except ValueError as e:
        raise DatasetError(str(e)) from None
    if sources.composite and domain is not None:
        raise ValueError("domain= names the domain of one root; name several roots as name=PATH")
    samples: list[Sample] = []
    problems: list[Problem] = []
    first_root: dict[str, Path] = {}
    for i, (_, root) in enumerate(sources.roots):
        found, trouble = _read_root(root, domain or sources.roots[i][0] or
                                    (sources.default_name(i) if sources.composite else None), required)
        for d in dict.fromkeys(s.domain for s in found):
            if first_root.setdefault(d, root) != root:
                problems.append(Problem(root, f"domain {d!r} is also a domain of {first_root[d]}",
                                        "give each root its own name (--data NAME=PATH) or change the manifest's "
                                        "domain column", kind="domain-twice"))
        samples += found
        problems += trouble
    return qualify_ids(samples), problems


def _read_root(root: Path, domain: str | None, required: frozenset[str]) -> tuple[list[Sample], list[Problem]]:
    if not root.exists():
        raise DatasetError(f"{root}: does not exist; {_LAYOUT_HINT}")
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return _read_manifest(root, domain, required)
        raise DatasetError(f"{root}: not a dataset; {_LAYOUT_HINT}")
    split_dirs = _find_split_dirs(root)
    if not split_dirs:
        near = {split: _near_split_folder(root, split) for split in SPLITS}
        renames = [f"{folder.name}/ -> {split}_Folder/" for split, folder in near.items() if folder is not None]
        found = _subfolders(root)
        raise DatasetError(
            f"{root}: no split folders found"
            + (f" (it holds {_listing(found)})" if found else " (it holds no folders)")
            + (f"; rename {', '.join(renames)}" if renames else "") + f"; {_LAYOUT_HINT}")
    return _read_lvit(root, split_dirs, domain or root.name, required)


def explain_missing_split(path: DataArg, split: str) -> tuple[Path, str, str]:
    """Where a split was looked for and why it has no images: ``(place, reason, fix)``.

    For a split of ``path`` that yields no samples. ``place`` is the folder (LViT
    layout) or manifest looked in; ``reason`` a short phrase such as
    ``"Test_Folder/ not found"``, ``"Train_Folder/img/ is empty"``,
    ``"Train_Folder/img/ holds no image files (it holds 3 .dcm files)"`` or
    ``"no row of m.csv has split test"``; ``fix`` what would give the split
    images. Only names are looked at, as by the readers.

    Several roots (a split that none of them has): the first root's place, and each
    root's reason and fix prefixed with its domain name.

    Raises:
        ValueError: ``split`` is not a split name.
    """
    (split,) = check_split_names([split])
    sources = DataSources.parse(path)
    if not sources.composite:
        return _explain_root_missing_split(sources.roots[0][1], split)
    each = [(sources.default_name(i), *_explain_root_missing_split(root, split))
            for i, (_, root) in enumerate(sources.roots)]
    return (each[0][1], "; ".join(f"{name}: {reason}" for name, _, reason, _ in each),
            "; ".join(f"{name}: {fix}" for name, _, _, fix in each))


def _explain_root_missing_split(root: Path, split: str) -> tuple[Path, str, str]:
    word = split.lower()
    if root.is_file():
        try:
            with open(root, newline="", encoding="utf-8-sig") as handle:
                rows = [cells for cells in csv.reader(handle) if any(c.strip() for c in cells)]
        except (OSError, UnicodeDecodeError, csv.Error):
            rows = []
        header = [c.strip().lower() for c in rows[0]] if rows else []
        at = header.index("split") if "split" in header else None
        count = sum(1 for cells in rows[1:] if at is not None and at < len(cells)
                    and normalise_split(cells[at]) == split)
        if not count:
            return root, f"no row of {root.name} has split {word}", f"add rows with split {word} to {root.name}"
        rows_named = f"its one row with split {word}" if count == 1 else f"none of its {count} rows with split {word}"
        return (root, f"{rows_named} {'names no' if count == 1 else 'names an'} existing image",
                f"correct the image paths of those rows of {root.name} (paths are relative to {root.parent})")
    folder_name = f"{split}_Folder"
    split_dir = _find_split_dirs(root).get(split) if root.is_dir() else None
    if split_dir is None:
        near = _near_split_folder(root, split) if root.is_dir() else None
        if near is not None:
            return near, f"{folder_name}/ not found; {near.name}/ looks like it", \
                f"rename {near.name}/ to {folder_name}/"
        fix = (f"create {folder_name}/ holding img/ (the {split} images), labelcol/ (their masks) and "
               f"{split}_text.xlsx (their texts)")
        return root / folder_name, f"{folder_name}/ not found", fix
    img_dir = _child(split_dir, "img", want_dir=True)
    if img_dir is None:
        return split_dir / "img", f"{split_dir.name}/ has no img/ folder", _no_img_fix(split_dir, split, root)
    rel = _rel(img_dir, root)
    try:
        entries = [e for e in os.scandir(img_dir) if not e.name.startswith(".")]
    except OSError as exc:
        return img_dir, f"{rel}/ cannot be listed ({exc.strerror or exc})", f"make {rel}/ readable"
    if not entries:
        return img_dir, f"{rel}/ is empty", f"put the {split} images (PNG, JPEG, BMP or TIFF) in {rel}/"
    folders = sorted(e.name for e in entries if e.is_dir())
    suffixes: dict[str, int] = {}
    for e in entries:
        if e.is_file():
            suffix = Path(e.name).suffix.lower() or "(no suffix)"
            suffixes[suffix] = suffixes.get(suffix, 0) + 1
    held = [f"{n} {suffix} file{'s' if n > 1 else ''}" for suffix, n in sorted(suffixes.items())]
    if folders:
        held.append(f"{len(folders)} folder{'s' if len(folders) > 1 else ''} ({_listing(folders)})")
    reason = f"{rel}/ holds no image files (it holds {', '.join(held)})"
    if ".dcm" in suffixes:
        fix = f"convert the .dcm files to PNG in {rel}/ (medtextseg reads PNG, JPEG, BMP and TIFF)"
    elif folders and not suffixes:
        fix = f"move the {split} images out of the subfolders, directly into {rel}/"
    else:
        fix = f"put the {split} images (PNG, JPEG, BMP or TIFF) directly in {rel}/"
    return img_dir, reason, fix


# --------------------------------------------------------------------------- LViT layout

# Folder names people use for what the LViT layout calls img/ and labelcol/.
_IMAGE_FOLDER_NAMES = ("images", "image", "imgs", "imgae", "pictures")
_MASK_FOLDER_NAMES = ("masks", "mask", "labels", "label", "gt", "groundtruth", "ground_truth", "annotations",
                      "segmentations", "labelcols")


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


def _child_named(parent: Path, names: Iterable[str]) -> Path | None:
    """The first sub-folder of ``parent`` whose lower-cased name is one of ``names``."""
    wanted = tuple(names)
    found = {name.lower(): parent / name for name in _subfolders(parent)}
    return next((found[n] for n in wanted if n in found), None)


def _subfolders(folder: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return []


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(f"{n}/" for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def _find_split_dirs(root: Path) -> dict[str, Path]:
    found = {}
    for split in SPLITS:
        folder = _child(root, f"{split}_Folder", want_dir=True)
        if folder is not None:
            found[split] = folder
    return found


def _near_split_folder(root: Path, split: str) -> Path | None:
    """A folder of ``root`` named like the split but not ``<Split>_Folder`` (``Train/``,
    ``training_folder/``, ``Validation_Folder/``): the likely intended one."""
    for name in _subfolders(root):
        word = re.sub(r"[^a-z]", "", name.lower())
        word = word.removesuffix("folders").removesuffix("folder").removesuffix("set").removesuffix("data")
        if _SPLIT_ALIASES.get(word) == split and name.lower() != f"{split}_folder".lower():
            return root / name
    return None


def _no_img_fix(split_dir: Path, split: str, root: Path) -> str:
    rel = _rel(split_dir, root)
    near = _child_named(split_dir, _IMAGE_FOLDER_NAMES)
    if near is not None:
        return f"rename {rel}/{near.name}/ to {rel}/img/"
    loose = _list_images(split_dir)
    if loose:
        return f"move the {len(loose)} images in {rel}/ into {rel}/img/ (and their masks into {rel}/labelcol/)"
    try:
        empty = not any(not e.name.startswith(".") for e in os.scandir(split_dir))
    except OSError:
        empty = False
    return f"put the {split} images in {rel}/img/" + (f" or delete the empty {split_dir.name}" if empty else "")


def _list_images(folder: Path) -> list[Path]:
    """Image files in ``folder`` (no recursion, hidden files skipped), sorted by name."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    return sorted(
        Path(entry.path)
        for entry in entries
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
    _by_lower: dict[str, list[str]] | None = field(default=None, repr=False, compare=False)

    def lookup(self, stems: Iterable[str]) -> list[_TextRow] | None:
        for stem in stems:
            rows = self.rows_by_stem.get(stem)
            if rows:
                return rows
        return None

    def lookup_ignoring_case(self, stems: Iterable[str]) -> list[_TextRow] | None:
        """Unused rows whose key differs from one of ``stems`` in letter case only."""
        if self._by_lower is None:
            # Built once: a table keyed all differently must not cost rows x images.
            self._by_lower = {}
            for stem in self.rows_by_stem:
                self._by_lower.setdefault(stem.lower(), []).append(stem)
        for stem in stems:
            for candidate in self._by_lower.get(stem.lower(), ()):
                rows = self.rows_by_stem[candidate]
                if candidate != stem and not any(r.row in self.used for r in rows):
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


_TEXT_COLUMNS = ("Image", "Description")
_HEADER_SEARCH = 20  # non-blank rows searched for the header: a title or note may sit above it


def _find_header(rows: list[tuple[int, tuple]]) -> tuple[int | None, list[str]]:
    """``(index into rows, cells as written)`` of the header row; ``(None, [])`` if blank.

    The header is the first of the leading non-blank rows that names both
    columns; failing that, the first that names one of them, else the first
    non-blank row (the one a message then describes).
    """
    nonblank = [i for i, (_, cells) in enumerate(rows) if any(_cell_text(c) for c in cells)][:_HEADER_SEARCH]
    partial = None
    for i in nonblank:
        named = {_cell_text(c).lower() for c in rows[i][1]} & {c.lower() for c in _TEXT_COLUMNS}
        if len(named) == len(_TEXT_COLUMNS):
            return i, [_cell_text(c) for c in rows[i][1]]
        if named and partial is None:
            partial = i
    at = partial if partial is not None else (nonblank[0] if nonblank else None)
    return at, ([_cell_text(c) for c in rows[at][1]] if at is not None else [])


def _describe_headerless(path: Path, sheets) -> tuple[str, str]:
    """Message and fix for a table none of whose sheets has both columns."""
    several = len(sheets) > 1
    described, renames = [], []
    for name, rows in sheets:
        at, cells = _find_header(rows)
        label = f"sheet {name!r}" if name is not None and several else "the table"
        if at is None:
            described.append(f"{label} is empty")
            continue
        lowered = [c.lower() for c in cells]
        missing = [c for c in _TEXT_COLUMNS if c.lower() not in lowered]
        others = [c for c in cells if c and c.lower() not in {m.lower() for m in _TEXT_COLUMNS}]
        where = f" of sheet {name!r}" if name is not None and several else ""
        found = ", ".join(repr(c) for c in cells if c)
        described.append(f"no {' and '.join(missing)} column{'s' if len(missing) > 1 else ''} in row "
                         f"{rows[at][0]}{where} (found {found})")
        if len(missing) == 1 and len(others) == 1:
            renames.append(f"rename column {others[0]!r} in row {rows[at][0]}{where} to {missing[0]}")
    if all(d.endswith(" is empty") for d in described):
        names = ", ".join(repr(n) for n, _ in sheets if n is not None)
        message = "the text table is empty" + (f" (sheets {names} are all empty)" if several else "")
    elif several:
        message = "no sheet has both an Image and a Description column: " + "; ".join(described)
    else:
        message = described[0]
    fix = renames[0] if len(renames) == 1 else (
        f"give {path.name} a header row naming the columns Image (the mask file name) and Description, "
        "with one row per mask below it")
    return message, fix


def _why_unreadable_table(path: Path, exc: Exception) -> tuple[str, str]:
    """What a text table that failed to open is, from its first bytes (openpyxl only says
    "File is not a zip file")."""
    again = f"save {path.name} again as .xlsx (or .csv) with the columns Image, Description"
    try:
        head = path.read_bytes()[:512]
    except OSError as os_exc:
        return f"{type(os_exc).__name__}: {os_exc.strerror or os_exc}", f"make {path.name} readable"
    if not head:
        return "the file is empty (0 bytes)", f"copy {path.name} again from its source, or {again}"
    if path.suffix.lower() == ".xlsx":
        if head.startswith(b"version https://git-lfs"):
            return "it is a Git LFS pointer, not the workbook", "fetch the real files with `git lfs pull`"
        if head.startswith(b"\xd0\xcf\x11\xe0"):
            return "it is an old-style .xls workbook (or an encrypted one)", \
                "open it in a spreadsheet program and save it as .xlsx (Excel Workbook), unencrypted"
        if not head.startswith(b"PK"):
            try:
                head.decode("utf-8")
            except UnicodeDecodeError:
                return "it is not an .xlsx workbook", again
            return "it is a text file, not an .xlsx workbook (a CSV renamed to .xlsx?)", \
                f"rename it to {path.stem}.csv if it is a CSV with the columns Image, Description, or {again}"
    return f"{type(exc).__name__}: {exc}", again


def _load_text_table(path: Path) -> tuple[_TextTable | None, list[Problem]]:
    problems: list[Problem] = []
    try:
        sheets = _read_sheets(path)
    except Exception as exc:  # noqa: BLE001 - openpyxl / zipfile / csv raise many types
        message, fix = _why_unreadable_table(path, exc)
        return None, [Problem(path, f"cannot read the text table: {message}", fix, kind="text-table-unreadable")]
    # The first sheet with both columns is the table: a workbook may keep it behind an
    # empty or unrelated first sheet.
    found = None
    for _, rows in sheets:
        at, cells = _find_header(rows)
        lowered = [c.lower() for c in cells]
        if at is not None and all(c.lower() in lowered for c in _TEXT_COLUMNS):
            found = (rows, at, lowered)
            break
    if found is None:
        message, fix = _describe_headerless(path, sheets)
        return None, [Problem(path, message, fix, kind="text-table-columns")]
    rows, header_at, header = found
    image_col, text_col = header.index("image"), header.index("description")
    table = _TextTable(path)
    for number, cells in rows[header_at + 1:]:
        key = _cell_text(cells[image_col]) if image_col < len(cells) else ""
        text = _cell_text(cells[text_col]) if text_col < len(cells) else ""
        if not key:
            if text:
                problems.append(Problem(
                    path, f"row {number} has a Description but no Image name",
                    f"write the mask file name in column Image of row {number}, or delete it",
                    kind="row-without-name"))
            continue
        table.rows_by_stem.setdefault(_key_stem(key), []).append(_TextRow(number, key, text))
    for rows_of_key in table.rows_by_stem.values():
        texts = {r.text for r in rows_of_key}
        if len(texts) > 1:
            numbers = ", ".join(str(r.row) for r in rows_of_key)
            problems.append(Problem(
                path, f"rows {numbers} all describe {rows_of_key[0].key!r}, differently",
                f"keep one of rows {numbers} and delete the others", kind="rows-disagree"))
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


def _near_text_table(root: Path, split: str, split_dir: Path) -> Path | None:
    """A file that looks meant as the split's text table but is not found under its name:
    ``Train_text.xls``, ``train_text.xlsm``, or the one spreadsheet in the split folder."""
    stems = {f"{split}_text".lower()} | ({"train_val_text"} if split in _SHARED_TEXT_SPLITS else set())
    sheets = (".xlsx", ".xls", ".xlsm", ".ods", ".csv", ".tsv")
    for folder in (split_dir, root):
        try:
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        except OSError:
            continue
        for file in files:
            if file.stem.lower() in stems or file.name.lower().startswith(tuple(f"{s}." for s in stems)):
                return file
        if folder == split_dir:
            tables = [f for f in files if f.suffix.lower() in sheets]
            if len(tables) == 1:
                return tables[0]
    return None


def _case_variant(path: Path, listings: dict[Path, list[str]]) -> Path | None:
    """The one existing file whose path differs from ``path`` in letter case only.

    Walks ``path`` component by component, matching a missing component
    case-insensitively (``listings`` caches folder listings across calls);
    None where no such file exists or the match is ambiguous.
    """
    current = Path(path.parts[0])
    for part in path.parts[1:]:
        candidate = current / part
        if part in (".", "..") or os.path.lexists(candidate):
            current = candidate
            continue
        names = listings.get(current)
        if names is None:
            try:
                names = os.listdir(current)
            except OSError:
                names = []
            listings[current] = names
        matches = [n for n in names if n.lower() == part.lower()]
        if len(matches) != 1:
            return None
        current = current / matches[0]
    return current if current != path and current.is_file() else None


def _strip_mask_prefix(stem: str) -> str:
    return stem[len(_MASK_PREFIX):] if stem.lower().startswith(_MASK_PREFIX) else stem


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


@dataclass
class _Entry:
    """One image of a split while the LViT reader pairs it."""

    image: Path
    masks: list[Path] = field(default_factory=list)  # exact matches (more than one is a problem)
    near_mask: Path | None = None  # a mask whose name differs in letter case only, or misspelled
    rows: list[_TextRow] | None = None
    near_rows: list[_TextRow] | None = None  # likewise for the text row
    # The near pair is a misspelling (medtextseg.data.names), not a letter-case difference.
    mask_misspelled: bool = False
    rows_misspelled: bool = False

    @property
    def mask(self) -> Path | None:
        return self.masks[0] if self.masks else self.near_mask

    def row_stems(self) -> list[str]:
        # Rows are keyed by the mask file name (LViT), but tables keyed by the image work too.
        stem = self.image.stem
        mask = self.mask
        return list(dict.fromkeys(([mask.stem] if mask is not None else []) + [stem, _MASK_PREFIX + stem]))


@dataclass
class _Split:
    name: str
    folder: Path
    img_dir: Path | None
    label_dir: Path | None
    masks: list[Path]
    table: _TextTable | None
    entries: list[_Entry]


def _read_lvit(
    root: Path, split_dirs: dict[str, Path], domain: str, required: frozenset[str]
) -> tuple[list[Sample], list[Problem]]:
    problems: list[Problem] = []
    tables: dict[Path, _TextTable | None] = {}
    splits_of_table: dict[Path, list[str]] = {}
    scans: list[_Split] = []

    # 1. What is there: folders, files, text tables.
    for split, split_dir in split_dirs.items():
        rel = _rel(split_dir, root)
        img_dir = _child(split_dir, "img", want_dir=True)
        if img_dir is None:
            others = _subfolders(split_dir)
            problems.append(Problem(
                split_dir / "img", f"{split_dir.name} has no img/ folder"
                + (f" (it holds {_listing(others)})" if others else ""),
                _no_img_fix(split_dir, split, root), kind="no-img-folder"))
        # A missing or empty img/ is not skipped: its masks and text rows are then orphans,
        # and are reported as such (a split a command needs is checked by validate_dataset).
        images = _list_images(img_dir) if img_dir is not None else []
        label_dir = _child(split_dir, "labelcol", want_dir=True)
        masks = _list_images(label_dir) if label_dir is not None else []
        if label_dir is None:
            misnamed = _child_named(split_dir, _MASK_FOLDER_NAMES)
            if misnamed is not None and _list_images(misnamed):
                # Without this, the split's images silently become unlabeled data.
                problems.append(Problem(
                    split_dir / "labelcol", f"{split_dir.name} has no labelcol/ folder but has "
                    f"{misnamed.name}/, so its images are read as having no masks",
                    f"rename {rel}/{misnamed.name}/ to {rel}/labelcol/", kind="labelcol-misnamed"))
            elif split in required and images:
                problems.append(Problem(
                    split_dir / "labelcol", f"{split_dir.name} has no labelcol/ folder, but "
                    f"{split} images need masks",
                    f"put the {split} masks in {rel}/labelcol/ (same file names as the images)",
                    kind="no-labelcol"))

        table_path = _find_text_table(root, split, split_dir)
        table = None
        if table_path is None and images:
            near = _near_text_table(root, split, split_dir)
            problems.append(Problem(
                split_dir / f"{split}_text.xlsx",
                f"no text table for the {split} split (looked for {split}_text.xlsx"
                + (" and Train_Val_text.xlsx" if split in _SHARED_TEXT_SPLITS else "")
                + f" in {rel}/ and the dataset folder"
                + (f"; found {_rel(near, root)}" if near is not None else "") + ")",
                (f"save {_rel(near, root)} as {rel}/{split}_text.xlsx (columns Image, Description)"
                 if near is not None else
                 f"create {rel}/{split}_text.xlsx with columns Image, Description and one row per mask file name"),
                kind="no-text-table"))
        elif table_path is not None:
            if table_path not in tables:
                tables[table_path], table_problems = _load_text_table(table_path)
                problems += table_problems
            splits_of_table.setdefault(table_path, []).append(split)
            table = tables[table_path]
        scans.append(_Split(split, split_dir, img_dir, label_dir, masks, table,
                            [_Entry(image) for image in images]))

    # 2. Exact pairs first, everywhere, so that a near (letter-case) match can never take
    # a mask or a row that belongs exactly to another image.
    for scan in scans:
        masks_by_stem: dict[str, list[Path]] = {}
        for mask in scan.masks:
            masks_by_stem.setdefault(mask.stem, []).append(mask)
        for entry in scan.entries:
            stem = entry.image.stem
            entry.masks = masks_by_stem.get(stem) or masks_by_stem.get(_MASK_PREFIX + stem) or []
        if scan.table is not None:
            for entry in scan.entries:
                entry.rows = scan.table.lookup(entry.row_stems())
                if entry.rows is not None:
                    scan.table.used.update(r.row for r in entry.rows)
    # 3. Near pairs: one problem for one mistake, not "no mask" plus "mask has no image".
    for scan in scans:
        used = {m for entry in scan.entries for m in entry.masks}
        by_lower: dict[str, list[Path]] = {}
        for mask in scan.masks:
            if mask not in used:
                by_lower.setdefault(mask.stem.lower(), []).append(mask)
        for entry in scan.entries:
            if entry.masks:
                continue
            stem = entry.image.stem.lower()
            near = by_lower.get(stem) or by_lower.get(_MASK_PREFIX + stem) or []
            if len(near) == 1:
                entry.near_mask = near[0]
                del by_lower[near[0].stem.lower()]
        # Then misspellings (cse_96_1 for case_96_1), only where the pair is unambiguous.
        lonely = [entry for entry in scan.entries if not entry.masks and entry.near_mask is None]
        free = {_strip_mask_prefix(m.stem): m for masks in by_lower.values() for m in masks}
        if lonely and free:
            pairs = near_pairs([entry.image.stem for entry in lonely], list(free))
            for entry in lonely:
                if entry.image.stem in pairs:
                    entry.near_mask, entry.mask_misspelled = free[pairs[entry.image.stem]], True
        if scan.table is not None:
            for entry in scan.entries:
                if entry.rows is None and entry.near_mask is not None:
                    # The row may name the mask exactly as it is spelled.
                    entry.rows = scan.table.lookup([entry.near_mask.stem])
                    if entry.rows is not None:
                        scan.table.used.update(r.row for r in entry.rows)
                if entry.rows is None:
                    entry.near_rows = scan.table.lookup_ignoring_case(entry.row_stems())
                    if entry.near_rows is not None:
                        scan.table.used.update(r.row for r in entry.near_rows)
    # Misspelled row keys, after every letter-case pair, over all splits a table serves.
    for table in {id(scan.table): scan.table for scan in scans if scan.table is not None}.values():
        lonely = [entry for scan in scans if scan.table is table for entry in scan.entries
                  if entry.rows is None and entry.near_rows is None]
        free = [key for key, rows in table.rows_by_stem.items() if not any(r.row in table.used for r in rows)]
        if not lonely or not free:
            continue
        pairs = near_pairs([(entry.mask or entry.image).stem for entry in lonely], free)
        for entry in lonely:
            key = pairs.get((entry.mask or entry.image).stem)
            if key is not None:
                entry.near_rows, entry.rows_misspelled = table.rows_by_stem[key], True
                table.used.update(r.row for r in entry.near_rows)

    # 4. Samples and the problems of each image, split by split.
    samples: list[Sample] = []
    for scan in scans:
        split, table, label_dir = scan.name, scan.table, scan.label_dir
        img_dir = scan.img_dir or scan.folder / "img"
        used_masks: set[Path] = set()
        for entry in scan.entries:
            image, stem, mask = entry.image, entry.image.stem, entry.mask
            if len(entry.masks) > 1:
                names = ", ".join(m.name for m in entry.masks)
                problems.append(Problem(
                    entry.masks[1], f"{len(entry.masks)} masks for image {image.name}: {names}",
                    f"keep one of {names} in {_rel(label_dir, root)}/", kind="several-masks"))
            used_masks.update(entry.masks)
            if entry.near_mask is not None:
                used_masks.add(entry.near_mask)
                prefix = _MASK_PREFIX if entry.near_mask.stem.lower().startswith(_MASK_PREFIX) and \
                    entry.near_mask.stem.lower() != stem.lower() else ""
                expected = f"{prefix}{stem}{entry.near_mask.suffix}"
                if entry.mask_misspelled:
                    problems.append(Problem(
                        entry.near_mask, f"mask {entry.near_mask.name!r} matches no image; image {image.name!r} "
                        "has no mask: one name misspelled?",
                        f"rename the mask to {expected!r} (or the image to match the mask)", kind="misspelled-name"))
                else:
                    problems.append(Problem(
                        entry.near_mask, f"mask {entry.near_mask.name!r} and image {image.name!r} differ only in "
                        "letter case (file names are case-sensitive)",
                        f"rename the mask to {expected!r} (or the image to match the mask)", kind="case-mismatch"))
            if mask is None and label_dir is not None and split in required:
                problems.append(Problem(
                    image, f"no mask in {_rel(label_dir, root)}/ (looked for {stem}.* and "
                    f"{_MASK_PREFIX}{stem}.*); {split} images need masks",
                    f"add the mask as {_rel(label_dir, root)}/{stem}.png, or remove the image", kind="no-mask"))

            text = ""
            if table is not None:
                named = (mask or image).name
                if entry.near_rows is not None:
                    row = entry.near_rows[0]
                    text = row.text  # paired anyway: read_dataset users get the text
                    how = ("one name misspelled?", "misspelled-name") if entry.rows_misspelled else \
                        ("they differ only in letter case (names are case-sensitive)", "case-mismatch")
                    problems.append(Problem(
                        table.path, f"row {row.row} names {row.key!r}, but the file is {named!r}: {how[0]}",
                        f"write {named!r} in column Image of row {row.row}, or rename the file to {row.key!r}",
                        kind=how[1]))
                elif entry.rows is None:
                    problems.append(Problem(
                        image, f"no row for {named!r} in {table.path.name}",
                        f"add a row {named!r} with its description to {_rel(table.path, root)}", kind="no-row"))
                else:
                    row = entry.rows[0]
                    text = row.text
                    if not text:
                        problems.append(Problem(
                            table.path, f"row {row.row} ({row.key!r}) has an empty Description",
                            f"write the description of {row.key!r} in row {row.row}", kind="empty-description"))
            samples.append(Sample(id=stem, image_path=image, mask_path=mask, text=text,
                                  split=split, domain=domain))

        for mask in scan.masks:
            if mask not in used_masks:
                problems.append(Problem(
                    mask, f"mask has no image in {_rel(img_dir, root)}/",
                    f"add its image to {_rel(img_dir, root)}/ or delete the mask", kind="mask-without-image"))

    for split in SPLITS:
        if split in split_dirs:
            continue
        # A table of a split whose folder is missing: its rows are all orphans; one line says why.
        own = next((t for t in (_child(root, f"{split}_text{suffix}", want_dir=False) for suffix in _TEXT_SUFFIXES)
                    if t is not None), None)
        if own is not None and own not in tables:
            problems.append(Problem(
                own, f"{own.name} holds the texts of the {split} split, but there is no {split}_Folder/",
                f"put the {split} images in {split}_Folder/img/ (masks in {split}_Folder/labelcol/), "
                f"or delete {own.name}", kind="table-without-split"))

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
                f"delete row {row.row} or add the image of {row.key!r}", kind="row-without-image"))

    if not samples:
        problems.append(Problem(
            root, "no images in any <Split>_Folder/img/",
            "put the images in Train_Folder/img/ (and Val_Folder/img/, Test_Folder/img/)", kind="no-images"))
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
            lines = [(reader.line_num, cells) for cells in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DatasetError(f"{csv_path}: cannot read the manifest ({exc}); {_LAYOUT_HINT}") from exc
    # Blank lines above the header are skipped, as in text tables.
    header_at = next((i for i, (_, cells) in enumerate(lines) if any(c.strip() for c in cells)), None)
    written = [c.strip() for c in lines[header_at][1]] if header_at is not None else []
    rows = lines[header_at + 1:] if header_at is not None else []
    columns = [c.lower() for c in written]
    missing = [c for c in _MANIFEST_REQUIRED if c not in columns]
    if missing:
        where = f"its header row (row {lines[header_at][0]})" if header_at is not None else "its header row"
        raise DatasetError(
            f"{csv_path}: manifest lacks column(s) {', '.join(missing)} in {where} "
            f"(found {', '.join(c for c in written if c) or 'nothing'}); expected image,mask,text,split[,domain]")
    index = {name: columns.index(name) for name in (*_MANIFEST_REQUIRED, "domain")
             if name in columns}

    def cell(cells: list[str], name: str) -> str:
        i = index.get(name)
        return cells[i].strip() if i is not None and i < len(cells) else ""

    samples: list[Sample] = []
    problems: list[Problem] = []
    listings: dict[Path, list[str]] = {}
    where = csv_path.name

    def case_problem(column: str, number: int, written: str, found: Path) -> Problem:
        actual = _rel(found, base)
        return Problem(csv_path, f"row {number}: {column} {written!r} and the file {actual!r} differ only in "
                       "letter case (paths are case-sensitive)",
                       f"write {actual!r} in column {column} of row {number}, or rename the file to match",
                       kind="case-mismatch")

    for number, cells in rows:
        if not any(c.strip() for c in cells):
            continue
        image_rel, mask_rel = cell(cells, "image"), cell(cells, "mask")
        text, split_raw = cell(cells, "text"), cell(cells, "split")
        split = normalise_split(split_raw)
        if not image_rel:
            problems.append(Problem(csv_path, f"row {number} has no image path",
                                    f"fill in column image of row {number} of {where}, "
                                    "or delete the row", kind="manifest-no-image-path"))
            continue
        image = base / image_rel
        if split is None:
            problems.append(Problem(
                csv_path, f"row {number} ({image_rel}): split {split_raw!r} is not "
                "train, val or test", f"set column split of row {number} to train, val or test",
                kind="manifest-bad-split"))
            continue
        if not image.is_file():
            near = _case_variant(image, listings)
            if near is None:
                problems.append(Problem(
                    image, f"image of row {number} of {where} does not exist",
                    f"correct column image of row {number} (paths are relative to {base}) or add the file",
                    kind="manifest-missing-image"))
                continue
            # Paired anyway (the file is there), but still a problem: on a case-sensitive
            # file system the row names a file that does not exist.
            problems.append(case_problem("image", number, image_rel, near))
            image = near
        mask = None
        if mask_rel:
            mask = base / mask_rel
            if not mask.is_file():
                near = _case_variant(mask, listings)
                if near is not None:
                    problems.append(case_problem("mask", number, mask_rel, near))
                    mask = near
                else:
                    problems.append(Problem(
                        mask, f"mask of row {number} of {where} does not exist",
                        f"correct column mask of row {number} (paths are relative to {base}), "
                        "add the file, or leave the column empty for an unlabeled image",
                        kind="manifest-missing-mask"))
                    mask = None
        elif split in required:
            problems.append(Problem(
                image, f"row {number} of {where}: {split} image without a mask; {split} images "
                "need masks", f"fill in column mask of row {number}, or set its split to train "
                "to use it unlabeled", kind="no-mask"))
        if not text:
            problems.append(Problem(
                csv_path, f"row {number} ({image_rel}) has empty text",
                f"write the description of {image_rel} in column text of row {number}", kind="empty-text"))
        samples.append(Sample(id=image.stem, image_path=image, mask_path=mask, text=text,
                              split=split, domain=cell(cells, "domain") or default_domain))

    if not samples and not problems:
        problems.append(Problem(csv_path, "the manifest has no rows",
                                "add one row per image: image,mask,text,split", kind="manifest-empty"))
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
