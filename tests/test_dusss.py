"""DuSSS stage 2 (Eq. 12-17): the merged pseudo label, the text masks (own text, once, in
the unaugmented frame, following the augmentation), the step's loss, `train --vlm` refusals
that write nothing, a smoke run that predicts after the VLM run is gone, resume, and the
text-mask switch that is plain Mean Teacher."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from _kill import Kill, Killed
from _synth import cli, no_network, tiny_cxr  # noqa: F401

from medtextseg.config import DataConfig, load_preset
from medtextseg.data.module import SegDataset, build_augmentation
from medtextseg.data.sample import Sample
from medtextseg.engine import pretrain, train
from medtextseg.methods.dusss import (
    DuSSS,
    TextMasks,
    compute_text_masks,
    merged_pseudo_label,
    soft_ce,
)
from medtextseg.pretrain.dusss import build_vlm

pytestmark = pytest.mark.usefixtures("no_network")


# -- formulas ------------------------------------------------------------------------------
def test_merged_pseudo_label_sums_the_logits():
    teacher = torch.tensor([0.0, math.log(3.0), math.log(3.0), 0.0]).view(1, 1, 2, 2)
    text = torch.tensor([0.8, 0.75, 0.25, 1.0]).view(1, 1, 2, 2)
    merged = merged_pseudo_label(teacher, text, eps=1e-4).flatten()
    # odds multiply: 1 * 4 = 4 -> 0.8; 3 * 3 = 9 -> 0.9; 3 * 1/3 = 1 -> 0.5; a certain text is capped by eps
    torch.testing.assert_close(merged[:3], torch.tensor([0.8, 0.9, 0.5]), atol=1e-6, rtol=0)
    assert 0.999 < merged[3] < 1.0
    # not the official sum of probabilities, sigmoid(sigmoid(t) + p)
    assert not torch.allclose(merged, torch.sigmoid(torch.sigmoid(teacher) + text).flatten())


def test_soft_ce_is_the_binary_cross_entropy_against_soft_targets():
    logits = torch.tensor([2.0, -1.0]).view(1, 1, 1, 2)
    target = torch.tensor([0.7, 0.1]).view(1, 1, 1, 2)
    p = torch.sigmoid(logits)
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(soft_ce(logits, target), expected)


# -- the text masks --------------------------------------------------------------------------
def _smoke_vlm():
    torch.manual_seed(0)
    return build_vlm(load_preset("dusss-vlm", "smoke")).eval()


def test_text_masks_use_each_images_own_text_once_through_the_sigmoid():
    vlm = _smoke_vlm()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (3, 3, 32, 32), dtype=np.uint8)
    texts = ["Left lung, one small area.", "Right lower lung, two areas.", "No infection."]
    masks = compute_text_masks(vlm, images, texts, max_len=32, batch_size=2)
    assert masks.shape == (3, 1, 32, 32) and masks.dtype == torch.float16
    for i in range(3):  # batching does not mix images and texts
        alone = compute_text_masks(vlm, images[i:i + 1], texts[i:i + 1], max_len=32, batch_size=1)
        torch.testing.assert_close(masks[i:i + 1], alone, atol=2e-3, rtol=0)
    swapped = compute_text_masks(vlm, images[:2], texts[1::-1], max_len=32, batch_size=2)
    assert not torch.allclose(swapped, masks[:2], atol=1e-3)
    # one sigmoid, of the image's own text: equal to the VLM's own mask_probs
    ids, attn = vlm.tokenize(texts, 32)
    with torch.no_grad():
        direct = vlm.mask_probs(torch.from_numpy(images).float() / 255, ids, attn)
    torch.testing.assert_close(masks.float(), direct, atol=1e-3, rtol=0)


def test_text_mask_map_follows_the_image_augmentation():
    size = 32
    pattern = np.zeros((size, size), np.float32)
    pattern[4:12, 6:25] = 1.0
    pattern[20:28, 3:9] = 1.0
    images = np.repeat((pattern * 255).astype(np.uint8)[None, None], 4, axis=0).repeat(3, axis=1)
    samples = [Sample(id=f"{i}", image_path=Path(f"{i}.png"), mask_path=None, text="t", split="Train")
               for i in range(4)]
    ds = SegDataset(samples, images, None, torch.zeros(1, 4, dtype=torch.long), np.zeros(4, int),
                    build_augmentation(DataConfig(img_size=size, augment="rotate", rotate_degrees=45.0),
                                       DuSSS.unlabeled_keys))
    ds.transform.set_random_state(seed=3)
    ref = torch.from_numpy(pattern)[None, None].repeat(4, 1, 1, 1).half()
    ds.targets = TextMasks(ref)
    moved = 0
    for _ in range(3):
        for i in range(len(ds)):
            item = ds[i]
            torch.testing.assert_close(item["text_mask"], item["image"][:1], atol=2e-3, rtol=0)
            moved += not torch.allclose(item["text_mask"], ref[i].float())
    assert moved > 2


# -- the step ----------------------------------------------------------------------------------
def test_dusss_step_is_eq_14_to_17():
    """L = CE(student(x_l), y) + w · (CE(y^s, σ(y^t + logit y^text)) + CE(y^s, y^text)) / 2."""
    cfg = load_preset("dusss", "smoke", ["semi.warmup_epochs=0", "semi.rampup_epochs=0", "semi.unsup_weight=0.6"])
    torch.manual_seed(0)
    m = DuSSS(cfg.to_dict())
    size = cfg.data.img_size
    text = torch.zeros(2, 1, dtype=torch.long)
    lab = {"image": torch.rand(2, 3, size, size), "mask": (torch.rand(2, 1, size, size) > 0.5).long(), "text": text}
    tm = torch.rand(2, 1, size, size)
    unl = {"image": torch.rand(2, 3, size, size), "text": text, "text_mask": tm}
    torch.manual_seed(1)
    loss = m.training_step({"labeled": lab, "unlabeled": unl}, 0)

    torch.manual_seed(1)
    std = cfg.semi.noise_std
    noise = lambda x: x + (torch.randn_like(x) * std).clamp(-2 * std, 2 * std)
    logits = m(torch.cat([lab["image"], noise(unl["image"])]), torch.cat([text, text]))
    with torch.no_grad():
        t_logits = m.teacher(noise(unl["image"]), None)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    l_sup = bce(logits[:2], lab["mask"].float())  # Eq. 14: CE only (loss.dice = 0)
    merged = torch.sigmoid(t_logits + torch.log(tm.clamp(1e-4, 1 - 1e-4) / (1 - tm.clamp(1e-4, 1 - 1e-4))))
    l_semi = (bce(logits[2:], merged) + bce(logits[2:], tm)) / 2
    torch.testing.assert_close(loss, l_sup + 0.6 * l_semi, rtol=0, atol=1e-5)


# -- runs ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, seed=4)


@pytest.fixture(scope="module")
def vlm_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "vlm"
    metrics = pretrain(load_preset("dusss-vlm", "smoke", ["data.labeled_ratio=0.25", "train.max_epochs=1"]),
                       data, run, progress=False)
    assert "Test" in metrics
    return run


def _cli_train(data, out, *extra):
    return cli("train", "--preset", "dusss", "--tier", "smoke", "--data", data, "--out", out,
               "--labeled-ratio", "0.25", *extra)


@pytest.mark.parametrize("case", ["missing", "size", "text", "leak", "leak-composite", "not-a-vlm"])
def test_train_refuses_a_missing_or_unfitting_vlm_and_writes_nothing(case, data, vlm_run, tmp_path):
    out = tmp_path / "run"
    if case == "missing":
        res = _cli_train(data, out)
        assert "medtextseg pretrain --preset dusss-vlm" in res.output
        # the split's flags, so that a VLM learning from masks sees only this run's labeled ones
        assert re.search(r"--labeled-ratio\s+0\.25\s+--seed\s+\d+", res.output), res.output
    elif case == "size":
        res = _cli_train(data, out, "--vlm", vlm_run, "--set", "data.img_size=64")
        assert "data.img_size" in res.output
    elif case == "text":
        res = _cli_train(data, out, "--vlm", vlm_run, "--set", "vlm.text_encoder=minilm")
        assert "vlm.text_encoder" in res.output
    elif case == "leak":  # the VLM read masks that a 10 % split withholds
        res = cli("train", "--preset", "dusss", "--tier", "smoke", "--data", data, "--out", out,
                  "--labeled-ratio", "0.1", "--vlm", vlm_run)
        assert "unlabeled" in res.output and "mask_supervision=false" in res.output
    elif case == "leak-composite":  # the VLM's root is one domain of this run: checked on it
        from medtextseg.data.synthetic import GENERATORS

        GENERATORS["lung-ct"](tmp_path / "ct", n=12, seed=0, size=64)
        res = cli("train", "--preset", "dusss", "--tier", "smoke", "--data", data, "--data", tmp_path / "ct",
                  "--out", out, "--labeled-ratio", "0.1", "--vlm", vlm_run)
        assert f"unlabeled (e.g. {data.name}/" in res.output, res.output
    else:
        res = _cli_train(data, out, "--vlm", data)
        assert "not a pre-training run" in res.output
    assert res.exit_code == 2, res.output
    assert not out.exists()


def test_dusss_smoke_run_resumes_and_predicts_without_the_vlm_run(data, vlm_run, tmp_path):
    vlm = tmp_path / "vlm-copy"
    shutil.copytree(vlm_run, vlm)
    cfg = load_preset("dusss", "smoke", ["data.labeled_ratio=0.25", "train.max_epochs=2", "train.patience=5"])
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(cfg, data, run, vlm=vlm, progress=False, extra_callbacks=[Kill(1)])
    info = json.loads((run / "run.json").read_text())
    assert info["vlm"]["run"] == str(vlm.resolve()) and len(info["vlm"]["sha256"]) == 64
    assert (run / "vlm" / "weights.pt").is_file()
    shutil.rmtree(vlm)  # from here on the run has only its own copy
    res = cli("train", "--resume", "--out", run)
    assert res.exit_code == 0, res.output
    rows = _rows(run)
    dice = [float(r["dusss/text_mask_dice"]) for r in rows if r.get("dusss/text_mask_dice")]
    assert len(dice) == 2 and dice[0] == dice[1]  # the same text masks after the resume
    assert any(r.get("train/semi_text") for r in rows)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["method"] == "dusss" and 0 <= metrics["Test"]["dice"] <= 1
    img_dir = data / "Test_Folder" / "img"
    res = cli("predict", run, "--images", img_dir, "--text", "Left lung, one area.", "--out", tmp_path / "pred")
    assert res.exit_code == 0, res.output
    n = len(list(img_dir.iterdir()))
    assert len(list((tmp_path / "pred" / "masks").glob("*.png"))) == n


def _rows(run: Path) -> list[dict]:
    import csv

    rows = []
    for f in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(f) as h:
            rows += list(csv.DictReader(h))
    return rows


def test_text_mask_off_is_plain_mean_teacher(data, tmp_path):
    same = ["data.labeled_ratio=0.25", "train.max_epochs=2", "data.augment=rotate"]
    mt = train(load_preset("mean-teacher", "smoke", same), data, tmp_path / "mt", progress=False)
    off = train(load_preset("dusss", "smoke", [*same, "dusss.text_mask=false", "loss.dice=0.5", "loss.ce=0.5",
                                               "semi.unsup_weight=0.1"]), data, tmp_path / "off", progress=False)
    assert not (tmp_path / "off" / "vlm").exists()
    for split in ("Val", "Test"):
        assert off[split]["dice"] == mt[split]["dice"] and off[split]["iou"] == mt[split]["iou"]
    # A smoke net's Dice can sit still while its weights move: the weights and losses say more.
    a = torch.load(tmp_path / "mt" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "off" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[(r["epoch"], r["val/loss"]) for r in _rows(tmp_path / run) if r.get("val/loss")] for run in ("mt", "off")]
    assert losses[0] and losses[0] == losses[1]
