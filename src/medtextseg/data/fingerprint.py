"""A dataset's identity, so that recorded figures always say which data produced them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from medtextseg.data.sample import Sample
from medtextseg.data.sources import DataArg, DataSources

FINGERPRINT_CHARS = 16


def _rel(path: Path | None, folders: Sequence[Path]) -> str:
    """``path`` relative to the innermost root folder that holds it (so each root of a
    composite dataset can move on its own), or as given when none does."""
    if path is None:
        return ""
    full = Path(path).absolute()
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):
        if full.is_relative_to(folder):
            return full.relative_to(folder).as_posix()
    return Path(path).as_posix()


def dataset_fingerprint(samples: Sequence[Sample], data: DataArg,
                        splits: Iterable[str] | None = None) -> str:
    """SHA-256 (first 16 hex digits) of the file list of ``samples``.

    Each sample contributes its split, its image and mask paths relative to its
    dataset root (its own root's folder for several roots), both files' sizes and its text, in a fixed order; so a copied or
    moved dataset keeps its fingerprint, while adding, removing, replacing a
    file or editing a description changes it. ``splits`` restricts it to those
    splits (the figures of ``Test`` depend on the Test files only). Samples of several
    domains also contribute their domain (a dataset of one domain keeps the fingerprint
    it had before composite data existed).
    """
    folders = DataSources.parse(data).folders
    several = len({s.domain for s in samples}) > 1
    keep = set(splits) if splits is not None else None
    lines = []
    for s in samples:
        if keep is not None and s.split not in keep:
            continue
        sizes = [str(os.path.getsize(p)) if p is not None and os.path.exists(p) else "-"
                 for p in (s.image_path, s.mask_path)]
        line = (s.split, _rel(s.image_path, folders), _rel(s.mask_path, folders), *sizes, s.text)
        lines.append("\t".join((s.domain, *line) if several else line))
    digest = hashlib.sha256("\n".join(sorted(lines)).encode("utf-8"))
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def domain_fingerprints(samples: Sequence[Sample], data: DataArg) -> dict[str, str]:
    """``{domain: fingerprint}``: each domain's samples fingerprinted as that root alone
    would be (:func:`dataset_fingerprint` of one domain has no domain column), so a model
    trained on one root is recognised inside a composite dataset and the other way round."""
    return {d: dataset_fingerprint([s for s in samples if s.domain == d], data)
            for d in sorted({s.domain for s in samples})}


def describe_data(samples: Sequence[Sample], data: DataArg, split: str,
                  fingerprint: str | None = None) -> dict:
    """``{"path", "name", "fingerprint", "split", "files"}`` recorded beside a split's
    figures: ``path`` is :meth:`DataSources.record` (a string, or a list of
    ``name=path`` for several roots), ``name`` its short label, ``fingerprint`` covers
    the whole dataset (pass it when already computed), ``split_fingerprint`` the
    scored split."""
    sources = DataSources.parse(data)
    return {"path": sources.record(), "name": sources.label,
            "fingerprint": fingerprint or dataset_fingerprint(samples, data),
            "split": split, "split_fingerprint": dataset_fingerprint(samples, data, [split]),
            "files": sum(s.split == split for s in samples)}


def data_label(described: dict | None) -> str:
    """``"cxr500 (1a2b3c4d)"`` for a :func:`describe_data` record (older ones lack ``name``)."""
    if not described:
        return "not recorded"
    name = described.get("name") or Path(str(described["path"])).name
    return f"{name} ({described['fingerprint'][:8]})"
