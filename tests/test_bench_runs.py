"""The benchmarks' run helper: a run whose child was killed resumes from its last
checkpoint when the same configuration is asked for again, and its timings add up over
the attempts; another configuration in the same folder starts afresh."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from tests._kill import Kill, Killed
from tests._synth import tiny_cxr

RUNS_PY = Path(__file__).resolve().parents[1] / "benchmarks" / "runs.py"
OPTS = ["data.augment=none", "train.max_epochs=3", "train.patience=10"]


@pytest.fixture(scope="module")
def runs():
    spec = importlib.util.spec_from_file_location("bench_runs", RUNS_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return tiny_cxr(tmp_path_factory)


def _epochs_per_attempt(run: Path) -> list[set[str]]:
    out = []
    for attempt in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(attempt) as f:
            out.append({r["epoch"] for r in csv.DictReader(f) if r.get("val/dice")})
    return out


def test_a_killed_benchmark_run_resumes_and_times_both_attempts(runs, data, tmp_path):
    run = tmp_path / "unet-s0"
    spec = runs.run_spec("unet", "smoke", OPTS, data, run)
    with pytest.raises(Killed):
        runs._child(spec, callbacks=(Kill(2),))
    partial = json.loads((run / runs.PARTIAL_FILE).read_text())
    assert partial["attempts"] == 1 and len(partial["epoch_seconds"]) == 2
    assert not (run / runs.BENCH_FILE).exists()

    runs._child(spec)
    assert _epochs_per_attempt(run) == [{"0", "1"}, {"2"}]  # epochs 0-1 were not trained again
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 2
    bench = json.loads((run / runs.BENCH_FILE).read_text())
    assert bench["attempts"] == 2 and bench["epochs"] == 3
    assert bench["epoch_seconds"][:2] == partial["epoch_seconds"]
    assert bench["seconds"] >= partial["seconds"] + bench["epoch_seconds"][2]
    assert not (run / runs.PARTIAL_FILE).exists()
    assert "Test" in json.loads((run / "metrics.json").read_text())


def test_another_configuration_in_a_killed_runs_folder_starts_afresh(runs, data, tmp_path):
    run = tmp_path / "unet-s0"
    with pytest.raises(Killed):
        runs._child(runs.run_spec("unet", "smoke", OPTS, data, run), callbacks=(Kill(2),))
    runs._child(runs.run_spec("unet", "smoke", [*OPTS, "optim.lr=5e-4"], data, run))
    assert _epochs_per_attempt(run) == [{"0", "1", "2"}]
    assert json.loads((run / runs.BENCH_FILE).read_text())["attempts"] == 1
