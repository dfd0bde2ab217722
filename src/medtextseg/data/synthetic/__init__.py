"""Synthetic datasets in the LViT layout, one generator per domain.

``GENERATORS[name](out, n, seed=0, size=..., ...)`` writes ``out`` and returns a summary
dict. Every generator writes through :mod:`medtextseg.data.synthetic.layout`, so the LViT
reader loads them all.
"""

from __future__ import annotations

from collections.abc import Callable

from medtextseg.data.synthetic.chest_xray import ChestXrayConfig, generate_chest_xray

GENERATORS: dict[str, Callable[..., dict]] = {
    "chest-xray": generate_chest_xray,
}

__all__ = ["GENERATORS", "ChestXrayConfig", "generate_chest_xray"]
