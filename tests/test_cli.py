"""The edges of the command line and the run directory: options checked before anything
is written, failed starts that leave nothing behind, finished runs left alone, figures
that say which data they are on, reports whose rows use their own runs' values,
interrupts that end in one line, and a quiet console."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _kill import Kill, Killed
from _synth import SMOKE, runner, tiny_cxr
from _synth import cli as _cli

from medtextseg.cli import INTERRUPTED_EXIT, USER_ERROR_EXIT, app
from medtextseg.config import load_preset
from medtextseg.engine import RunError, resume_config, train

EXE = Path(sys.executable).with_name("medtextseg")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, seed=5)


@pytest.fixture(scope="module")
def other_data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, "cxr-other", seed=6)


@pytest.fixture(scope="module")
def unet_run(data, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("runs") / "unet"
    # Two key=value pairs after one --set flag.
    res = _cli("train", "--preset", "unet", "--data", data, "--out", run, "--tier", "smoke",
               "--set", "data.augment=none", "train.max_epochs=2")
    assert res.exit_code == 0, res.output
    return run


# --------------------------------------------------------------------------- options


def test_several_set_pairs_after_one_flag(unet_run):
    saved = (unet_run / "config.yaml").read_text()
    assert load_preset("unet", "smoke").train.max_epochs != 2  # so the pair after the first did apply
    assert "augment: none" in saved and "max_epochs: 2" in saved
    res = _cli("train", "--preset", "unet", "--data", unet_run, "--set", "train.max_epochs=2", "oops")
    assert res.exit_code == USER_ERROR_EXIT and "oops" in res.output and "key=value" in res.output


@pytest.mark.parametrize("devices", ["0", "-3", "x", "0.5"])
def test_bad_devices_refused_before_the_run_directory(data, tmp_path, devices):
    run = tmp_path / "run"
    res = _cli("train", "--preset", "unet", "--data", data, "--out", run, *SMOKE, "--devices", devices)
    assert res.exit_code == USER_ERROR_EXIT, res.output
    assert "--devices" in res.output and "Traceback" not in res.output
    assert not run.exists()


def test_devices_auto_is_accepted():
    cfg = load_preset("unet", "smoke", ["train.devices=auto"])
    assert cfg.train.devices == "auto"
    cfg = load_preset("unet", "smoke", ["train.devices=[0, 1]"])
    assert cfg.train.devices == [0, 1]


def test_unknown_accelerator_refused_before_the_run_directory(data, tmp_path):
    run = tmp_path / "run"
    res = _cli("train", "--preset", "unet", "--data", data, "--out", run, *SMOKE, "--accelerator", "tpu-x")
    assert res.exit_code == USER_ERROR_EXIT and "accelerator" in res.output
    assert not run.exists()


def test_unknown_split_names_no_internal_parameter(unet_run, data):
    res = _cli("evaluate", unet_run, "--data", data, "--split", "Nosuch")
    assert res.exit_code == USER_ERROR_EXIT
    assert "Nosuch" in res.output and "require_masks_in" not in res.output


def test_version_and_help():
    res = _cli("--version")
    assert res.exit_code == 0 and res.output.startswith("medtextseg ")
    res = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "300"})
    assert "runs/<preset>-<tier>[-r<ratio>]-s<seed>" in res.output


def test_synth_prints_a_table_not_a_dict(tmp_path):
    res = _cli("synth", "chest-xray", "--out", tmp_path / "d", "--n", "12", "--size", "32")
    assert res.exit_code == 0, res.output
    assert "{'" not in res.output and "unique texts" in res.output


# --------------------------------------------------------------------------- failed starts, resume


def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(data, tmp_path):
    cfg = load_preset("unet", "smoke", ["data.augment=none", "train.max_epochs=2"])
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(cfg, data, run, progress=False, extra_callbacks=[Kill(0)])
    assert not run.exists()
    train(cfg, data, run, progress=False)  # the same command again is not refused
    assert (run / "metrics.json").is_file()


def test_resume_of_a_finished_run_changes_nothing(unet_run):
    before = {p: p.stat().st_mtime_ns for p in unet_run.rglob("*") if p.is_file()}
    res = _cli("train", "--resume", "--out", unet_run)
    assert res.exit_code == 0, res.output
    assert "is complete" in res.output and "nothing was changed" in res.output
    after = {p: p.stat().st_mtime_ns for p in unet_run.rglob("*") if p.is_file()}
    assert after == before


def test_resume_continues_when_the_budget_is_raised(data, tmp_path):
    cfg = load_preset("unet", "smoke", ["data.augment=none", "train.max_epochs=1", "train.patience=10"])
    run = tmp_path / "run"
    train(cfg, data, run, progress=False)
    res = _cli("train", "--resume", "--out", run, "--set", "train.max_epochs=2")
    assert res.exit_code == 0, res.output
    assert "raised from 1 to 2" in res.output
    info = json.loads((run / "run.json").read_text())
    assert info["finished"]["epochs"] == 2


def test_resume_may_change_devices_but_not_the_experiment(unet_run):
    assert resume_config(unet_run, ["train.devices=auto"]).train.devices == "auto"
    with pytest.raises(RunError, match="optim.lr"):
        resume_config(unet_run, ["optim.lr=0.5"])


def test_unet_loads_no_text_model(unet_run):
    info = json.loads((unet_run / "run.json").read_text())
    assert info["text_spec"] == "none"


def test_parameter_count_is_the_predicting_network():
    from medtextseg.methods import method_class

    cfg = load_preset("mean-teacher", "smoke")
    method = method_class(cfg.method)(cfg.to_dict(), text_dim=1)
    net = sum(p.numel() for p in method.net.parameters())
    assert method.num_predictor_parameters() == net
    assert sum(p.numel() for p in method.parameters()) == 2 * net  # the teacher is not counted


# --------------------------------------------------------------------------- figures and their data


def test_figures_say_which_data_and_other_data_writes_beside(unet_run, data, other_data):
    own = json.loads((unet_run / "metrics.json").read_text())
    assert own["Test"]["data"]["fingerprint"] and own["Test"]["data"]["split"] == "Test"
    before = (unet_run / "metrics.json").read_text(), (unet_run / "per_image.csv").read_text()
    res = _cli("evaluate", unet_run, "--data", other_data, "--split", "Test", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert ((unet_run / "metrics.json").read_text(), (unet_run / "per_image.csv").read_text()) == before
    written = list((unet_run / "evaluations").glob("cxr-other-*/metrics.json"))
    assert len(written) == 1
    theirs = json.loads(written[0].read_text())
    assert theirs["Test"]["data"]["fingerprint"] != own["Test"]["data"]["fingerprint"]
    assert theirs["run"] == str(unet_run.resolve())
    # Re-evaluating on the run's own data updates its own figures, recorded with the same data.
    res = _cli("evaluate", unet_run, "--split", "Val")
    assert res.exit_code == 0, res.output
    again = json.loads((unet_run / "metrics.json").read_text())
    assert again["Val"]["data"]["fingerprint"] == own["Val"]["data"]["fingerprint"]
    assert again["Test"] == own["Test"]


def test_evaluate_out_folder(unet_run, other_data, tmp_path):
    out = tmp_path / "eval"
    res = _cli("evaluate", unet_run, "--data", other_data, "--split", "Val", "--out", out)
    assert res.exit_code == 0, res.output
    assert "Val" in json.loads((out / "metrics.json").read_text())


def test_report_rows_use_their_own_runs(unet_run, data, tmp_path):
    cfg = load_preset("unet", "smoke", ["data.augment=none", "train.max_epochs=1", "data.img_size=48",
                                        "data.threshold=0.3"])
    small = tmp_path / "small"
    train(cfg, data, small, progress=False)
    res = _cli("report", unet_run, small, "--out", tmp_path / "rep", "--n-images", "2")
    assert res.exit_code == 0, res.output
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Threshold" in md and "0.3" in md and "cxr (" in md
    assert "threshold 0.5" not in md


def test_report_does_not_choose_a_matplotlib_backend(unet_run, tmp_path):
    import matplotlib

    from medtextseg.report import report

    before = matplotlib.rcParams["backend"]
    report([unet_run], tmp_path / "rep", n_images=1)
    assert matplotlib.rcParams["backend"] == before


# --------------------------------------------------------------------------- interrupts, console


def _start(args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A runner started in the background (nohup, `&`, some CI) ignores SIGINT, and an ignored
    # signal stays ignored across exec; a handler of ours resets to the default there, so the
    # program under test sees Ctrl-C as a terminal sends it.
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return subprocess.Popen([str(EXE), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env, **kw)
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.slow
def test_ctrl_c_at_start_up_is_one_line_and_leaves_nothing(data, tmp_path):
    run = tmp_path / "run"
    proc = _start(["train", "--preset", "lvit-t", "--data", data, "--out", run, *SMOKE])
    time.sleep(1.5)  # inside the imports / data checks
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT, out + err
    assert "Traceback" not in out + err
    assert len([line for line in err.splitlines() if line.strip()]) == 1, err
    assert not run.exists() or not any(run.iterdir())


@pytest.mark.parametrize("shown", [False, True])
def test_ctrl_c_inside_typer_itself_still_says_so_once(monkeypatch, capsys, shown):
    """Typer ends an interrupt in its own code (parsing, between callbacks) with a silent exit
    130 (the subprocess test above lands there only by timing); the entry point then names
    it, and says nothing more where a command already did."""
    from medtextseg import cli

    def typer_app():
        if shown:  # a command's own report; Typer turns its Exit into sys.exit
            sys.exit(cli._interrupted("stopped by the user; nothing half-written was left").exit_code)
        sys.exit(INTERRUPTED_EXIT)

    monkeypatch.setattr(cli, "_INTERRUPT_SHOWN", type(cli._INTERRUPT_SHOWN)())
    monkeypatch.setattr(cli, "app", typer_app)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == INTERRUPTED_EXIT
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines == ["interrupted: " + ("stopped by the user; nothing half-written was left" if shown
                                        else "stopped before the command started")]


@pytest.mark.slow
def test_sigterm_mid_epoch_is_one_line_and_resumable_and_console_is_quiet(data, tmp_path):
    run = tmp_path / "run"
    proc = _start(["train", "--preset", "unet", "--data", data, "--out", run, "--tier", "smoke",
                   "--set", "data.augment=none", "train.max_epochs=200", "train.patience=500"])
    deadline = time.time() + 120
    while not (run / "checkpoints" / "last.ckpt").is_file():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == INTERRUPTED_EXIT, out + err
    assert "Traceback" not in out + err and "--resume" in err
    for noise in ("GPU available", "TPU available", "litlogger", "Loading weights", "limit_train_batches",
                  "pytree", "Warning"):
        assert noise not in out + err, noise
    done = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] + 1
    # A budget below the epochs already trained is one clear refusal, not Lightning's error.
    res = _cli("train", "--resume", "--out", run, "--set", f"train.max_epochs={done - 1}")
    assert res.exit_code == 2 and f"train.max_epochs={done}" in res.output, res.output
    res = _cli("train", "--resume", "--out", run, "--set", f"train.max_epochs={done + 1}")
    assert res.exit_code == 0, res.output
    assert "Test" in json.loads((run / "metrics.json").read_text())
