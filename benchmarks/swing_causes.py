"""Why does Val Dice swing from epoch to epoch? Looks at finished runs one cause at a time.

    python benchmarks/swing_causes.py --data ../shared/data/MoNuSeg \
        bench/stability/unet-plain-s0 bench/stability/lvit-t-plain-s0 \
        bench/stability/unet-stabilised-s0 bench/stability/lvit-t-stabilised-s0

Per run (train nothing; a few forward passes per run):

- **restarts**: how many cosine warm restarts fall inside the run (``optim.t0`` vs the
  epochs trained); none means the schedule cannot explain a swing.
- **train loss vs Val Dice**: the relative spread (std / mean) of the epoch-mean training
  loss and the std of Val Dice over the last ``--last`` epochs. A smooth loss with a
  jumpy Val Dice points at the weights' noise, not at under-fitting.
- **BatchNorm statistics at batch 2**: Val Dice of ``last.ckpt`` as saved (running
  statistics, an EMA over batches of ``data.batch_size``), then after recomputing the
  statistics as a plain average over every unaugmented Train image. A large change
  means the saved statistics (not the weights) drive the swing.
- **threshold sensitivity**: the share of Val foreground pixels whose probability lies
  in (0.4, 0.6); predictions that hover at the threshold flip between epochs.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
from runs import logged

from medtextseg.data.module import make_dataset, make_loader
from medtextseg.data.validation import validate_dataset
from medtextseg.engine import load_run, predict_logits
from medtextseg.metrics import binarize, dice_iou_per_image
from medtextseg.utils import atomic_write_text


def val_dice(method, cfg, loader) -> tuple[float, float]:
    """(mean Dice %, % of pixels with probability in (0.4, 0.6)) over a loader."""
    dice, unsure, total = [], 0, 0

    def on_batch(batch, logits):
        nonlocal unsure, total
        d, _ = dice_iou_per_image(binarize(logits, cfg.data.threshold), batch["mask"], cfg.data.num_classes)
        dice.extend(d.tolist())
        p = torch.sigmoid(logits)
        unsure += int(((p > 0.4) & (p < 0.6)).sum())
        total += p.numel()

    predict_logits(method, loader, on_batch)
    return 100 * statistics.mean(dice), 100 * unsure / total


@torch.no_grad()
def recalibrate_batchnorm(method, loader) -> int:
    """Running statistics = the plain average over ``loader`` (momentum None); returns the
    number of BatchNorm layers."""
    bns = [m for m in method.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    method.net.train()
    for batch in loader:
        method(batch["image"].to(method.device), batch["text"].to(method.device))
    method.eval()
    return len(bns)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--last", type=int, default=10)
    ap.add_argument("--out-md", type=Path, default=None)
    args = ap.parse_args()

    head = ["Run", "Epochs", "Restarts inside", f"Train loss std/mean, last {args.last} (%)",
            f"Val Dice std, last {args.last} (pts)", "last.ckpt Val Dice %", "after BN recalibration %",
            "Val pixels with p in (0.4, 0.6) %"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    samples = None
    for run in args.runs:
        method, cfg, encoder, _ = load_run(run / "checkpoints" / "last.ckpt", device="cpu")
        if samples is None:
            samples = validate_dataset(args.data, num_classes=cfg.data.num_classes, need_splits=("Train", "Val"))
        dice = [v for _, v in sorted(logged(run, "val/dice"))]
        by_epoch: dict[int, list[float]] = {}
        for e, v in logged(run, "train/loss"):
            by_epoch.setdefault(e, []).append(v)
        loss = [statistics.mean(v) for _, v in sorted(by_epoch.items())][-args.last:]
        restarts = (len(dice) - 1) // cfg.optim.t0 if cfg.optim.scheduler == "cosine_restarts" else 0
        val = make_loader(make_dataset([s for s in samples if s.split == "Val"], encoder, cfg.data), 2, shuffle=False)
        trn = make_loader(make_dataset([s for s in samples if s.split == "Train" and s.labeled], encoder, cfg.data),
                          cfg.data.batch_size, shuffle=False)
        before, unsure = val_dice(method, cfg, val)
        recalibrate_batchnorm(method, trn)
        after, _ = val_dice(method, cfg, val)
        lines.append("| " + " | ".join([
            str(run), str(len(dice)), str(restarts), f"{100 * statistics.pstdev(loss) / statistics.mean(loss):.1f}",
            f"{100 * statistics.pstdev(dice[-args.last:]):.2f}", f"{before:.2f}", f"{after:.2f}", f"{unsure:.2f}"]) + " |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        atomic_write_text(args.out_md, table + "\n")


if __name__ == "__main__":
    main()
