"""K-fold cross-validation over Train + Val: a selection protocol for small datasets.

On MoNuSeg (24 Train + 6 Val images) one fixed Val split of six images decides
which checkpoint and which model "wins" by noise. Cross-validation pools Train
and Val, cuts the labeled images into ``k`` folds and trains ``k`` runs, each
validated on one fold and trained on the rest, so every labeled image is
validated on exactly once and figures come as mean ± std over folds.

A fold assignment depends only on the samples' keys ``(domain, split, id)``,
``k`` and the seed, never on the order the reader returned them in, nor on the
model: every model cross-validated with the same ``k`` and seed sees the same
folds (like :mod:`medtextseg.data.splits`, a seeded shuffle of the sorted keys).
The Test split is not part of the folds; :func:`write_fold_manifests` can add it
to every fold unchanged.

Folds are stratified by domain: the labeled images of each domain are shuffled
separately and dealt round-robin to the folds, one domain after the other with
the deal continuing where the previous domain stopped, so fold sizes differ by
at most one overall and within every domain.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from medtextseg.data.sample import Sample
from medtextseg.utils import atomic_write_text

__all__ = ["FOLDS_FILE", "FoldError", "fold_file", "kfold", "write_fold_manifests"]

FOLDS_FILE = "folds.json"
POOLED_SPLITS = ("Train", "Val")
MANIFEST_COLUMNS = ("image", "mask", "text", "split", "domain")


class FoldError(ValueError):
    """A ``k`` or a dataset that cannot be cut into folds."""


def _key(s: Sample) -> tuple[str, str, str]:
    return (s.domain, s.split, s.id)


def _name(s: Sample) -> str:
    """How folds.json names a sample: ``<domain>/<original split>/<id>``."""
    return "/".join(_key(s))


def fold_file(out: str | os.PathLike, i: int) -> Path:
    """The manifest of fold ``i`` (0-based) in ``out``: ``out/fold_<i>.csv``."""
    return Path(out) / f"fold_{i}.csv"


def kfold(samples: Sequence[Sample], k: int, seed: int) -> list[tuple[list[Sample], list[Sample]]]:
    """Cut the Train + Val samples into ``k`` folds; return ``(train, val)`` per fold.

    Contract:

    - Pooled: every sample whose split is Train or Val; Test samples are ignored.
    - Only labeled samples (``mask_path`` not None) are dealt to folds: validation
      needs masks. An unlabeled sample is in the ``train`` list of every fold and
      in no ``val`` list.
    - Disjoint and covering: the ``val`` lists of the ``k`` folds are disjoint
      and their union is the set of labeled pooled samples; fold ``i``'s
      ``train`` is every other pooled sample (the labeled ones of the other
      folds plus all unlabeled ones), so ``train + val`` is the whole pool.
    - Balanced: ``val`` sizes differ by at most one, overall and per domain.
    - Seeded and order-independent: the result depends only on the set of keys
      ``(domain, split, id)``, ``k`` and ``seed``; both lists of every fold are
      sorted by that key. Same seed, same folds; another seed, (almost always)
      other folds.
    - The samples are returned unchanged: ``split`` still names the sample's
      original split (a Val image in a training fold still says ``"Val"``);
      :func:`write_fold_manifests` writes the fold's own split.

    Args:
        samples: a dataset's samples, e.g. from
            :func:`medtextseg.data.readers.read_dataset`.
        k: number of folds, 2 <= k <= number of labeled pooled samples.
        seed: the fold seed (independent of the training seed).

    Raises:
        FoldError: ``k`` out of range, or two pooled samples of one domain share
            an id (a Train and a Val image with the same file stem would become
            duplicate ids in one fold; rename one of them).

    Example::

        folds = kfold(read_dataset("data/MoNuSeg"), k=5, seed=0)
        train, val = folds[0]      # 24 and 6 of MoNuSeg's 30 Train + Val images
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise FoldError(f"k must be an integer >= 2, got {k!r} (e.g. k=5)")
    pool = sorted((s for s in samples if s.split in POOLED_SPLITS), key=_key)
    seen: dict[tuple[str, str], Sample] = {}
    for s in pool:
        other = seen.setdefault((s.domain, s.id), s)
        if other is not s:
            raise FoldError(f"id {s.id!r} of domain {s.domain!r} is both a {other.split} image ({other.image_path}) "
                            f"and a {s.split} image ({s.image_path}); pooled Train + Val ids must be unique: "
                            "rename one of the two files")
    labeled = [s for s in pool if s.labeled]
    if k > len(labeled):
        raise FoldError(f"k={k} folds need at least {k} labeled Train + Val images, the dataset has {len(labeled)}; "
                        f"use k <= {len(labeled)}")
    fold_of: dict[tuple[str, str, str], int] = {}
    position = 0
    for domain in sorted({s.domain for s in labeled}):
        order = [_key(s) for s in labeled if s.domain == domain]  # sorted: pool is
        random.Random(f"kfold/{seed}/{domain}").shuffle(order)
        for key in order:
            fold_of[key] = position % k
            position += 1
    out = []
    for i in range(k):
        val = [s for s in labeled if fold_of[_key(s)] == i]
        train = [s for s in pool if fold_of.get(_key(s)) != i]
        out.append((train, val))
    return out


def _manifest(rows: list[tuple[Sample, str]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(MANIFEST_COLUMNS)
    for s, split in rows:
        writer.writerow([str(Path(s.image_path).absolute()),
                         str(Path(s.mask_path).absolute()) if s.mask_path is not None else "",
                         s.text, split, s.domain])
    return buf.getvalue()


def _canonical(path: Path, text: str) -> object:
    """What a fold file means, whatever spelling of the dataset's path wrote it.

    The same dataset reached as ``../shared/data/X`` and ``/work/shared/data/X``
    writes different bytes but the same folds: paths are compared resolved
    (``..`` and symlinks followed), everything else as written. Only for
    comparing; the files keep the paths as given, so ids read back from a
    manifest are the original file names even where those are symlinks.
    """
    def same_file(p: str) -> str:
        return str(Path(p).resolve()) if p else p

    try:
        if path.name == FOLDS_FILE:
            record = json.loads(text)
            return {**record, "data": same_file(record.get("data", ""))}
        rows = list(csv.reader(io.StringIO(text)))
        return rows[:1] + [[same_file(r[0]), same_file(r[1]), *r[2:]] for r in rows[1:]]
    except (ValueError, AttributeError, IndexError):  # not a file we wrote: compare it as it is
        return text


def write_fold_manifests(data: str | os.PathLike, k: int, seed: int, out: str | os.PathLike,
                         test: str = "test") -> list[Path]:
    """Validate ``data``, cut it with :func:`kfold` and write one CSV manifest per fold.

    Writes ``out/fold_<i>.csv`` for ``i`` in ``0..k-1`` (columns
    ``image,mask,text,split,domain``, absolute paths, empty ``mask`` for an
    unlabeled image): the fold's training samples as split ``train`` (Train
    and Val images alike), its validation fold as ``val``, and, with
    ``test="test"``, every original Test sample as ``test`` (the same rows in
    every fold); ``test="none"`` writes no Test rows. Rows are sorted by
    ``(domain, original split, id)`` within each split, so the files depend only
    on the dataset, ``k`` and ``seed``. Each sample keeps its domain, so
    ``read_dataset(fold_csv)`` gives back the original ids and domains.

    Also writes ``out/folds.json``: ``{"k", "seed", "data", "test", "folds":
    [{"val": [...], "train": [...]}, ...]}``, samples named
    ``<domain>/<original split>/<id>``.

    Files are written atomically. An existing file with the same content is
    kept, also where another spelling of the same path wrote it (``..``,
    symlinks: paths are compared resolved); one with different content
    (another dataset, ``k``, seed or ``test``) raises :class:`FileExistsError` naming it, before anything is
    written, so runs trained on old folds are never silently mixed with new ones.

    Args:
        data: an LViT-layout folder or a CSV manifest (validated with
            :func:`medtextseg.data.validation.validate_dataset` and its
            defaults: Val and Test images need masks).
        k, seed: see :func:`kfold`.
        out: the folder for the manifests (created if needed).
        test: ``"test"`` or ``"none"``.

    Returns:
        The ``k`` manifest paths, fold 0 first.

    Raises:
        DataError: the dataset failed validation. DatasetError: not a dataset.
        FoldError: see :func:`kfold`. ValueError: an unknown ``test``.
        FileExistsError: a file in ``out`` holds different folds.
    """
    from medtextseg.data.validation import validate_dataset

    if test not in ("test", "none"):
        raise ValueError(f"test must be 'test' (add the Test split to every fold) or 'none', got {test!r}")
    data = Path(data).expanduser().absolute()
    out = Path(out)
    samples = validate_dataset(data)
    folds = kfold(samples, k, seed)
    tests = sorted((s for s in samples if s.split == "Test"), key=_key) if test == "test" else []
    files: dict[Path, str] = {}
    for i, (train, val) in enumerate(folds):
        rows = [(s, "train") for s in train] + [(s, "val") for s in val] + [(s, "test") for s in tests]
        files[fold_file(out, i)] = _manifest(rows)
    record = {"k": k, "seed": seed, "data": str(data), "test": test,
              "folds": [{"val": [_name(s) for s in val], "train": [_name(s) for s in train]} for train, val in folds]}
    files[out / FOLDS_FILE] = json.dumps(record, indent=2) + "\n"
    for path, text in files.items():
        if path.exists() and _canonical(path, path.read_text(encoding="utf-8")) != _canonical(path, text):
            raise FileExistsError(f"{path} exists and holds other folds (dataset, k, seed or test differ from "
                                  f"{data}, k={k}, seed={seed}, test={test}); use another folder or delete "
                                  f"{out} (and the runs trained on its folds)")
    for path, text in files.items():
        if not path.exists():
            atomic_write_text(path, text)
    return list(files)[:k]
