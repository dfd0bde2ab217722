"""Synthetic lung CT generator: determinism, text/mask agreement, the LViT reader, the
CT look (against the chest X-ray generator's) and the CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from _synth import cli
from openpyxl import load_workbook
from PIL import Image
from test_synthetic import _components, _tree

from medtextseg.data.sample import SPLITS
from medtextseg.data.synthetic import GENERATORS, generate_lung_ct
from medtextseg.data.synthetic.chest_xray import ChestXrayConfig
from medtextseg.data.synthetic.chest_xray import make_item as make_xray
from medtextseg.data.synthetic.common import connected_components, item_name
from medtextseg.data.synthetic.layout import MASK_DIR, split_folder, text_file_name
from medtextseg.data.synthetic.lung_ct import (
    CONSOLIDATION,
    GROUND_GLASS,
    HU_AIR,
    LungCTConfig,
    make_item,
    render_lung_ct,
)
from medtextseg.data.synthetic.qata_grammar import (
    COUNT_WORDS,
    LEVELS,
    ZONES,
    Layout,
    LungFinding,
    parse_description,
)
from medtextseg.data.validation import validate_dataset

TINY = {"n": 12, "size": 64}


@pytest.fixture(scope="module")
def tiny_ct(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("ct") / "ds"
    return out, generate_lung_ct(out, seed=0, **TINY)


def _check_text_agrees(item, text: str) -> None:
    """The description names exactly the lesion areas of the mask: count, sides, zones."""
    layout = parse_description(text)
    assert layout == item.layout
    mask = item.mask > 0
    assert mask.any() and not (mask & (item.zones == 0)).any()  # lesions lie in the lungs
    total = mask.sum()
    for k, zone in enumerate(ZONES, start=1):
        in_zone = (mask & (item.zones == k)).sum()
        if zone in layout.zones():
            assert in_zone >= 0.05 * (item.zones == k).sum(), (text, zone)
        else:
            assert in_zone <= 0.05 * total, (text, zone)
    left = (mask & np.isin(item.zones, [1, 2, 3])).any()
    right = (mask & np.isin(item.zones, [4, 5, 6])).any()
    assert (left and right) == text.startswith("Bilateral") == layout.bilateral
    assert left == (layout.left is not None) and right == (layout.right is not None)
    count = text.split(", ")[1].split()[0]
    assert COUNT_WORDS.index(count) + 1 == layout.n_areas == len(item.kinds)
    assert _components(mask, min_pixels=4) == layout.n_areas, text


def test_registry_and_layout(tiny_ct) -> None:
    out, summary = tiny_ct
    assert GENERATORS["lung-ct"] is generate_lung_ct
    assert sum(summary["splits"].values()) == TINY["n"]
    assert set(summary) == {
        "out",
        "n",
        "splits",
        "unique_texts",
        "noisy_texts",
        "bilateral_fraction",
        "seconds",
    }
    # the LViT reader and the full file checks accept it, with all three splits
    samples = validate_dataset(out, need_splits=SPLITS)
    assert len(samples) == TINY["n"]
    assert {s.split for s in samples} == set(SPLITS)
    assert {s.id for s in samples} == {item_name(i, TINY["n"])[:-4] for i in range(TINY["n"])}
    for s in samples:
        assert s.mask_path is not None and parse_description(s.text)
        img = Image.open(s.image_path)
        assert img.mode == "L" and img.size == (TINY["size"],) * 2


def test_deterministic_and_seed_sensitive(tiny_ct, tmp_path) -> None:
    out, _ = tiny_ct
    again = tmp_path / "again"
    generate_lung_ct(again, seed=0, **TINY)
    assert _tree(out) == _tree(again)
    other = tmp_path / "other"
    generate_lung_ct(other, seed=1, **TINY)
    a, b = _tree(out), _tree(other)
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b.get(k) for k in pngs) > len(pngs) // 2
    # item k does not depend on n or on the worker count
    small = tmp_path / "small"
    generate_lung_ct(small, n=3, size=32, seed=3, split_fractions=(1, 0, 0))
    two = tmp_path / "two"
    generate_lung_ct(two, n=5, size=32, seed=3, split_fractions=(1, 0, 0), workers=2)
    img = str(Path(split_folder("Train")) / "img" / item_name(2, 3))
    assert _tree(small)[img] == _tree(two)[img]


def test_text_agrees_with_mask(tiny_ct) -> None:
    out, _ = tiny_ct
    cfg = LungCTConfig(size=TINY["size"])
    texts = {}
    for split in SPLITS:
        ws = load_workbook(out / split_folder(split) / text_file_name(split)).active
        texts |= {r[0]: (split, r[1]) for r in ws.iter_rows(min_row=2, values_only=True)}
    for i in range(TINY["n"]):
        item, text = make_item(0, i, cfg)
        split, written = texts[item_name(i, TINY["n"])]
        assert written == text == item.text
        on_disk = np.asarray(
            Image.open(out / split_folder(split) / MASK_DIR / item_name(i, TINY["n"]))
        )
        np.testing.assert_array_equal(on_disk, item.mask)
        _check_text_agrees(item, text)


@pytest.mark.parametrize("size", [48, 128])
def test_text_agrees_with_mask_other_sizes_and_every_level_subset(size) -> None:
    rng = np.random.default_rng(7)
    cfg = LungCTConfig(size=size)
    subsets = [("upper",), ("middle",), ("lower",), ("upper", "lower"), LEVELS]
    for j, levels in enumerate(subsets):
        # both lungs, two separated areas in one lung, and the diffuse "all"
        layout = Layout(LungFinding(levels), LungFinding(subsets[-1 - j]))
        item = render_lung_ct(layout, rng, cfg)
        _check_text_agrees(item, item.text)
    diffuse = Layout(None, LungFinding(LEVELS, diffuse=True))
    item = render_lung_ct(diffuse, rng, cfg)
    _check_text_agrees(item, item.text)
    right = item.zones >= 4
    assert (item.mask[right] > 0).mean() > 0.8  # "all" fills the lung


def test_lesion_kinds_in_hounsfield_units() -> None:
    """Ground glass is a faint rise above the lung, consolidation near soft tissue."""
    layout = Layout(LungFinding(("middle",)), None)
    ggo = render_lung_ct(
        layout, np.random.default_rng(0), LungCTConfig(size=96, consolidation_fraction=0.0)
    )
    cons = render_lung_ct(
        layout, np.random.default_rng(0), LungCTConfig(size=96, consolidation_fraction=1.0)
    )
    assert ggo.kinds == (GROUND_GLASS,) and cons.kinds == (CONSOLIDATION,)
    for item in (ggo, cons):
        lesion = item.mask > 0
        clear = (item.zones > 0) & ~lesion
        assert np.median(item.hu[clear]) < -700  # aerated lung
        assert np.median(item.hu[lesion]) > np.median(item.hu[clear]) + 50
    assert np.median(ggo.hu[ggo.mask > 0]) < -350  # hazy: far below soft tissue
    assert np.percentile(cons.hu[cons.mask > 0], 90) > -250  # a dense core


def test_looks_like_ct_not_like_the_xray() -> None:
    """Modality gap: black air, dark lungs inside a bright body wall, and image statistics
    unlike the radiographs'."""
    ct_hist, xr_hist = np.zeros(16), np.zeros(16)
    for i in range(4):
        ct, _ = make_item(0, i, LungCTConfig(size=64))
        xr, _ = make_xray(0, i, ChestXrayConfig(size=64))
        img = ct.image.astype(float)
        lungs = img[(ct.zones > 0) & (ct.mask == 0)]  # clear lung
        corners = np.concatenate([img[:6, :6].ravel(), img[-6:, -6:].ravel()])
        assert corners.mean() < 8  # air and the outside of the field of view are black
        assert np.median(ct.hu[:6, :6]) <= HU_AIR + 100
        # the body wall just outside the lungs is much brighter than the lungs
        count, labels = connected_components(ct.image > 0.5 * 255)
        wall = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
        assert count >= 1 and img[wall].mean() > lungs.mean() + 100
        assert np.median(lungs) < 90
        ct_hist += np.histogram(ct.image, bins=16, range=(0, 256))[0]
        xr_hist += np.histogram(xr.image, bins=16, range=(0, 256))[0]
    ct_hist, xr_hist = ct_hist / ct_hist.sum(), xr_hist / xr_hist.sum()
    assert 0.5 * np.abs(ct_hist - xr_hist).sum() > 0.3  # total variation distance
    assert ct_hist[0] > 0.25 > xr_hist[0]  # a CT slice is mostly black air around the body


def test_text_noise_and_refusal(tmp_path) -> None:
    summary = generate_lung_ct(tmp_path / "noisy", n=6, size=32, text_noise=1.0)
    assert summary["noisy_texts"] == 6
    with pytest.raises(FileExistsError, match="not empty"):
        generate_lung_ct(tmp_path / "noisy", n=2, size=32)
    with pytest.raises(ValueError, match="lesion_hu"):
        generate_lung_ct(tmp_path / "bad", n=2, size=32, lesion_hu=(0.0, 10.0))


def test_cli_synth_lung_ct(tmp_path) -> None:
    out = tmp_path / "ct"
    result = cli("synth", "lung-ct", "--n", 6, "--size", 32, "--seed", 2, "--out", out)
    assert result.exit_code == 0, result.output
    assert len(validate_dataset(out)) == 6
    direct = tmp_path / "direct"
    generate_lung_ct(direct, n=6, size=32, seed=2)
    assert _tree(out) == _tree(direct)
