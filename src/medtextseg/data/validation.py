"""Validate a dataset before anything trains on it, reporting every problem at once.

:func:`validate_dataset` runs the reader (structure: which files and text rows
exist and pair up) and :func:`check_samples` (contents: decodable files,
image/mask sizes, mask values, duplicate ids, empty text), then raises one
:class:`DataError` listing all problems, each with its file and a fix.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from medtextseg.data.io import ImageReadError, image_size, read_mask
from medtextseg.data.problems import DataError, Problem
from medtextseg.data.readers import normalise_split, read_dataset_with_problems
from medtextseg.data.sample import Sample

__all__ = ["DataError", "Problem", "check_samples", "check_split_names", "dataset_notes", "validate_dataset"]

_MAX_VALUES_SHOWN = 5


def _format_values(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:_MAX_VALUES_SHOWN])
    more = len(values) - _MAX_VALUES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _check_mask_values(mask_path: Path, mask: np.ndarray, num_classes: int) -> Problem | None:
    """``mask``: [H, W] uint8 raw values."""
    # Fast paths first: a valid mask (the common case) needs only elementwise tests.
    if num_classes == 1:
        if not np.any((mask != 0) & (mask != 255)) or mask.max() <= 1:
            return None
    elif mask.max() < num_classes:
        return None
    # bincount is linear time, unlike np.unique's sort.
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    if num_classes == 1:
        return Problem(
            mask_path,
            f"mask is not binary: values {_format_values(present)} (expected {{0, 255}} or "
            "{0, 1})",
            "convert the mask to {0, 255} (e.g. 255 where value >= 128, else 0) and save it "
            "as PNG (JPEG adds in-between values)")
    bad = present[present >= num_classes]
    if bad.size == 0:
        return None
    return Problem(
        mask_path,
        f"mask holds values {_format_values(bad)} outside the class ids 0..{num_classes - 1}",
        f"remap the mask to class ids 0..{num_classes - 1}, or set data.num_classes to "
        f"{int(bad.max()) + 1}" + (" (or to 1 if it is a binary {0, 255} mask)" if num_classes == 2 else ""))


def _check_files(sample: Sample, num_classes: int) -> list[Problem]:
    problems: list[Problem] = []
    try:
        image_hw = image_size(sample.image_path, verify=True)
    except ImageReadError as exc:
        image_hw = None
        problems.append(Problem(
            sample.image_path, f"unreadable image ({exc.reason})",
            "re-export the image as PNG, JPEG or TIFF, or remove it from the dataset"))
    if sample.mask_path is None:
        return problems
    try:
        mask = read_mask(sample.mask_path)
    except ImageReadError as exc:
        problems.append(Problem(
            sample.mask_path, f"unreadable mask ({exc.reason})",
            "re-export the mask as a single-channel 8-bit PNG, or remove it"))
        return problems
    if image_hw is not None and mask.shape != image_hw:
        (mh, mw), (ih, iw) = mask.shape, image_hw
        problems.append(Problem(
            sample.mask_path,
            f"mask is {mh}x{mw} (HxW) but its image {sample.image_path.name} is {ih}x{iw}",
            f"resize the mask to {ih}x{iw} with nearest-neighbour interpolation, or pair it "
            "with the right image"))
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
                "remove the second entry"))
        else:
            problems.append(Problem(
                sample.image_path,
                f"id {sample.id!r} is used twice in the {sample.split} split: "
                f"{other.image_path.name} and {sample.image_path.name}",
                f"rename or remove one of {other.image_path.name} and {sample.image_path.name}"))
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
    the mask, if any, decodes, has the image's size, and holds valid values
    (``num_classes`` = 1, binary: a subset of {0, 255} or {0, 1}; K >= 2: ids
    below K). Across samples: no id twice within a split. Text: not
    empty or whitespace (``check_text``).

    Args:
        samples: the samples to check.
        num_classes: 1 for binary masks ({0, 255} or {0, 1}); K >= 2 for label maps with
            class ids 0..K-1 (0 = background), as ``data.num_classes``.
        check_text: also report empty texts; :func:`validate_dataset` turns it
            off because the reader already reports them with their table row.
        workers: threads for the file checks; default a few more than CPU cores.

    Returns:
        Problems in sample order (each distinct problem once), then duplicate ids.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be 1 (binary) or the number of classes K >= 2, got {num_classes}")
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
                    f"write a description of {sample.image_path.name}"))
    problems += _check_duplicates(samples)
    return problems


def validate_dataset(
    path: str | os.PathLike,
    *,
    num_classes: int = 1,
    require_masks_in: Iterable[str] = ("Val", "Test"),
    domain: str | None = None,
    workers: int | None = None,
    need_splits: Iterable[str] = (),
) -> list[Sample]:
    """Read a dataset and check all of it.

    Args:
        path: an LViT-layout folder or a ``.csv`` manifest.
        num_classes: 1 for binary masks ({0, 255} or {0, 1}); K >= 2 for label maps with
            class ids 0..K-1 (0 = background), as ``data.num_classes``.
        require_masks_in: splits whose images must all have masks.
        domain: see :func:`medtextseg.data.readers.read_dataset`.
        workers: threads for the file checks (see :func:`check_samples`).

    Returns:
        The samples, when nothing is wrong.

    Raises:
        DataError: listing every problem found (structure and contents).
        DatasetError: the path is not a dataset at all.
    """
    samples, problems = read_dataset_with_problems(
        path, domain=domain, require_masks_in=require_masks_in)
    problems += check_samples(samples, num_classes, check_text=False, workers=workers)
    for split in check_split_names(need_splits):
        if not any(s.split == split for s in samples):
            problems.append(Problem(
                Path(path), f"the {split} split is missing or has no images, and this command needs it",
                f"put {split} images in {split}_Folder/img/ (LViT layout) or add rows with split "
                f"{split.lower()} to the manifest"))
    if problems:
        raise DataError(problems, path)
    return samples


def check_split_names(names: Iterable[str]) -> list[str]:
    """``["test", "VAL"]`` -> ``["Test", "Val"]``; raises ValueError naming an unknown split."""
    if isinstance(names, str):
        names = [names]
    out = []
    for name in names:
        split = normalise_split(name)
        if split is None:
            raise ValueError(f"unknown split {name!r}; use Train, Val or Test")
        if split not in out:
            out.append(split)
    return out


def dataset_notes(samples: Sequence[Sample]) -> list[str]:
    """Facts about a valid dataset worth telling before training (not problems)."""
    notes = []
    unlabeled = sum(s.split == "Train" and not s.labeled for s in samples)
    if unlabeled:
        notes.append(f"{unlabeled} Train images have no mask: supervised presets skip them; "
                     "semi-supervised presets use them as unlabeled")
    if not any(s.split == "Test" for s in samples):
        notes.append("no Test split: training selects on Val and reports no Test figures")
    return notes
