"""Training methods, one file each. A method is a LightningModule class that owns its
training step and names itself in its class statement, ``class Foo(SegMethod, method="foo")``
(the preset's ``method:`` key); every module here is imported once, so a new method is one
file and one preset, listed nowhere else."""

from __future__ import annotations

from medtextseg.methods.base import METHODS, NonFiniteLossError, SegMethod
from medtextseg.registry import import_submodules

import_submodules(__name__, __path__)


def method_class(name: str) -> type[SegMethod]:
    """The method registered as ``name``; ``ValueError`` (listing them) for an unknown one."""
    return METHODS.get_or_raise(name)


__all__ = ["METHODS", "NonFiniteLossError", "SegMethod", "method_class"]
