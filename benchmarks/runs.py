"""Shared by the accuracy benchmarks: train one configuration in a child process
(so its peak memory is its own), reuse finished runs, and format mean ± std.

A finished run holds ``metrics.json`` and ``bench.json`` (wall-clock seconds,
epochs trained, seconds per epoch, peak resident MiB); delete the run folder to
train it again. A run whose child was killed (a benchmark stopped, the machine
lost) resumes from its last checkpoint when the same configuration is asked for
again, instead of training from scratch: ``bench.partial.json`` holds what it was
started with and the time of its earlier attempts.
"""

from __future__ import annotations

import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

from medtextseg.utils import atomic_write_json

BENCH_FILE = "bench.json"
PARTIAL_FILE = "bench.partial.json"


def fmt(xs: list[float], scale: float = 100.0) -> str:
    xs = [scale * x for x in xs]
    if not xs:
        return "—"
    return f"{xs[0]:.2f}" if len(xs) == 1 else f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}"


def _log_rows(run: Path):
    """Rows of the CSV log over all attempts of a run (a resume starts a new version)."""
    for f in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(f) as h:
            yield from csv.DictReader(h)


def logged(run: Path, key: str) -> list[tuple[int, float]]:
    """(epoch, value) of a logged metric over all attempts of a run, e.g. ``epi/pseudo_dice``."""
    return [(int(r["epoch"]), float(r[key])) for r in _log_rows(run) if r.get(key)]


def optimizer_steps(run: Path) -> int:
    """Optimizer steps a run took (all attempts): the largest logged ``step`` + 1."""
    return max((int(r["step"]) for r in _log_rows(run) if r.get("step")), default=-1) + 1


def train_in_child(preset: str, tier: str, overrides: list[str], data: Path | list, run: Path, *,
                   vlm: Path | None = None, stage: str = "train") -> dict:
    """Train (or reuse) one run; returns its metrics.json merged with bench.json.

    ``stage``: ``train`` (a segmentation run, with ``vlm`` for the methods that use a
    pre-trained model) or ``pretrain`` (a vision-language pre-training run)."""
    metrics_file, bench_file, legacy = run / "metrics.json", run / BENCH_FILE, run / "wallclock.json"
    if metrics_file.is_file() and not bench_file.is_file():
        # A finished run without our timings (trained by hand with `medtextseg train`, or by the
        # first accuracy script, which kept only the wall-clock): reuse its figures. The child
        # trains with overwrite=True, so retraining here would destroy a run we did not time.
        nan = float("nan")
        seconds = json.loads(legacy.read_text())["seconds"] if legacy.is_file() else nan
        bench = {"seconds": seconds, "epochs": 0, "seconds_per_epoch": nan, "epoch_seconds": [], "peak_mib": nan}
        return {**json.loads(metrics_file.read_text()), **bench}
    if not (metrics_file.is_file() and bench_file.is_file()):
        spec = json.dumps(run_spec(preset, tier, overrides, data, run, vlm=vlm, stage=stage))
        subprocess.run([sys.executable, __file__, spec], check=True)
    return {**json.loads(metrics_file.read_text()), **json.loads(bench_file.read_text())}


def run_spec(preset: str, tier: str, overrides: list[str], data: Path | list, run: Path, *,
             vlm: Path | None = None, stage: str = "train") -> dict:
    """What a child trains, as JSON-able values: the identity of a benchmark run."""
    # Several roots (a composite dataset) travel as a list of paths or NAME=PATH strings.
    where = [str(d) for d in data] if isinstance(data, (list, tuple)) else str(data)
    return {"preset": preset, "tier": tier, "overrides": list(overrides), "data": where, "run": str(run),
            "vlm": str(vlm) if vlm else None, "stage": stage}


def _earlier_attempts(run: Path, spec: dict) -> dict | None:
    """The timings of the killed attempts of this very run, when it can resume: it was
    started with ``spec`` (not another configuration that left the same folder), has a
    last checkpoint and has not finished. None: train from scratch."""
    from medtextseg.engine import LAST

    partial = run / PARTIAL_FILE
    if not (partial.is_file() and (run / "checkpoints" / f"{LAST}.ckpt").is_file()):
        return None
    earlier = json.loads(partial.read_text())
    return earlier if earlier.get("spec") == spec else None


def _child(spec: dict, callbacks: tuple = ()) -> None:
    """Train ``spec`` (a :func:`run_spec`) and write its timings; ``callbacks`` join the
    Trainer's (the tests' stand-in for a kill)."""
    import lightning as L

    from medtextseg.config import load_preset
    from medtextseg.engine import pretrain, resume_config, train
    from medtextseg.utils import keep_freed_memory

    keep_freed_memory()  # as the CLI does: this child process is ours

    class EpochTimer(L.Callback):
        """Wall-clock from one epoch's start to the next (the last: to the end of fit):
        training steps, validation, the method's epoch-end work (EPI refresh) and saving."""

        def __init__(self, earlier: dict | None):
            self.starts: list[float] = []
            self.times: list[float] = []
            self.earlier = earlier or {"seconds": 0.0, "epoch_seconds": [], "attempts": 0}
            self.t0 = time.perf_counter()

        def seconds(self) -> float:
            """Wall-clock of this attempt and the earlier ones."""
            return self.earlier["seconds"] + time.perf_counter() - self.t0

        def on_train_epoch_start(self, trainer, module):
            now = time.perf_counter()
            if self.starts:
                self.times.append(now - self.starts[-1])
            self.starts.append(now)
            # Up to the epoch that just ended: time spent after the last checkpoint of an
            # attempt that is killed is lost with it, and is not counted.
            atomic_write_json(run / PARTIAL_FILE, {
                "spec": spec, "seconds": self.seconds(), "attempts": self.earlier["attempts"] + 1,
                "epoch_seconds": self.earlier["epoch_seconds"] + self.times})

        def on_train_end(self, trainer, module):
            if self.starts:
                self.times.append(time.perf_counter() - self.starts[-1])

    run = Path(spec["run"])
    earlier = _earlier_attempts(run, spec)
    # A resume continues the saved configuration, which is the one asked for (same spec)
    # with what training filled in (class names, domains).
    cfg = resume_config(run) if earlier else load_preset(spec["preset"], spec["tier"], spec["overrides"])
    timer = EpochTimer(earlier)
    how = {"resume": True} if earlier else {"overwrite": True}
    if spec.get("stage") == "pretrain":
        pretrain(cfg, spec["data"], run, progress=False, extra_callbacks=[timer, *callbacks], **how)
    else:
        vlm = Path(spec["vlm"]) if spec.get("vlm") else None
        train(cfg, spec["data"], run, vlm=vlm, progress=False, extra_callbacks=[timer, *callbacks], **how)
    times = timer.earlier["epoch_seconds"] + timer.times
    atomic_write_json(run / BENCH_FILE, {
        "seconds": timer.seconds(), "epochs": len(times), "attempts": timer.earlier["attempts"] + 1,
        # Median of the second half: past the first epoch and the cheaper supervised warm-up
        # epochs of the semi-supervised methods (all epochs are in "epoch_seconds").
        "seconds_per_epoch": statistics.median(times[len(times) // 2:]) if times else float("nan"),
        "epoch_seconds": times,
        # Of the last attempt (a resumed run's earlier attempts were other processes).
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    })
    (run / PARTIAL_FILE).unlink(missing_ok=True)


if __name__ == "__main__":
    _child(json.loads(sys.argv[1]))
