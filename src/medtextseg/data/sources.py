"""Where a run's data comes from: one dataset root, or several (a composite dataset).

Every command that takes data takes ``--data`` one or more times. Each root is an
LViT-layout folder or a CSV manifest and is one *domain* (modality) of the run,
named after its folder (a manifest: its folder, or its ``domain`` column) or
explicitly as ``name=PATH``::

    --data data/cxr --data data/ct            # domains "cxr" and "ct"
    --data xray=/mnt/qata --data ct=/mnt/mosmed
    --data manifest.csv                       # domains from its domain column

When the samples span more than one domain their ids are qualified as
``<domain>/<stem>`` (:func:`qualify_ids`), so two roots that both hold
``case_1.png`` do not collide in validation, splits, per-image rows or banks; a
dataset of one domain keeps plain stems, as before composite data existed.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medtextseg.data.sample import Sample

__all__ = ["ID_SEPARATOR", "DataArg", "DataSources", "domain_names", "qualify_ids"]

#: Between the domain and the file stem of a qualified id (``"cxr/covid_1"``).
ID_SEPARATOR = "/"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")

@dataclass(frozen=True)
class DataSources:
    """One or more dataset roots, in the order given.

    Attributes:
        roots: ``(name, path)`` per root; ``name`` is the domain a user gave with
            ``name=PATH``, or None (the reader names it after the folder, or a
            manifest's ``domain`` column does); ``path`` is absolute.
    """

    roots: tuple[tuple[str | None, Path], ...]

    @classmethod
    def parse(cls, data) -> DataSources:
        """A path, a ``name=PATH`` string, a list of them, a run.json ``data`` record
        (a string or a list), or a :class:`DataSources` -> :class:`DataSources`.

        A string that names an existing file or folder is a path even if it holds ``=``.

        Raises:
            ValueError: no root; a malformed name; two roots with the same name or path.
        """
        if isinstance(data, DataSources):
            return data
        items = [data] if isinstance(data, (str, os.PathLike)) else list(data or [])
        if not items:
            raise ValueError("no dataset given; pass --data DIR (repeat it for a composite dataset)")
        roots: list[tuple[str | None, Path]] = []
        for item in items:
            text = os.fspath(item)
            name: str | None = None
            if "=" in text and not Path(text).expanduser().exists():
                name, text = text.split("=", 1)
                name = name.strip()
                if not _NAME.match(name):
                    raise ValueError(f"--data {os.fspath(item)!r}: {name!r} is not a domain name; write "
                                     "NAME=PATH with a name of letters, digits, '_', '.', '+' or '-'")
            roots.append((name, Path(text).expanduser().absolute()))
        paths = [p for _, p in roots]
        twice = sorted({str(p) for p in paths if paths.count(p) > 1})
        if twice:
            raise ValueError(f"--data {twice[0]} is given twice; give each dataset root once")
        out = cls(tuple(roots))
        if len(roots) > 1:
            names = [out.default_name(i) for i in range(len(roots))]
            clash = sorted({n for n in names if names.count(n) > 1})
            if clash:
                raise ValueError(
                    f"two dataset roots are both named {clash[0]!r} (after their folders); name them: "
                    f"--data {clash[0]}_a=PATH --data {clash[0]}_b=PATH")
        return out

    @property
    def composite(self) -> bool:
        return len(self.roots) > 1

    def default_name(self, i: int) -> str:
        """The domain of root ``i`` unless a manifest's column says otherwise."""
        name, path = self.roots[i]
        return name or (path.parent.name if path.suffix.lower() == ".csv" else path.name)

    @property
    def label(self) -> str:
        """A short name for folder names and tables: the dataset's (or a manifest's) folder
        name, as before composite data existed; ``cxr+ct`` for several roots."""
        if not self.composite:
            return self.folders[0].name
        return "+".join(self.default_name(i) for i in range(len(self.roots)))

    @property
    def folders(self) -> list[Path]:
        """Each root's folder: the dataset folder, or a manifest's folder."""
        return [p.parent if p.suffix.lower() == ".csv" else p for _, p in self.roots]

    @property
    def base(self) -> Path:
        """The folder that file names are taken relative to (fingerprints, messages): the
        dataset folder or a manifest's folder; for several roots, their common folder."""
        folders = self.folders
        if len(folders) == 1:
            return folders[0]
        return Path(os.path.commonpath([str(f) for f in folders]))

    def record(self) -> str | list[str]:
        """What ``run.json`` keeps (``parse`` reads it back): the path for one unnamed root
        (as before composite data), else ``["name=path", ...]``."""
        if not self.composite and self.roots[0][0] is None:
            return str(self.roots[0][1])
        return [f"{name}={p}" if name else str(p) for name, p in self.roots]

    def __str__(self) -> str:
        rec = self.record()
        return rec if isinstance(rec, str) else " + ".join(rec)


#: What data-taking functions accept (see :meth:`DataSources.parse`).
DataArg = str | os.PathLike | Sequence[str | os.PathLike] | DataSources


def domain_names(samples: Sequence[Sample]) -> list[str]:
    """The sorted domain names of ``samples``: the order of the one-hot modality indicator."""
    return sorted({s.domain for s in samples})


def qualify_ids(samples: Sequence[Sample]) -> list[Sample]:
    """``id -> "<domain>/<id>"`` when the samples span more than one domain; unchanged otherwise."""
    if len({s.domain for s in samples}) <= 1:
        return list(samples)
    return [dataclasses.replace(s, id=f"{s.domain}{ID_SEPARATOR}{s.id}") for s in samples]
