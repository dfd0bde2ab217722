"""Loss and metric values against hand-computed cases, empty masks included."""

import math

import pytest
import torch
import torch.nn.functional as F

from medtextseg.losses import DiceCE
from medtextseg.metrics import (
    binarize,
    dice_iou_per_class,
    dice_iou_per_image,
    mean_of_scored,
    scored_totals,
)


def _mask(h, w, boxes):
    m = torch.zeros(1, 1, h, w, dtype=torch.long)
    for r0, r1, c0, c1 in boxes:
        m[0, 0, r0:r1, c0:c1] = 1
    return m


def test_dice_iou_hand_computed():
    pred = _mask(4, 4, [(0, 2, 0, 2)])          # 4 pixels
    gt = _mask(4, 4, [(0, 2, 0, 1), (3, 4, 3, 4)])  # 3 pixels, 2 shared
    dice, iou = dice_iou_per_image(pred, gt)
    assert dice.item() == pytest.approx(2 * 2 / (4 + 3))
    assert iou.item() == pytest.approx(2 / 5)


def test_empty_cases():
    empty = torch.zeros(1, 1, 4, 4, dtype=torch.long)
    some = _mask(4, 4, [(0, 1, 0, 1)])
    assert dice_iou_per_image(empty, empty)[0].item() == 1.0  # correct "nothing here"
    assert dice_iou_per_image(empty, empty)[1].item() == 1.0
    assert dice_iou_per_image(some, empty)[0].item() == 0.0
    assert dice_iou_per_image(empty, some)[1].item() == 0.0


def test_average_is_per_image_not_pooled():
    pred = torch.cat([_mask(4, 4, [(0, 4, 0, 4)]), _mask(4, 4, [])])
    gt = torch.cat([_mask(4, 4, [(0, 4, 0, 4)]), _mask(4, 4, [(0, 1, 0, 1)])])
    dice, _ = dice_iou_per_image(pred, gt)
    assert dice.tolist() == [1.0, 0.0]
    assert dice.mean().item() == 0.5  # pooled Dice would be 32/33


def test_multiclass_mean_over_present_classes():
    gt = torch.tensor([[[[1, 1], [2, 0]]]])
    pred = torch.tensor([[[[1, 0], [2, 0]]]])
    dice, iou = dice_iou_per_image(pred, gt, num_classes=3)
    assert dice.item() == pytest.approx((2 * 1 / 3 + 1.0) / 2)
    assert iou.item() == pytest.approx((1 / 2 + 1.0) / 2)


def test_mean_of_scored_is_the_class_mean_over_the_images_that_score_each_class():
    # Image 0 shows classes 1 and 2, image 1 class 1 only: class 1 is scored twice, class 2 once.
    t = torch.zeros(2, 1, 2, 4, dtype=torch.long)
    t[0, 0, 0, :2], t[0, 0, 1, :2], t[1, 0, 0, :2] = 1, 2, 1
    p = t.clone()
    p[0, 0, 1, :2] = 0          # image 0 misses class 2 (Dice 0); the rest is perfect
    dice, _ = dice_iou_per_class(p, t, 3)
    # per class: class 1 -> (1 + 1) / 2 = 1, class 2 -> 0; mean over classes 0.5, while the
    # mean of the per-image mDice would be (0.5 + 1) / 2 = 0.75
    assert mean_of_scored(scored_totals(dice)) == pytest.approx(0.5)
    assert float(dice_iou_per_image(p, t, 3)[0].mean()) == pytest.approx(0.75)
    # batch totals add up to the totals of the whole set
    torch.testing.assert_close(scored_totals(dice[:1]) + scored_totals(dice[1:]), scored_totals(dice))
    # one column (binary per-image figures): the plain mean over images
    assert mean_of_scored(scored_totals(torch.tensor([0.2, 0.4]))) == pytest.approx(0.3)
    assert math.isnan(mean_of_scored(scored_totals(torch.full((2, 3), float("nan")))))


def test_binarize_threshold_and_argmax():
    logits = torch.tensor([[[[-1.0, 0.1]]]])
    assert binarize(logits).tolist() == [[[[0, 1]]]]
    multi = torch.tensor([[[[0.0]], [[2.0]], [[1.0]]]])
    assert binarize(multi).tolist() == [[[[1]]]]


def test_dice_ce_matches_eq16_by_hand():
    logits = torch.tensor([[[[2.0, -1.0], [0.5, -3.0]]]])
    target = torch.tensor([[[[1, 0], [1, 1]]]])
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target.float())
    dice = 1 - (2 * (p * target).sum() + 1e-5) / (p.sum() + target.sum() + 1e-5)
    assert DiceCE(1)(logits, target).item() == pytest.approx(0.5 * bce.item() + 0.5 * dice.item(), rel=1e-5)


def test_dice_ce_perfect_prediction_is_near_zero_and_empty_target_ok():
    target = _mask(8, 8, [(2, 6, 2, 6)])
    logits = (target.float() * 2 - 1) * 50
    assert DiceCE(1)(logits, target).item() < 1e-3
    empty = torch.zeros(1, 1, 8, 8, dtype=torch.long)
    assert DiceCE(1)(torch.full((1, 1, 8, 8), -50.0), empty).item() < 1e-3


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="expected target"):
        DiceCE(1)(torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match=r"expected logits \[B, 1"):
        DiceCE(1)(torch.zeros(2, 3, 4, 4), torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="equal shape"):
        dice_iou_per_image(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
