"""How good are DuSSS's pseudo labels? Dice against the withheld masks of a run's unlabeled images.

    python benchmarks/dusss_pseudo.py bench/dusss-cxr/r0.25/dusss-s0 [more runs ...]

For each DuSSS (or Mean Teacher) run: its best checkpoint's teacher and student, and
(DuSSS) the text-guided masks of its copied VLM, on every unlabeled Train image in the
unaugmented frame at the network's input size. Prints the mean Dice (threshold
``data.threshold``) of the teacher's prediction, the text mask, the merged pseudo label
σ(teacher logit + text-mask logit) (Eq. 15) and the student's prediction.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from medtextseg.data.module import make_dataset, make_loader
from medtextseg.data.splits import SPLIT_FILE, LabeledSplit
from medtextseg.data.validation import validate_dataset
from medtextseg.engine import load_run
from medtextseg.methods.dusss import compute_text_masks, merged_pseudo_label
from medtextseg.metrics import dice_iou_per_image
from medtextseg.pretrain.base import PRETRAINED_DIR, load_pretrained


@torch.inference_mode()
def pseudo_label_dice(run: Path) -> dict[str, float]:
    method, cfg, encoder, run = load_run(run)
    info = json.loads((run / "run.json").read_text())
    samples = validate_dataset(info["data"], num_classes=1)  # a path, or name=path per root
    split = LabeledSplit.load(run / SPLIT_FILE)
    unlabeled = set(split.unlabeled)
    withheld = [s for s in samples if s.split == "Train" and s.id in unlabeled]
    ds = make_dataset(withheld, encoder, cfg.data)
    masks = torch.from_numpy(ds.masks).long()
    text = None
    if (run / PRETRAINED_DIR).is_dir():
        vlm, _ = load_pretrained(run / PRETRAINED_DIR)
        text = compute_text_masks(vlm.vlm, ds.images, [s.text for s in withheld], vlm.cfg.vlm.max_len,
                                  cfg.data.eval_batch_size).float()
    teacher, student = [], []
    for b in make_loader(ds, cfg.data.eval_batch_size, shuffle=False):
        teacher.append(method.teacher(b["image"], None).float())
        student.append(method(b["image"], b["text"]).float())
    t, s = torch.cat(teacher), torch.cat(student)
    thr = cfg.data.threshold

    def dice(probs: torch.Tensor) -> float:
        return float(dice_iou_per_image((probs > thr).long(), masks, 1)[0].mean())

    out = {"images": len(withheld), "teacher": dice(torch.sigmoid(t)), "student": dice(torch.sigmoid(s))}
    if text is not None:
        out["text_mask"] = dice(text)
        out["merged"] = dice(merged_pseudo_label(t, text, cfg.dusss.eps))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    print("| Run | Unlabeled images | Teacher Dice % | Text-mask Dice % | Merged Dice % | Student Dice % |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        r = pseudo_label_dice(run)
        cells = [f"{100 * r[k]:.2f}" if k in r else "—" for k in ("teacher", "text_mask", "merged", "student")]
        print(f"| {run} | {r['images']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
