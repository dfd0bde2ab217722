"""Per-image Dice and IoU, averaged over images (LViT's test protocol, Eq. 32-33).

Every paper of this toolkit reports Dice / mIoU this way: threshold the
prediction, score each image on its foreground, then average over images.

Empty images: when both the mask and the prediction of an image are empty, the
image scores Dice = IoU = 1 (a correct "nothing here"); when only one of them is
empty it scores 0. This is MONAI's ``ignore_empty=False`` behaviour.
"""

from __future__ import annotations

import torch
from monai.metrics import compute_dice, compute_iou


def binarize(logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Turn ``[B, K, H, W]`` logits into a ``[B, 1, H, W]`` integer label map.

    K = 1: sigmoid(logit) > threshold; K > 1: argmax over classes.
    """
    if logits.shape[1] == 1:
        return (torch.sigmoid(logits) > threshold).long()
    return logits.argmax(dim=1, keepdim=True)


def dice_iou_per_image(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of each image.

    Args:
        pred: ``[B, 1, H, W]`` label map ({0,1} for binary, class ids otherwise).
        target: ``[B, 1, H, W]`` label map of the same kind.
        num_classes: 1 for binary (foreground scored), K > 1 for multi-class
            (mean over the foreground classes present in the target or prediction).

    Returns:
        ``(dice, iou)``, each ``[B]`` float in [0, 1].
    """
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(f"expected pred and target [B, 1, H, W] of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    pred, target = pred.long(), target.long()
    if num_classes == 1:
        p, t = pred.float(), target.float()
        dice = compute_dice(p, t, include_background=True, ignore_empty=False)[:, 0]
        iou = compute_iou(p, t, include_background=True, ignore_empty=False)[:, 0]
        return dice, iou
    classes = torch.arange(1, num_classes, device=pred.device).view(1, -1, 1, 1)
    p, t = (pred == classes).float(), (target == classes).float()
    present = (p.flatten(2).sum(-1) + t.flatten(2).sum(-1)) > 0
    dice = compute_dice(p, t, include_background=True, ignore_empty=False)
    iou = compute_iou(p, t, include_background=True, ignore_empty=False)
    n = present.sum(1).clamp(min=1)
    # Images with no foreground class at all score 1, consistent with the binary rule.
    empty = present.sum(1) == 0
    dice = torch.where(empty, 1.0, (dice * present).sum(1) / n)
    iou = torch.where(empty, 1.0, (iou * present).sum(1) / n)
    return dice, iou
