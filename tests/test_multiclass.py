"""Multi-class segmentation (DESIGN §5-6): per-class Dice/IoU against hand-computed cases,
the split figures, the K-class loss, which methods take K >= 2, the residual U-Net, the
multistep schedule and non-square sizes through the data pipeline."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from medtextseg.config import Config, ConfigError, DataConfig, load_preset
from medtextseg.engine import split_figures
from medtextseg.losses import DiceCE
from medtextseg.methods import method_class
from medtextseg.metrics import dice_iou_per_class, dice_iou_per_image
from medtextseg.nets import build_network


def _map(rows):
    return torch.tensor(rows).view(1, 1, len(rows), len(rows[0]))


def test_per_class_dice_skips_a_class_absent_from_both_and_scores_0_when_absent_from_one():
    # K = 4: class 1 overlaps half, class 2 only in the prediction, class 3 absent from both.
    pred = _map([[1, 1, 2, 0]])
    target = _map([[1, 0, 0, 0]])
    dice, iou = dice_iou_per_class(pred, target, 4)
    torch.testing.assert_close(dice[0, :2], torch.tensor([2 * 1 / (2 + 1), 0.0]))
    torch.testing.assert_close(iou[0, :2], torch.tensor([1 / 2, 0.0]))
    assert math.isnan(dice[0, 2]) and math.isnan(iou[0, 2])
    # The image's figure is the mean over the classes scored (1 and 2), not over K - 1.
    d_img, i_img = dice_iou_per_image(pred, target, 4)
    torch.testing.assert_close(d_img, torch.tensor([(2 / 3 + 0.0) / 2]))
    torch.testing.assert_close(i_img, torch.tensor([(0.5 + 0.0) / 2]))


def test_an_image_without_any_foreground_class_scores_1():
    empty = _map([[0, 0], [0, 0]])
    assert dice_iou_per_image(empty, empty, 3)[0].item() == 1.0


def test_split_figures_average_each_class_over_the_images_that_score_it():
    names = ["a", "b"]
    rows = []
    for d_a, d_b in ((1.0, ""), (0.5, 0.2)):
        row = {"domain": "x"}
        for key in ("dice", "iou", "dice_orig", "iou_orig"):
            row[key] = 0.0  # per-image figures are not what the multi-class headline averages
            row[f"{key}:a"], row[f"{key}:b"] = d_a, d_b
        rows.append(row)
    out = split_figures(rows, names)
    assert out["classes"]["a"]["dice"] == pytest.approx(0.75) and out["classes"]["a"]["n"] == 2
    assert out["classes"]["b"]["dice"] == pytest.approx(0.2) and out["classes"]["b"]["n"] == 1
    assert out["dice"] == pytest.approx((0.75 + 0.2) / 2)  # mDice: mean over the classes scored


def test_multiclass_dice_ce_matches_the_hand_computed_loss():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [-1.0, 0.5]]).view(1, 3, 1, 2)
    target = torch.tensor([0, 2]).view(1, 1, 1, 2)
    p = torch.softmax(logits, 1)[0, :, 0]  # [3, 2]
    onehot = F.one_hot(target.flatten(), 3).T.float()  # [3, 2]
    ce = -(onehot * p.log()).sum(0).mean()
    dice = (1 - (2 * (p * onehot).sum(1) + 1e-5) / (p.sum(1) + onehot.sum(1) + 1e-5)).mean()
    torch.testing.assert_close(DiceCE(3, 0.5, 0.5)(logits, target), 0.5 * dice + 0.5 * ce, atol=1e-5, rtol=0)


@pytest.mark.parametrize("preset", ["lvit-t-semi", "dusss", "textmoe"])
def test_binary_methods_refuse_several_classes(preset):
    cfg = load_preset(preset, "smoke", ["data.num_classes=20"])
    with pytest.raises(ValueError, match="binary"):
        method_class(cfg.method).check_config(cfg)


@pytest.mark.parametrize("preset", ["unet", "mean-teacher", "promptssl"])
def test_multiclass_methods_accept_several_classes(preset):
    cfg = load_preset(preset, "smoke", ["data.num_classes=20"])
    method_class(cfg.method).check_config(cfg)


def test_mean_teacher_consistency_is_on_softmax_probabilities():
    cfg = load_preset("mean-teacher", "smoke", ["data.num_classes=3", "data.in_channels=1"])
    module = method_class(cfg.method)(cfg.to_dict(), text_dim=8)
    logits = torch.randn(2, 3, 4, 4)
    target = module.pseudo_target(logits, {})
    torch.testing.assert_close(target.sum(1), torch.ones(2, 4, 4))
    loss, _ = module.unsup_loss(logits, target, {})
    assert loss.item() == pytest.approx(0.0, abs=1e-7)


def test_residual_unet_is_monai_with_group_norm_and_a_class_head():
    net = build_network("resunet", in_channels=1, num_classes=20, base_width=32)
    assert any(isinstance(m, torch.nn.GroupNorm) and m.num_groups == 8 for m in net.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(6.53e6, rel=0.01)
    assert tuple(net(torch.rand(1, 1, 64, 32)).shape) == (1, 20, 64, 32)
    with pytest.raises(ValueError, match="divisible by 16"):
        net(torch.rand(1, 1, 40, 32))


def test_image_size_takes_an_int_or_height_and_width():
    assert DataConfig(img_size=64).size == (64, 64)
    cfg = Config().with_overrides(["data.img_size=[512,256]"])
    assert cfg.data.size == (512, 256) and cfg.data.size_label == "512×256"
    with pytest.raises(ConfigError, match=r"\[H, W\]"):
        Config().with_overrides(["data.img_size=[512]"])


def test_non_square_images_and_masks_go_through_the_data_pipeline(tmp_path):
    from medtextseg.data.module import build_augmentation, resize_image, resize_mask

    cfg = DataConfig(img_size=[32, 16], in_channels=1, num_classes=5, augment="rotate_elastic")
    img = resize_image(np.zeros((100, 50, 3), np.uint8), cfg.size, 1)
    mask = resize_mask(np.full((100, 50), 4, np.uint8), cfg.size)
    assert img.shape == (1, 32, 16) and mask.shape == (1, 32, 16) and set(np.unique(mask)) == {4}
    out = build_augmentation(cfg)({"image": torch.rand(1, 32, 16), "mask": torch.from_numpy(mask).float()})
    assert tuple(out["image"].shape) == (1, 32, 16)
    assert set(torch.unique(out["mask"]).tolist()) <= {0.0, 4.0}  # nearest: no new class ids


def test_multistep_schedule_divides_the_rate_at_each_milestone():
    cfg = load_preset("promptssl", "smoke", ["optim.milestones=[1,2]", "optim.gamma=0.2", "optim.lr=1.0"])
    module = method_class("mean_teacher")(cfg.to_dict(), text_dim=8)
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(3):  # steps_per_epoch is 1 without a trainer
        rates.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert rates == pytest.approx([1.0, 0.2, 0.04])


def test_unknown_scheduler_is_refused():
    cfg = load_preset("unet", "smoke", ["optim.scheduler=steps"])
    with pytest.raises(ValueError, match="multistep"):
        method_class(cfg.method)(cfg.to_dict(), text_dim=8).configure_optimizers()


def test_class_names_must_fit_num_classes():
    from medtextseg.classes import check_class_names

    with pytest.raises(ValueError, match="needs 3"):
        check_class_names(["background", "a"], 3)
    with pytest.raises(ValueError, match="twice"):
        check_class_names(["background", "a", "a"], 3)
