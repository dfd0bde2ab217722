"""Per-image Dice and IoU, averaged over images (LViT's test protocol, Eq. 32-33).

Every paper of this toolkit reports Dice / mIoU this way: threshold the
prediction, score each image on its foreground, then average over images.

Empty images: when both the mask and the prediction of an image are empty, the
image scores Dice = IoU = 1 (a correct "nothing here"); when only one of them is
empty it scores 0. This is MONAI's ``ignore_empty=False`` behaviour.

Multi-class (K >= 2, DESIGN.md §6): each foreground class of an image is scored when it
is in the mask or the prediction (absent from both: skipped; from one: 0). A split's
per-class figure is the mean over the images that score the class, and its mDice / mIoU
the mean of those over the foreground classes scored in the split (PromptSSL's table).
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


def dice_iou_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of each image and foreground class (PromptSSL's per-class protocol).

    Args:
        pred: ``[B, 1, H, W]`` class-id map.
        target: ``[B, 1, H, W]`` class-id map.
        num_classes: K >= 2 (classes 1..K-1 are scored).

    Returns:
        ``(dice, iou)``, each ``[B, K-1]`` float: column c-1 is class c; NaN where the
        class is absent from both the mask and the prediction of that image (not scored),
        0 where it is in only one of them.
    """
    _check_maps(pred, target)
    if num_classes < 2:
        raise ValueError(f"dice_iou_per_class needs num_classes >= 2, got {num_classes}")
    # Counted with bincount over (image, predicted class, true class) instead of K one-hot
    # maps through MONAI's per-channel loop (two orders of magnitude slower for 20 classes).
    b = pred.shape[0]
    p, t = pred.long().flatten(1).clamp(0, num_classes - 1), target.long().flatten(1).clamp(0, num_classes - 1)
    img = torch.arange(b, device=pred.device).unsqueeze(1)
    joint = torch.bincount(((img * num_classes + p) * num_classes + t).flatten(),
                           minlength=b * num_classes * num_classes).view(b, num_classes, num_classes).float()
    inter = joint.diagonal(dim1=1, dim2=2)[:, 1:]  # [B, K-1]
    n_pred, n_true = joint.sum(2)[:, 1:], joint.sum(1)[:, 1:]
    total = n_pred + n_true
    present = total > 0
    nan = torch.full_like(inter, float("nan"))
    dice = torch.where(present, 2 * inter / total.clamp_min(1), nan)
    iou = torch.where(present, inter / (total - inter).clamp_min(1), nan)
    return dice, iou


def dice_iou_per_image(pred: torch.Tensor, target: torch.Tensor, num_classes: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of each image.

    Args:
        pred: ``[B, 1, H, W]`` label map ({0,1} for binary, class ids otherwise).
        target: ``[B, 1, H, W]`` label map of the same kind.
        num_classes: 1 for binary (foreground scored), K > 1 for multi-class
            (mean over the foreground classes present in the target or prediction,
            :func:`dice_iou_per_class`; an image with no foreground class in either scores 1).

    Returns:
        ``(dice, iou)``, each ``[B]`` float in [0, 1].
    """
    _check_maps(pred, target)
    if num_classes == 1:
        p, t = pred.long().float(), target.long().float()
        dice = compute_dice(p, t, include_background=True, ignore_empty=False)[:, 0]
        iou = compute_iou(p, t, include_background=True, ignore_empty=False)[:, 0]
        return dice, iou
    dice, iou = dice_iou_per_class(pred, target, num_classes)
    # Images with no foreground class at all score 1, consistent with the binary rule.
    empty = dice.isnan().all(1)
    return (torch.where(empty, 1.0, dice.nan_to_num(0).sum(1) / (~dice.isnan()).sum(1).clamp(min=1)),
            torch.where(empty, 1.0, iou.nan_to_num(0).sum(1) / (~iou.isnan()).sum(1).clamp(min=1)))


def scored_totals(values: torch.Tensor) -> torch.Tensor:
    """Per column, the sum and the count of the scored (non-NaN) entries of ``values``:
    ``[N]`` (binary per-image figures, one column) or ``[N, K-1]``
    (:func:`dice_iou_per_class`) -> ``[2, C]``. Totals of several batches (or DDP ranks)
    add up; :func:`mean_of_scored` turns them into the headline figure."""
    v = values.reshape(values.shape[0], -1).float()
    return torch.stack([v.nan_to_num(0).sum(0), (~v.isnan()).sum(0).float()])


def mean_of_scored(totals: torch.Tensor) -> float:
    """The headline of :func:`scored_totals` ``[2, C]``, as in ``metrics.json``: each class
    averaged over the images that score it, then the mean over the classes scored
    (PromptSSL's mDice); one column (binary): the mean over the images. NaN when nothing
    is scored."""
    sums, counts = totals
    ok = counts > 0
    return float((sums[ok] / counts[ok]).mean()) if bool(ok.any()) else float("nan")


def _check_maps(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.ndim != 4 or pred.shape[1] != 1:
        raise ValueError(f"expected pred and target [B, 1, H, W] of equal shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
