"""Import the PromptSSL release's MRSpineSeg folds (HDF5) into the LViT layout.

The PromptSSL code ships each cross-validation fold as one HDF5 file
(``../shared/notes/reference-implementations.md``)::

    <fold>.h5
      train_sup/   mr [N, H, W], mask [N, H, W], weight, filename [N]   labeled slices
      train_weak/  the same                                              the "unlabeled" slices
      val/         the same                                              evaluation slices

with class ids 0..19 in the official order (background, S, L5 ... T9, then the nine discs
L5/S ... T9/T10), which is also :data:`medtextseg.data.synthetic.spine_mr.CLASS_NAMES`'s
order; the slice texts live apart, in a table keyed by the same names
(``train_val_text.xlsx``: ``Image, Description``).

:func:`import_hdf5_fold` turns one fold into an LViT-layout folder that every command
reads: ``train_sup`` -> ``Train`` with masks, ``train_weak`` -> ``Train`` *without*
masks (the release's unlabeled part; ``keep_weak_masks`` keeps them, so that
``--labeled-ratio`` draws its own split), ``val`` -> ``Val``, each slice with its text,
and ``classes.txt``. Choices where the format is silent, all stated here:

- ``mr`` is any numeric array; each slice is scaled to 0..255 by its own min and max
  (8-bit PNG; a constant slice becomes 0). ``[N, 1, H, W]`` and ``[N, H, W, 1]`` are
  squeezed.
- ``mask`` holds class ids (integers, or floats that are whole numbers) or is one-hot
  ``[N, K, H, W]`` (taken by argmax). A group without ``mask`` is unlabeled.
- ``weight`` (the release's loss weighting) is not used: medtextseg's losses weight
  nothing per pixel.
- ``filename`` entries (bytes or str) name the slices; a path or an image suffix is
  stripped. Texts are matched to them as the dataset reader matches rows: exactly, then
  ignoring letter case, then one unambiguous misspelling with the same numbers (the
  real table's ``cse_96_*`` rows).

Everything is checked before anything is written: every problem comes back at once in one
:class:`~medtextseg.data.problems.DataError`, and the folder is built next to ``out`` and
renamed into place (:class:`~medtextseg.data.synthetic.layout.LViTLayoutWriter`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medtextseg.classes import CLASSES_FILE, class_names
from medtextseg.data.names import near_pairs
from medtextseg.data.problems import DataError, Problem
from medtextseg.data.readers import _key_stem, _load_text_table
from medtextseg.utils import atomic_write_text

# HDF5 group -> (split, labeled) of the LViT layout.
GROUPS = {"train_sup": ("Train", True), "train_weak": ("Train", False), "val": ("Val", True)}
_FILE_FIX = "export the fold again with the PromptSSL release's data script, or fix the file"


@dataclass(frozen=True)
class _Slice:
    group: str
    index: int
    name: str  # file stem, e.g. case_12_7


def _h5py():
    try:
        import h5py
    except ImportError as e:  # pragma: no cover - h5py is a dependency
        raise RuntimeError("reading HDF5 needs h5py: pip install h5py") from e
    return h5py


def _image_2d(a: np.ndarray) -> np.ndarray:
    """``[H, W]``, ``[1, H, W]`` or ``[H, W, 1]`` -> ``[H, W]``."""
    if a.ndim == 3 and 1 in (a.shape[0], a.shape[-1]):
        a = a.reshape(a.shape[1:] if a.shape[0] == 1 else a.shape[:-1])
    return a


def to_uint8(slice_: np.ndarray) -> np.ndarray:
    """One MR slice ``[H, W]`` (any numeric dtype) -> uint8 by its own min and max."""
    a = np.asarray(slice_, dtype=np.float64)
    lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.round((np.nan_to_num(a, nan=lo) - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_class_ids(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """A mask slice -> ``[H, W]`` int64 class ids: one-hot ``[K, H, W]`` by argmax,
    else the values themselves (whole numbers). Range checks are the caller's."""
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == num_classes > 1:
        return m.argmax(axis=0).astype(np.int64)
    m = _image_2d(m)
    whole = np.issubdtype(m.dtype, np.integer) or (np.all(np.isfinite(m)) and np.all(m == np.round(m)))
    if not whole:
        raise ValueError("holds values that are not whole numbers (class ids)")
    return m.astype(np.int64)


def _decode(name) -> str:
    return (name.decode("utf-8") if isinstance(name, bytes) else str(name)).strip()


def _inspect(h5, path: Path, num_classes: int, keep_weak_masks: bool) -> tuple[list[_Slice], list[Problem]]:
    """The slices of every group and what is wrong with the file's structure and masks."""
    problems: list[Problem] = []
    present = [g for g in GROUPS if g in h5]
    if not present:
        found = ", ".join(sorted(h5.keys())) or "nothing"
        return [], [Problem(path, f"no group of a PromptSSL fold ({', '.join(GROUPS)}); the file holds {found}",
                            _FILE_FIX, kind="h5-no-groups")]
    if "val" not in present or not {"train_sup", "train_weak"} & set(present):
        problems.append(Problem(path, f"a fold needs val and train_sup or train_weak; it has {', '.join(present)}",
                                _FILE_FIX, kind="h5-missing-group"))
    slices: list[_Slice] = []
    for group in present:
        g = h5[group]
        where = f"/{group}"  # the file itself is the problem's file
        missing = [k for k in ("mr", "filename") if k not in g]
        if missing:
            problems.append(Problem(path, f"{where} has no {' or '.join(missing)} dataset", _FILE_FIX,
                                    kind="h5-missing-dataset"))
            continue
        n = len(g["mr"])
        shape = _image_2d(np.empty(g["mr"].shape[1:], dtype=np.uint8)).shape
        if len(shape) != 2:
            problems.append(Problem(path, f"{where}/mr has slices of shape {tuple(g['mr'].shape[1:])}; "
                                    "expected [N, H, W]", _FILE_FIX, kind="h5-mr-shape"))
            continue
        names = [_decode(x) for x in g["filename"][()]]
        if len(names) != n:
            problems.append(Problem(path, f"{where} has {n} slices in mr and {len(names)} file names",
                                    _FILE_FIX, kind="h5-length"))
            continue
        labeled = GROUPS[group][1] or keep_weak_masks
        if labeled and "mask" in g:
            if len(g["mask"]) != n:
                problems.append(Problem(path, f"{where} has {n} slices in mr and {len(g['mask'])} in mask",
                                        _FILE_FIX, kind="h5-length"))
                continue
            bad_ids: set[int] = set()
            for i in range(n):
                try:
                    ids = to_class_ids(g["mask"][i], num_classes)
                except ValueError as e:
                    problems.append(Problem(path, f"{where}/mask slice {i} ({names[i]}) {e}", _FILE_FIX,
                                            kind="h5-mask-values"))
                    break
                if ids.shape != shape:
                    problems.append(Problem(path, f"{where}/mask slice {i} ({names[i]}) is {ids.shape}, its "
                                            f"image {shape}", _FILE_FIX, kind="h5-mask-shape"))
                    break
                bad_ids.update(int(v) for v in np.unique(ids) if not 0 <= v < num_classes)
            if bad_ids:
                problems.append(Problem(
                    path, f"{where}/mask holds class ids {sorted(bad_ids)[:5]} outside 0..{num_classes - 1}",
                    f"pass the dataset's number of classes (--num-classes), or {_FILE_FIX}", kind="h5-class-ids"))
        slices += [_Slice(group, i, _key_stem(name)) for i, name in enumerate(names)]
    seen: dict[str, _Slice] = {}
    for s in slices:
        if s.name in seen:
            problems.append(Problem(path, f"{s.name!r} names a slice of {seen[s.name].group} and one of {s.group}",
                                    "give every slice its own file name", kind="h5-duplicate-name"))
        seen.setdefault(s.name, s)
    return slices, problems


def _match_texts(slices: list[_Slice], table_path: Path) -> tuple[dict[str, str], dict[str, str], list[Problem]]:
    """``{slice name: text}`` from the ``Image, Description`` table, ``{slice name: row key}``
    of the pairs made by a near name (reported, not guessed: :func:`near_pairs`), and the
    problems (slices without a text)."""
    table, problems = _load_text_table(table_path)
    if table is None:
        return {}, {}, problems
    texts: dict[str, str] = {}
    unmatched: list[str] = []
    for s in slices:
        rows = table.lookup([s.name]) or table.lookup_ignoring_case([s.name])
        if rows:
            texts[s.name] = rows[0].text
            table.used.update(r.row for r in rows)
        else:
            unmatched.append(s.name)
    free = [k for k, rows in table.rows_by_stem.items() if not any(r.row in table.used for r in rows)]
    near = near_pairs(unmatched, free)
    for name, key in near.items():
        texts[name] = table.rows_by_stem[key][0].text
    missing = [n for n in unmatched if n not in texts]
    if missing:
        shown = ", ".join(repr(n) for n in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        problems.append(Problem(table_path, f"no row for {len(missing)} slice(s) of the fold: {shown}",
                                "add a row (Image = the slice name, Description = its text) for each",
                                kind="no-row"))
    empty = [n for n, t in texts.items() if not t.strip()]
    if empty:
        problems.append(Problem(table_path, f"empty Description for {', '.join(map(repr, empty[:5]))}",
                                "write the slice's text in its Description cell", kind="empty-text"))
    return texts, near, problems


def import_hdf5_fold(
    h5_path: str | os.PathLike,
    texts: str | os.PathLike,
    out: str | os.PathLike,
    *,
    num_classes: int = 20,
    class_list: list[str] | None = None,
    keep_weak_masks: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write one PromptSSL HDF5 fold as an LViT-layout dataset (see the module docstring).

    Args:
        h5_path: the fold's ``.h5`` file.
        texts: the ``Image, Description`` table (xlsx or csv) keyed by the slices' names.
        out: the dataset folder to create (absent or empty unless ``overwrite``).
        num_classes: K, class ids 0..K-1 (MRSpineSeg: 20).
        class_list: K class names for ``classes.txt`` (default: the MRSpineSeg names when
            K = 20, else ``class 1`` ...).
        keep_weak_masks: keep ``train_weak``'s masks (labeled) instead of dropping them.
        overwrite: replace a non-empty ``out``.

    Returns:
        Summary: ``out``, images per split, labeled per split, unique texts, and the slices
        whose text row was keyed by a near name (``case_96_1 <- cse_96_1``).

    Raises:
        DataError: every problem of the file and the table, before anything is written.
        FileExistsError: ``out`` is not empty and ``overwrite`` is false.
    """
    from medtextseg.data.synthetic.layout import LViTLayoutWriter, png_bytes

    h5_path, table_path, out = Path(h5_path), Path(texts), Path(out)
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (class ids with background), got {num_classes}")
    names_of_classes = class_list or _default_class_names(num_classes)
    for p in (h5_path, table_path):
        if not p.is_file():
            raise DataError([Problem(p, "no such file", "check the path", kind="missing-file")])
    h5py = _h5py()
    try:
        h5 = h5py.File(h5_path, "r")
    except OSError as e:
        raise DataError([Problem(h5_path, f"cannot read it as HDF5 ({e})", _FILE_FIX, kind="h5-unreadable")]) from None
    with h5:
        slices, problems = _inspect(h5, h5_path, num_classes, keep_weak_masks)
        text_of, near, text_problems = _match_texts(slices, table_path) if slices else ({}, {}, [])
        problems += text_problems
        if problems:
            raise DataError(problems)
        counts: dict[str, list[int]] = {}
        with LViTLayoutWriter(out, overwrite=overwrite) as writer:
            for s in slices:
                g = h5[s.group]
                split, labeled = GROUPS[s.group]
                labeled = (labeled or keep_weak_masks) and "mask" in g
                image = to_uint8(_image_2d(np.asarray(g["mr"][s.index])))
                mask = to_class_ids(g["mask"][s.index], num_classes).astype(np.uint8) if labeled else None
                writer.add_encoded(split, f"{s.name}.png", png_bytes(image),
                                   png_bytes(mask) if mask is not None else None, text_of[s.name])
                c = counts.setdefault(split, [0, 0])
                c[0] += 1
                c[1] += int(labeled)
            atomic_write_text(writer.staging / CLASSES_FILE, "\n".join(names_of_classes) + "\n")
    return {"out": str(out), "splits": {k: v[0] for k, v in counts.items()},
            "labeled": {k: v[1] for k, v in counts.items()}, "unique texts": len(set(text_of.values())),
            "texts by a near name": ", ".join(f"{n} <- {k}" for n, k in sorted(near.items())) or "none"}


def _default_class_names(num_classes: int) -> list[str]:
    if num_classes == 20:
        from medtextseg.data.synthetic.spine_mr import CLASS_NAMES

        return list(CLASS_NAMES)
    return class_names(num_classes)


__all__ = ["GROUPS", "import_hdf5_fold", "to_class_ids", "to_uint8"]
