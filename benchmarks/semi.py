"""Semi-supervised benchmark in the layout of the LViT paper's Table 2 (semi part).

    python benchmarks/semi.py --data bench/cxr500 --ratios 0.25 0.5 --seeds 0 --tier cpu \
        --out bench/semi-cxr --split Test
    python benchmarks/semi.py --data ../shared/data/MoNuSeg --ratios 0.25 0.5 --seeds 0 --tier cpu \
        --out bench/semi-monuseg --split Val --set data.img_size=224 data.batch_size=2 data.eval_batch_size=2 \
        --lv-contrastive labeled

Rows per labeled ratio r: U-Net, LViT-TW and LViT-T trained on the labeled part
only; Mean Teacher; LViT-TW + EPI; LViT-T + EPI; LViT-T + EPI + LV; and the three
supervised models at 100 % as the reference. All runs at one (ratio, seed) use the
same labeled images (data/splits.py). The labeled-only runs get as many optimizer
steps as the semi-supervised ones (whose epoch is set by the larger of the two
parts, the smaller one cycled): their epochs and patience are multiplied by
max(r, 1 - r) / r. Runs at different ratios are not step-matched (an epoch has
max(r, 1 - r) * N / batch steps); the Steps column shows each run's optimizer
steps, and ``--set train.max_epochs=...`` per ratio matches them to the 100 % run.
Prints the table with the paper's QaTa / MoNuSeg figures, the
time per epoch relative to supervised LViT-T on all images, peak memory, and the
pseudo-label Dice (against the withheld masks) of the last EPI generation.
Finished runs are reused (``--collect`` tabulates only those, e.g. runs made with
different ``--set`` per ratio or more seeds for some rows); writes ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from runs import fmt, logged, optimizer_steps, train_in_child

from medtextseg.config import load_preset
from medtextseg.utils import atomic_write_text

# name: (preset, extra overrides, semi-supervised?, Text, EPI, L_LV)
ROWS = {
    "unet": ("unet", [], False, "", "", ""),
    "mean-teacher": ("mean-teacher", [], True, "", "", ""),
    "lvit-tw": ("lvit-tw", [], False, "", "", ""),
    "lvit-t": ("lvit-t", [], False, "✓", "", ""),
    "lvit-tw+epi": ("lvit-tw-semi", [], True, "", "✓", ""),
    "lvit-t+epi": ("lvit-t-semi", ["semi.lv_loss=false"], True, "✓", "✓", ""),
    "lvit-t+epi+lv": ("lvit-t-semi", [], True, "✓", "✓", "✓"),
}
LABELS = {"unet": "U-Net", "mean-teacher": "Mean Teacher (U-Net)", "lvit-tw": "LViT-TW", "lvit-t": "LViT-T",
          "lvit-tw+epi": "LViT-TW", "lvit-t+epi": "LViT-T", "lvit-t+epi+lv": "LViT-T"}
# LViT paper, Dice / mIoU %: Table 2 (QaTa) and Table 1 (QaTa | MoNuSeg). Keys: (row, ratio).
PAPER = {
    ("unet", 1.0): ("79.02 / 69.46", "76.45 / 62.86"),
    ("lvit-tw", 1.0): ("81.12 / 71.37", "80.33 / 67.24"),
    ("lvit-t", 1.0): ("83.66 / 75.11", "80.36 / 67.31"),
    ("lvit-tw+epi", 0.25): ("79.08 / 69.42", "79.94 / 66.80"),
    ("lvit-t+epi", 0.25): ("80.67 / 71.08", "—"),
    ("lvit-t+epi+lv", 0.25): ("80.95 / 71.31", "80.09 / 66.97"),
    ("lvit-tw+epi", 0.5): ("80.35 / 70.74", "80.11 / 67.04"),
    ("lvit-t+epi+lv", 0.5): ("82.73 / 73.99", "80.25 / 67.17"),
}


def overrides_for(row: str, ratio: float, seed: int, tier: str, extra: list[str], lv_contrastive: str) -> list[str]:
    preset, row_sets, semi, *_ = ROWS[row]
    sets = [f"train.seed={seed}", f"data.labeled_ratio={ratio}", *row_sets, *extra]
    if ROWS[row][5] and lv_contrastive:
        sets.append(f"semi.lv_contrastive={lv_contrastive}")
    if not semi and ratio < 1.0:
        cfg = load_preset(preset, tier, sets)
        scale = max(ratio, 1.0 - ratio) / ratio
        sets += [f"train.max_epochs={math.ceil(cfg.train.max_epochs * scale)}",
                 f"train.patience={math.ceil(cfg.train.patience * scale)}"]
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25, 0.5])
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--reference", nargs="*", default=["unet", "lvit-tw", "lvit-t"],
                    help="supervised rows also trained with 100%% labels")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="key=value overrides for every run")
    ap.add_argument("--lv-contrastive", default="", help="semi.lv_contrastive for the LV rows (default: preset's)")
    ap.add_argument("--split", default="Test")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: tabulate the finished runs of the plan, skip the missing ones")
    args = ap.parse_args()

    plan = [(row, 1.0) for row in args.reference] + [(row, r) for r in args.ratios for row in args.rows]
    results: dict[tuple[str, float], list[dict]] = {}
    for row, ratio in plan:
        for seed in args.seeds:
            run = args.out / f"r{ratio:g}" / f"{row}-s{seed}"
            if args.collect and not (run / "metrics.json").is_file():
                continue
            sets = overrides_for(row, ratio, seed, args.tier, args.overrides, args.lv_contrastive)
            m = train_in_child(ROWS[row][0], args.tier, sets, args.data, run)
            pseudo = logged(run, "epi/pseudo_dice")
            m["pseudo_dice"] = pseudo[-1][1] if pseudo else None
            m["steps"] = optimizer_steps(run)
            results.setdefault((row, ratio), []).append(m)
            print(f"{row} r={ratio:g} seed {seed}: Dice {100 * m[args.split]['dice']:.2f} "
                  f"({m['seconds']:.0f} s, {m['seconds_per_epoch']:.1f} s/epoch)", flush=True)

    base = results.get(("lvit-t", 1.0))
    base_epoch = statistics.mean(m["seconds_per_epoch"] for m in base) if base else float("nan")
    head = ["Method", "Labels", "Text", "EPI", "L_LV", f"Dice % ({args.split})", "IoU %", "Paper QaTa",
            "Paper MoNuSeg", "Steps", "s/epoch", "× sup. LViT-T 100%", "Peak MiB", "Pseudo-label Dice %", "Seeds"]
    lines = [f"{args.data} — {args.split} split, tier {args.tier}, overrides: {' '.join(args.overrides) or 'none'}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (row, ratio), ms in results.items():
        _, _, _, text, epi, lv = ROWS[row]
        paper = PAPER.get((row, ratio), ("—", "—"))
        spe = statistics.mean(m["seconds_per_epoch"] for m in ms)
        pseudo = [m["pseudo_dice"] for m in ms if m["pseudo_dice"] is not None]
        lines.append("| " + " | ".join([
            LABELS[row], f"{ratio:.0%}", text, epi, lv, fmt([m[args.split]["dice"] for m in ms]),
            fmt([m[args.split]["iou"] for m in ms]), *paper, str(max(m["steps"] for m in ms)), f"{spe:.1f}", f"{spe / base_epoch:.2f}",
            f"{max(m['peak_mib'] for m in ms):.0f}", fmt(pseudo) if pseudo else "—", str(len(ms))]) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(args.out / "results.md", table + "\n")


if __name__ == "__main__":
    main()
