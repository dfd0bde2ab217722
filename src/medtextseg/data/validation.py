"""Validate a dataset before anything trains on it, reporting every problem at once.

:func:`validate_dataset` runs the reader (structure: which files and text rows
exist and pair up) and :func:`check_samples` (contents: decodable files,
image/mask sizes, mask values, duplicate ids, empty text), then raises one
:class:`DataError` listing all problems, each with its file and a fix.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtextseg.data.io import ImageReadError, image_size, read_mask
from medtextseg.data.sample import Sample

__all__ = ["DataError", "Problem", "check_samples", "validate_dataset"]

_MAX_VALUES_SHOWN = 5


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset.

    Attributes:
        file: the offending file (image, mask, text table or manifest).
        message: what is wrong, in words.
        fix: a concrete action that removes the problem.
    """

    file: Path
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.file}: {self.message} -> fix: {self.fix}"


class DataError(Exception):
    """A dataset failed validation.

    ``str()`` is a heading ``"N problem(s) found in <dataset>:"`` followed by
    one line ``"- <file>: <message> -> fix: <fix>"`` per problem; files inside
    the dataset folder are shown relative to it.

    Attributes:
        problems: every problem found, in a stable order.
        dataset: the dataset path that was validated (or None).
    """

    def __init__(self, problems: Sequence[Problem], dataset: str | os.PathLike | None = None):
        self.problems = list(problems)
        self.dataset = Path(dataset) if dataset is not None else None
        super().__init__(self._format())

    def __reduce__(self):
        return (type(self), (self.problems, self.dataset))

    def _format(self) -> str:
        where = f" in {self.dataset}" if self.dataset is not None else ""
        base = None
        if self.dataset is not None:
            base = self.dataset.absolute()
            if base.suffix.lower() == ".csv":
                base = base.parent
        lines = [f"{len(self.problems)} problem(s) found{where}:"]
        for problem in self.problems:
            shown = problem.file
            if base is not None:
                with contextlib.suppress(ValueError):  # outside the dataset: keep it whole
                    shown = Path(problem.file).absolute().relative_to(base)
            lines.append(f"- {shown}: {problem.message} -> fix: {problem.fix}")
        return "\n".join(lines)


def _format_values(values: np.ndarray) -> str:
    shown = ", ".join(str(int(v)) for v in values[:_MAX_VALUES_SHOWN])
    more = len(values) - _MAX_VALUES_SHOWN
    return shown + (f" and {more} more" if more > 0 else "")


def _check_mask_values(mask_path: Path, mask: np.ndarray, num_classes: int) -> Problem | None:
    """``mask``: [H, W] uint8 raw values."""
    # Fast paths first: a valid mask (the common case) needs only elementwise tests.
    if num_classes <= 2:
        if not np.any((mask != 0) & (mask != 255)) or mask.max() <= 1:
            return None
    elif mask.max() < num_classes:
        return None
    # bincount is linear time, unlike np.unique's sort.
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    if num_classes <= 2:
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
        f"remap the mask to class ids 0..{num_classes - 1}, or set num_classes to "
        f"{int(bad.max()) + 1}")


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
    num_classes: int = 2,
    *,
    check_text: bool = True,
    workers: int | None = None,
) -> list[Problem]:
    """Check the files behind samples; never stops at the first problem.

    Per sample: the image is intact (header size plus a cheap integrity check,
    see :func:`medtextseg.data.io.image_size`; pixels are not decoded for PNG);
    the mask, if any, decodes, has the image's size, and holds valid values
    (binary: a subset of {0, 255} or {0, 1}; ``num_classes > 2``: ids below
    ``num_classes``). Across samples: no id twice within a split. Text: not
    empty or whitespace (``check_text``).

    Args:
        samples: the samples to check.
        num_classes: 2 for binary masks, else the number of class ids.
        check_text: also report empty texts; :func:`validate_dataset` turns it
            off because the reader already reports them with their table row.
        workers: threads for the file checks; default a few more than CPU cores.

    Returns:
        Problems in sample order (each distinct problem once), then duplicate ids.
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
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
    num_classes: int = 2,
    require_masks_in: Iterable[str] = ("Val", "Test"),
    domain: str | None = None,
    workers: int | None = None,
) -> list[Sample]:
    """Read a dataset and check all of it.

    Args:
        path: an LViT-layout folder or a ``.csv`` manifest.
        num_classes: 2 for binary masks, else the number of class ids.
        require_masks_in: splits whose images must all have masks.
        domain: see :func:`medtextseg.data.readers.read_dataset`.
        workers: threads for the file checks (see :func:`check_samples`).

    Returns:
        The samples, when nothing is wrong.

    Raises:
        DataError: listing every problem found (structure and contents).
        DatasetError: the path is not a dataset at all.
    """
    # Imported here: the reader builds Problems, so it imports this module.
    from medtextseg.data.readers import read_dataset_with_problems

    samples, problems = read_dataset_with_problems(
        path, domain=domain, require_masks_in=require_masks_in)
    problems += check_samples(samples, num_classes, check_text=False, workers=workers)
    if problems:
        raise DataError(problems, path)
    return samples
