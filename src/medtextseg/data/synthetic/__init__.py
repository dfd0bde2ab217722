"""Synthetic datasets in the LViT layout, one generator per domain.

``GENERATORS[name](out, n, seed=0, size=..., ...)`` writes ``out`` and returns a summary
dict. Every generator writes through :mod:`medtextseg.data.synthetic.layout` (by way of
:func:`medtextseg.data.synthetic.common.write_dataset`), so the LViT reader loads them all.

* ``chest-xray``: QaTa-like frontal chest radiographs (:mod:`.chest_xray`).
* ``lung-ct``: MosMedData+-like axial lung CT slices in a lung window (:mod:`.lung_ct`).
* ``spine-mr``: MRSpineSeg-like sagittal T2 spine MR cases (:mod:`.spine_mr`): 20-class
  label maps (class ids, not {0, 255}), per-structure state texts, files named by case and
  slice, splits by case; takes ``n_cases`` and ``n`` is optional.

The first two describe their lesions in the QaTa grammar (:mod:`.qata_grammar`).
"""

from __future__ import annotations

from collections.abc import Callable

from medtextseg.data.synthetic.chest_xray import ChestXrayConfig, generate_chest_xray
from medtextseg.data.synthetic.lung_ct import LungCTConfig, generate_lung_ct
from medtextseg.data.synthetic.spine_mr import SpineMRConfig, generate_spine_mr

GENERATORS: dict[str, Callable[..., dict]] = {
    "chest-xray": generate_chest_xray,
    "lung-ct": generate_lung_ct,
    "spine-mr": generate_spine_mr,
}

__all__ = [
    "GENERATORS",
    "ChestXrayConfig",
    "LungCTConfig",
    "SpineMRConfig",
    "generate_chest_xray",
    "generate_lung_ct",
    "generate_spine_mr",
]
