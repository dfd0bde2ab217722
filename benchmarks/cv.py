"""K-fold cross-validation benchmark: Val figures that mean something on small sets.

    python benchmarks/cv.py --data ../shared/data/MoNuSeg --k 5 --seeds 0 --tier cpu \
        --runs-dir bench/cv-monuseg --out-md bench/cv-monuseg/results.md \
        --set data.img_size=224 data.batch_size=2 data.eval_batch_size=2 train.max_epochs=40 train.patience=40

Train + Val are pooled and cut into ``--k`` seeded folds once
(:func:`medtextseg.data.folds.write_fold_manifests`, written to
``<runs-dir>/folds/fold_<i>.csv`` + ``folds.json``), so every model trains and
validates on the same folds. For each model preset, fold and seed, one run
trains on the fold's manifest in a child process (``runs.train_in_child``) in
``<runs-dir>/<model>/fold<i>-s<seed>``; finished runs are reused (delete a run
folder to retrain it; use one ``--runs-dir`` per set of ``--set`` overrides, the
reuse does not compare configurations). Unlabeled Train images (no mask) stay
in the training part of every fold. The original Test split, if any, is
evaluated by every run (``--test none`` leaves it out).

The table: Val Dice / IoU % at the network's input size and at the masks'
original size, mean ± std over all folds × seeds; the Val Dice of each fold
(mean over seeds); the paired difference in Val Dice to the first model over
the same (fold, seed) pairs, which cancels most of the fold-to-fold spread;
Test figures when the data has a Test split. Each run selects its best
checkpoint on its own Val fold and reports that fold, so the Val figures are
optimistic by the selection (as any single Val split is); the Test columns
are not. Printed and written to ``--out-md``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from runs import fmt, train_in_child

from medtextseg.data.folds import write_fold_manifests
from medtextseg.data.readers import DatasetError
from medtextseg.data.validation import DataError
from medtextseg.utils import atomic_write_text

KEYS = ("dice", "iou", "dice_orig", "iou_orig")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True, help="LViT-layout folder or CSV manifest")
    ap.add_argument("--models", nargs="+", default=["unet", "lvit-tw", "lvit-t"], help="presets")
    ap.add_argument("--k", type=int, default=5, help="folds")
    ap.add_argument("--fold-seed", type=int, default=0, help="seed of the fold assignment (not of training)")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (train.seed)")
    ap.add_argument("--folds", nargs="+", type=int, default=None,
                    help="train only these folds (default: all); the table says how many folds each row has")
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="key=value overrides for every run")
    ap.add_argument("--test", choices=["test", "none"], default="test",
                    help="evaluate the original Test split in every run (default) or leave it out")
    ap.add_argument("--runs-dir", type=Path, required=True)
    ap.add_argument("--out-md", type=Path, default=None, help="default: <runs-dir>/results.md")
    ap.add_argument("--collect", action="store_true",
                    help="train nothing: tabulate the finished runs, skip the missing ones")
    args = ap.parse_args()

    try:
        manifests = write_fold_manifests(args.data, args.k, args.fold_seed, args.runs_dir / "folds", test=args.test)
    except (FileExistsError, ValueError, DataError, DatasetError) as e:  # FoldError is a ValueError
        raise SystemExit(f"cv.py: {e}") from None
    # results[model][(fold, seed)] = metrics.json + bench.json of that run
    results: dict[str, dict[tuple[int, int], dict]] = {}
    for model in args.models:
        for i, manifest in enumerate(manifests):
            if args.folds is not None and i not in args.folds:
                continue
            for seed in args.seeds:
                run = args.runs_dir / model / f"fold{i}-s{seed}"
                if args.collect and not (run / "metrics.json").is_file():
                    continue
                m = train_in_child(model, args.tier, [f"train.seed={seed}", *args.overrides], manifest, run)
                results.setdefault(model, {})[(i, seed)] = m
                print(f"{model} fold {i} seed {seed}: Val Dice {100 * m['Val']['dice']:.2f}"
                      + (f", Test Dice {100 * m['Test']['dice']:.2f}" if "Test" in m else "")
                      + f" ({m['seconds']:.0f} s)", flush=True)

    has_test = any("Test" in m for runs in results.values() for m in runs.values())
    first = args.models[0]
    head = ["Model", "Tier", "Folds × seeds", "Val Dice %", "Val IoU %", "Val Dice % (orig.)", "Val IoU % (orig.)",
            "Val Dice % per fold", f"Δ Val Dice vs {first} (paired)"]
    if has_test:
        head += ["Test Dice %", "Test IoU %", "Test Dice % (orig.)", "Test IoU % (orig.)"]
    head += ["s/run"]
    title = (f"{args.data} — {args.k}-fold cross-validation over Train + Val (fold seed {args.fold_seed}, "
              f"folds in {args.runs_dir / 'folds'}), training seeds {' '.join(map(str, args.seeds))}, "
              f"tier {args.tier}, overrides: {' '.join(args.overrides) or 'none'}")
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for model, runs in results.items():
        ms = list(runs.values())
        folds = sorted({i for i, _ in runs})
        per_fold = " / ".join(f"{100 * statistics.mean(m['Val']['dice'] for (j, _), m in runs.items() if j == i):.1f}"
                              for i in folds)
        base = results.get(first, {})
        pairs = [m["Val"]["dice"] - base[key]["Val"]["dice"] for key, m in runs.items() if key in base]
        delta = "—" if model == first or not pairs else fmt(pairs)
        row = [model, args.tier, f"{len(folds)} × {len({s for _, s in runs})} = {len(ms)}",
               *(fmt([m["Val"][key] for m in ms]) for key in KEYS), per_fold, delta]
        if has_test:
            row += [fmt([m["Test"][key] for m in ms if "Test" in m]) for key in KEYS]
        row += [f"{statistics.mean(m['seconds'] for m in ms):.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(args.out_md or args.runs_dir / "results.md", table + "\n")


if __name__ == "__main__":
    main()
