"""PromptSSL benchmarks (issue 13) on synthetic spine MR: the paper's Table 1 layout, the
Fig. 6a ablation, per-class Dice, the prompt mask's quality and the cost.

    medtextseg synth spine-mr --n-cases 60 --out bench/spine60 --seed 0
    # Table 1: U-Net labeled only, Mean Teacher, PromptSSL at 5-50 % (3 seeds at 5 %)
    python benchmarks/promptssl.py --data bench/spine60 --tier cpu --out bench/promptssl \\
        --ratios 0.05 0.1 0.25 0.5 --seeds 0 --rows unet mean-teacher promptssl
    # Fig. 6a at 5 %: MT; +L_LS; +L_GS; +L_region; +L_feat (= PromptSSL)
    python benchmarks/promptssl.py ... --ratios 0.05 --rows mean-teacher +ls +gs +region promptssl
    # the 50 % rows with the optimizer steps of the 5 % ones (the paper's claim: PromptSSL at 5 % ~ MT at 50 %)
    python benchmarks/promptssl.py ... --ratios 0.5 --steps-of 0.05 --rows unet mean-teacher promptssl

Every row runs the ``promptssl`` preset (residual U-Net, the same augmentation, loss and
schedule), so rows differ only in what the paper's rows differ in:

- ``unet``: ``method=supervised`` on the labeled slices, with as many optimizer steps as
  the semi-supervised rows (epochs x max(r, 1 - r) / r, as benchmarks/semi.py);
- ``mean-teacher``: ``promptssl.prompt_mask=false`` (Mean Teacher's step, no VLM);
- ``+ls``: the prompt mask of a GLsc VLM with L_LS only (``vlm.sss=false``: plain InfoNCE
  on [CLS]), no L_region / L_feat; ``+gs``: the full VLM (L_LS + L_GS), no L_region / L_feat;
  ``+region``: + L_region; ``promptssl``: + L_feat (everything).

Each VLM (``glsc-vlm`` at the same tier, seed and labeled split) goes under
``<out>/vlm/r<ratio>-s<seed>-<variant>``, each segmentation run under
``<out>/r<ratio>/<row>-s<seed>`` (``<row>-steps<R>-s<seed>`` with ``--steps-of R``). Finished runs are reused; ``--collect`` trains
nothing. Writes ``<out>/results.md``: mDice / mIoU (mean ± std over seeds) with the
paper's figures, steps, s/epoch and its ratio to Mean Teacher's, the prompt mask's mDice
on the unlabeled slices (withheld masks) and on the split; the VLM table (retrieval,
prompt-mask mDice, pre-training time); and per-class Dice of Mean Teacher and PromptSSL
at the first ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from runs import fmt, logged, optimizer_steps, train_in_child

from medtextseg.config import load_preset
from medtextseg.utils import atomic_write_text

VLM_VARIANTS = {"full": [], "ls": ["vlm.sss=false"]}
VARIANT_LABELS = {"full": "GLsc: L_LS + L_GS (+ mask term)", "ls": "L_LS only (+ mask term)"}
ROWS = {
    "unet": (["method=supervised"], None),
    "mean-teacher": (["promptssl.prompt_mask=false"], None),
    "+ls": (["promptssl.region=false", "promptssl.feat=false"], "ls"),
    "+gs": (["promptssl.region=false", "promptssl.feat=false"], "full"),
    "+region": (["promptssl.feat=false"], "full"),
    "promptssl": ([], "full"),
}
LABELS = {"unet": "Residual U-Net (labeled only)", "mean-teacher": "Mean Teacher (residual U-Net)",
          "+ls": "MT + prompt mask, L_LS", "+gs": "MT + prompt mask, L_LS + L_GS",
          "+region": "... + L_region", "promptssl": "PromptSSL (... + L_feat)"}
# PromptSSL paper, MRSpineSeg (mDice, mIoU %): Table 1; Fig. 6a's increments from MT at 5 %.
PAPER = {("mean-teacher", 0.05): "74.25 / 64.14", ("mean-teacher", 0.1): "75.54 / 64.22",
         ("mean-teacher", 0.25): "77.11 / 67.65", ("mean-teacher", 0.5): "79.31 / 69.05",
         ("promptssl", 0.05): "79.35 / 69.11", ("promptssl", 0.1): "79.56 / 70.76",
         ("promptssl", 0.25): "80.05 / 69.49", ("promptssl", 0.5): "81.46 / 72.28",
         ("+ls", 0.05): "76.60 (MT + 2.36)", ("+gs", 0.05): "78.30 (+ 1.70)", ("+region", 0.05): "78.90 (+ 0.60)"}


def epoch_scale(row: str, ratio: float, steps_of: float | None) -> float:
    """The factor on the preset's epochs that gives ``row`` at ``ratio`` as many optimizer
    steps as a semi-supervised row at ``steps_of`` (its own ratio when None). A
    semi-supervised epoch is max(labeled, unlabeled) / batch steps, the labeled-only
    U-Net's labeled / batch (as benchmarks/semi.py)."""
    ref = ratio if steps_of is None else steps_of
    scale = max(ref, 1.0 - ref) / max(ratio, 1.0 - ratio)
    return scale * max(ratio, 1.0 - ratio) / ratio if row == "unet" else scale


def seg_overrides(row: str, ratio: float, seed: int, tier: str, extra: list[str],
                  steps_of: float | None = None) -> list[str]:
    sets = [f"train.seed={seed}", f"data.labeled_ratio={ratio}", *ROWS[row][0], *extra]
    scale = epoch_scale(row, ratio, steps_of)
    if not math.isclose(scale, 1.0):
        cfg = load_preset("promptssl", tier, sets)
        epochs = math.ceil(cfg.train.max_epochs * scale)
        # The multistep milestones are epochs: scale them with the run.
        sets += [f"train.max_epochs={epochs}", f"train.patience={math.ceil(cfg.train.patience * scale)}",
                 f"optim.milestones=[{','.join(str(math.ceil(m * scale)) for m in cfg.optim.milestones)}]"]
    return sets


def run_name(row: str, ratio: float, seed: int, steps_of: float | None) -> str:
    matched = steps_of is not None and not math.isclose(steps_of, ratio)
    return f"{row}{f'-steps{steps_of:g}' if matched else ''}-s{seed}"


def vlm_run(args, variant: str, ratio: float, seed: int) -> tuple[Path, dict | None]:
    run = args.out / "vlm" / f"r{ratio:g}-s{seed}-{variant}"
    if args.collect and not (run / "metrics.json").is_file():
        return run, None
    sets = [f"train.seed={seed}", f"data.labeled_ratio={ratio}", *VLM_VARIANTS[variant], *args.vlm_set]
    m = train_in_child("glsc-vlm", args.tier, sets, args.data, run, stage="pretrain")
    print(f"VLM {variant} r={ratio:g} seed {seed}: {args.split} R@1 {100 * m[args.split]['r1']:.1f}, prompt-mask "
          f"mDice {100 * m[args.split].get('text_dice', float('nan')):.1f} ({m['seconds']:.0f} s)", flush=True)
    return run, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.05])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rows", nargs="*", default=["unet", "mean-teacher", "promptssl"], choices=list(ROWS))
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="overrides for every segmentation run")
    ap.add_argument("--vlm-set", nargs="*", default=[], help="overrides for every VLM pre-training")
    ap.add_argument("--split", default="Test")
    ap.add_argument("--steps-of", type=float, default=None, metavar="RATIO",
                    help="give every row the optimizer steps of a semi-supervised row at RATIO (e.g. 0.05: "
                         "the 50 %% rows step-matched to the 5 %% ones); default: each ratio its preset epochs")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--collect", action="store_true", help="train nothing: tabulate the finished runs")
    args = ap.parse_args()

    vlms: dict[tuple[str, float], list[tuple[dict, Path]]] = {}
    seg: dict[tuple[str, float], list[dict]] = {}
    for ratio in args.ratios:
        for seed in args.seeds:
            paths = {}
            for variant in dict.fromkeys(v for r in args.rows if (v := ROWS[r][1])):
                run, m = vlm_run(args, variant, ratio, seed)
                paths[variant] = run
                if m is not None:
                    vlms.setdefault((variant, ratio), []).append((m, run))
            for row in args.rows:
                variant = ROWS[row][1]
                run = args.out / f"r{ratio:g}" / run_name(row, ratio, seed, args.steps_of)
                if args.collect and not (run / "metrics.json").is_file():
                    continue
                if variant is not None and not (paths[variant] / "metrics.json").is_file():
                    continue
                sets = seg_overrides(row, ratio, seed, args.tier, args.overrides, args.steps_of)
                m = train_in_child("promptssl", args.tier, sets, args.data, run, vlm=paths.get(variant))
                m["steps"] = optimizer_steps(run)
                pm = logged(run, "promptssl/prompt_mask_dice")
                m["prompt_mask_dice"] = pm[0][1] if pm else None
                m["prompt_mask_dice_end"] = pm[-1][1] if len(pm) > 1 else None
                seg.setdefault((row, ratio), []).append(m)
                print(f"{row} r={ratio:g} seed {seed}: mDice {100 * m[args.split]['dice']:.2f} "
                      f"({m['seconds']:.0f} s, {m['seconds_per_epoch']:.1f} s/epoch)", flush=True)

    sp = args.split
    lines = [f"{args.data} — {sp} split, tier {args.tier}, overrides: {' '.join(args.overrides) or 'none'}", ""]
    head = ["Method", "Labels", f"mDice % ({sp})", "mIoU %", "Paper mDice / mIoU", "Steps", "s/epoch", "× MT epoch",
            "Prompt-mask mDice % (unlabeled): start → last epoch", "Seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (row, ratio), ms in seg.items():
        spe = statistics.mean(m["seconds_per_epoch"] for m in ms)
        mt = seg.get(("mean-teacher", ratio))
        rel = f"{spe / statistics.mean(m['seconds_per_epoch'] for m in mt):.2f}" if mt and row != "unet" else "—"
        pm = [m["prompt_mask_dice"] for m in ms if m["prompt_mask_dice"] is not None]
        pm_end = [m["prompt_mask_dice_end"] for m in ms if m.get("prompt_mask_dice_end") is not None]
        lines.append("| " + " | ".join([
            LABELS[row] + (f", steps of {args.steps_of:.0%}" if "-steps" in run_name(row, ratio, 0, args.steps_of) else ""),
            f"{ratio:.0%}", fmt([m[sp]["dice"] for m in ms]), fmt([m[sp]["iou"] for m in ms]),
            PAPER.get((row, ratio), "—"), str(max(m["steps"] for m in ms)), f"{spe:.1f}", rel,
            (fmt(pm) + (f" → {fmt(pm_end)}" if pm_end else "")) if pm else "—", str(len(ms))]) + " |")
    if vlms:
        head = ["VLM", "Labels (masks)", "I→T R@1 %", "T→I R@1 %", "chance R@1 I→T / T→I",
                f"Prompt-mask mDice % ({sp})", "Pre-train s", "Epochs", "Seeds"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (variant, ratio), ms in vlms.items():
            figs = [m[sp] for m, _ in ms]
            info = json.loads((ms[0][1] / "run.json").read_text())
            td = [f["text_dice"] for f in figs if "text_dice" in f]
            lines.append("| " + " | ".join([
                VARIANT_LABELS[variant], f"{ratio:.0%} ({info.get('train_masks', 0)})",
                fmt([f["i2t_r1"] for f in figs]), fmt([f["t2i_r1"] for f in figs]),
                f"{100 * figs[0]['chance']['i2t_r1']:.1f} / {100 * figs[0]['chance']['t2i_r1']:.1f}",
                fmt(td) if td else "—", f"{statistics.mean(m['seconds'] for m, _ in ms):.0f}",
                str(max(m["epochs"] for m, _ in ms)), str(len(ms))]) + " |")
    first = args.ratios[0]
    per = {row: seg.get((row, first)) for row in ("mean-teacher", "promptssl") if seg.get((row, first))}
    if per:
        names = list(dict.fromkeys(c for ms in per.values() for m in ms for c in m[sp].get("classes", {})))
        head = ["Class", *(f"{LABELS[r]} Dice %" for r in per), "Δ"]
        lines += ["", f"Per-class {sp} Dice at {first:.0%} labels (mean over seeds):", "",
                  "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in names:
            vals = {r: [m[sp]["classes"][c]["dice"] for m in ms if c in m[sp].get("classes", {})]
                    for r, ms in per.items()}
            cells = [fmt(v) if v else "—" for v in vals.values()]
            delta = (f"{100 * (statistics.mean(vals['promptssl']) - statistics.mean(vals['mean-teacher'])):+.2f}"
                     if len(per) == 2 and all(vals.values()) else "—")
            lines.append("| " + " | ".join([c, *cells, delta]) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(args.out / "results.md", table + "\n")


if __name__ == "__main__":
    main()
