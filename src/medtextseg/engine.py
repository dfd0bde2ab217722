"""Training, evaluation and the run directory.

A run directory holds::

    config.yaml        the resolved config (the only config a resume/evaluate reads)
    run.json           dataset path, text-encoder state, text width
    split.json         labeled / unlabeled Train ids (only when data.labeled_ratio < 1 or labeled_ids)
    checkpoints/       best.ckpt (val Dice) and last.ckpt, written atomically
    logs/              csv/version_N/metrics.csv and tensorboard/version_N/ (one N per attempt)
    metrics.json       {split: {dice, iou, dice_orig, iou_orig, n}} per evaluated split
    per_image.csv      split, id, dice, iou, dice_orig, iou_orig, text

Lightning owns the loop, devices (``--devices``/``--strategy`` DDP), precision,
checkpointing, early stopping and logging; this module only wires them.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

from medtextseg.config import Config, read_config, save_config
from medtextseg.data.io import read_mask
from medtextseg.data.module import SegDataModule, make_dataset, make_loader, mask_to_labels
from medtextseg.data.sample import Sample
from medtextseg.data.splits import SPLIT_FILE, LabeledSplit, apply_split, make_split
from medtextseg.data.validation import validate_dataset
from medtextseg.methods import SegMethod, method_class
from medtextseg.metrics import binarize, dice_iou_per_image
from medtextseg.text.encoders import build_text_encoder
from medtextseg.utils import atomic_write_bytes, atomic_write_json, keep_freed_memory

CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
BEST = "best"
LAST = "last"
MONITOR = "val/dice"


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


def build_encoder(cfg: Config, samples: list[Sample] | None = None, state: dict | None = None):
    enc = build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim,
                             cache_dir=text_cache_dir(), state=state)
    if state is None:
        enc.fit([s.text for s in samples or [] if s.split == "Train"])
    return enc


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise RunError(f"cannot resume: {out} has no {CONFIG_FILE}; start it without --resume")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunError(f"run directory {out} already exists and is not empty; "
                           "pass --overwrite to replace it or --resume to continue it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def train(cfg: Config, data: Path, out: Path, *, resume: bool = False, overwrite: bool = False,
          progress: bool = True, extra_callbacks: list | None = None) -> dict:
    """Validate the data, train, then evaluate the best checkpoint on Val (and Test).

    Nothing is written before the data has passed validation.
    Returns the metrics dict written to ``metrics.json`` (empty on DDP ranks > 0).
    """
    data, out = Path(data), Path(out)
    if resume and (out / CONFIG_FILE).is_file():
        cfg = read_config(out / CONFIG_FILE)
    method_cls = method_class(cfg.method)
    method_cls.check_config(cfg)
    all_samples = validate_dataset(data, num_classes=max(2, cfg.data.num_classes))
    split_file = out / SPLIT_FILE
    if resume and split_file.is_file():
        split = LabeledSplit.load(split_file)
    else:
        split = make_split(all_samples, cfg.data.labeled_ratio, cfg.data.labeled_ids, cfg.train.seed)
    samples = apply_split(all_samples, split)
    if not any(s.split == "Train" and s.labeled for s in samples):
        raise RunError(f"{data} has no labeled Train images to train on")
    if not any(s.split == "Val" for s in samples):
        raise RunError(f"{data} has no Val split; early stopping and model selection need one")
    child = _is_launcher_child()
    if not child:
        prepare_run_dir(out, resume=resume, overwrite=overwrite)
    L.seed_everything(cfg.train.seed, workers=True, verbose=False)
    keep_freed_memory()
    run_info = json.loads((out / RUN_FILE).read_text()) if resume else None
    encoder = build_encoder(cfg, samples, state=run_info["text_state"] if run_info else None)
    if not child and not resume:
        save_config(cfg, out / CONFIG_FILE)
        atomic_write_json(out / RUN_FILE, {"data": str(data.resolve()), "text_state": encoder.state(),
                                           "text_dim": encoder.dim})
        if split is not None:
            split.save(split_file)
    dm = SegDataModule(samples, encoder, cfg.data, seed=cfg.train.seed, unlabeled_keys=method_cls.unlabeled_keys,
                       withheld=all_samples)
    method = method_cls(cfg.to_dict(), text_state=encoder.state(), text_dim=encoder.dim)
    ckpt_dir = out / "checkpoints"
    # Saved at train-epoch end, i.e. after validation and after the method's
    # on_train_epoch_end (where EPI refreshes its bank), so a checkpoint holds the
    # state the next epoch starts from.
    callbacks = [
        ModelCheckpoint(dirpath=ckpt_dir, filename=BEST, monitor=MONITOR, mode="max", save_top_k=1,
                        enable_version_counter=False, save_on_train_epoch_end=True),
        # Lightning's save_last only writes when the best checkpoint improved; a resumable
        # run needs the latest epoch every epoch, so an unmonitored checkpoint keeps it.
        ModelCheckpoint(dirpath=ckpt_dir, filename=LAST, monitor=None, save_top_k=1, every_n_epochs=1,
                        enable_version_counter=False, save_on_train_epoch_end=True),
        EarlyStopping(monitor=MONITOR, mode="max", patience=cfg.train.patience, check_finite=True),
        *(extra_callbacks or []),
    ]
    t = cfg.train
    trainer = L.Trainer(
        default_root_dir=out, max_epochs=t.max_epochs, accelerator=t.accelerator, devices=t.devices,
        strategy=t.strategy, num_nodes=t.num_nodes, precision=t.precision, callbacks=callbacks,
        # One version folder per attempt: a resumed run appends version_1, ... instead of
        # overwriting the logs of the interrupted attempt.
        logger=[L.pytorch.loggers.CSVLogger(out / "logs", name="csv"),
                L.pytorch.loggers.TensorBoardLogger(out / "logs", name="tensorboard")],
        plugins=[AtomicCheckpointIO()], deterministic=t.deterministic, log_every_n_steps=t.log_every_n_steps,
        limit_train_batches=t.limit_train_batches, enable_progress_bar=progress, enable_model_summary=False,
    )
    last = ckpt_dir / f"{LAST}.ckpt"
    trainer.fit(method, datamodule=dm, ckpt_path=str(last) if resume and last.is_file() else None)
    if trainer.interrupted:
        # Lightning shuts down gracefully on an interrupt and returns; a half-trained
        # model must not be evaluated as if it were finished.
        raise RunInterrupted(f"training of {out} was interrupted; continue it with --resume")
    if not trainer.is_global_zero:
        return {}
    splits = [s for s in ("Val", "Test") if any(x.split == s for x in samples)]
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


def load_run(run_or_ckpt: Path, device: str = "cpu") -> tuple[SegMethod, Config, object, Path]:
    """Load the trained method, its config, its text encoder and its run directory."""
    ckpt, run = resolve_checkpoint(run_or_ckpt)
    if not (run / CONFIG_FILE).is_file() or not (run / RUN_FILE).is_file():
        raise RunError(f"{run} lacks {CONFIG_FILE} or {RUN_FILE}; is it a medtextseg run directory?")
    cfg = read_config(run / CONFIG_FILE)
    info = json.loads((run / RUN_FILE).read_text())
    encoder = build_encoder(cfg, state=info["text_state"])
    method = method_class(cfg.method).load_from_checkpoint(ckpt, map_location=device, weights_only=False)
    method.eval()
    return method, cfg, encoder, run


@torch.inference_mode()
def predict_logits(method: SegMethod, loader, on_batch: Callable[[dict, torch.Tensor], None]) -> None:
    device = method.device
    for batch in loader:
        logits = method(batch["image"].to(device), batch["text"].to(device)).float().cpu()
        on_batch(batch, logits)


def upsample_to(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[1, K, h, w]`` -> ``[1, K, H, W]`` bilinear, for scoring at the mask's own size."""
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


def evaluate(run_or_ckpt: Path, data: Path, splits: list[str] | tuple[str, ...] = ("Test",),
             samples: list[Sample] | None = None) -> dict:
    """Score the run's best checkpoint on ``splits`` of ``data``.

    Dice/IoU per image (threshold 0.5) at the network's input size (the papers'
    protocol) and at the mask's original size (``*_orig``: logits upsampled
    bilinearly before thresholding), averaged over images. Results are merged into
    ``metrics.json`` and ``per_image.csv`` of the run directory.
    """
    method, cfg, encoder, run = load_run(run_or_ckpt)
    if samples is None:
        samples = validate_dataset(data, num_classes=max(2, cfg.data.num_classes), require_masks_in=tuple(splits))
    metrics_path, rows_path = run / "metrics.json", run / "per_image.csv"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    rows = [r for r in _read_rows(rows_path) if r["split"] not in splits]
    k = cfg.data.num_classes
    for split in splits:
        subset = [s for s in samples if s.split == split]
        if not subset:
            raise RunError(f"{data} has no {split} split; available: "
                           f"{', '.join(sorted({s.split for s in samples}))}")
        ds = make_dataset(subset, encoder, cfg.data)
        split_rows: list[dict] = []

        def score(batch, logits, subset=subset, split_rows=split_rows, split=split):
            dice, iou = dice_iou_per_image(binarize(logits, cfg.data.threshold), batch["mask"], k)
            for j, idx in enumerate(batch["index"].tolist()):
                s = subset[idx]
                gt = torch.from_numpy(mask_to_labels(read_mask(s.mask_path), k)).long()[None, None]
                pred = binarize(upsample_to(logits[j:j + 1], tuple(gt.shape[-2:])), cfg.data.threshold)
                d_o, i_o = dice_iou_per_image(pred, gt, k)
                split_rows.append({"split": split, "id": s.id, "dice": float(dice[j]), "iou": float(iou[j]),
                                   "dice_orig": float(d_o[0]), "iou_orig": float(i_o[0]), "text": s.text})

        predict_logits(method, make_loader(ds, cfg.data.eval_batch_size, shuffle=False), score)
        n = len(split_rows)
        metrics[split] = {key: sum(r[key] for r in split_rows) / n for key in ("dice", "iou", "dice_orig", "iou_orig")}
        metrics[split]["n"] = n
        rows.extend(split_rows)
    metrics["model"] = {"preset": cfg.preset, "tier": cfg.tier, "method": cfg.method, "network": cfg.network.name,
                        "labeled_ratio": cfg.data.labeled_ratio,
                        "use_text": cfg.network.use_text, "text_encoder": cfg.text.encoder,
                        "seed": cfg.train.seed,
                        "parameters": sum(p.numel() for p in method.parameters())}
    atomic_write_json(metrics_path, metrics)
    _write_rows(rows_path, rows)
    return metrics


ROW_FIELDS = ("split", "id", "dice", "iou", "dice_orig", "iou_orig", "text")


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=ROW_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
