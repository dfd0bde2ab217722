"""Segmentation losses.

Shape contract (MONAI style): ``logits`` is ``[B, K, H, W]`` float; ``target`` is
``[B, 1, H, W]`` with {0, 1} for K = 1 (sigmoid) or class ids in [0, K) for K > 1
(softmax). Anything else raises ``ValueError`` naming what arrived.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn


class DiceCE(nn.Module):
    """L = w_dice·L_Dice + w_ce·L_CE (LViT Eq. 16 / 28-30 with w = 0.5 each).

    Wraps :class:`monai.losses.DiceCELoss`: binary (K = 1) uses sigmoid + BCE,
    multi-class uses softmax + cross-entropy on one-hot targets. The Dice term is
    averaged per image and class (``batch=False``), as in LViT Eq. 28.

    Args:
        num_classes: K, the number of output channels.
        dice_weight: w_dice.
        ce_weight: w_ce.

    Example:
        >>> loss = DiceCE(num_classes=1)
        >>> loss(torch.zeros(2, 1, 8, 8), torch.ones(2, 1, 8, 8)).item() > 0
        True
    """

    def __init__(self, num_classes: int = 1, dice_weight: float = 0.5, ce_weight: float = 0.5):
        super().__init__()
        self.num_classes = num_classes
        binary = num_classes == 1
        self.loss = DiceCELoss(
            sigmoid=binary,
            softmax=not binary,
            to_onehot_y=not binary,
            lambda_dice=dice_weight,
            lambda_ce=ce_weight,
        )

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        check_pair(logits, target, self.num_classes)
        return self.loss(logits, target.float() if self.num_classes == 1 else target.long())


def check_pair(logits: torch.Tensor, target: torch.Tensor, num_classes: int) -> None:
    if logits.ndim != 4 or logits.shape[1] != num_classes:
        raise ValueError(f"expected logits [B, {num_classes}, H, W], got {tuple(logits.shape)}")
    expected = (logits.shape[0], 1, *logits.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"expected target {expected} (B1HW), got {tuple(target.shape)}")


def lv_loss(probs: torch.Tensor, contrast: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Language-Vision loss of LViT, Eq. 14-15 (appendix D, Eq. 26-27), per image.

    L_LV = 1 - ImgSim, ImgSim = cos(x_img,p, x_img,c): the cosine between the
    flattened predicted foreground probabilities and the flattened contrastive
    label chosen by text similarity (Eq. 13). Identical masks give 0, disjoint
    masks give 1; the cosine ignores the masks' overall scale, so a contrastive
    label only says roughly *where* the lesion is, not its exact boundary.

    Args:
        probs: ``[B, 1, H, W]`` predicted probabilities in [0, 1].
        contrast: ``[B, 1, H, W]`` contrastive labels in [0, 1] (binary or soft).

    Returns:
        ``[B]`` losses. An image whose contrastive label is empty has no defined
        cosine; its loss is 0 (no gradient), the caller should also leave it out
        of the mean (see :func:`lv_valid`).
    """
    if probs.shape != contrast.shape or probs.ndim != 4 or probs.shape[1] != 1:
        raise ValueError(f"expected probs and contrast both [B, 1, H, W], got {tuple(probs.shape)} "
                         f"and {tuple(contrast.shape)}")
    p, c = probs.flatten(1).float(), contrast.flatten(1).float()
    cos = (p * c).sum(1) / (p.norm(dim=1) * c.norm(dim=1)).clamp_min(eps)
    return torch.where(lv_valid(contrast), 1.0 - cos, torch.zeros_like(cos))


def lv_valid(contrast: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: contrastive labels with some foreground (cosine defined)."""
    return contrast.flatten(1).amax(dim=1) > 0
