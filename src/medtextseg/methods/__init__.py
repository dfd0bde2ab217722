"""Training methods, one file each. A method is a LightningModule class that owns
its training step; register it here by name (the preset's ``method:`` key)."""

from __future__ import annotations

from medtextseg.methods.base import NonFiniteLossError, SegMethod
from medtextseg.methods.dusss import DuSSS
from medtextseg.methods.lvit_semi import LViTSemi
from medtextseg.methods.mean_teacher import MeanTeacher
from medtextseg.methods.promptssl import PromptSSL
from medtextseg.methods.supervised import Supervised
from medtextseg.methods.textmoe import TextMoE

METHODS: dict[str, type[SegMethod]] = {"supervised": Supervised, "lvit_semi": LViTSemi, "mean_teacher": MeanTeacher,
                                     "dusss": DuSSS, "textmoe": TextMoE, "promptssl": PromptSSL}


def method_class(name: str) -> type[SegMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


__all__ = ["METHODS", "NonFiniteLossError", "SegMethod", "method_class"]
