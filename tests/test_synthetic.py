"""Synthetic QaTa-like chest X-ray generator: layout on disk, determinism, text/mask
agreement, grammar and text-noise statistics."""

from __future__ import annotations

import zipfile
from collections import Counter, deque
from pathlib import Path

import numpy as np
import pytest
from openpyxl import load_workbook
from PIL import Image

from medtextseg.data.sample import SPLITS
from medtextseg.data.synthetic import GENERATORS, generate_chest_xray
from medtextseg.data.synthetic.chest_xray import ChestXrayConfig, item_name, make_item
from medtextseg.data.synthetic.layout import (
    IMAGE_DIR,
    MASK_DIR,
    LViTLayoutWriter,
    split_folder,
    text_file_name,
)
from medtextseg.data.synthetic.qata_grammar import (
    COUNT_WORDS,
    LEVELS,
    QATA_NOISE_KIND_COUNTS,
    ZONES,
    Layout,
    LungFinding,
    add_annotation_noise,
    all_layouts,
    describe,
    level_band,
    parse_description,
    sample_layout,
)

TINY = {"n": 12, "size": 64}


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _components(mask: np.ndarray, min_pixels: int) -> int:
    """4-connected components of a boolean ``(H, W)`` mask with at least ``min_pixels``."""
    seen = np.zeros_like(mask)
    count = 0
    h, w = mask.shape
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, size = deque([(y, x)]), 0
        while queue:
            cy, cx = queue.popleft()
            size += 1
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        count += size >= min_pixels
    return count


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cxr") / "ds"
    summary = generate_chest_xray(out, seed=0, **TINY)
    return out, summary


def test_registry() -> None:
    assert GENERATORS["chest-xray"] is generate_chest_xray


def test_layout_files(tiny_dataset) -> None:
    out, summary = tiny_dataset
    assert sum(summary["splits"].values()) == TINY["n"]
    assert summary["splits"]["Train"] > summary["splits"]["Test"] >= summary["splits"]["Val"] >= 1
    names = set()
    for split in SPLITS:
        folder = out / split_folder(split)
        imgs = sorted(p.name for p in (folder / IMAGE_DIR).iterdir())
        masks = sorted(p.name for p in (folder / MASK_DIR).iterdir())
        assert imgs == masks and len(imgs) == summary["splits"][split]
        ws = load_workbook(folder / text_file_name(split)).active
        rows = list(ws.iter_rows(values_only=True))
        assert rows[0] == ("Image", "Description")
        assert sorted(r[0] for r in rows[1:]) == masks
        assert all(isinstance(r[1], str) and r[1] for r in rows[1:])
        for name in imgs:
            img = Image.open(folder / IMAGE_DIR / name)
            mask = np.asarray(Image.open(folder / MASK_DIR / name))
            assert img.mode == "L" and img.size == (TINY["size"],) * 2
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
        names |= set(imgs)
    assert names == {item_name(i, TINY["n"]) for i in range(TINY["n"])}
    assert item_name(12, 100) == "synth_00012.png"
    # no temp folder left next to the dataset
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_deterministic_and_seed_sensitive(tiny_dataset, tmp_path) -> None:
    out, _ = tiny_dataset
    again = tmp_path / "again"
    generate_chest_xray(again, seed=0, **TINY)
    assert _tree(out) == _tree(again)  # images, masks and xlsx byte for byte
    # no wall-clock time inside the xlsx (openpyxl stamps one unless told otherwise)
    with zipfile.ZipFile(out / split_folder("Train") / text_file_name("Train")) as z:
        assert {i.date_time for i in z.infolist()} == {(2000, 1, 1, 0, 0, 0)}
        core = z.read("docProps/core.xml").decode()
        assert core.count("2000-01-01T00:00:00Z") == 2, core
    other = tmp_path / "other"
    generate_chest_xray(other, seed=1, **TINY)
    a, b = _tree(out), _tree(other)
    pngs = [k for k in a if k.endswith(".png")]
    assert sum(a[k] != b.get(k) for k in pngs) > len(pngs) // 2


def test_workers_and_n_do_not_change_images(tmp_path) -> None:
    one = tmp_path / "one"
    two = tmp_path / "two"
    generate_chest_xray(one, n=6, size=32, seed=3, workers=1, split_fractions=(1, 0, 0))
    generate_chest_xray(two, n=6, size=32, seed=3, workers=2, split_fractions=(1, 0, 0))
    assert _tree(one) == _tree(two)
    small = tmp_path / "small"
    generate_chest_xray(small, n=3, size=32, seed=3, split_fractions=(1, 0, 0))
    img = Path(split_folder("Train")) / IMAGE_DIR / item_name(2, 3)
    assert _tree(small)[str(img)] == _tree(one)[str(img)]


def test_text_mask_agreement(tiny_dataset) -> None:
    out, _ = tiny_dataset
    cfg = ChestXrayConfig(size=TINY["size"])
    texts = {}
    for split in SPLITS:
        ws = load_workbook(out / split_folder(split) / text_file_name(split)).active
        texts |= {r[0]: (split, r[1]) for r in ws.iter_rows(min_row=2, values_only=True)}
    for i in range(TINY["n"]):
        item, text = make_item(0, i, cfg)
        split, written = texts[item_name(i, TINY["n"])]
        assert written == text == describe(item.layout)
        on_disk = np.asarray(
            Image.open(out / split_folder(split) / MASK_DIR / item_name(i, TINY["n"]))
        )
        np.testing.assert_array_equal(on_disk, item.mask)

        layout = parse_description(text)
        mask = item.mask > 0
        assert mask.any() and not (mask & (item.zones == 0)).any()  # lesions lie in the lungs
        total = mask.sum()
        for k, zone in enumerate(ZONES, start=1):
            in_zone = (mask & (item.zones == k)).sum()
            if zone in layout.zones():
                # every named zone is substantially covered
                assert in_zone >= 0.05 * (item.zones == k).sum(), (text, zone)
            else:
                # a clean zone holds at most a sliver spilling over a zone boundary
                assert in_zone <= 0.05 * total, (text, zone)
        left = (mask & np.isin(item.zones, [1, 2, 3])).any()
        right = (mask & np.isin(item.zones, [4, 5, 6])).any()
        assert (left and right) == text.startswith("Bilateral") == layout.bilateral
        count = text.split(", ")[1].split()[0]
        assert COUNT_WORDS.index(count) + 1 == layout.n_areas
        assert _components(mask, min_pixels=4) == layout.n_areas, text


def test_images_look_like_radiographs() -> None:
    item, _ = make_item(0, 0, ChestXrayConfig(size=64))
    img = item.image.astype(float)
    lungs = img[item.zones > 0].mean()
    mid = img[20:44, 30:34].mean()  # mediastinum / spine column
    corners = np.concatenate([img[-6:, :4].ravel(), img[-6:, -4:].ravel()]).mean()  # air
    assert lungs + 30 < mid
    assert corners + 30 < mid
    assert img.std() > 25


def test_grammar_round_trip_all_layouts() -> None:
    layouts = all_layouts()
    assert len(layouts) == len(set(layouts)) == 80
    for layout in layouts:
        text = describe(layout)
        assert parse_description(text) == layout
        assert 1 <= layout.n_areas <= 4
        assert text.startswith("Bilateral" if layout.bilateral else "Unilateral")
    # the real data's counting rule: a skipped level splits a lung into two areas
    assert Layout(LungFinding(("upper", "lower")), LungFinding(("lower",))).n_areas == 3
    assert Layout(LungFinding(LEVELS, diffuse=True), None).n_areas == 1
    assert describe(Layout(None, LungFinding(("middle", "lower")))) == (
        "Unilateral pulmonary infection, one infected area, middle lower right lung."
    )
    with pytest.raises(ValueError):
        parse_description(
            "Unilateral pulmonary infection, one infected area, lower middle left lung."
        )


def test_layout_frequencies_match_qata() -> None:
    rng = np.random.default_rng(0)
    layouts = [sample_layout(rng) for _ in range(2000)]
    bilateral = np.mean([lay.bilateral for lay in layouts])
    assert abs(bilateral - 0.79) < 0.03
    areas = Counter(lay.n_areas for lay in layouts)
    assert abs(areas[1] / 2000 - 0.21) < 0.03 and abs(areas[2] / 2000 - 0.75) < 0.03
    top = Counter(describe(lay) for lay in layouts).most_common(1)[0]
    assert top[0].endswith("all left lung and all right lung.") and abs(top[1] / 2000 - 0.31) < 0.03


def test_annotation_noise() -> None:
    rng = np.random.default_rng(0)
    clean = [describe(sample_layout(rng)) for _ in range(2000)]
    noisy = [add_annotation_noise(t, rng) if rng.random() < 0.07 else t for t in clean]
    changed = [n for c, n in zip(clean, noisy) if n != c]
    assert abs(len(changed) / 2000 - 0.07) < 0.02
    # every real noise kind yields a sentence the strict grammar rejects
    text = describe(Layout(LungFinding(("middle", "lower")), LungFinding(("lower",))))
    for kind in set(QATA_NOISE_KIND_COUNTS) - {"plural"}:
        bad = add_annotation_noise(text, rng, kind=kind)
        assert bad != text
        with pytest.raises(ValueError):
            parse_description(bad)
    one = describe(Layout(None, LungFinding(("lower",))))
    assert "one infected areas" in add_annotation_noise(one, rng, kind="plural")


def test_text_noise_in_generator(tmp_path) -> None:
    summary = generate_chest_xray(tmp_path / "noisy", n=8, size=32, text_noise=1.0)
    assert summary["noisy_texts"] == 8


def test_refuses_non_empty_output(tmp_path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_chest_xray(out, n=2, size=32)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no temp folder left
    generate_chest_xray(out, n=2, size=32, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / split_folder("Train")).is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    generate_chest_xray(empty, n=2, size=32)  # an empty folder is fine


def test_interrupted_write_leaves_nothing(tmp_path) -> None:
    out = tmp_path / "ds"
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(KeyboardInterrupt), LViTLayoutWriter(out) as writer:
        writer.add("Train", "a.png", img, img, "Unilateral pulmonary infection, ...")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_level_band_is_open_at_the_lungs_ends_and_moves_by_the_margin():
    bounds = [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]  # upper, middle, lower
    assert LEVELS == ("upper", "middle", "lower")
    assert level_band(bounds, ("middle",), 0.25) == (0.75, 2.25)
    assert level_band(bounds, ("middle",), -0.25) == (1.25, 1.75)  # a distractor keeps clear of it
    assert level_band(bounds, ("upper", "middle"), 0.25) == (-np.inf, 2.25)
    assert level_band(bounds, ("lower",), -0.25) == (2.25, np.inf)
    layout = parse_description("Unilateral pulmonary infection, one infected area, upper left lung.")
    assert layout.clean_zones() == [z for z in ZONES if z != ("left", "upper")]
