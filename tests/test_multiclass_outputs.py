"""Multi-class outputs (K >= 2 class ids, 0 = background): the palette overlay, check-data's
classes per split and its refusal of a class id >= K, the per-class tables of the CLI and of
report, and predict's class-id masks, palette overlays and legend.png on a 20-class spine run.

One tiny supervised U-Net run is trained per module (smoke tier, 2 batches) on 3 synthetic
spine MR cases; everything else is hand-made and takes milliseconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import openpyxl
import pytest
import yaml
from _synth import cli, no_network  # noqa: F401
from PIL import Image

import medtextseg.cli as C
from medtextseg.classes import (
    BINARY_COLOR,
    CLASSES_FILE,
    OVERLAY_ALPHA,
    default_names,
    in_class_order,
    legend_png,
    overlay_labels,
    palette,
)
from medtextseg.data.readers import read_dataset
from medtextseg.data.synthetic.spine_mr import CLASS_NAMES, generate_spine_mr
from medtextseg.predict import OutputError, overlay, predict
from medtextseg.report import metrics_table

# --------------------------------------------------------------------------- palette overlay


def _blend(image: np.ndarray, color) -> np.ndarray:
    return (1 - OVERLAY_ALPHA) * image.astype(np.float64) + OVERLAY_ALPHA * np.asarray(color, np.float64)


def test_palette_overlay_tints_each_class_with_its_fixed_colour_and_leaves_background():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    labels = np.zeros((6, 5), np.uint8)
    labels[1:3, 1:4] = 1
    labels[4, :] = 3
    out = overlay_labels(image, labels, 4)
    assert out.shape == image.shape and out.dtype == np.uint8
    bg = labels == 0
    assert np.array_equal(out[bg], image[bg])
    pal = palette(4)
    for c in (1, 3):
        got, want = out[labels == c].astype(float), _blend(image[labels == c], pal[c])
        assert np.abs(got - want).max() <= 1, c
    # Two classes on one grey level come out in different colours.
    flat = np.full((1, 2, 3), 128, np.uint8)
    two = overlay_labels(flat, np.array([[1, 2]], np.uint8), 3)
    assert not np.array_equal(two[0, 0], two[0, 1])
    # Fixed: the same colours on every call, and a class's colour does not depend on K.
    assert np.array_equal(overlay_labels(image, labels, 4), out)
    assert np.array_equal(palette(4), palette(20)[:4])
    assert tuple(palette(20)[0]) == (0, 0, 0) and len({tuple(c) for c in palette(20)[1:]}) == 19


def test_binary_overlay_is_the_red_tint_of_before():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    mask = np.where(rng.random((5, 7)) > 0.5, 255, 0).astype(np.uint8)
    # The former predict.overlay, verbatim: float32 blend with [255, 40, 40] at alpha 0.45.
    old = image.astype(np.float32)
    fg = mask > 0
    old[fg] = (1 - 0.45) * old[fg] + 0.45 * np.array([255, 40, 40], dtype=np.float32)
    old = old.clip(0, 255).astype(np.uint8)
    assert BINARY_COLOR == (255, 40, 40)
    assert np.array_equal(overlay(image, mask), old)
    assert np.array_equal(overlay_labels(image, mask // 255, 1), old)  # {0, 1} masks alike


def test_class_names_are_merged_in_class_id_order():
    names = ["background", "S", "L5", "L4", "T12"]
    # Val lists S, T12; Test lists S, L4: L4 goes before T12 when the names are known.
    assert in_class_order(["S", "T12", "S", "L4"], names) == ["S", "L4", "T12"]
    assert in_class_order(["S", "T12", "S", "L4"]) == ["S", "T12", "L4"]  # unknown: first seen
    assert in_class_order(["x", "S"], names) == ["S", "x"]


# --------------------------------------------------------------------------- check-data

K = 4
NAMES = ["background", "disc", "body", "canal"]
# Per image: the class ids its mask holds (row bands); Train: class 1 in 2 images, and so on.
MASKS = {"Train": {"a": (0, 1, 2), "b": (0, 1), "c": (0, 3)}, "Val": {"v": (0, 2)}, "Test": {"t": (0, 1, 2, 3)}}


def _xlsx(path: Path, rows) -> None:
    book = openpyxl.Workbook()
    book.active.append(["Image", "Description"])
    for row in rows:
        book.active.append(list(row))
    book.save(path)


def _label_dataset(root: Path, classes: list[str] | None = NAMES) -> Path:
    """A hand-made LViT-layout dataset whose masks are 8x6 label maps with the ids of MASKS."""
    for split, items in MASKS.items():
        folder = root / f"{split}_Folder"
        (folder / "img").mkdir(parents=True)
        (folder / "labelcol").mkdir()
        for stem, ids in items.items():
            Image.fromarray(np.full((8, 6, 3), 90, np.uint8)).save(folder / "img" / f"{stem}.png")
            rows = np.resize(np.asarray(ids, np.uint8), 8)
            Image.fromarray(np.repeat(rows[:, None], 6, axis=1)).save(folder / "labelcol" / f"{stem}.png")
        _xlsx(folder / f"{split}_text.xlsx", [(f"{s}.png", f"about {s}") for s in items])
    if classes is not None:
        (root / CLASSES_FILE).write_text("\n".join(classes) + "\n")
    return root


def _table_rows(output: str) -> dict[str, list[str]]:
    """The cells of the class table's body rows, keyed by class id."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃|]", line)[1:-1]]
        if len(cells) >= 2 and cells[0].isdigit():
            rows[cells[0]] = cells[1:]
    return rows


def test_check_data_prints_the_classes_present_per_split(tmp_path):
    root = _label_dataset(tmp_path / "ds")
    res = cli("check-data", root, "--num-classes", K)
    assert res.exit_code == 0, res.output
    assert "classes present" in res.output
    want = {str(c): [NAMES[c]] + [str(sum(c in ids for ids in MASKS[sp].values())) for sp in ("Train", "Val", "Test")]
            for c in range(K)}
    assert _table_rows(res.output) == want
    assert want["1"] == ["disc", "2", "0", "1"]  # the counts by hand, in case MASKS changes


def test_check_data_names_classes_by_default_without_classes_txt(tmp_path):
    root = _label_dataset(tmp_path / "ds", classes=None)
    res = cli("check-data", root, "--num-classes", K)
    assert res.exit_code == 0, res.output
    assert [r[0] for r in _table_rows(res.output).values()] == default_names(K)


def test_check_data_notes_a_classes_txt_of_another_length(tmp_path):
    root = _label_dataset(tmp_path / "ds", classes=NAMES[:3])
    res = cli("check-data", root, "--num-classes", K)
    assert res.exit_code == 0, res.output
    assert "classes.txt has 3 names" in res.output and "data.classes" in res.output
    assert [r[0] for r in _table_rows(res.output).values()] == default_names(K)


def test_roots_class_names_agree_across_roots_and_read_a_manifests_folder(tmp_path):
    from medtextseg.classes import roots_class_names

    a, b = tmp_path / "a", tmp_path / "b"
    for root, names in ((a, ["background", "x", "y"]), (b, ["background", "x", "z"])):
        root.mkdir()
        (root / "classes.txt").write_text("\n".join(names) + "\n")
    manifest = a / "m.csv"
    manifest.write_text("image,mask,text,split\n")
    assert roots_class_names([manifest, tmp_path / "none"], 3) == ["background", "x", "y"]
    assert roots_class_names([tmp_path], 3) is None
    with pytest.raises(ValueError, match="name their classes differently"):
        roots_class_names([a, b], 3)
    with pytest.raises(ValueError, match=r"a/classes.txt has 3 names"):
        roots_class_names([a], 4)


def test_binary_check_data_prints_no_class_table(tmp_path):
    root = _label_dataset(tmp_path / "ds")
    for mask in root.rglob("labelcol/*.png"):  # binary masks: every class id becomes 255
        m = np.asarray(Image.open(mask))
        Image.fromarray(np.where(m > 0, 255, 0).astype(np.uint8)).save(mask)
    res = cli("check-data", root)
    assert res.exit_code == 0, res.output
    assert "classes present" not in res.output


def test_check_data_refuses_a_class_id_of_k_or_more_with_exit_2(tmp_path):
    root = _label_dataset(tmp_path / "ds")
    mask = root / "Train_Folder" / "labelcol" / "b.png"
    m = np.asarray(Image.open(mask)).copy()
    m[0, 0] = 7
    Image.fromarray(m).save(mask)
    res = cli("check-data", root, "--num-classes", K)
    assert res.exit_code == 2, res.output
    assert "b.png" in res.output and "7" in res.output and f"0..{K - 1}" in res.output
    assert "classes present" not in res.output
    # The same masks are fine when K covers id 7.
    assert cli("check-data", root, "--num-classes", 8).exit_code == 0


# --------------------------------------------------------------------------- per-class tables

def _fake_run(path: Path, seed: int, classes: dict | None, *, names: list[str] | None = None) -> Path:
    """A run directory holding only a hand-written metrics.json (and, with ``names``, a config)."""
    path.mkdir(parents=True)
    test = {"dice": 0.5, "iou": 0.4, "dice_orig": 0.5, "iou_orig": 0.4, "n": 3,
            "data": {"name": "spine", "fingerprint": "ab" * 8}}
    if classes is not None:
        test["classes"] = {c: {"dice": d, "iou": i, "dice_orig": d, "iou_orig": i, "n": 2}
                           for c, (d, i) in classes.items()}
    model = {"preset": "unet", "tier": "smoke", "use_text": False, "text_encoder": "learned",
             "parameters": 1_000_000, "threshold": 0.5, "seed": seed}
    (path / "metrics.json").write_text(json.dumps({"Test": test, "model": model}))
    if names is not None:
        (path / "config.yaml").write_text(yaml.safe_dump({"data": {"num_classes": len(names), "classes": names}}))
    return path


def _md_rows(md: str) -> dict[str, list[str]]:
    return {cells[0]: cells[1:] for line in md.splitlines() if line.startswith("| ")
            for cells in [[c.strip() for c in line.strip("|").split("|")]]}


def test_report_adds_a_per_class_table_mean_and_std_over_seeds(tmp_path):
    a = _fake_run(tmp_path / "s1", 1, {"disc": (0.5, 0.4), "canal": (0.9, 0.8)}, names=NAMES)
    b = _fake_run(tmp_path / "s2", 2, {"disc": (0.7, 0.6), "body": (0.2, 0.1), "canal": (0.9, 0.8)}, names=NAMES)
    md = metrics_table([a, b])
    main, per = md.split("Per class (Test):")
    assert "| unet | smoke |" in main and "Class" not in main
    rows = _md_rows(per)
    assert rows["Class"] == ["unet Dice", "unet IoU"]
    assert rows["disc"] == ["60.00 ± 14.14", "50.00 ± 14.14"]
    assert rows["body"] == ["20.00", "10.00"]  # only one seed has it
    assert rows["canal"] == ["90.00 ± 0.00", "80.00 ± 0.00"]
    # Class-id order (disc, body, canal) from the runs' data.classes, though seed 1 lists canal second.
    assert [k for k in rows if k in NAMES] == ["disc", "body", "canal"]


def test_report_of_binary_runs_has_no_per_class_table(tmp_path):
    md = metrics_table([_fake_run(tmp_path / "s1", 1, None)])
    assert "Per class" not in md and "| unet | smoke |" in md


def test_cli_prints_a_per_class_table_in_class_id_order(capsys):
    metrics = {split: {"dice": 0.5, "iou": 0.4, "dice_orig": 0.5, "iou_orig": 0.4, "n": 2,
                       "classes": classes}
               for split, classes in {
                   "Val": {"disc": {"dice": 0.25, "iou": 0.125, "n": 1}, "canal": {"dice": 1.0, "iou": 1.0, "n": 1}},
                   # "body" scored at the original size only: no Dice / IoU at the network's size.
                   "Test": {"body": {"dice_orig": 0.5, "iou_orig": 0.3, "n": 1},
                            "canal": {"dice": 0.5, "iou": 0.25, "n": 2}},
               }.items()}
    C._print_metrics(metrics, "run", NAMES)
    out = capsys.readouterr().out
    assert "per class" in out
    rows = {cells[0]: cells[1:] for line in out.splitlines()
            if len(cells := [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]) == 3 and cells[0] in NAMES}
    assert list(rows) == ["disc", "body", "canal"]
    assert rows["disc"] == ["25.00 / 12.50", "—"]
    assert rows["body"] == ["—", "—"]
    assert rows["canal"] == ["100.00 / 100.00", "50.00 / 25.00"]


def test_cli_prints_no_per_class_table_for_binary_metrics(capsys):
    C._print_metrics({"Test": {"dice": 0.5, "iou": 0.4, "dice_orig": 0.5, "iou_orig": 0.4, "n": 2}}, "run")
    assert "per class" not in capsys.readouterr().out


# --------------------------------------------------------------------------- predict / report on a run

@pytest.fixture(scope="module")
def spine(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("spine") / "data"
    generate_spine_mr(out, n_cases=3, seed=0, size=32)
    return out


def test_spine_mr_writes_classes_txt_and_the_reader_loads_the_dataset(spine):
    assert (spine / CLASSES_FILE).read_text().splitlines() == list(CLASS_NAMES)
    samples = read_dataset(spine)
    assert {s.split for s in samples} == {"Train", "Val", "Test"} and all(s.labeled for s in samples)


@pytest.fixture(scope="module")
def run(spine, tmp_path_factory, no_network) -> Path:  # noqa: F811
    from medtextseg.config import load_preset
    from medtextseg.engine import train

    out = tmp_path_factory.mktemp("runs") / "unet20"
    cfg = load_preset("unet", "smoke", ["data.augment=none", "train.max_epochs=1", "train.limit_train_batches=2",
                                        "data.num_classes=20", "data.img_size=[64,32]", "data.in_channels=1",
                                        "data.eval_batch_size=16"])
    train(cfg, spine, out, progress=False)
    return out


def _rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def _check_overlays(out: Path, images: Path, written: list[Path]) -> set[int]:
    """Every mask is an [H, W] uint8 class-id map at its image's size and its overlay is the
    image with each class blended in its palette colour; returns the class ids seen."""
    pal, seen = palette(20), set()
    for mask_path in written:
        mask = Image.open(mask_path)
        labels = np.asarray(mask)
        image = _rgb(images / mask_path.name)
        assert mask.mode == "L" and labels.shape == image.shape[:2]  # the image's own size
        assert labels.max() < 20
        seen |= set(np.unique(labels).tolist())
        over = _rgb(out / "overlays" / mask_path.name)
        assert np.array_equal(over[labels == 0], image[labels == 0])
        assert np.abs(over - _blend(image, pal[labels]))[labels > 0].max(initial=0) <= 1
    return seen


def test_predict_writes_class_id_masks_palette_overlays_and_a_legend(run, spine, tmp_path):
    images = spine / "Test_Folder" / "img"
    out = tmp_path / "pred"
    written = predict(run, images, out, text="L5 link")
    assert [p.name for p in written] == sorted(p.name for p in images.iterdir())
    _check_overlays(out, images, written)
    # The legend: names from the run's data.classes (the dataset's classes.txt), every
    # foreground class's swatch in its palette colour.
    legend = out / "legend.png"
    assert legend.read_bytes() == legend_png(list(CLASS_NAMES), 20)
    assert legend.read_bytes() != legend_png(default_names(20), 20)
    colours = {tuple(c) for c in _rgb(legend).reshape(-1, 3)}
    assert {tuple(int(v) for v in palette(20)[c]) for c in range(1, 20)} <= colours
    assert not list(out.rglob("*.tmp")), "atomic writes left temp files"


# Column x of every image is class IDS[x % 4]: background and classes at both ends of the palette.
IDS = (0, 3, 12, 19)


def test_predict_writes_the_networks_class_ids_and_their_colours(run, spine, tmp_path, monkeypatch):
    """The run's own network barely trained; its logits are replaced by ones whose argmax is
    a known pattern, so every class id of IDS must come out in the mask and its colour."""
    import torch

    import medtextseg.predict as P

    real = P.predict_logits

    def known_logits(method, loader, on_batch):
        def swap(batch, logits):
            b, _, h, w = logits.shape
            ids = torch.tensor(IDS)[torch.arange(w) % len(IDS)].view(1, 1, 1, w).expand(b, 1, h, w)
            on_batch(batch, torch.full_like(logits, -5.0).scatter_(1, ids, 5.0))
        return real(method, loader, swap)

    monkeypatch.setattr(P, "predict_logits", known_logits)
    images = spine / "Test_Folder" / "img"
    written = predict(run, images, tmp_path / "pred", text="L5 link")
    assert _check_overlays(tmp_path / "pred", images, written) == set(IDS)
    labels = np.asarray(Image.open(written[0]))
    assert labels.shape == (64, 32)  # the network's size too, so no resize blurs the pattern
    assert np.array_equal(labels, np.tile(np.resize(np.asarray(IDS, np.uint8), 32), (64, 1)))


def test_overwrite_replaces_the_legend_but_refuses_foreign_files(run, spine, tmp_path):
    images = spine / "Test_Folder" / "img"
    out = tmp_path / "pred"
    predict(run, images, out, text="L5 link")
    good = (out / "legend.png").read_bytes()
    (out / "legend.png").write_bytes(b"stale")
    (out / ".legend.png.x1y2.tmp").write_bytes(b"half")  # what an interrupted write leaves
    with pytest.raises(OutputError, match="not empty"):
        predict(run, images, out, text="L5 link")
    predict(run, images, out, text="L5 link", overwrite=True)
    assert (out / "legend.png").read_bytes() == good
    assert not (out / ".legend.png.x1y2.tmp").exists()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        predict(run, images, out, text="L5 link", overwrite=True)
    assert (out / "legend.png").read_bytes() == good and (out / "notes.txt").read_text() == "mine"


def test_report_grid_uses_the_palette_with_a_legend_and_lists_classes(run, tmp_path):
    from medtextseg.report import report

    md = report([run], tmp_path / "report", n_images=2).read_text()
    assert "Per class (Test):" in md
    rows = _md_rows(md.split("Per class (Test):")[1])
    assert rows["Class"] == ["unet Dice", "unet IoU"]
    listed = [k for k in rows if k in CLASS_NAMES]
    assert listed and listed == [c for c in CLASS_NAMES if c in listed]  # class-id order
    # The legend's swatches are solid palette colours.
    colours = {tuple(c) for c in _rgb(tmp_path / "report" / "overlays.png").reshape(-1, 3)}
    assert {tuple(int(v) for v in palette(20)[c]) for c in (1, 2, 19)} <= colours
