"""Training stabilisers: an EMA of the weights that validation and the checkpoints use (and
a resume restores), learning-rate warm-up and gradient clipping that reach the optimiser."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from _kill import Kill, Killed
from _synth import tiny_cxr

from medtextseg.config import load_preset
from medtextseg.engine import train

BASE = ["data.augment=none", "train.patience=50"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_cxr(tmp_path_factory, seed=7)


class Record(L.Callback):
    """Learning rate at every optimizer step, gradient norm after clipping."""

    def __init__(self):
        self.lrs: list[float] = []
        self.norms: list[float] = []
        self.average_at_start: dict | None = None
        self.model_at_start: dict | None = None
        # Per validation batch: do the module's weights equal the average / the raw weights
        # as the last training step left them? (Lightning swaps the two for validation.)
        self.val_sees_average: list[bool] = []
        self.val_sees_raw: list[bool] = []
        self._last: tuple[dict, dict] | None = None

    @staticmethod
    def _average(trainer):
        for cb in trainer.callbacks:
            if isinstance(cb, L.pytorch.callbacks.WeightAveraging) and cb._average_model is not None:
                return cb._average_model.module
        return None

    @staticmethod
    def _state(module) -> dict:
        return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    def on_train_start(self, trainer, module):
        self.model_at_start = {k: v.clone() for k, v in module.state_dict().items()}
        if (average := self._average(trainer)) is not None:
            self.average_at_start = {k: v.clone() for k, v in average.state_dict().items()}

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0):
        if self._last is not None and not trainer.sanity_checking:
            now, (average, raw) = self._state(module), self._last
            self.val_sees_average.append(all(torch.equal(now[k], average[k]) for k in average))
            self.val_sees_raw.append(all(torch.equal(now[k], raw[k]) for k in raw))

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if (average := self._average(trainer)) is not None:
            self._last = (self._state(average), self._state(module))
        grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
        self.norms.append(float(torch.linalg.vector_norm(torch.stack(grads))))


def _val_dice_per_epoch(run: Path) -> list[float]:
    out = []
    for path in sorted((run / "logs" / "csv").glob("version_*/metrics.csv")):
        with open(path) as f:
            out += [float(r["val/dice"]) for r in csv.DictReader(f) if r.get("val/dice")]
    return out


def test_ema_weights_are_validated_and_checkpointed(data, tmp_path):
    cfg = load_preset("unet", "smoke", [*BASE, "train.max_epochs=2", "train.ema_decay=0.9"])
    run = tmp_path / "ema"
    rec = Record()
    metrics = train(cfg, data, run, progress=False, extra_callbacks=[rec])
    # Validation runs on the average, training on the raw weights (which differ from it).
    assert rec.val_sees_average and all(rec.val_sees_average)
    assert not any(rec.val_sees_raw)
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    raw, avg = ckpt["current_model_state"], ckpt["state_dict"]
    assert any(not torch.equal(raw[k], avg[k]) for k in raw if raw[k].is_floating_point())
    # The Val Dice logged during training is the Dice of the checkpoint the run evaluates.
    best_epoch = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["epoch"]
    assert _val_dice_per_epoch(run)[best_epoch] == pytest.approx(metrics["Val"]["dice"], abs=1e-5)


def test_ema_average_is_restored_on_resume(data, tmp_path):
    cfg = load_preset("unet", "smoke", [*BASE, "train.max_epochs=2", "train.ema_decay=0.9"])
    run = tmp_path / "ema"
    with pytest.raises(Killed):
        train(cfg, data, run, progress=False, extra_callbacks=[Kill(1)])
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    saved, raw = ckpt["state_dict"], ckpt["current_model_state"]
    rec = Record()
    train(cfg, data, run, resume=True, progress=False, extra_callbacks=[rec])
    assert rec.average_at_start is not None
    # The raw weights come back too (not the average in their place), and they differ from it.
    assert rec.model_at_start.keys() == raw.keys()
    assert all(torch.equal(rec.model_at_start[k], raw[k]) for k in raw)
    assert any(not torch.equal(raw[k], saved[k]) for k in raw if raw[k].is_floating_point())
    net = {k[len("net."):]: v for k, v in saved.items() if k.startswith("net.")}
    restored = {k[len("net."):]: v for k, v in rec.average_at_start.items() if k.startswith("net.")}
    assert net.keys() == restored.keys()
    assert all(torch.equal(net[k], restored[k]) for k in net)


def test_lr_warmup_reaches_the_optimiser(data, tmp_path):
    cfg = load_preset("unet", "smoke", [*BASE, "train.max_epochs=2", "optim.lr_warmup_epochs=1",
                                        "optim.scheduler=none", "optim.lr=0.01"])
    rec = Record()
    train(cfg, data, tmp_path / "warm", progress=False, extra_callbacks=[rec])
    n = len(rec.lrs) // 2  # steps per epoch
    assert n >= 2
    assert rec.lrs[:n] == pytest.approx([0.01 * (i + 1) / n for i in range(n)])
    assert rec.lrs[n:] == pytest.approx([0.01] * (len(rec.lrs) - n))


def test_cosine_restarts_per_epoch_times_warmup(data, tmp_path):
    cfg = load_preset("unet", "smoke", [*BASE, "train.max_epochs=3", "optim.lr_warmup_epochs=0",
                                        "optim.scheduler=cosine_restarts", "optim.t0=2", "optim.lr=0.01",
                                        "optim.eta_min=0.001"])
    rec = Record()
    train(cfg, data, tmp_path / "cos", progress=False, extra_callbacks=[rec])
    n = len(rec.lrs) // 3
    mid = 0.001 + (0.01 - 0.001) * (1 + math.cos(math.pi / 2)) / 2
    assert rec.lrs == pytest.approx([0.01] * n + [mid] * n + [0.01] * n)


def test_gradient_clipping_reaches_the_optimiser(data, tmp_path):
    cfg = load_preset("unet", "smoke", [*BASE, "train.max_epochs=1", "optim.grad_clip=0.001"])
    rec = Record()
    train(cfg, data, tmp_path / "clip", progress=False, extra_callbacks=[rec])
    assert rec.norms and max(rec.norms) <= 0.001 * 1.01
    info = json.loads((tmp_path / "clip" / "run.json").read_text())
    assert info["finished"]["epochs"] >= 1
