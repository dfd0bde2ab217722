"""End to end on a tiny synthetic set: synth -> check-data -> train -> evaluate -> predict -> report,
plus resume after an interrupted run, refusal of bad input, determinism and 2-process DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from _kill import Kill, Killed
from _synth import SMOKE, runner, tiny_cxr
from _synth import cli as _cli
from PIL import Image

from medtextseg.cli import USER_ERROR_EXIT, app
from medtextseg.config import load_preset
from medtextseg.engine import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, seed=3)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "lvit-t"
    res = runner.invoke(app, ["train", "--preset", "lvit-t", "--data", str(data), "--out", str(run), *SMOKE,
                              "--set", "train.max_epochs=2"])
    assert res.exit_code == 0, res.output
    return run


def test_check_data_ok(data):
    res = _cli("check-data", data)
    assert res.exit_code == 0, res.output
    assert "Train" in res.output and "Test" in res.output


def test_train_writes_the_run_directory(trained):
    for rel in ("config.yaml", "run.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                "metrics.json", "per_image.csv", "logs/csv/version_0/metrics.csv"):
        assert (trained / rel).is_file(), rel
    assert list((trained / "logs" / "tensorboard").glob("version_0/events.out.tfevents*"))
    metrics = json.loads((trained / "metrics.json").read_text())
    assert set(metrics) >= {"Val", "Test", "model"}
    for split in ("Val", "Test"):
        for key in ("dice", "iou", "dice_orig", "iou_orig"):
            assert 0.0 <= metrics[split][key] <= 1.0
    with open(trained / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == metrics["Val"]["n"] + metrics["Test"]["n"]
    assert not list(trained.rglob("*.tmp")), "atomic writes left temp files behind"


def test_evaluate_cli(trained, data):
    res = _cli("evaluate", trained, "--data", data, "--split", "Test")
    assert res.exit_code == 0, res.output
    assert "Test" in res.output


def test_predict_writes_original_size_masks(trained, data, tmp_path):
    images = data / "Test_Folder" / "img"
    res = _cli("predict", trained, "--images", images, "--text",
               "Unilateral pulmonary infection, one infected area, lower left lung.", "--out", tmp_path / "pred")
    assert res.exit_code == 0, res.output
    masks = sorted((tmp_path / "pred" / "masks").glob("*.png"))
    assert len(masks) == len(list(images.iterdir()))
    src = Image.open(images / masks[0].name)
    out = Image.open(masks[0])
    assert out.size == src.size and set(np.unique(np.asarray(out)).tolist()) <= {0, 255}
    assert len(list((tmp_path / "pred" / "overlays").glob("*.png"))) == len(masks)


def test_predict_rejects_missing_texts_before_writing(trained, data, tmp_path):
    images = data / "Test_Folder" / "img"
    table = tmp_path / "texts.csv"
    first = min(images.iterdir()).name
    table.write_text(f"image,text\n{first},Bilateral pulmonary infection.\nghost.png,x\n")
    res = _cli("predict", trained, "--images", images, "--texts", table, "--out", tmp_path / "pred")
    assert res.exit_code == USER_ERROR_EXIT
    assert "ghost.png" in res.output and "no text" in res.output
    assert not (tmp_path / "pred").exists()


def test_report(trained, tmp_path):
    res = _cli("report", trained, "--out", tmp_path / "rep", "--n-images", "2")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| lvit-t | smoke |" in md and "Dice" in md
    assert Image.open(tmp_path / "rep" / "overlays.png").size[0] > 100


def test_existing_run_is_not_overwritten(trained, data):
    before = (trained / "metrics.json").read_text()
    res = _cli("train", "--preset", "lvit-t", "--data", data, "--out", trained, *SMOKE)
    assert res.exit_code == USER_ERROR_EXIT and "--overwrite" in res.output
    assert (trained / "metrics.json").read_text() == before


def test_bad_data_refused_before_anything_is_written(data, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(data, bad)
    mask = next((bad / "Train_Folder" / "labelcol").iterdir())
    Image.new("L", (10, 10), 7).save(mask)
    run = tmp_path / "run"
    res = _cli("train", "--preset", "unet", "--data", bad, "--out", run, *SMOKE)
    assert res.exit_code == USER_ERROR_EXIT
    assert mask.name in res.output
    assert not run.exists()


def test_bad_options_are_one_message(data, tmp_path):
    res = _cli("train", "--preset", "nope", "--data", data, "--out", tmp_path / "r")
    assert res.exit_code == USER_ERROR_EXIT and "available" in res.output
    res = _cli("evaluate", tmp_path / "missing", "--data", data)
    assert res.exit_code == USER_ERROR_EXIT and "run directory" in res.output


def test_resume_continues_from_last_checkpoint(data, tmp_path):
    import torch

    cfg = load_preset("lvit-tw", "smoke", ["data.augment=none", "train.max_epochs=3", "train.patience=10"])
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(cfg, data, run, progress=False, extra_callbacks=[Kill(2)])
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["epoch"] == 1 and not (run / "metrics.json").exists()
    metrics = train(cfg, data, run, resume=True, progress=False)
    resumed = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert resumed["epoch"] == 2 and resumed["global_step"] > last["global_step"]
    assert "Test" in metrics
    epochs = set()
    for attempt in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(attempt) as f:
            epochs |= {r["epoch"] for r in csv.DictReader(f) if r.get("val/dice")}
    assert epochs == {"0", "1", "2"}  # the interrupted attempt's logs are kept


def test_a_killed_and_resumed_run_ends_as_the_uninterrupted_one(data, tmp_path):
    """Augmentation and data order continue where they stopped: the checkpoint holds the
    global generators and the augmentation streams, so resuming changes no figure."""
    cfg = load_preset("lvit-tw", "smoke", ["data.augment=rotate", "train.max_epochs=3", "train.patience=10"])
    whole = train(cfg, data, tmp_path / "whole", progress=False)
    with pytest.raises(Killed):
        train(cfg, data, tmp_path / "cut", progress=False, extra_callbacks=[Kill(2)])
    resumed = train(cfg, data, tmp_path / "cut", resume=True, progress=False)
    assert resumed["Val"] == whole["Val"] and resumed["Test"] == whole["Test"]


def test_same_seed_same_metrics(data, tmp_path):
    cfg = load_preset("lvit-t", "smoke", ["data.augment=rotate", "train.max_epochs=1"])
    a = train(cfg, data, tmp_path / "a", progress=False)
    b = train(cfg, data, tmp_path / "b", progress=False)
    assert a["Test"] == b["Test"]


@pytest.mark.slow
def test_ddp_two_processes_on_cpu(data, tmp_path):
    run = tmp_path / "ddp"
    exe = Path(sys.executable).with_name("medtextseg")
    cmd = [str(exe), "train", "--preset", "unet", "--data", str(data), "--out", str(run), *SMOKE,
           "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (run / "checkpoints" / "best.ckpt").is_file()
    assert "Test" in json.loads((run / "metrics.json").read_text())
