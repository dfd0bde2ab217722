"""Training, evaluation and the run directory.

A run directory holds::

    config.yaml        the resolved config (the only config a resume/evaluate reads)
    run.json           dataset path and fingerprint, text-encoder spec and state, text width,
                       and ``finished`` ({epochs, reason}) once training has ended
    split.json         labeled / unlabeled Train ids (only when data.labeled_ratio < 1 or labeled_ids)
    checkpoints/       best.ckpt (val Dice) and last.ckpt, written atomically
    logs/              csv/version_N/metrics.csv and tensorboard/version_N/ (one N per attempt)
    metrics.json       {split: {dice, iou, dice_orig, iou_orig, n, data}} per evaluated split,
                       ``data`` = the dataset's path, fingerprint and split (see ``evaluate``)
    evaluations/       <dataset>-<fp8>/{metrics.json, per_image.csv}: figures on other data
    per_image.csv      split, id, dice, iou, dice_orig, iou_orig, text

A pre-training run (``medtextseg pretrain``, :func:`pretrain`) has the same layout; its
``run.json`` says ``kind: "vlm"`` (with the module, data fingerprint, the model's text
encoder spec and input size), ``best.ckpt`` is selected on Val retrieval (``val/r1``),
and ``metrics.json`` holds per split the retrieval recalls both ways and the text
mask's Dice where masks exist (:func:`evaluate_pretrained`); there is no per_image.csv.

Lightning owns the loop, devices (``--devices``/``--strategy`` DDP), precision,
checkpointing, early stopping and logging; this module only wires them.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerStatus
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from medtextseg.classes import check_class_names, class_names, roots_class_names
from medtextseg.config import Config, ConfigError, read_config, save_config
from medtextseg.data.fingerprint import dataset_fingerprint, describe_data, domain_fingerprints
from medtextseg.data.io import read_mask
from medtextseg.data.module import (
    SegDataModule,
    domain_index,
    eval_batch_size,
    make_dataset,
    make_loader,
    mask_to_labels,
    parse_oversample,
)
from medtextseg.data.sample import Sample
from medtextseg.data.sources import ID_SEPARATOR, DataArg, DataSources, domain_names
from medtextseg.data.splits import SPLIT_FILE, LabeledSplit, apply_split, make_split
from medtextseg.data.validation import check_split_names, dataset_notes, validate_dataset
from medtextseg.methods import SegMethod, method_class
from medtextseg.metrics import binarize, dice_iou_per_class, dice_iou_per_image
from medtextseg.text.encoders import build_text_encoder
from medtextseg.utils import (
    atomic_write_bytes,
    atomic_write_json,
    numpy_rng_state,
    set_numpy_rng_state,
)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
BEST = "best"
LAST = "last"
MONITOR = "val/dice"
METRICS_FILE = "metrics.json"
EVAL_DIR = "evaluations"
# A training run needs both: Train to learn from, Val to select and stop on.
TRAIN_SPLITS = ("Train", "Val")


class RunError(ValueError):
    """A run directory that cannot be used as asked (exists, missing, not a run)."""


class RunInterrupted(RuntimeError):
    """Training was interrupted (Ctrl-C / SIGTERM); ``last.ckpt`` holds the last finished epoch."""


def text_cache_dir() -> Path:
    """Where frozen-encoder embeddings are cached (``MEDTEXTSEG_CACHE`` overrides)."""
    root = os.environ.get("MEDTEXTSEG_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "medtextseg")
    return Path(root) / "text"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints are serialised in memory, then written with temp file + rename, so a
    run killed mid-save never leaves a truncated ``last.ckpt`` behind."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        buf = io.BytesIO()
        torch.save(checkpoint, buf)
        atomic_write_bytes(Path(path), buf.getvalue())


def _is_launcher_child() -> bool:
    """DDP re-executes the command for ranks > 0; those must not touch the run directory."""
    return int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0


def text_spec(cfg: Config) -> str:
    """The text encoder a run needs: ``none`` when its method never reads the texts
    (U-Net, Mean Teacher), so no language model is loaded for it."""
    return cfg.text.encoder if method_class(cfg.method).needs_text(cfg) else "none"


def build_encoder(cfg: Config, samples: list[Sample] | None = None, state: dict | None = None,
                  spec: str | None = None):
    enc = build_text_encoder(spec or text_spec(cfg), max_len=cfg.text.max_len, dim=cfg.text.dim,
                             cache_dir=text_cache_dir(), state=state)
    if state is None:
        enc.fit([s.text for s in samples or [] if s.split == "Train"])
    return enc


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise RunError(f"cannot resume: {out} has no {CONFIG_FILE}; start it without --resume")
        return
    if out.exists() and not out.is_dir():
        raise RunError(f"run directory {out} is a file; choose another --out")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"run directory {out} already exists and is not empty; "
                           "pass --overwrite to replace it or --resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


# Keys a resumed run may change: where it runs, and how long (raising the budget).
# Everything else would make the continued run a different experiment.
RESUMABLE_KEYS = ("train.devices", "train.accelerator", "train.strategy", "train.num_nodes", "train.max_epochs")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def resume_config(out: Path, overrides: list[str] | None = None) -> Config:
    """The saved config of run ``out`` with ``overrides`` applied; only
    :data:`RESUMABLE_KEYS` may change.

    Raises:
        RunError: ``out`` is not a run, or an override changes another key.
    """
    out = Path(out)
    if not (out / CONFIG_FILE).is_file():
        raise RunError(f"cannot resume: {out} has no {CONFIG_FILE}; start it without --resume")
    saved = read_config(out / CONFIG_FILE)
    cfg = saved.with_overrides(list(overrides or []))
    _check_resume_changes(saved, cfg, out)
    return cfg


def _check_resume_changes(saved: Config, cfg: Config, out: Path) -> dict:
    old, new = _flatten(saved.to_dict()), _flatten(cfg.to_dict())
    changed = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    fixed = {k: c for k, c in changed.items() if k not in RESUMABLE_KEYS}
    if fixed:
        what = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in fixed.items())
        raise RunError(f"cannot resume {out} with {what}: a resumed run may change only "
                       f"{', '.join(RESUMABLE_KEYS)}; start a new run (another --out) instead")
    return changed


def check_trainer_options(t) -> None:
    """Reject device options Lightning would only reject after the run directory exists."""
    dev = t.devices
    ok = dev == "auto" or dev == -1 or (isinstance(dev, int) and not isinstance(dev, bool) and dev > 0) \
        or (isinstance(dev, list) and dev and all(isinstance(i, int) and i >= 0 for i in dev)) \
        or (isinstance(dev, str) and all(x.strip().isdigit() for x in dev.split(",") if x.strip())
            and dev.strip(", ") != "" and (("," in dev) or int(dev) > 0))
    if not ok:
        raise ConfigError(f"--devices {dev!r}: use a positive number of devices (1, 2), a list of device ids "
                          "(0,1 or [0, 1]), -1 for all, or auto")
    if not isinstance(t.num_nodes, int) or t.num_nodes < 1:
        raise ConfigError(f"--num-nodes {t.num_nodes!r}: use a positive integer")


def _build_trainer(cfg: Config, out: Path, callbacks: list, progress: bool) -> L.Trainer:
    t = cfg.train
    check_trainer_options(t)
    try:
        return L.Trainer(
            default_root_dir=out, max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices,
            strategy=t.strategy, num_nodes=t.num_nodes, precision=t.precision, callbacks=callbacks,
            # One version folder per attempt: a resumed run appends version_1, ... instead of
            # overwriting the logs of the interrupted attempt. Loggers create nothing until used.
            logger=[L.pytorch.loggers.CSVLogger(out / "logs", name="csv"),
                    L.pytorch.loggers.TensorBoardLogger(out / "logs", name="tensorboard")],
            plugins=[AtomicCheckpointIO()], deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
            limit_train_batches=t.limit_train_batches, enable_progress_bar=progress, enable_model_summary=False,
            gradient_clip_val=cfg.optim.grad_clip or None, gradient_clip_algorithm="norm",
        )
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as e:
        raise ConfigError(f"the training options are not usable here (accelerator={t.accelerator!r}, "
                          f"devices={t.devices!r}, strategy={t.strategy!r}, precision={t.precision!r}, "
                          f"num_nodes={t.num_nodes!r}): {e}") from None


def weight_averaging(cfg: Config) -> list:
    """``[EMAWeightAveraging]`` when ``train.ema_decay`` > 0, else ``[]``.

    Lightning's callback validates with the averaged weights, writes them as the
    checkpoint's ``state_dict`` (the raw weights go to ``current_model_state``, so a
    resume continues both), and leaves them in the model at the end of training;
    best.ckpt is therefore chosen on, and holds, the averaged weights. It updates
    after every optimizer step from the first on (its first update copies the
    weights, so the random initialisation never enters the average).
    """
    t = cfg.train
    if t.ema_decay <= 0:
        return []
    if not 0 < t.ema_decay < 1:
        raise ConfigError(f"train.ema_decay must be in (0, 1) or 0 for off, got {t.ema_decay}")
    return [EMAWeightAveraging(decay=t.ema_decay)]


def _read_run_info(out: Path) -> dict | None:
    path = out / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _has_checkpoint(out: Path) -> bool:
    return any((out / "checkpoints").glob("*.ckpt")) if (out / "checkpoints").is_dir() else False


def _resume_state(cfg: Config, data: DataArg | None, out: Path,
                  evaluate_finished: Callable[[Path, DataSources], dict]
                  ) -> tuple[DataArg | None, dict | None, dict | None]:
    """The checks and messages of ``--resume`` that every kind of run shares.

    Returns ``(data, run_info, metrics)``: ``data`` defaults to the run's; ``metrics``
    is not None when the run is already complete (its recorded figures, or those
    ``evaluate_finished(out, data)`` computes for a run that finished but was never
    evaluated), and then nothing else is to be done.
    """
    if not (out / CONFIG_FILE).is_file():
        raise RunError(f"cannot resume: {out} has no {CONFIG_FILE}; start it without --resume")
    saved = read_config(out / CONFIG_FILE)
    changed = _check_resume_changes(saved, cfg, out)
    run_info = _read_run_info(out)
    if data is None:
        if not run_info:
            raise RunError(f"{out}/{RUN_FILE} is missing; pass --data to resume")
        data = run_info["data"]
    data = DataSources.parse(data)
    done = (run_info or {}).get("finished")
    if done:
        raised = done["reason"] == "max_epochs" and cfg.train.max_epochs > done["epochs"]
        if not raised:
            how = (f"early stopping at epoch {done['epochs']} (no Val improvement in {saved.train.patience} epochs)"
                   if done["reason"] == "early_stopping" else f"its {done['epochs']} epochs (train.max_epochs)")
            if (out / METRICS_FILE).is_file():
                log.info("%s is complete: it stopped after %s; nothing was changed%s", out, how,
                         "" if done["reason"] == "early_stopping" else
                         ". Raise train.max_epochs (--set train.max_epochs=N) to train it further")
                return data, run_info, json.loads((out / METRICS_FILE).read_text())
            log.info("%s finished training (%s) but was never evaluated: evaluating it", out, how)
            return data, run_info, evaluate_finished(out, data)
        log.info("%s: train.max_epochs raised from %d to %d: continuing training",
                 out, done["epochs"], cfg.train.max_epochs)
    last = out / "checkpoints" / f"{LAST}.ckpt"
    if last.is_file():
        # Saved at the end of epoch e (0-based): e + 1 epochs are done. Lightning would
        # refuse a smaller budget only inside fit, with its own wording.
        done_epochs = int(torch.load(last, map_location="cpu", weights_only=False, mmap=True)["epoch"]) + 1
        if cfg.train.max_epochs < done_epochs:
            raise RunError(f"cannot resume {out} with train.max_epochs={cfg.train.max_epochs}: it has already "
                           f"trained {done_epochs} epochs; pass --set train.max_epochs={done_epochs} or more")
    for key, (a, b) in changed.items():
        log.info("%s: %s changed from %r to %r for the resumed attempt", out, key, a, b)
    return data, run_info, None


def _start_state(cfg: Config, data: DataArg | None, out: Path, resume: bool,
                 evaluate_finished: Callable[[Path, Path], dict]) -> tuple[Path | None, dict | None, dict | None]:
    """``(data, run_info, finished)`` at the start of :func:`train` / :func:`pretrain`: on
    resume :func:`_resume_state`'s answer; ``finished`` is not None when nothing is left to
    do, else ``data`` is the dataset to train on."""
    run_info = finished = None
    if resume:
        data, run_info, finished = _resume_state(cfg, data, out, evaluate_finished)
        if finished is not None:
            return data, run_info, finished
    if data is None:
        raise RunError("no dataset given; pass --data")
    try:
        return DataSources.parse(data), run_info, None
    except ValueError as e:
        raise RunError(str(e)) from None


def _checked_data(cfg: Config, data: DataSources, out: Path, *, resume: bool, run_info: dict | None,
                  require_masks_in: tuple[str, ...] = ("Val", "Test")) -> tuple[list[Sample], str]:
    """Validate the training data (Train and Val needed) and, on resume, check it is the
    run's. Returns ``(samples, fingerprint)``."""
    all_samples = validate_dataset(data, num_classes=cfg.data.num_classes, need_splits=TRAIN_SPLITS,
                                   require_masks_in=require_masks_in)
    for note in dataset_notes(all_samples, data=data, need_splits=TRAIN_SPLITS):
        log.info("%s", note)
    fingerprint = dataset_fingerprint(all_samples, data)
    if resume and run_info and run_info.get("data_fingerprint") not in (None, fingerprint):
        raise RunError(f"cannot resume {out} on {data}: its files differ from the data the run started on "
                       f"({run_info.get('data')}, fingerprint {run_info['data_fingerprint']} != {fingerprint})")
    return all_samples, fingerprint


def _with_domains(cfg: Config, samples: list[Sample], data: DataSources) -> Config:
    """``cfg`` with ``data.domains`` (the modality indicator's order, saved in config.yaml):
    the data's sorted domain names when unset; a set list must name every domain of the data."""
    names = domain_names(samples)
    try:
        parse_oversample(cfg.data.oversample, names)
    except ValueError as e:
        raise RunError(f"{data}: {e} (--set data.oversample=...)") from None
    if not cfg.data.domains:
        return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, domains=names))
    repeated = sorted({n for n in cfg.data.domains if cfg.data.domains.count(n) > 1})
    if repeated:
        raise RunError(f"data.domains lists {', '.join(repeated)} more than once ({', '.join(cfg.data.domains)}); "
                       "give each domain once (--set data.domains=[...])")
    missing = [n for n in names if n not in cfg.data.domains]
    if missing:
        raise RunError(f"{data}: domain(s) {', '.join(missing)} are not in data.domains "
                       f"({', '.join(cfg.data.domains)}); add them (--set data.domains=[...]) or name the roots "
                       "after the listed domains (--data NAME=PATH)")
    return cfg


def _with_classes(cfg: Config, data: DataSources) -> Config:
    """``cfg`` with ``data.classes`` (K >= 2): the set list, checked against
    ``data.num_classes``, or the names in the dataset roots' ``classes.txt``
    (:mod:`medtextseg.classes`; every root that has one must agree), else unchanged
    (tables then say "class 1" ...). Binary runs are left as they are."""
    k = cfg.data.num_classes
    if k < 2:
        return cfg
    try:
        if cfg.data.classes:
            check_class_names(cfg.data.classes, k)
            return cfg
        names = roots_class_names((path for _, path in data.roots), k)
        if names is None:
            return cfg
    except ValueError as e:
        raise RunError(str(e)) from None
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, classes=list(names)))


def _labeled_split(cfg: Config, out: Path, all_samples: list[Sample], *,
                   resume: bool) -> tuple[LabeledSplit | None, list[Sample]]:
    """The run's labeled / unlabeled split (the saved one on resume) and the samples after it."""
    split_file = out / SPLIT_FILE
    if resume and split_file.is_file():
        split = LabeledSplit.load(split_file)
    else:
        split = make_split(all_samples, cfg.data.labeled_ratio, cfg.data.labeled_ids, cfg.train.seed)
    return split, apply_split(all_samples, split)


class RandomState(L.Callback):
    """The global random generators (Python, NumPy, torch, CUDA) in every checkpoint, restored
    on resume: with the datamodule's augmentation streams
    (:class:`~medtextseg.data.module.TransformStateMixin`) a killed run continues with the
    data order, augmentations and noise the uninterrupted run would have drawn."""

    def state_dict(self) -> dict:
        state = {"python": random.getstate(), "numpy": numpy_rng_state(np.random), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        # Lightning restores callbacks before it builds the first train iterator (which draws
        # the sampler's seed), as the uninterrupted run drew it after this checkpoint.
        random.setstate(state["python"])
        set_numpy_rng_state(np.random, state["numpy"])
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def _run_callbacks(cfg: Config, out: Path, monitor: str, extra: list | None) -> tuple[list, EarlyStopping]:
    """best.ckpt on ``monitor`` (higher is better), last.ckpt every epoch, early stopping,
    the optional weight average, then ``extra``."""
    ckpt_dir = out / "checkpoints"
    # Saved at train-epoch end, i.e. after validation and after the method's
    # on_train_epoch_end (where EPI refreshes its bank), so a checkpoint holds the
    # state the next epoch starts from.
    early = EarlyStopping(monitor=monitor, mode="max", patience=cfg.train.patience, check_finite=True)
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename=BEST, monitor=monitor, mode="max", save_top_k=1,
                        enable_version_counter=False, save_on_train_epoch_end=True),
        # Lightning's save_last only writes when the best checkpoint improved; a resumable
        # run needs the latest epoch every epoch, so an unmonitored checkpoint keeps it.
        ModelCheckpoint(dirpath=ckpt_dir, filename=LAST, monitor=None, save_top_k=1, every_n_epochs=1,
                        enable_version_counter=False, save_on_train_epoch_end=True),
        early,
        RandomState(),
        *weight_averaging(cfg),
        *(extra or []),
    ]
    return callbacks, early


def _in_run_dir(out: Path, *, resume: bool, overwrite: bool, body: Callable[[bool], dict]) -> dict:
    """Create (or reuse, on resume) the run directory, then ``body(child)``; a new run that
    stops before its first checkpoint is removed, so the same command can be run again."""
    child = _is_launcher_child()
    if not child:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
    created = not resume
    try:
        return body(child)
    except BaseException as e:
        if created and not child and not _has_checkpoint(out):
            # Nothing worth keeping: a retry of the same command must not be refused.
            shutil.rmtree(out, ignore_errors=True)
            if isinstance(e, RunInterrupted):
                raise RunInterrupted(f"training of {out} was interrupted before its first checkpoint; "
                                     "nothing was kept: run the same command again") from None
        raise


def _start_run_files(cfg: Config, out: Path, *, resume: bool, run_info: dict | None,
                     new_info: Callable[[], dict], split: LabeledSplit | None) -> dict | None:
    """config.yaml (a resume records a raised budget or new devices), run.json (a resumed
    run drops its ``finished`` mark; a new one gets ``new_info()``) and split.json."""
    save_config(cfg, out / CONFIG_FILE)
    if resume and run_info is not None and "finished" in run_info:
        run_info = {k: v for k, v in run_info.items() if k != "finished"}
        atomic_write_json(out / RUN_FILE, run_info)
    if run_info is None:
        run_info = new_info()
        atomic_write_json(out / RUN_FILE, run_info)
    if split is not None and not (out / SPLIT_FILE).is_file():
        split.save(out / SPLIT_FILE)
    return run_info


def _fit_and_finish(trainer: L.Trainer, module: L.LightningModule, dm: L.LightningDataModule, out: Path,
                    early: EarlyStopping, *, resume: bool) -> bool:
    """``trainer.fit`` from last.ckpt on resume; Ctrl-C / SIGTERM become :class:`RunInterrupted`.
    Records ``finished`` in run.json; returns whether this is rank 0 (which then evaluates)."""
    last = out / "checkpoints" / f"{LAST}.ckpt"
    sigint = signal.getsignal(signal.SIGINT)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume and last.is_file() else None)
    except SystemExit:
        # Lightning turns Ctrl-C (and our SIGTERM) into a graceful shutdown and sys.exit(1).
        if trainer.state.status == TrainerStatus.INTERRUPTED:
            raise RunInterrupted(f"training of {out} was interrupted; continue it with --resume") from None
        raise
    finally:
        # Lightning leaves SIGINT ignored after an interrupt; give the caller its handler back.
        signal.signal(signal.SIGINT, sigint)
    if trainer.interrupted or trainer.received_sigterm:
        # A half-trained model must not be evaluated as if it were finished.
        raise RunInterrupted(f"training of {out} was interrupted; continue it with --resume")
    if not trainer.is_global_zero:
        return False
    reason = "early_stopping" if early.stopped_epoch > 0 else "max_epochs"
    atomic_write_json(out / RUN_FILE, {**_read_run_info(out), "finished": {"epochs": trainer.current_epoch,
                                                                          "reason": reason}})
    return True


def _refuse_pretrain_preset(cfg: Config) -> None:
    if cfg.pretrain:
        raise RunError(f"preset {cfg.preset!r} pre-trains a vision-language model ({cfg.pretrain}); run "
                       f"`medtextseg pretrain --preset {cfg.preset} --data DIR --out DIR` instead of `train`")


def _pretrain_preset_for(name: str) -> str:
    """The preset that pre-trains module ``name`` (for messages), e.g. ``dusss-vlm``."""
    from medtextseg.config import load_preset, preset_names

    for preset in preset_names():
        if load_preset(preset).pretrain == name:
            return preset
    return f"<a preset with pretrain: {name}>"


def _check_pretrained_run(cfg: Config, method_cls: type[SegMethod], vlm: Path | None, out: Path, *,
                          resume: bool, all_samples: list[Sample], fingerprint: str,
                          samples: list[Sample], data: DataSources) -> tuple[Path, Path] | None:
    """The checks of ``train --vlm RUN``, all before anything is written.

    Returns ``(checkpoint, run)`` of the pre-training run to copy into the new run, or
    None when nothing is to be copied (the method needs no pre-trained model, or a
    resumed run already holds its copy). Raises :class:`RunError` with the fix when the
    method needs one and none is given, or the run given is not one that fits: not a
    pre-training run, another module's, an input size or text encoder that differs
    (the method's ``check_pretrained``), weights that do not load here, or a model that
    read the masks of Train images this run treats as unlabeled.
    """
    from medtextseg.pretrain import pretrain_class
    from medtextseg.pretrain.base import PRETRAINED_DIR, WEIGHTS_FILE

    need = method_cls.needs_pretrained(cfg)
    if not need:
        if vlm is not None:
            raise RunError(f"--vlm {vlm}: preset {cfg.preset!r} (method {cfg.method}) uses no pre-trained model; "
                           "leave --vlm out")
        return None
    if resume:
        if not (out / PRETRAINED_DIR / WEIGHTS_FILE).is_file():
            raise RunError(f"cannot resume {out}: it lacks its copy of the pre-trained model ({PRETRAINED_DIR}/); "
                           "start the run again with --vlm")
        if vlm is not None:
            log.info("%s resumes with its own copy of the pre-trained model; --vlm %s is not read", out, vlm)
        return None
    tier = cfg.tier if cfg.tier else "cpu"
    # The split's flags too: a VLM that learns from masks must see only this run's labeled ones.
    split_flags = (f"--labeled-ids {cfg.data.labeled_ids}" if cfg.data.labeled_ids
                   else f"--labeled-ratio {cfg.data.labeled_ratio:g} --seed {cfg.train.seed}")
    how = (f"`medtextseg pretrain --preset {_pretrain_preset_for(need)} --tier {tier} --data DATA {split_flags} "
           "--out runs/vlm`, then pass --vlm runs/vlm")
    if vlm is None:
        raise RunError(f"preset {cfg.preset!r} (method {cfg.method}) needs a pre-trained vision-language model: "
                       f"run {how}")
    try:
        ckpt, run = resolve_checkpoint(Path(vlm))
    except RunError:
        raise RunError(f"--vlm {vlm} is not a pre-training run with checkpoints/best.ckpt; run {how}") from None
    info = _read_run_info(run) or {}
    if info.get("kind") != "vlm" or not (run / CONFIG_FILE).is_file():
        raise RunError(f"--vlm {vlm} is not a vision-language pre-training run (its run.json has no kind: vlm); "
                       f"run {how}")
    if info.get("pretrain") != need:
        raise RunError(f"--vlm {vlm} was pre-trained by {info.get('pretrain')!r}; method {cfg.method} needs "
                       f"{need!r}: run {how}")
    pre_cfg = read_config(run / CONFIG_FILE)
    try:
        method_cls.check_pretrained(cfg, pre_cfg)
    except ValueError as e:
        raise RunError(f"--vlm {vlm} does not fit this run: {e}") from None
    try:
        method_cls.check_pretrained_texts(pre_cfg, samples)
    except ValueError as e:
        raise RunError(f"{data}: {e}") from None
    try:
        module = pretrain_class(need)(pre_cfg.to_dict())
        module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"])
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise RunError(f"--vlm {vlm}: its model cannot be loaded here ({e}); pre-train it again") from None
    del module
    leaked = _leaked_masks(info, run / SPLIT_FILE, all_samples, samples, fingerprint, data) if info.get(
        "train_masks") else []
    if leaked:
        raise RunError(
            f"--vlm {vlm} was trained on the masks of {len(leaked)} Train images that this run treats as "
            f"unlabeled (e.g. {', '.join(leaked[:3])}): pre-train with this run's split (the same "
            f"--labeled-ratio {cfg.data.labeled_ratio:g} and --seed {cfg.train.seed}, or --labeled-ids), or "
            "with --set vlm.mask_supervision=false")
    if info.get("data_fingerprint") != fingerprint:
        log.info("%s was pre-trained on other data (%s)", vlm, info.get("data"))
    if not info.get("finished"):
        log.warning("%s has not finished pre-training: using its %s", vlm, ckpt.name)
    return ckpt, run


def _leaked_masks(info: dict, split_file: Path, all_samples: list[Sample], samples: list[Sample],
                  fingerprint: str, data: DataSources) -> list[str]:
    """Ids of Train images whose masks a pre-trained model read and this run withholds.

    The model's data is matched to this run's as a whole (the same fingerprint) or per
    domain (``data_fingerprints`` in its run.json): a model pre-trained on one root of
    this composite dataset, or on a composite dataset that holds this run's root, is
    checked on the images they share. What the model read is its split.json's labeled
    ids, or every labeled Train image of the shared data when it has none.
    """
    vlm_split = LabeledSplit.load(split_file).labeled if split_file.is_file() else None
    kept = {s.id for s in samples if s.split == "Train" and s.labeled}

    def read(pool: list[Sample], ids) -> set[str]:
        return {s.id for s in pool if s.split == "Train" and s.labeled and (ids is None or s.id in ids)}

    if info.get("data_fingerprint") == fingerprint:
        return sorted(read(all_samples, None if vlm_split is None else set(vlm_split)) - kept)
    theirs: dict = info.get("data_fingerprints") or {}
    if not theirs:
        return []
    ours = domain_fingerprints(all_samples, data)
    composite = len(ours) > 1
    leaked: set[str] = set()
    for their_domain, fp in theirs.items():
        for domain in (d for d, f in ours.items() if f == fp):
            pool = [s for s in all_samples if s.domain == domain]
            ids = None
            if vlm_split is not None:
                # Bring the model's ids (qualified when its data had several domains) to this run's.
                stems = {i.split(ID_SEPARATOR, 1)[1] if len(theirs) > 1 else i for i in vlm_split
                         if len(theirs) == 1 or i.startswith(f"{their_domain}{ID_SEPARATOR}")}
                ids = {f"{domain}{ID_SEPARATOR}{i}" if composite else i for i in stems}
            leaked |= read(pool, ids) - kept
    return sorted(leaked)


def _pretrained_record(ckpt: Path, run: Path) -> dict:
    """What run.json says of the pre-trained model a segmentation run copied."""
    import hashlib

    info = _read_run_info(run) or {}
    digest = hashlib.sha256(ckpt.read_bytes()).hexdigest()
    return {"run": str(run.resolve()), "checkpoint": ckpt.name, "sha256": digest, "pretrain": info.get("pretrain"),
            "data": info.get("data"), "data_fingerprint": info.get("data_fingerprint")}


def _with_derived_of_saved_run(cfg: Config, out: Path, resume: bool) -> Config:
    """On resume, the keys a run derives from its data at its start (``data.domains`` from
    the roots, ``data.classes`` from ``classes.txt``) taken from its saved config where
    ``cfg`` leaves them empty, so that a preset's config resumes the run it started."""
    if not resume or not (out / CONFIG_FILE).is_file():
        return cfg
    saved = read_config(out / CONFIG_FILE).data
    keep = {key: getattr(saved, key) for key in ("domains", "classes") if not getattr(cfg.data, key)}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **keep))


def train(cfg: Config, data: DataArg | None, out: Path, *, vlm: Path | None = None, resume: bool = False,
          overwrite: bool = False, progress: bool = True, extra_callbacks: list | None = None) -> dict:
    """Validate the data, train, then evaluate the best checkpoint on Val (and Test).

    Nothing is written before the data and every option have passed validation;
    a run that stops (error, Ctrl-C, SIGTERM) before its first checkpoint is
    removed, so the same command can simply be run again. ``resume``: ``cfg``
    may differ from the saved config in :data:`RESUMABLE_KEYS` only (see
    :func:`resume_config`); ``data`` defaults to the run's. A finished run is
    left unchanged (its recorded metrics are returned) unless ``train.max_epochs``
    was raised past the epochs it ran. A pre-training preset (``pretrain:`` set)
    is refused: :func:`pretrain` trains it. ``vlm``: the pre-training run of a
    method that needs one (``SegMethod.needs_pretrained``; DuSSS), checked by
    :func:`_check_pretrained_run` and copied into ``out/vlm/`` so that the run
    resumes and predicts without it; ``run.json`` records its path and checksum.

    Returns the metrics dict written to ``metrics.json`` (empty on DDP ranks > 0).
    """
    out = Path(out)
    _refuse_pretrain_preset(cfg)
    cfg = _with_derived_of_saved_run(cfg, out, resume)
    data, run_info, finished = _start_state(cfg, data, out, resume, _evaluate_finished)
    if finished is not None:
        return finished
    method_cls = method_class(cfg.method)
    method_cls.check_config(cfg)
    check_trainer_options(cfg.train)
    all_samples, fingerprint = _checked_data(cfg, data, out, resume=resume, run_info=run_info)
    cfg = _with_classes(_with_domains(cfg, all_samples, data), data)
    split, samples = _labeled_split(cfg, out, all_samples, resume=resume)
    if not any(s.split == "Train" and s.labeled for s in samples):
        raise RunError(f"{data} has no labeled Train images to train on")
    pretrained = _check_pretrained_run(cfg, method_cls, vlm, out, resume=resume, all_samples=all_samples,
                                       fingerprint=fingerprint, samples=samples, data=data)
    callbacks, early = _run_callbacks(cfg, out, MONITOR, extra_callbacks)
    trainer = _build_trainer(cfg, out, callbacks, progress)
    return _in_run_dir(out, resume=resume, overwrite=overwrite, body=lambda child: _fit(
        cfg, data, out, trainer, early, samples, all_samples, split, fingerprint, method_cls,
        resume=resume, run_info=run_info, child=child, pretrained=pretrained))


def _fit(cfg, data, out, trainer, early, samples, all_samples, split, fingerprint, method_cls, *, resume, run_info,
         child, pretrained: tuple[Path, Path] | None = None) -> dict:
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    spec = (run_info or {}).get("text_spec") or (text_spec(cfg) if not run_info else cfg.text.encoder)
    encoder = build_encoder(cfg, samples, state=run_info["text_state"] if run_info else None, spec=spec)
    # Every text once, up front: frozen encoders fill their cache in one pass and a text
    # that loses words is reported in one warning for the whole dataset, not once per split.
    encoder.features(sorted({s.text for s in all_samples}))
    if not child:
        extra = {}
        if pretrained is not None:
            from medtextseg.pretrain.base import PRETRAINED_DIR, export_pretrained

            ckpt, vlm_run = pretrained
            export_pretrained(ckpt, vlm_run / CONFIG_FILE, vlm_run / RUN_FILE, out / PRETRAINED_DIR)
            extra["vlm"] = _pretrained_record(ckpt, vlm_run)
        _start_run_files(cfg, out, resume=resume, run_info=run_info, split=split, new_info=lambda: {
            "data": data.record(), "data_fingerprint": fingerprint, "text_spec": spec,
            "text_state": encoder.state(), "text_dim": encoder.dim, **extra})
    dm = SegDataModule(samples, encoder, cfg.data, seed=cfg.train.seed, unlabeled_keys=method_cls.unlabeled_keys,
                       withheld=all_samples)
    method = method_cls(cfg.to_dict(), text_state=encoder.state(), text_dim=encoder.dim)
    if not _fit_and_finish(trainer, method, dm, out, early, resume=resume):
        return {}
    splits = [s for s in ("Val", "Test") if any(x.split == s for x in samples)]
    return evaluate(out, data, splits=splits, samples=all_samples, encoder=encoder)


def pretrain(cfg: Config, data: DataArg | None, out: Path, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True, extra_callbacks: list | None = None) -> dict:
    """Pre-train a vision-language model (``cfg.pretrain``, DESIGN §2), then evaluate its best
    checkpoint on Val (and Test): retrieval both ways and text-mask Dice.

    The same run directory, Trainer, checkpoints, resume rules, seeds, logs and
    interrupt handling as :func:`train`; ``best.ckpt`` is selected on the module's
    ``monitor`` (``val/r1`` for DuSSS). It trains on every Train image with its text;
    masks are read only where the module asks for them (DuSSS ``vlm.mask_supervision``),
    and then only those of the labeled set of ``data.labeled_ratio`` /
    ``data.labeled_ids`` (the segmentation runs' split, written to ``split.json``).
    ``run.json`` records ``kind: "vlm"``, the module, the data and its fingerprint,
    and the model's text encoder spec and input size.

    Returns the metrics dict written to ``metrics.json`` (empty on DDP ranks > 0).
    """
    from medtextseg.pretrain import pretrain_class

    out = Path(out)
    if not cfg.pretrain:
        raise RunError(f"preset {cfg.preset!r} trains a segmentation method ({cfg.method}), not a "
                       f"vision-language model; run `medtextseg train --preset {cfg.preset}` instead of `pretrain`")
    cfg = _with_derived_of_saved_run(cfg, out, resume)
    data, run_info, finished = _start_state(cfg, data, out, resume, _evaluate_pretrained_finished)
    if finished is not None:
        return finished
    module_cls = pretrain_class(cfg.pretrain)
    module_cls.check_config(cfg)
    check_trainer_options(cfg.train)
    # Masks are optional everywhere: Val / Test figures score the text mask where there is one.
    all_samples, fingerprint = _checked_data(cfg, data, out, resume=resume, run_info=run_info, require_masks_in=())
    cfg = _with_classes(cfg, data)
    split, samples = _labeled_split(cfg, out, all_samples, resume=resume)
    try:
        module_cls.check_samples(cfg, samples)
    except ValueError as e:
        raise RunError(f"{data}: {e}") from None
    callbacks, early = _run_callbacks(cfg, out, module_cls.monitor_for(cfg), extra_callbacks)
    trainer = _build_trainer(cfg, out, callbacks, progress)
    # Built before the run directory exists, so an unusable model option writes nothing.
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    try:
        module = module_cls(cfg.to_dict())
    except ValueError as e:
        raise RunError(f"{cfg.preset}: {e}") from None
    # Masks the model reads (vlm.mask_supervision); with it off none is, whatever the split.
    n_masks = sum(s.split == "Train" and s.labeled for s in samples) if cfg.vlm.mask_supervision else 0

    def body(child: bool) -> dict:
        if not child:
            _start_run_files(cfg, out, resume=resume, run_info=run_info, split=split, new_info=lambda: {
                "kind": module_cls.kind, "pretrain": cfg.pretrain, "data": data.record(),
                "data_fingerprint": fingerprint, "data_fingerprints": domain_fingerprints(all_samples, data),
                **module.run_info(), "train_masks": n_masks})
        dm = module.datamodule(samples, seed=cfg.train.seed)
        if not _fit_and_finish(trainer, module, dm, out, early, resume=resume):
            return {}
        splits = [s for s in ("Val", "Test") if any(x.split == s for x in samples)]
        return evaluate_pretrained(out, data, splits=splits, samples=all_samples)

    return _in_run_dir(out, resume=resume, overwrite=overwrite, body=body)


def _evaluate_pretrained_finished(out: Path, data: DataArg) -> dict:
    all_samples = validate_dataset(data, num_classes=read_config(out / CONFIG_FILE).data.num_classes,
                                   need_splits=TRAIN_SPLITS, require_masks_in=())
    splits = [s for s in ("Val", "Test") if any(x.split == s for x in all_samples)]
    return evaluate_pretrained(out, data, splits=splits, samples=all_samples)


def is_pretrain_run(run_or_ckpt: Path) -> bool:
    """Whether a run directory (or a checkpoint in one) holds a pre-trained VLM (``kind: vlm``)."""
    _, run = resolve_checkpoint(run_or_ckpt)
    return (_read_run_info(run) or {}).get("kind") == "vlm"


def evaluate_pretrained(run_or_ckpt: Path, data: DataArg, splits: list[str] | tuple[str, ...] = ("Test",),
                        samples: list[Sample] | None = None, *, out: Path | None = None,
                        device: str = "auto") -> dict:
    """Score a pre-trained VLM's best checkpoint on ``splits`` of ``data``.

    Per split (the module's ``evaluate_split``; DuSSS: :mod:`medtextseg.pretrain.retrieval`):
    R@1 / R@5 image -> text among the split's distinct texts and text -> image,
    scored by text, with their chance levels, and the text mask's Dice / IoU on
    the images that have a mask. The figures go where :func:`evaluate` puts them:
    the run's ``metrics.json`` for the run's own data, else ``out`` or
    :func:`evaluation_dir`.
    """
    from medtextseg.pretrain import pretrain_class

    ckpt, run = resolve_checkpoint(run_or_ckpt)
    if not (run / CONFIG_FILE).is_file():
        raise RunError(f"{run} lacks {CONFIG_FILE}; is it a medtextseg run directory?")
    cfg = read_config(run / CONFIG_FILE)
    info = _read_run_info(run) or {}
    dev = resolve_device(device)
    module = pretrain_class(cfg.pretrain).load_from_checkpoint(ckpt, map_location=dev, weights_only=False)
    module.to(dev).eval()
    splits = check_split_names(splits)
    if samples is None:
        samples = validate_dataset(data, num_classes=cfg.data.num_classes, require_masks_in=(),
                                   need_splits=tuple(splits))
    fingerprint = dataset_fingerprint(samples, data)
    target, metrics = _figures_target(run, data, fingerprint, info, out)
    for split in splits:
        subset = [s for s in samples if s.split == split]
        if not subset:
            raise RunError(f"{data} has no {split} split; available: "
                           f"{', '.join(sorted({s.split for s in samples}))}")
        figures = module.evaluate_split(subset)
        figures["n"] = len(subset)
        figures["data"] = describe_data(samples, data, split, fingerprint)
        metrics[split] = figures
    v = cfg.vlm
    metrics["model"] = {"preset": cfg.preset, "tier": cfg.tier, "pretrain": cfg.pretrain, "kind": module.kind,
                        "image_encoder": v.image_encoder, "text_encoder": v.text_encoder,
                        "img_size": cfg.data.img_size, "embed_dim": v.embed_dim, "sss": v.sss,
                        "sss_warmup_epochs": v.sss_warmup_epochs, "imc": v.imc,
                        "tg_loss": v.tg_loss, "mask_supervision": v.mask_supervision,
                        "labeled_ratio": cfg.data.labeled_ratio, "seed": cfg.train.seed,
                        "threshold": cfg.data.threshold,
                        "parameters": sum(p.numel() for p in module.parameters())}
    if target != run:
        metrics["run"] = str(run.resolve())
    atomic_write_json(target / METRICS_FILE, metrics)
    log.info("wrote %s figures on %s (fingerprint %s) to %s", ", ".join(splits), data, fingerprint,
             target / METRICS_FILE)
    return metrics


def _evaluate_finished(out: Path, data: DataArg) -> dict:
    all_samples = validate_dataset(data, num_classes=read_config(out / CONFIG_FILE).data.num_classes,
                                   need_splits=TRAIN_SPLITS)
    splits = [s for s in ("Val", "Test") if any(x.split == s for x in all_samples)]
    return evaluate(out, data, splits=splits, samples=all_samples)


def resolve_checkpoint(run_or_ckpt: Path) -> tuple[Path, Path]:
    """Return (checkpoint, run directory) for a run directory or a ``.ckpt`` inside one."""
    p = Path(run_or_ckpt)
    if p.is_file() and p.suffix == ".ckpt":
        run = p.parent.parent if p.parent.name == "checkpoints" else p.parent
        return p, run
    for name in (BEST, LAST):
        ckpt = p / "checkpoints" / f"{name}.ckpt"
        if ckpt.is_file():
            return ckpt, p
    raise RunError(f"{p} is neither a run directory with checkpoints/best.ckpt nor a .ckpt file; "
                   "train one with `medtextseg train`")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` -> the first CUDA GPU if there is one, else CPU; ``"cpu"``, ``"cuda"``,
    ``"cuda:1"``, ``"mps"`` are taken as given once checked to exist.

    Raises:
        ValueError: an unknown device name or one that is not available here.
    """
    name = (device or "auto").strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and (not torch.cuda.is_available()
                               or (dev.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {device}: no such CUDA GPU here "
                         f"({torch.cuda.device_count()} visible); use --device auto or cpu")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {device}: MPS is not available here; use --device auto or cpu")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device!r}: unsupported; use auto, cpu, cuda or cuda:N")
    return dev


def load_run(run_or_ckpt: Path, device: str | torch.device = "cpu") -> tuple[SegMethod, Config, object, Path]:
    """Load the trained method, its config, its text encoder and its run directory."""
    ckpt, run = resolve_checkpoint(run_or_ckpt)
    if not (run / CONFIG_FILE).is_file() or not (run / RUN_FILE).is_file():
        raise RunError(f"{run} lacks {CONFIG_FILE} or {RUN_FILE}; is it a medtextseg run directory?")
    cfg = read_config(run / CONFIG_FILE)
    info = json.loads((run / RUN_FILE).read_text())
    if info.get("kind") == "vlm":
        raise RunError(f"{run} is a vision-language pre-training run (`medtextseg pretrain`), not a segmentation "
                       "run: it predicts no masks of its own; `medtextseg evaluate` scores it")
    encoder = build_encoder(cfg, state=info["text_state"], spec=info.get("text_spec", cfg.text.encoder))
    device = resolve_device(device) if isinstance(device, str) else device
    method = method_class(cfg.method).load_from_checkpoint(ckpt, map_location=device, weights_only=False)
    method.to(device).eval()
    return method, cfg, encoder, run


@torch.inference_mode()
def predict_logits(method: SegMethod, loader, on_batch: Callable[[dict, torch.Tensor], None]) -> None:
    device = method.device
    for batch in loader:
        domain = batch.get("domain")
        logits = method.infer(batch["image"].to(device), batch["text"].to(device),
                              None if domain is None else domain.to(device)).float().cpu()
        on_batch(batch, logits)


def protocol(cfg: Config) -> str:
    """How a run sees its images: ``resize <S>²`` (the papers') or ``patches <S>² at <scale>×``."""
    d = cfg.data
    return f"patches {d.size_label} at {d.scale:g}×" if d.patches else f"resize {d.size_label}"


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[1, K, h, w]`` -> ``[1, K, H, W]`` bilinear, for scoring at the mask's own size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def evaluation_dir(run: Path, data: DataArg, fingerprint: str) -> Path:
    """Where figures on data other than the run's own go: ``<run>/evaluations/<name>-<fp8>/``
    (``<name>``: the dataset folder's name, or ``cxr+ct`` for several roots)."""
    return Path(run) / EVAL_DIR / f"{DataSources.parse(data).label}-{fingerprint[:8]}"


def _figures_target(run: Path, data: DataArg, fingerprint: str, info: dict,
                    out: Path | None) -> tuple[Path, dict]:
    """Where figures on ``data`` go (the run itself for its own data, else ``out`` or
    :func:`evaluation_dir`) and the figures already there that are on the same data."""
    if out is None:
        own = info.get("data_fingerprint") in (None, fingerprint) and (
            info.get("data_fingerprint") is not None
            or ("data" in info and DataSources.parse(info["data"]) == DataSources.parse(data)))
        target = run if own else evaluation_dir(run, data, fingerprint)
    else:
        target = Path(out)
    metrics_path = target / METRICS_FILE
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    if target != run and metrics and metrics.get("run") not in (None, str(run.resolve())):
        raise RunError(f"{target} holds the figures of another run ({metrics['run']}); choose another --out")
    metrics = {k: v for k, v in metrics.items()
               if k in ("model", "run") or (isinstance(v, dict) and v.get("data", {}).get("fingerprint") == fingerprint)}
    return target, metrics


def evaluate(run_or_ckpt: Path, data: DataArg, splits: list[str] | tuple[str, ...] = ("Test",),
             samples: list[Sample] | None = None, *, out: Path | None = None, device: str = "auto",
             encoder=None) -> dict:
    """Score the run's best checkpoint on ``splits`` of ``data``.

    Dice/IoU per image (threshold ``data.threshold``) at the working resolution
    (the network's input size under the papers' resize protocol; ``data.scale`` × the
    image's size under the patch protocol, predicted by a sliding window) and at the
    mask's original size (``*_orig``: logits upsampled bilinearly before
    thresholding), averaged over images. Every split's
    entry records the data it was computed on (:func:`describe_data`: path,
    fingerprint of the file list, split).

    Where the figures go: the run's own ``metrics.json`` and ``per_image.csv``
    when ``data`` is the data the run was trained on (same fingerprint); else
    ``out``, or by default :func:`evaluation_dir` — never over the run's own
    figures. The folder written to is logged. ``encoder``: the run's text encoder when
    the caller already has it (training does), instead of a new one from the run.
    A pre-trained VLM run is scored by :func:`evaluate_pretrained` instead.
    """
    if is_pretrain_run(run_or_ckpt):
        return evaluate_pretrained(run_or_ckpt, data, splits, samples, out=out, device=device)
    method, cfg, run_encoder, run = load_run(run_or_ckpt, device=device)
    encoder = encoder or run_encoder
    splits = check_split_names(splits)
    if samples is None:
        samples = validate_dataset(data, num_classes=cfg.data.num_classes, require_masks_in=tuple(splits),
                                   need_splits=tuple(splits))
    try:
        domain_index([s for s in samples if s.split in splits], cfg.data.domains)
    except ValueError as e:
        raise RunError(f"{DataSources.parse(data)}: {e}") from None
    info = _read_run_info(run) or {}
    fingerprint = dataset_fingerprint(samples, data)
    target, metrics = _figures_target(run, data, fingerprint, info, out)
    metrics_path, rows_path = target / METRICS_FILE, target / "per_image.csv"
    kept_splits = {k for k in metrics if k not in ("model", "run")} - set(splits)
    rows = [r for r in _read_rows(rows_path) if r["split"] in kept_splits]
    k = cfg.data.num_classes
    names = class_names(k, cfg.data.classes)[1:] if k > 1 else None
    for split in splits:
        subset = [s for s in samples if s.split == split]
        if not subset:
            raise RunError(f"{data} has no {split} split; available: "
                           f"{', '.join(sorted({s.split for s in samples}))}")
        ds = make_dataset(subset, encoder, cfg.data)
        split_rows: list[dict] = []

        def score(batch, logits, subset=subset, split_rows=split_rows, split=split):
            labels = binarize(logits, cfg.data.threshold)
            dice, iou = dice_iou_per_image(labels, batch["mask"], k)
            per_class = dice_iou_per_class(labels, batch["mask"], k) if names else None
            for j, idx in enumerate(batch["index"].tolist()):
                s = subset[idx]
                gt = torch.from_numpy(mask_to_labels(read_mask(s.mask_path), k)).long()[None, None]
                pred = binarize(upsample_to(logits[j:j + 1], tuple(gt.shape[-2:])), cfg.data.threshold)
                d_o, i_o = dice_iou_per_image(pred, gt, k)
                row = {"split": split, "id": s.id, "domain": s.domain, "dice": float(dice[j]),
                       "iou": float(iou[j]), "dice_orig": float(d_o[0]), "iou_orig": float(i_o[0]), "text": s.text}
                if names:
                    d_oc, i_oc = dice_iou_per_class(pred, gt, k)
                    for key, values in zip(FIGURE_KEYS, (per_class[0][j], per_class[1][j], d_oc[0], i_oc[0])):
                        row.update(class_columns(key, names, values))
                split_rows.append(row)

        predict_logits(method, make_loader(ds, eval_batch_size(cfg.data), shuffle=False), score)
        metrics[split] = split_figures(split_rows, names)
        metrics[split]["data"] = describe_data(samples, data, split, fingerprint)
        rows.extend(split_rows)
    metrics["model"] = {"preset": cfg.preset, "tier": cfg.tier, "method": cfg.method, "network": cfg.network.name,
                        "labeled_ratio": cfg.data.labeled_ratio,
                        "use_text": cfg.network.use_text, "text_encoder": cfg.text.encoder,
                        "seed": cfg.train.seed, "threshold": cfg.data.threshold,
                        "img_size": cfg.data.img_size, "protocol": protocol(cfg),
                        "parameters": method.num_predictor_parameters()}
    if target != run:
        metrics["run"] = str(run.resolve())
    atomic_write_json(metrics_path, metrics)
    _write_rows(rows_path, rows)
    log.info("wrote %s figures on %s (fingerprint %s) to %s", ", ".join(splits), data, fingerprint, metrics_path)
    return metrics


ROW_FIELDS = ("split", "id", "domain", "dice", "iou", "dice_orig", "iou_orig", "text")
FIGURE_KEYS = ("dice", "iou", "dice_orig", "iou_orig")


def class_columns(key: str, names: list[str], values: torch.Tensor) -> dict:
    """Per-image row columns ``<key>:<class name>`` of one image's ``[K-1]`` per-class
    values; a class not scored on the image (NaN) is an empty cell."""
    return {f"{key}:{n}": ("" if math.isnan(v) else v) for n, v in zip(names, values.tolist())}


def split_figures(rows: list[dict], class_names: list[str] | None = None) -> dict:
    """A split's figures from its per-image rows: each of :data:`FIGURE_KEYS` averaged over
    the images, and ``n``. Rows of several domains add ``domains`` (``{name: figures}``, each
    averaged over that domain's images) and ``domain_mean`` (the unweighted mean of the
    domain figures: each domain counts once, whatever its size).

    Multi-class (``class_names``: the foreground classes, rows with their
    :func:`class_columns`): ``classes`` holds, per class scored on some image of the part,
    each figure averaged over the images that score it and ``n`` (those images); the
    headline figures are then the mean over those classes (PromptSSL's mDice / mIoU),
    not the mean of the per-image figures."""
    def mean(part: list[dict]) -> dict:
        out = {**{key: sum(r[key] for r in part) / len(part) for key in FIGURE_KEYS}, "n": len(part)}
        if class_names:
            per_class = {}
            for name in class_names:
                # A class can be scored at one resolution and not the other (a sliver that the
                # resize drops): each figure averages the images that score it there.
                figures = {}
                for key in FIGURE_KEYS:
                    values = [float(r[f"{key}:{name}"]) for r in part if r.get(f"{key}:{name}", "") != ""]
                    if values:
                        figures[key] = sum(values) / len(values)
                        figures.setdefault("n", len(values))
                if figures:
                    per_class[name] = figures
            for key in FIGURE_KEYS:
                scored = [c[key] for c in per_class.values() if key in c]
                if scored:
                    out[key] = sum(scored) / len(scored)
            out["classes"] = per_class
        return out

    out = mean(rows)
    names = sorted({r["domain"] for r in rows})
    if len(names) > 1:
        out["domains"] = {d: mean([r for r in rows if r["domain"] == d]) for d in names}
        out["domain_mean"] = {key: sum(f[key] for f in out["domains"].values()) / len(names)
                              for key in FIGURE_KEYS}
    return out


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    # Multi-class rows carry per-class columns after the fixed ones (class_columns).
    extra = list(dict.fromkeys(k for r in rows for k in r if k not in ROW_FIELDS))
    w = csv.DictWriter(buf, fieldnames=[*ROW_FIELDS, *extra], restval="")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
