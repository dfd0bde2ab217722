"""Fully supervised training on the labeled images: L_sup = (L_Dice + L_CE)/2 (LViT Eq. 16)."""

from __future__ import annotations

import torch

from medtextseg.methods.base import SegMethod


class Supervised(SegMethod, method="supervised"):
    """Supervised segmentation with any network of :func:`medtextseg.build_network`.

    Batch: ``image [B,C,H,W]``, ``mask [B,1,H,W]``, ``text [B,L]|[B,L,D]``.
    """

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        return self.supervised_step(batch)
