"""Vision-language pre-training modules (DESIGN §2), one file each.

A pre-training preset names its module with ``pretrain: <name>``; the module joins
the toolkit by one entry in :data:`PRETRAINERS` (the name a preset uses -> its
:class:`~medtextseg.pretrain.base.PretrainModule` subclass). ``medtextseg pretrain``
trains it; ``medtextseg train`` refuses such a preset.
"""

from __future__ import annotations

from medtextseg.pretrain.base import PretrainModule
from medtextseg.pretrain.dusss import DuSSSPretrain
from medtextseg.pretrain.glsc import GLscPretrain

PRETRAINERS: dict[str, type[PretrainModule]] = {"dusss": DuSSSPretrain, "glsc": GLscPretrain}


def pretrain_class(name: str) -> type[PretrainModule]:
    if name not in PRETRAINERS:
        raise ValueError(f"unknown pre-training module {name!r}; available: {', '.join(sorted(PRETRAINERS))}")
    return PRETRAINERS[name]


__all__ = ["PRETRAINERS", "PretrainModule", "pretrain_class"]
