"""Vision-language pre-training modules (DESIGN §2), one file each.

A pre-training preset names its module with ``pretrain: <name>``; a module names itself in
its class statement, ``class Foo(PretrainModule, pretrain="foo")``, and every module here is
imported once, so a new one is one file and one preset, listed nowhere else
(:data:`PRETRAINERS`). ``medtextseg pretrain`` trains it; ``medtextseg train`` refuses such a
preset.
"""

from __future__ import annotations

from medtextseg.pretrain.base import PRETRAINERS, PretrainModule
from medtextseg.registry import import_submodules

import_submodules(__name__, __path__)


def pretrain_class(name: str) -> type[PretrainModule]:
    """The module registered as ``name``; ``ValueError`` (listing them) for an unknown one."""
    return PRETRAINERS.get_or_raise(name)


__all__ = ["PRETRAINERS", "PretrainModule", "pretrain_class"]
