"""DuSSS benchmarks (issue 11): VLM quality, the paper's Table 1 and Table 2 layouts, cost.

    # Table 1 at 25 % (3 seeds) and 50 % (1 seed): U-Net labeled only, Mean Teacher, DuSSS
    python benchmarks/dusss.py --data bench/cxr500 --tier cpu --split Test --out bench/dusss-cxr \\
        --ratios 0.25 --seeds 0 1 2 --rows unet mean-teacher dusss
    python benchmarks/dusss.py --data bench/cxr500 --tier cpu --split Test --out bench/dusss-cxr \\
        --ratios 0.5 --seeds 0 --rows unet mean-teacher dusss
    # Table 2 ablation at 50 % (seed 0) and the VLM quality table
    python benchmarks/dusss.py --data bench/cxr500 --tier cpu --split Test --out bench/dusss-cxr \\
        --ratios 0.5 --seeds 0 --rows dusss-mt dusss:sss dusss:dcl dusss:sss+tg dusss:dcl+tg dusss:sss+dcl dusss \\
        --vlm-variants full full-nomask

Every DuSSS row pre-trains its own VLM (``dusss-vlm`` at the same tier, seed and
labeled split, so the VLM never reads a mask the segmentation run withholds) under
``<out>/vlm/r<ratio>-s<seed>-<variant>``; segmentation runs go to
``<out>/r<ratio>/<row>-s<seed>``. Rows:

- ``unet``: U-Net on the labeled images only, with as many optimizer steps as the
  semi-supervised rows (epochs and patience × max(r, 1 - r) / r, as benchmarks/semi.py);
- ``mean-teacher``: the Mean Teacher preset (MSE consistency, weight 0.1);
- ``dusss``: DuSSS with the full VLM (SSS + DCL + L_tg); ``dusss:<variant>`` with
  another VLM (:data:`VLM_VARIANTS`); ``dusss-mt``: the dusss preset with
  ``dusss.text_mask=false`` (Mean Teacher inside DuSSS's losses: Table 2's first row).

Finished runs are reused; ``--collect`` trains nothing. Prints and writes
``<out>/results.md``: the segmentation table (Dice/IoU mean ± std over seeds, steps,
s/epoch and its ratio to Mean Teacher's, the text mask's Dice on the unlabeled
images), the VLM table (retrieval both ways with the chance level, text-mask Dice on
the split, pre-training time and peak memory) and the one-off text-mask pass.
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

# Table 2's VLM switches: SSS (vlm.sss), DCL (the intra-modal term vlm.imc beside CMC), L_tg.
VLM_VARIANTS = {
    "full": [],
    "full-nomask": ["vlm.mask_supervision=false"],
    "sss": ["vlm.imc=false", "vlm.tg_loss=false"],
    "dcl": ["vlm.sss=false", "vlm.tg_loss=false"],
    "sss+tg": ["vlm.imc=false"],
    "dcl+tg": ["vlm.sss=false"],
    "sss+dcl": ["vlm.tg_loss=false"],
    "plain": ["vlm.sss=false", "vlm.imc=false"],
    # The cpu tier's ViT sees 112² in 16-pixel patches: a 7 x 7 grid. Patches of 8 give the
    # paper's 14 x 14 grid (ViT-B/16 at 224²) at 4x the image tokens.
    "full-p8": ["vlm.patch_size=8"],
}
VARIANT_LABELS = {"full": "SSS + DCL + L_tg", "full-nomask": "SSS + DCL + L_tg, no mask term", "sss": "SSS",
                  "dcl": "DCL", "sss+tg": "SSS + L_tg", "dcl+tg": "DCL + L_tg", "sss+dcl": "SSS + DCL",
                  "plain": "CMC + L_tg (no SSS, no IMC)", "full-p8": "SSS + DCL + L_tg, 14 x 14 patch grid"}
# DuSSS paper, Dice % (QaTa-COV19, MoNuSeg): Table 1 (MT, DuSSS at 25 / 50 %), Table 2 (the ablation at 50 %).
PAPER = {("mean-teacher", 0.25): ("77.88", "72.80"), ("dusss", 0.25): ("79.00", "76.51"),
         ("mean-teacher", 0.5): ("79.64", "75.15"), ("dusss", 0.5): ("82.52", "78.03"),
         ("dusss-mt", 0.5): ("79.64", "75.15"), ("dusss:sss", 0.5): ("80.86", "77.25"),
         ("dusss:dcl", 0.5): ("80.13", "76.90"), ("dusss:sss+tg", 0.5): ("81.49", "77.53"),
         ("dusss:dcl+tg", 0.5): ("81.05", "77.10"), ("dusss:sss+dcl", 0.5): ("81.10", "77.74")}


def row_spec(row: str) -> tuple[str, list[str], str | None]:
    """(preset, overrides, VLM variant or None) of a segmentation row."""
    if row == "unet":
        return "unet", [], None
    if row == "mean-teacher":
        return "mean-teacher", [], None
    if row == "dusss-mt":
        return "dusss", ["dusss.text_mask=false"], None
    if row == "dusss":
        return "dusss", [], "full"
    if row.startswith("dusss:") and row.split(":", 1)[1] in VLM_VARIANTS:
        return "dusss", [], row.split(":", 1)[1]
    raise SystemExit(f"unknown row {row!r}: unet, mean-teacher, dusss, dusss-mt or dusss:<{'|'.join(VLM_VARIANTS)}>")


def label(row: str) -> str:
    variant = row_spec(row)[2]
    if row == "unet":
        return "U-Net (labeled only)"
    if row == "mean-teacher":
        return "Mean Teacher (U-Net)"
    if row == "dusss-mt":
        return "DuSSS, no text mask (MT)"
    return f"DuSSS ({VARIANT_LABELS[variant]})"


def seg_overrides(row: str, ratio: float, seed: int, tier: str, extra: list[str]) -> list[str]:
    preset, row_sets, _ = row_spec(row)
    sets = [f"train.seed={seed}", f"data.labeled_ratio={ratio}", *row_sets, *extra]
    if row == "unet" and ratio < 1.0:
        cfg = load_preset(preset, tier, sets)
        scale = max(ratio, 1.0 - ratio) / ratio
        sets += [f"train.max_epochs={math.ceil(cfg.train.max_epochs * scale)}",
                 f"train.patience={math.ceil(cfg.train.patience * scale)}"]
    return sets


def vlm_run(args, variant: str, ratio: float, seed: int, collect: bool) -> tuple[Path, dict | None]:
    run = args.out / "vlm" / f"r{ratio:g}-s{seed}-{variant}"
    if collect and not (run / "metrics.json").is_file():
        return run, None
    sets = [f"train.seed={seed}", f"data.labeled_ratio={ratio}", *VLM_VARIANTS[variant], *args.vlm_set]
    m = train_in_child("dusss-vlm", args.tier, sets, args.data, run, stage="pretrain")
    print(f"VLM {variant} r={ratio:g} seed {seed}: {args.split} R@1 {100 * m[args.split]['r1']:.1f}, text Dice "
          f"{100 * m[args.split].get('text_dice', float('nan')):.1f} ({m['seconds']:.0f} s)", flush=True)
    return run, m


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--ratios", nargs="+", type=float, default=[0.25])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--rows", nargs="*", default=["unet", "mean-teacher", "dusss"])
    ap.add_argument("--vlm-variants", nargs="*", default=[], choices=list(VLM_VARIANTS),
                    help="VLMs to pre-train and tabulate even when no row uses them")
    ap.add_argument("--tier", default="cpu")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], help="overrides for every segmentation run")
    ap.add_argument("--vlm-set", nargs="*", default=[], help="overrides for every VLM pre-training")
    ap.add_argument("--split", default="Test")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--collect", action="store_true", help="train nothing: tabulate the finished runs")
    args = ap.parse_args()
    for row in args.rows:
        row_spec(row)

    vlms: dict[tuple[str, float], list[tuple[dict, Path]]] = {}
    seg: dict[tuple[str, float], list[dict]] = {}
    for ratio in args.ratios:
        for seed in args.seeds:
            wanted = list(dict.fromkeys(args.vlm_variants + [v for r in args.rows if (v := row_spec(r)[2])]))
            paths = {}
            for variant in wanted:
                run, m = vlm_run(args, variant, ratio, seed, args.collect)
                paths[variant] = run
                if m is not None:
                    vlms.setdefault((variant, ratio), []).append((m, run))
            for row in args.rows:
                preset, _, variant = row_spec(row)
                run = args.out / f"r{ratio:g}" / f"{row}-s{seed}"
                if args.collect and not (run / "metrics.json").is_file():
                    continue
                if variant is not None and not (paths[variant] / "metrics.json").is_file():
                    continue
                m = train_in_child(preset, args.tier, seg_overrides(row, ratio, seed, args.tier, args.overrides),
                                   args.data, run, vlm=paths.get(variant))
                m["steps"] = optimizer_steps(run)
                text_dice = logged(run, "dusss/text_mask_dice")
                m["text_mask_dice"] = text_dice[0][1] if text_dice else None
                passes = logged(run, "dusss/text_mask_seconds")
                m["text_mask_seconds"] = passes[0][1] if passes else None
                seg.setdefault((row, ratio), []).append(m)
                print(f"{row} r={ratio:g} seed {seed}: Dice {100 * m[args.split]['dice']:.2f} "
                      f"({m['seconds']:.0f} s, {m['seconds_per_epoch']:.1f} s/epoch)", flush=True)

    sp = args.split
    vlm_sets = f"; VLM: {' '.join(args.vlm_set)}" if args.vlm_set else ""
    lines = [f"{args.data} — {sp} split, tier {args.tier}, overrides: {' '.join(args.overrides) or 'none'}{vlm_sets}",
             ""]
    head = ["Method", "Labels", f"Dice % ({sp})", "IoU %", "Paper Dice QaTa / MoNuSeg", "Steps", "s/epoch",
            "× MT epoch", "Text-mask Dice % (unlabeled)", "Text-mask pass s", "Seeds"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (row, ratio), ms in seg.items():
        spe = statistics.mean(m["seconds_per_epoch"] for m in ms)
        mt = seg.get(("mean-teacher", ratio))
        # Labeled-only epochs have a third of the steps: only semi-supervised epochs compare.
        rel = f"{spe / statistics.mean(m['seconds_per_epoch'] for m in mt):.2f}" if mt and row != "unet" else "—"
        td = [m["text_mask_dice"] for m in ms if m["text_mask_dice"] is not None]
        tp = [m["text_mask_seconds"] for m in ms if m["text_mask_seconds"] is not None]
        paper = " / ".join(PAPER.get((row, ratio), ("—", "—")))
        lines.append("| " + " | ".join([
            label(row), f"{ratio:.0%}", fmt([m[sp]["dice"] for m in ms]), fmt([m[sp]["iou"] for m in ms]), paper,
            str(max(m["steps"] for m in ms)), f"{spe:.1f}", rel, fmt(td) if td else "—",
            f"{statistics.mean(tp):.1f}" if tp else "—", str(len(ms))]) + " |")
    if vlms:
        head = ["VLM", "Labels (mask term)", "I→T R@1 %", "I→T R@5 %", "T→I R@1 %", "T→I R@5 %",
                "chance R@1 I→T / T→I", f"Text-mask Dice % ({sp})", "Pre-train s", "Epochs", "Peak MiB", "Seeds"]
        lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for (variant, ratio), ms in vlms.items():
            figs = [m[sp] for m, _ in ms]
            chance = figs[0]["chance"]
            td = [f["text_dice"] for f in figs if "text_dice" in f]
            cfg = json.loads((ms[0][1] / "run.json").read_text())
            lines.append("| " + " | ".join([
                VARIANT_LABELS[variant], f"{ratio:.0%} ({cfg.get('train_masks', 0) if variant != 'full-nomask' else 0})",
                *(fmt([f[k] for f in figs]) for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")),
                f"{100 * chance['i2t_r1']:.1f} / {100 * chance['t2i_r1']:.1f}", fmt(td) if td else "—",
                f"{statistics.mean(m['seconds'] for m, _ in ms):.0f}", str(max(m["epochs"] for m, _ in ms)),
                f"{max(m['peak_mib'] for m, _ in ms):.0f}", str(len(ms))]) + " |")
    table = "\n".join(lines)
    print(table)
    atomic_write_text(args.out / "results.md", table + "\n")


if __name__ == "__main__":
    main()
