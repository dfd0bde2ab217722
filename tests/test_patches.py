"""The patch protocol: random crops for training, MONAI's sliding window for whole images,
scored at the working and at the original resolution."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _synth import cli, tiny_cxr
from PIL import Image

from medtextseg.config import DataConfig, load_preset
from medtextseg.data.module import check_patch_options, make_dataset
from medtextseg.data.sample import Sample
from medtextseg.engine import train
from medtextseg.inference import sliding_window_logits
from medtextseg.nets import build_network
from medtextseg.text.encoders import build_text_encoder


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, seed=3)


@pytest.mark.parametrize("name", ["unet", "lvit-t"])
def test_a_window_covering_the_whole_image_is_one_forward_pass(name):
    torch.manual_seed(0)
    net = build_network(name, in_channels=3, num_classes=1, base_width=8, img_size=32, text_dim=16,
                        text_len=6, use_text=name != "unet").eval()
    images, tokens = torch.rand(3, 3, 32, 32), torch.randn(3, 6, 16)
    with torch.no_grad():
        plain = net(images, tokens)
        for mode in ("gaussian", "constant"):
            windowed = sliding_window_logits(net, images, tokens, 32, sw_batch_size=2, mode=mode)
            torch.testing.assert_close(windowed, plain, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape", [(75, 90), (32, 100), (20, 25)])
def test_every_pixel_is_covered_and_blended_once(mode, shape):
    """A pointwise 'network' (2x its input) is recovered exactly: every pixel lies in some
    window and the overlapping windows' weights sum to one; smaller images are padded."""
    torch.manual_seed(0)
    images = torch.rand(2, 1, *shape) + 0.5  # no zeros: an uncovered pixel would show as 0
    calls = []

    def forward(windows, tokens):
        calls.append(len(windows))
        return 2 * windows

    out = sliding_window_logits(forward, images, None, 32, sw_batch_size=3, overlap=0.25, mode=mode)
    assert out.shape == images.shape
    torch.testing.assert_close(out, 2 * images)
    assert max(calls) <= 3  # sw_batch_size windows per call at most


def test_each_window_gets_its_own_image_text():
    images = torch.zeros(3, 1, 64, 64)
    tokens = torch.tensor([[1.0], [2.0], [3.0]])
    out = sliding_window_logits(lambda w, t: w + t[:, :, None, None], images, tokens, 32, sw_batch_size=4)
    torch.testing.assert_close(out, tokens[:, :, None, None].expand(3, 1, 64, 64))


def _samples(tmp_path: Path, n: int = 3, size: tuple[int, int] = (60, 80)) -> list[Sample]:
    """Images whose mask is exactly where the red channel is bright: a crop of the image
    and a crop of the mask agree only if they are the same crop."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
        img[..., 0] = np.where(rng.random(size) < 0.5, 0, 255)
        Image.fromarray(img).save(tmp_path / f"i{i}.png")
        Image.fromarray(np.where(img[..., 0] > 127, 255, 0).astype(np.uint8)).save(tmp_path / f"m{i}.png")
        out.append(Sample(f"i{i}", tmp_path / f"i{i}.png", tmp_path / f"m{i}.png", "two nuclei", "Train"))
    return out


def _encoder(samples):
    enc = build_text_encoder("learned", max_len=4, dim=8)
    enc.fit([s.text for s in samples])
    return enc


def test_patch_training_items_are_aligned_random_crops(tmp_path):
    samples = _samples(tmp_path)
    cfg = DataConfig(img_size=32, patches=True, scale=1.0, patches_per_image=5, augment="none")
    ds = make_dataset(samples, _encoder(samples), cfg, train=True, seed=0)
    assert len(ds) == 15 and ds.images.shape == (3, 3, 60, 80)  # native size kept
    corners = set()
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["mask"].shape == (1, 32, 32)
        assert item["index"] == i % 3
        assert torch.equal((item["image"][0] > 0.5).long(), item["mask"][0])
        corners.add(tuple(item["image"][1, 0, :4].tolist()))
    assert len(corners) > 10  # different crops, not one fixed window


def test_scale_halves_the_kept_images_and_evaluation_sees_whole_images(tmp_path):
    samples = _samples(tmp_path, size=(64, 90))
    cfg = DataConfig(img_size=16, patches=True, scale=0.5)
    ds = make_dataset(samples, _encoder(samples), cfg)
    assert len(ds) == 3 and ds[0]["image"].shape == (3, 32, 45) and ds[0]["mask"].shape == (1, 32, 45)
    resized = make_dataset(samples, _encoder(samples), dataclasses.replace(cfg, patches=False))
    assert resized[0]["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("bad, word", [({"scale": 0.0}, "data.scale"), ({"patches_per_image": 0}, "patches_per_image"),
                                       ({"window_overlap": 1.0}, "window_overlap"), ({"window_blend": "max"}, "window_blend")])
def test_bad_patch_options_are_named(bad, word):
    with pytest.raises(ValueError, match=word):
        check_patch_options(DataConfig(patches=True, **bad))


def test_lvit_semi_refuses_patches_before_writing(data, tmp_path):
    cfg = load_preset("lvit-t-semi", "smoke", ["data.patches=true", "data.labeled_ratio=0.5"])
    with pytest.raises(ValueError, match="cannot train on patches"):
        train(cfg, data, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_patch_run_trains_evaluates_and_predicts_at_the_original_size(data, tmp_path):
    """LViT-T (text reaches every window) on 64² images, 32² patches at native size."""
    run = tmp_path / "run"
    r = cli("train", "--preset", "lvit-t", "--tier", "smoke", "--data", data, "--out", run,
            "--set", "data.augment=none", "data.patches=true", "data.scale=1.0", "data.patches_per_image=2")
    assert r.exit_code == 0, r.output
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["model"]["protocol"] == "patches 32² at 1×"
    for split in ("Val", "Test"):
        assert 0 <= metrics[split]["dice_orig"] <= 1 and metrics[split]["n"] > 0
        # At native scale the working and the original resolution are the same pixels.
        assert metrics[split]["dice"] == pytest.approx(metrics[split]["dice_orig"], abs=1e-6)
    images = data / "Test_Folder" / "img"
    r = cli("predict", run, "--images", images, "--text", "Left lung.", "--out", tmp_path / "pred", "--batch-size", "3")
    assert r.exit_code == 0, r.output
    masks = sorted((tmp_path / "pred" / "masks").glob("*.png"))
    assert masks and all(Image.open(m).size == (64, 64) for m in masks)
