"""Training stability: the spread of Val Dice over the last epochs, with and without the
stabilisers (EMA of the weights, lr warm-up, gradient clipping), per model.

    python benchmarks/stability.py --data ../shared/data/MoNuSeg --presets unet lvit-t \
        --out bench/stability --set data.img_size=224 data.batch_size=2 data.eval_batch_size=2 \
        train.max_epochs=40 train.patience=40

Each (preset, recipe) trains once in a child process (finished runs are reused). The
table gives, per run, the std and the range (max - min) of the logged Val Dice over the
last ``--last`` epochs, the best and the final Val Dice, and the run's wall-clock;
it is printed and written to ``<out>/results.md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from runs import logged, train_in_child

from medtextseg.utils import atomic_write_text

RECIPES = {
    "plain": [],
    "stabilised": ["train.ema_decay=0.99", "optim.lr_warmup_epochs=2", "optim.grad_clip=1.0"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--presets", nargs="+", default=["unet", "lvit-t"])
    ap.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--last", type=int, default=10, help="epochs at the end whose Val Dice spread is reported")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra key=value overrides")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()

    head = ["Model", "Recipe", "Epochs", f"Val Dice std, last {args.last} (pts)", f"range, last {args.last} (pts)",
            "Best Val Dice %", "Final Val Dice %", "Train time (s)"]
    title = (f"{args.data} — tier {args.tier}, seed {args.seed}, overrides: {' '.join(args.overrides) or 'none'}; "
             f"stabilised = {' '.join(RECIPES['stabilised'])}")
    lines = [title, "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for preset in args.presets:
        for recipe in args.recipes:
            run = args.out / f"{preset}-{recipe}-s{args.seed}"
            m = train_in_child(preset, args.tier, [f"train.seed={args.seed}", *args.overrides, *RECIPES[recipe]],
                               args.data, run)
            dice = [v for _, v in sorted(logged(run, "val/dice"))]
            tail = dice[-args.last:]
            std = 100 * statistics.pstdev(tail) if len(tail) > 1 else float("nan")
            lines.append("| " + " | ".join([
                preset, recipe, str(len(dice)), f"{std:.2f}", f"{100 * (max(tail) - min(tail)):.2f}",
                f"{100 * max(dice):.2f}", f"{100 * dice[-1]:.2f}", f"{m['seconds']:.0f}"]) + " |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    print(table)
    atomic_write_text(args.out / "results.md", table + "\n")


if __name__ == "__main__":
    main()
