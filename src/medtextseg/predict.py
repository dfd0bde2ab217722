"""Predict masks for new image + text pairs with a trained run.

Inputs: every image file (``.png .jpg .jpeg .tif .tiff .bmp``, any case) directly
inside the images folder; sub-folders and names starting with ``.`` are not read.

Outputs, for every image ``<stem>.<ext>``:

    <out>/masks/<stem>.png      the mask at the image's own size: {0, 255} for a
                                binary run, class ids 0..K-1 otherwise
    <out>/overlays/<stem>.png   the image with the prediction tinted: red for a binary
                                run, each class in its fixed palette colour otherwise
    <out>/legend.png            multi-class runs only: the palette colour, id and name of each
                                foreground class (names: the run's ``data.classes``, else
                                ``class 1`` ...); a binary run has one colour and no legend

Rules that keep an output folder meaning one thing:

- Nothing is written, and the model is not loaded, before every input problem
  (name collisions, missing or empty texts, unreadable images, CSV rows naming no
  image) has been found; they are raised together as one :class:`DataError`.
- Two inputs whose output names would be the same file are refused. Names are
  compared ignoring case (and Unicode normalisation), as macOS and Windows do.
- ``out`` must be new or empty. With ``overwrite=True`` an ``out`` that holds only
  what predict writes (``masks/`` and ``overlays/`` of PNG files, ``legend.png``, plus
  the temp files of an interrupted run) is cleared first; anything else there is refused,
  so ``--overwrite`` never deletes a folder predict did not make.
- ``out`` and the images folder must be separate: neither may be inside the other
  (outputs would land among the inputs, and ``--overwrite`` could delete inputs).
- Every PNG (the legend included) is written atomically; a run interrupted midway is
  redone with ``--overwrite``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import shutil
import unicodedata
from collections import defaultdict, deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medtextseg.classes import class_names, legend_png, overlay_labels
from medtextseg.config import read_config
from medtextseg.data.io import (
    IMAGE_SUFFIXES,
    ImageReadError,
    image_size,
    read_image,
    write_png_atomic,
)
from medtextseg.data.module import eval_batch_size, make_dataset, make_loader
from medtextseg.data.names import near_pairs
from medtextseg.data.problems import DataError, Problem
from medtextseg.data.sample import Sample
from medtextseg.engine import (
    CONFIG_FILE,
    load_run,
    predict_logits,
    resolve_checkpoint,
    resolve_device,
    upsample_to,
)
from medtextseg.metrics import binarize
from medtextseg.utils import atomic_write_bytes

OUT_DIRS = ("masks", "overlays")
LEGEND = "legend.png"
OS_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})
TEXT_COLUMNS = ("image", "text")


class OutputError(ValueError):
    """The ``--out`` folder cannot be used as asked (not empty, foreign files, overlaps the inputs)."""


def overlay(image: np.ndarray, mask: np.ndarray, num_classes: int = 1) -> np.ndarray:
    """``[H, W, 3]`` uint8 image + ``[H, W]`` labels -> ``[H, W, 3]`` uint8 with the foreground
    tinted (binary, any non-zero label: red; K >= 2: each class id its palette colour,
    :func:`medtextseg.classes.overlay_labels`)."""
    return overlay_labels(image, mask, num_classes)


def _is_legend_tmp(name: str) -> bool:
    """The temp file an interrupted atomic write of the legend leaves (utils.atomic_write_bytes)."""
    return name.startswith(f".{LEGEND}.") and name.endswith(".tmp")


def output_key(stem: str) -> str:
    """The name under which ``<stem>.png`` lands on a case-insensitive file system."""
    return unicodedata.normalize("NFC", stem).casefold()


def list_images(images: Path) -> list[Path]:
    """The image files directly inside ``images``, sorted by name."""
    if not images.exists():
        raise ValueError(f"--images {images} does not exist")
    if not images.is_dir():
        raise ValueError(f"--images {images} is not a folder; give the folder that holds the images")
    files = sorted(p for p in images.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"--images {images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


# ----------------------------------------------------------------------------- texts

@dataclass(frozen=True)
class TextRow:
    row: int  # line of the CSV, the header being row 1
    key: str  # the image column as written
    text: str | None  # None: the row is malformed and already reported


def read_text_table(path: Path) -> tuple[list[TextRow] | None, list[Problem]]:
    """Rows of a ``--texts`` CSV (columns ``image,text``, any case, other columns ignored).

    Returns ``(rows, problems)``; ``rows`` is None when the file cannot be used at all.
    """
    fix = ("make the first row of the CSV 'image,text' and add one row per image "
           "(image = file name or stem, text = its description)")
    if not path.is_file():
        return None, [Problem(path, "the --texts CSV does not exist" if not path.exists()
                              else "the --texts CSV is not a file", "give the path of a CSV file")]
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, [c.strip() for c in cells]) for cells in reader]
    except UnicodeDecodeError:
        return None, [Problem(path, "the --texts CSV is not UTF-8 text", "save it as CSV UTF-8")]
    except csv.Error as e:
        return None, [Problem(path, f"the --texts CSV cannot be parsed ({e})", fix)]
    lines = [(n, cells) for n, cells in lines if any(cells)]
    if not lines:
        return None, [Problem(path, "the --texts CSV is empty", fix)]
    header = [c.lower() for c in lines[0][1]]
    if not set(TEXT_COLUMNS) <= set(header):
        found = ",".join(lines[0][1])
        return None, [Problem(path, f"expected the columns image,text in the first row, found {found!r}", fix)]
    image_col, text_col = header.index("image"), header.index("text")
    rows, problems = [], []
    for n, cells in lines[1:]:
        if len(cells) > len(header):
            problems.append(Problem(path, f"row {n} has {len(cells)} fields but the header has {len(header)}",
                                    'put a text that contains commas in quotes: a.png,"left lung, lower lobe"'))
            if cells[image_col]:  # still matched, so its image is not also reported as lacking a row
                rows.append(TextRow(n, cells[image_col], None))
            continue
        cells = cells + [""] * (len(header) - len(cells))
        if not cells[image_col]:
            problems.append(Problem(path, f"row {n} has a text but no image name",
                                    f"write the image file name in column image of row {n}, or delete the row"))
            continue
        rows.append(TextRow(n, cells[image_col], cells[text_col]))
    return rows, problems


def _key_base(key: str) -> str:
    """A row's image name without folders."""
    return key.replace("\\", "/").rsplit("/", 1)[-1]


def _key_stem(key: str) -> str:
    """A row's image name without folders and without an image suffix."""
    base = _key_base(key)
    return Path(base).stem if Path(base).suffix.lower() in IMAGE_SUFFIXES else base


def _texts_from_table(files: list[Path], images: Path, texts: Path) -> tuple[dict[Path, str], list[Problem]]:
    """Match CSV rows to images by exact file name, else exact stem; report every mismatch."""
    rows, problems = read_text_table(texts)
    if rows is None:
        return {}, problems
    by_name = {p.name: [p] for p in files}
    by_stem: dict[str, list[Path]] = defaultdict(list)
    by_fold: dict[str, list[Path]] = defaultdict(list)
    for p in files:
        by_stem[p.stem].append(p)
        by_fold[output_key(p.name)].append(p)
        by_fold[output_key(p.stem)].append(p)
    matched: dict[Path, list[TextRow]] = defaultdict(list)
    excused: set[Path] = set()  # images whose row was reported as a near miss
    orphans: list[TextRow] = []  # rows that name no image
    for r in rows:
        targets = by_name.get(r.key) or by_stem.get(r.key)
        if targets:
            for p in targets:
                matched[p].append(r)
            continue
        near = by_fold.get(output_key(_key_base(r.key)), [])
        if near:
            excused.update(near)
            problems.append(Problem(texts, f"row {r.row} names {r.key!r}, but the image is {near[0].name!r}",
                                    f"write {near[0].name!r} (the file name only, same case) in column image "
                                    f"of row {r.row}"))
        else:
            orphans.append(r)
    # One problem for one misspelled name (cse_96_1 for case_96_1), not "no row" and "no image".
    lonely = [p for p in files if not matched.get(p) and p not in excused]
    pairs = near_pairs([p.stem for p in lonely], [_key_stem(r.key) for r in orphans])
    by_key_stem = {_key_stem(r.key): r for r in orphans}
    for p in lonely:
        r = by_key_stem.get(pairs.get(p.stem, ""))
        if r is not None:
            excused.add(p)
            orphans.remove(r)
            problems.append(Problem(texts, f"row {r.row} names {r.key!r}, but the image is {p.name!r}: one name "
                                    "misspelled?", f"write {p.name!r} in column image of row {r.row}, or rename "
                                    f"the image to match the row"))
    for r in orphans:
        problems.append(Problem(texts, f"row {r.row} names {r.key!r}, which is not an image in {images}",
                                "remove the row, or add the image"))
    chosen: dict[Path, str] = {}
    for p in files:
        found = matched.get(p, [])
        if not found:
            if p not in excused:
                problems.append(Problem(p, f"no text: {texts.name} has no row for this image",
                                        f"add a row '{p.name},<description>' to {texts}"))
        elif any(r.text is None for r in found):
            continue
        elif len({r.text for r in found}) > 1:
            numbers = ", ".join(str(r.row) for r in found)
            problems.append(Problem(texts, f"rows {numbers} all describe {p.name!r}, differently",
                                    f"keep one of rows {numbers} and delete the others"))
        elif not found[0].text:
            problems.append(Problem(texts, f"row {found[0].row} ({found[0].key!r}) has an empty text",
                                    f"write the description of {p.name} in column text of row {found[0].row}"))
        else:
            chosen[p] = found[0].text
    return chosen, problems


def _check_text_options(texts: Path | None, text: str | None) -> None:
    if texts is not None and text is not None:
        raise ValueError("give either --texts CSV or --text \"...\", not both")
    if texts is None and text is None:
        raise ValueError("give the image descriptions: --text \"...\" (one for all images) "
                         "or --texts CSV (columns image,text)")


def collect_inputs(images: Path, texts: Path | None, text: str | None) -> list[Sample]:
    """Pair every image with its text, checking everything that can be checked without the model.

    Args:
        images: folder of images (see :func:`list_images`).
        texts: CSV with a header row naming the columns ``image`` and ``text``; ``image`` is
            the file name (``a.png``) or the stem (``a``) of an image in ``images``, matched
            exactly (case included).
        text: one description for every image (exclusive with ``texts``).

    Raises:
        ValueError: not exactly one of ``texts`` / ``text``; ``images`` missing or without images.
        DataError: every input problem at once (see the module docstring).
    """
    _check_text_options(texts, text)
    files = list_images(images)
    problems: list[Problem] = []
    groups: dict[str, list[Path]] = defaultdict(list)
    for p in files:
        groups[output_key(p.stem)].append(p)
    for same in groups.values():
        if len(same) > 1:
            names = ", ".join(p.name for p in same)
            problems.append(Problem(same[0], f"{names} would all be written to one file, masks/{same[0].stem}.png "
                                             "(output names are the stem + .png, compared ignoring case)",
                                    f"rename all but one of {names}"))
    if text is not None:
        chosen = {p: text.strip() for p in files}
        if not text.strip():
            problems.append(Problem(Path("--text"), "the --text is empty",
                                    'give a description, e.g. --text "Bilateral pulmonary infection, two '
                                    'infected areas", or a --texts CSV with one row per image'))
    else:
        chosen, table_problems = _texts_from_table(files, images, texts)
        problems += table_problems
    for p in files:
        try:
            image_size(p, verify=True)
        except ImageReadError as e:
            problems.append(Problem(p, f"unreadable image: {e.reason}", e.fix or "re-export it as PNG, or move it out",
                                    kind=f"unreadable-image:{e.kind}"))
    if problems:
        raise DataError(problems, dataset=images)
    return [Sample(id=p.stem, image_path=p, mask_path=None, text=chosen[p], split="Test") for p in files]


# ----------------------------------------------------------------------------- output folder

def _is_inside(a: Path, b: Path) -> bool:
    """``a`` is ``b`` or inside it; compared by inode, so case-insensitive file systems and
    symlinked paths count too."""
    if not b.exists():
        return False
    return any(p.exists() and os.path.samefile(p, b) for p in (a, *a.parents))


def _foreign_entries(out: Path) -> list[Path]:
    """Entries of ``out`` that an earlier predict (finished or interrupted) did not write."""
    foreign = []
    for e in out.iterdir():
        if e.name in OS_JUNK:
            continue
        if e.name == LEGEND or _is_legend_tmp(e.name):
            if e.is_symlink() or not e.is_file():
                foreign.append(e)
            continue
        if e.name not in OUT_DIRS or e.is_symlink() or not e.is_dir():
            foreign.append(e)
            continue
        for f in e.iterdir():
            ours = f.suffix == ".png" or (f.name.startswith(".") and f.name.endswith(".tmp"))
            if f.name not in OS_JUNK and (f.is_symlink() or not f.is_file() or not ours):
                foreign.append(f)
    return foreign


def check_out(out: Path, images: Path, overwrite: bool) -> None:
    """Refuse an ``out`` that overlaps ``images``, is a file, or holds files (unless ``overwrite``
    and they are all predict's own). Reads only; clearing is :func:`clear_out`."""
    o, i = out.resolve(), images.resolve()
    if _is_inside(o, i) or _is_inside(i, o):
        raise OutputError(f"--out {out} and --images {images} overlap (one is inside the other); "
                          f"choose an --out outside {images}, e.g. {images.parent / (images.name + '_pred')}")
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a folder; choose a folder")
    held = sorted(e.name for e in out.iterdir() if e.name not in OS_JUNK)
    if not held:
        return
    if not overwrite:
        raise OutputError(f"--out {out} is not empty (holds {', '.join(held[:5])}); pass --overwrite to "
                          "replace the earlier predictions, or choose a new --out")
    foreign = _foreign_entries(out)
    if foreign:
        shown = ", ".join(str(p.relative_to(out)) for p in foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise OutputError(f"--out {out} holds files that predict did not write ({shown}); --overwrite only "
                          "replaces the masks/, overlays/ and legend.png of an earlier predict: choose another --out")


def clear_out(out: Path) -> None:
    """Delete ``out/masks``, ``out/overlays`` and the legend (checked to be predict's own by
    :func:`check_out`)."""
    for name in OUT_DIRS:
        if (out / name).is_dir():
            shutil.rmtree(out / name)
    if out.is_dir():
        for e in out.iterdir():
            if e.name == LEGEND or _is_legend_tmp(e.name):
                e.unlink()


# ----------------------------------------------------------------------------- predict

def predict(run_or_ckpt: Path, images: Path, out: Path, *, texts: Path | None = None, text: str | None = None,
            overwrite: bool = False, device: str | torch.device = "auto",
            batch_size: int | None = None, domain: str | None = None) -> list[Path]:
    """Predict a mask and an overlay for every image of ``images`` (rules: module docstring).

    Args:
        run_or_ckpt: run directory (its best checkpoint) or a ``.ckpt`` inside one.
        images: folder of images; every image directly inside it is predicted.
        out: output folder for ``masks/``, ``overlays/`` and (K >= 2) ``legend.png``; new or
            empty unless ``overwrite``.
        texts: CSV with columns ``image,text``; ``image`` is an image's file name (``a.png``)
            or stem (``a``), case-sensitive; one row per image.
        text: one description for every image (instead of ``texts``).
        overwrite: replace the outputs of an earlier predict in ``out``.
        device: ``"auto"`` (CUDA, else MPS, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:N"``, ``"mps"``.
        batch_size: images per forward pass (default: the run's ``data.eval_batch_size``); under the
            patch protocol, windows per forward pass (images go one at a time).
        domain: the images' domain (modality), one of the run's ``data.domains``; needed
            when the run was trained on several (composite data), ignored otherwise.

    Returns:
        The mask paths written, one per input image, in input (name) order.

    Raises:
        ValueError: bad arguments (device, batch size, text options, images folder).
        RunError: ``run_or_ckpt`` is not a trained run.
        OutputError: ``out`` cannot be used (see :func:`check_out`).
        DataError: every input problem at once; nothing is written.
    """
    images, out = Path(images), Path(out)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: give at least 1")
    dev = resolve_device(device) if not isinstance(device, torch.device) else device
    _, run = resolve_checkpoint(run_or_ckpt)  # a wrong run path fails before the images are read
    domains = read_config(run / CONFIG_FILE).data.domains if (run / CONFIG_FILE).is_file() else []
    if len(domains) > 1 and domain not in domains:
        raise ValueError(f"{run} was trained on {len(domains)} domains ({', '.join(domains)}): say which one "
                         f"the images are with --domain {domains[0]}"
                         + (f" (got {domain!r})" if domain is not None else ""))
    _check_text_options(texts, text)
    check_out(out, images, overwrite)
    samples = collect_inputs(images, Path(texts) if texts is not None else None, text)
    if len(domains) > 1:
        samples = [dataclasses.replace(s, domain=domain) for s in samples]

    method, cfg, encoder, _ = load_run(run_or_ckpt, device=dev)
    if cfg.data.patches and batch_size is not None:
        # Whole images go one at a time under the patch protocol; the batch is of windows.
        method.cfg.data.eval_batch_size = batch_size
    loader = make_loader(make_dataset(samples, encoder, cfg.data),
                         eval_batch_size(cfg.data) if cfg.data.patches else batch_size or cfg.data.eval_batch_size,
                         shuffle=False)
    clear_out(out)
    written: list[Path | None] = [None] * len(samples)
    k = cfg.data.num_classes
    if k > 1:
        atomic_write_bytes(out / LEGEND, legend_png(class_names(k, cfg.data.classes), k))

    @torch.inference_mode()
    def write(idx: int, logits: torch.Tensor) -> None:
        """``logits``: ``[1, K, h, w]`` float on CPU for ``samples[idx]``; writes the ``[H, W]``
        uint8 mask (binary {0, 255}; else class ids 0..K-1) at the image's own size H x W."""
        s = samples[idx]
        img = read_image(s.image_path)  # [H, W, 3] uint8
        # Logits, not labels, are resized: class boundaries at the image's size follow the
        # interpolated scores (argmax / threshold after upsampling).
        mask = binarize(upsample_to(logits, img.shape[:2]), cfg.data.threshold)[0, 0].to(torch.uint8).numpy()
        if k == 1:
            mask = mask * 255
        write_png_atomic(out / "overlays" / f"{s.id}.png", overlay(img, mask, k))
        written[idx] = write_png_atomic(out / "masks" / f"{s.id}.png", mask)

    # PNG decoding/encoding runs in threads (zlib and PIL release the GIL) while the
    # model computes the next batch; at most ``limit`` writes wait, bounding memory.
    workers = max(1, min(4, os.cpu_count() or 1))
    limit = 4 * workers
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="predict-write") as pool:
        def on_batch(batch: dict, logits: torch.Tensor) -> None:
            for j, idx in enumerate(batch["index"].tolist()):
                pending.append(pool.submit(write, idx, logits[j:j + 1]))
            while len(pending) > limit:
                pending.popleft().result()

        try:
            predict_logits(method, loader, on_batch)
            while pending:
                pending.popleft().result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    return [p for p in written if p is not None]
