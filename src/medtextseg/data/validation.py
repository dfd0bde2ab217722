"""Validate a dataset before anything trains on it, reporting every problem at once.

:func:`validate_dataset` runs the reader (structure: which files and text rows
exist and pair up), :func:`check_samples` (contents: decodable files,
image/mask sizes, mask values, duplicate ids, empty text) and checks that the
splits a command needs hold images, then raises one :class:`DataError`
listing all problems, each with its file and a fix. :func:`dataset_notes`
tells what is not an error but changes what a command does (no Test split,
unlabeled Train images).

Class counts follow ``data.num_classes``: 1 means binary masks ({0, 255} or
{0, 1}); K >= 2 means label maps holding class ids 0..K-1, 0 = background.

``Problem`` and ``DataError`` live in :mod:`medtextseg.data.problems` and are
re-exported here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medtextseg.data.io import ImageReadError, image_size, read_mask
from medtextseg.data.problems import DataError, Problem
from medtextseg.data.readers import (
    check_split_names,
    explain_missing_split,
    read_dataset_with_problems,
)
from medtextseg.data.sample import Sample
from medtextseg.data.sources import DataArg, DataSources

__all__ = [
    "DataError",
    "Problem",
    "check_num_classes",
    "check_samples",
    "check_split_names",
    "class_presence",
    "dataset_notes",
    "validate_dataset",
]

_MAX_VALUES_SHOWN = 5
# A non-binary mask whose values are all below this, and few, looks like a label map.
_CLASS_ID_LIKE = 32
_JPEG_SUFFIXES = (".jpg", ".jpeg")


def _format_values(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:_MAX_VALUES_SHOWN])
    more = len(values) - _MAX_VALUES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def check_num_classes(num_classes: int) -> int:
    """``num_classes`` if it is 1 (binary) or K >= 2 (class ids 0..K-1); else ValueError."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ValueError(f"num_classes must be 1 (binary masks) or the number of classes K >= 2 including "
                         f"background, got {num_classes!r}")
    if num_classes > 256:
        raise ValueError(f"num_classes must be at most 256 (masks are 8-bit), got {num_classes}")
    return int(num_classes)


def _check_mask_values(mask_path: Path, mask: np.ndarray, num_classes: int) -> Problem | None:
    """``mask``: [H, W] uint8 raw values; ``num_classes`` as ``data.num_classes``."""
    # Fast paths first: a valid mask (the common case) needs only elementwise tests.
    if num_classes == 1:
        if not np.any((mask != 0) & (mask != 255)) or mask.max() <= 1:
            return None
    elif mask.max() < num_classes:
        return None
    # bincount is linear time, unlike np.unique's sort.
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    if num_classes == 1:
        message = f"mask is not binary: values {_format_values(present)} (expected {{0, 255}} or {{0, 1}})"
        if mask_path.suffix.lower() in _JPEG_SUFFIXES:
            return Problem(
                mask_path, message,
                "save the mask as PNG from its source: JPEG compression adds in-between values to masks "
                "(or threshold it, 255 where value >= 128, else 0, and save that as PNG)",
                kind="mask-not-binary:jpeg")
        if present.max() < _CLASS_ID_LIKE and len(present) <= 16:
            k = int(present.max()) + 1
            return Problem(
                mask_path, message,
                f"if these are class ids, set data.num_classes to {k} (K classes including background); "
                "if the mask is binary, set every foreground pixel to 255 (or 1)",
                kind="mask-not-binary:ids")
        return Problem(
            mask_path, message,
            "convert the mask to {0, 255} (e.g. 255 where value >= 128, else 0) and save it "
            "as PNG (JPEG adds in-between values)", kind="mask-not-binary")
    bad = present[present >= num_classes]
    if bad.size == 0:
        return None
    message = f"mask holds values {_format_values(bad)} outside the class ids 0..{num_classes - 1}"
    if set(present.tolist()) <= {0, 255}:
        # data.module.mask_to_labels keeps raw values for K >= 2: 255 is no class id.
        return Problem(
            mask_path, message + " (it looks like a binary {0, 255} mask)",
            f"set data.num_classes to 1 for binary masks, or store the classes as ids 0..{num_classes - 1}",
            kind="mask-class-ids:binary")
    if int(bad.max()) == 255:
        return Problem(
            mask_path, message,
            f"map the 255 pixels to one of the class ids 0..{num_classes - 1} (255 is often a boundary or "
            "'ignore' label; medtextseg has none)", kind="mask-class-ids:255")
    return Problem(
        mask_path, message,
        f"remap the mask to class ids 0..{num_classes - 1}, or set data.num_classes to "
        f"{int(bad.max()) + 1} if the masks have that many classes (including background)",
        kind="mask-class-ids")


def _unreadable(path: Path, what: str, exc: ImageReadError, generic_fix: str) -> Problem:
    return Problem(path, f"unreadable {what}: {exc.reason}", exc.fix or generic_fix,
                   kind=f"unreadable-{what}:{exc.kind}")


def _check_files(sample: Sample, num_classes: int) -> list[Problem]:
    problems: list[Problem] = []
    try:
        image_hw = image_size(sample.image_path, verify=True)
    except ImageReadError as exc:
        image_hw = None
        problems.append(_unreadable(sample.image_path, "image", exc,
                                    "re-export the image as PNG, JPEG or TIFF, or remove it from the dataset"))
    if sample.mask_path is None:
        return problems
    try:
        mask = read_mask(sample.mask_path)
    except ImageReadError as exc:
        problems.append(_unreadable(sample.mask_path, "mask", exc,
                                    "re-export the mask as a single-channel 8-bit PNG, or remove it"))
        return problems
    if image_hw is not None and mask.shape != image_hw:
        (mh, mw), (ih, iw) = mask.shape, image_hw
        problems.append(Problem(
            sample.mask_path,
            f"mask is {mh}x{mw} (HxW) but its image {sample.image_path.name} is {ih}x{iw}",
            f"resize the mask to {ih}x{iw} with nearest-neighbour interpolation, or pair it "
            "with the right image", kind="mask-size"))
    value_problem = _check_mask_values(sample.mask_path, mask, num_classes)
    if value_problem is not None:
        problems.append(value_problem)
    return problems


def _check_duplicates(samples: Sequence[Sample]) -> list[Problem]:
    problems = []
    first: dict[tuple[str, str], Sample] = {}
    for sample in samples:
        key = (sample.split, sample.id)
        if key not in first:
            first[key] = sample
            continue
        other = first[key]
        if Path(other.image_path) == Path(sample.image_path):
            problems.append(Problem(
                sample.image_path, f"listed twice in the {sample.split} split",
                "remove the second entry", kind="listed-twice"))
        else:
            problems.append(Problem(
                sample.image_path,
                f"id {sample.id!r} is used twice in the {sample.split} split: "
                f"{other.image_path.name} and {sample.image_path.name}",
                f"rename or remove one of {other.image_path.name} and {sample.image_path.name}",
                kind="duplicate-id"))
    return problems


def _default_workers() -> int:
    # Decoding is in C with the GIL released, and file access waits on I/O: a few
    # threads beyond the core count keep both busy.
    return min(16, (os.cpu_count() or 1) + 2)


def check_samples(
    samples: Iterable[Sample],
    num_classes: int = 1,
    *,
    check_text: bool = True,
    workers: int | None = None,
) -> list[Problem]:
    """Check the files behind samples; never stops at the first problem.

    Per sample: the image is intact (header size plus a cheap integrity check,
    see :func:`medtextseg.data.io.image_size`; pixels are not decoded for PNG);
    an empty (0-byte), truncated or non-image file is named as such; the mask,
    if any, decodes, has the image's size, and holds valid values
    (``num_classes`` = 1, binary: a subset of {0, 255} or {0, 1}; K >= 2: class
    ids 0..K-1, so a {0, 255} mask is wrong for K = 2). Across samples: no id
    twice within a split. Text: not empty or whitespace (``check_text``).

    Args:
        samples: the samples to check.
        num_classes: 1 for binary masks ({0, 255} or {0, 1}); K >= 2 for label maps with
            class ids 0..K-1 (0 = background), as ``data.num_classes``.
        check_text: also report empty texts; :func:`validate_dataset` turns it
            off because the reader already reports them with their table row.
        workers: threads for the file checks; default a few more than CPU cores.

    Returns:
        Problems in sample order (each distinct problem once), then duplicate ids.

    Raises:
        ValueError: ``num_classes`` is not 1 or K >= 2.
    """
    num_classes = check_num_classes(num_classes)
    samples = list(samples)
    workers = workers or _default_workers()
    if workers > 1 and len(samples) > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            per_sample = list(pool.map(lambda s: _check_files(s, num_classes), samples))
    else:
        per_sample = [_check_files(s, num_classes) for s in samples]
    # Samples can share a file (a.png and a.tif both pair with mask a.png): report it once.
    problems = list(dict.fromkeys(p for found in per_sample for p in found))
    if check_text:
        for sample in samples:
            if not sample.text.strip():
                problems.append(Problem(
                    sample.image_path, f"empty text for {sample.id!r} ({sample.split})",
                    f"write a description of {sample.image_path.name}", kind="empty-text"))
    problems += _check_duplicates(samples)
    return problems


def _missing_splits(path: DataArg, samples: Sequence[Sample], need: Sequence[str],
                    problems: Sequence[Problem]) -> list[Problem]:
    present = {s.split for s in samples}
    already = {Path(p.file) for p in problems if p.kind == "no-img-folder"}
    out = []
    for split in need:
        if split in present:
            continue
        place, reason, fix = explain_missing_split(path, split)
        if place in already:
            continue  # the reader said it: "<Split>_Folder has no img/ folder"
        out.append(Problem(place, f"the {split} split is missing or has no images: {reason}; this command "
                                  "needs it", fix, kind="split-needed"))
    return out


def validate_dataset(
    path: DataArg,
    *,
    num_classes: int = 1,
    require_masks_in: Iterable[str] = ("Val", "Test"),
    need_splits: Iterable[str] = (),
    domain: str | None = None,
    workers: int | None = None,
) -> list[Sample]:
    """Read a dataset and check all of it.

    Checks the structure (see
    :func:`medtextseg.data.readers.read_dataset_with_problems`), the files'
    contents (see :func:`check_samples`), and that every split of
    ``need_splits`` exists and holds images (the problem names the folder or
    manifest looked in and the fix). Split names and ``num_classes`` are checked
    before any file is read.

    Args:
        path: an LViT-layout folder or a ``.csv`` manifest, or several (a composite
            dataset: :mod:`medtextseg.data.sources`); a split is missing when no root has it.
        num_classes: 1 for binary masks ({0, 255} or {0, 1}); K >= 2 for label maps with
            class ids 0..K-1 (0 = background), as ``data.num_classes``.
        require_masks_in: splits whose images must all have masks.
        need_splits: splits the command needs (training: ``("Train", "Val")``;
            evaluation: the splits evaluated); default none.
        domain: see :func:`medtextseg.data.readers.read_dataset`.
        workers: threads for the file checks (see :func:`check_samples`).

    Returns:
        The samples, when nothing is wrong.

    Raises:
        DataError: listing every problem found (structure, contents, needed splits).
        DatasetError: the path is not a dataset at all.
        ValueError: an unknown split name (``"unknown split 'X'; use Train, Val or
            Test"``) or a ``num_classes`` below 1.
    """
    num_classes = check_num_classes(num_classes)
    need = check_split_names(need_splits)
    samples, problems = read_dataset_with_problems(
        path, domain=domain, require_masks_in=require_masks_in)
    problems += check_samples(samples, num_classes, check_text=False, workers=workers)
    problems += _missing_splits(path, samples, need, problems)
    if problems:
        sources = DataSources.parse(path)
        raise DataError(problems, sources.base if sources.composite else sources.roots[0][1])
    return samples


def _consequence(split: str, need: Sequence[str]) -> str:
    if split == "Test":
        if "Val" in need:
            return "training will select on Val and report no Test figures"
        return "no Test figures will be reported"
    if split == "Val":
        return "no Val figures will be reported, and training cannot select a best checkpoint"
    return "there are no Train images"


def class_presence(samples: Sequence[Sample], num_classes: int) -> dict[str, np.ndarray]:
    """Per split (Train, Val, Test, those with labeled images): ``[K]`` int, how many of its
    masks contain each class id 0..K-1. ``samples`` must have passed :func:`check_samples`
    (every mask holds ids below K)."""
    labeled = [s for s in samples if s.labeled]
    counts = {sp: np.zeros(num_classes, int) for sp in ("Train", "Val", "Test") if any(s.split == sp for s in labeled)}

    def present(s: Sample) -> np.ndarray:
        return np.bincount(read_mask(s.mask_path).ravel(), minlength=num_classes)[:num_classes] > 0

    # PNG decoding releases the GIL: threads read the masks in parallel.
    with ThreadPoolExecutor(4) as pool:
        for s, has in zip(labeled, pool.map(present, labeled), strict=True):
            counts[s.split] += has
    return counts


def dataset_notes(
    samples: Sequence[Sample],
    *,
    data: DataArg | None = None,
    need_splits: Iterable[str] = ("Train", "Val"),
    optional_splits: Iterable[str] = ("Test",),
) -> list[str]:
    """Facts about a valid dataset that are not errors but change what a command does.

    Notes, in this order:

    - each split of ``optional_splits`` (not also in ``need_splits``) that has no
      images: ``"no Test split (Test_Folder/ not found): training will select on
      Val and report no Test figures"`` (the part in parentheses says where it
      was looked for, and is there only when ``data`` is given);
    - Train images without a mask: ``"N Train images have no mask: supervised
      presets skip them; semi-supervised presets use them as unlabeled"``, or,
      when no Train image has one, that no preset has labeled images to train on.

    Args:
        samples: the dataset's samples (as :func:`validate_dataset` returns them).
        data: the dataset path, to say where a missing split was looked for.
        need_splits: splits the command needs (a missing one is a problem, not a note).
        optional_splits: splits the command uses when present.

    Returns:
        Human-readable sentences, no trailing full stop; empty when there is nothing to say.

    Raises:
        ValueError: an unknown split name.
    """
    need = check_split_names(need_splits)
    optional = [s for s in check_split_names(optional_splits) if s not in need]
    present = {s.split for s in samples}
    notes = []
    for split in optional:
        if split in present:
            continue
        where = ""
        if data is not None:
            try:
                where = f" ({explain_missing_split(data, split)[1]})"
            except OSError:  # the note is a courtesy: a folder that cannot be listed gets none
                where = ""
        notes.append(f"no {split} split{where}: {_consequence(split, need)}")
    domains = sorted({s.domain for s in samples})
    if len(domains) > 1:
        for domain in domains:
            have = {s.split for s in samples if s.domain == domain}
            lacking = [split for split in (*need, *optional) if split in present and split not in have]
            if lacking:
                notes.append(f"domain {domain!r} has no {' or '.join(lacking)} images: its per-domain "
                             f"{' and '.join(lacking)} figures will be missing")
    train = [s for s in samples if s.split == "Train"]
    unlabeled = sum(not s.labeled for s in train)
    if train and unlabeled == len(train):
        notes.append(f"none of the {len(train)} Train images has a mask: supervised presets have nothing to "
                     "train on, and semi-supervised presets need some labeled images too")
    elif unlabeled:
        notes.append(f"{unlabeled} Train images have no mask: supervised presets skip them; "
                     "semi-supervised presets use them as unlabeled")
    return notes
