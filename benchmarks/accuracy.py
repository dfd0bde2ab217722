"""Accuracy benchmark: train presets over seeds on one dataset and print a table.

    python benchmarks/accuracy.py --data demo/data --presets unet lvit-tw lvit-t \
        --seeds 0 1 2 --tier cpu --out bench/cxr --split Test

    python benchmarks/accuracy.py --data ../shared/data/MoNuSeg --presets unet lvit-tw lvit-t \
        --seeds 0 --tier cpu --out bench/monuseg --split Val

Each run trains in a child process (its peak memory is its own); runs that already
have metrics.json are reused (delete them to retrain), so an
interrupted benchmark continues where it stopped. Prints mean ± std over seeds
(in %) and the wall-clock of each training run; writes ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from runs import fmt, train_in_child

from medtextseg.utils import atomic_write_text

KEYS = ("dice", "iou", "dice_orig", "iou_orig")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["unet", "lvit-tw", "lvit-t"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra key=value overrides")
    ap.add_argument("--split", default="Test", help="split to report (Val where the data has no Test)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    results: dict[str, list[dict]] = {}
    for preset in args.presets:
        for seed in args.seeds:
            m = train_in_child(preset, args.tier, [f"train.seed={seed}", *args.overrides], args.data,
                               args.out / f"{preset}-s{seed}")
            results.setdefault(preset, []).append(m)
            print(f"{preset} seed {seed}: Dice {100 * m[args.split]['dice']:.2f}  ({m['seconds']:.0f} s)", flush=True)

    head = ["Model", "Params (M)", "Seeds", "Dice %", "IoU %", "Dice % (orig.)", "IoU % (orig.)",
            "Train time (s/run)", "Peak MiB"]
    lines = [f"{args.data} — {args.split} split, tier {args.tier}, overrides: {' '.join(args.overrides) or 'none'}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset, ms in results.items():
        secs = statistics.mean(m["seconds"] for m in ms)
        lines.append("| " + " | ".join([preset, f"{ms[0]['model']['parameters'] / 1e6:.2f}", str(len(ms)),
                                        *[fmt([m[args.split][k] for m in ms]) for k in KEYS], f"{secs:.0f}",
                                        f"{max(m['peak_mib'] for m in ms):.0f}"]) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(args.out / "results.md", table + "\n")


if __name__ == "__main__":
    main()
