"""Compare runs: a Markdown table of Dice/IoU and a PNG grid of overlays.

Runs that share preset and tier but differ in seed are grouped into one row,
``mean ± std`` over seeds. Figures are in percent, as in the papers' tables.
"""

from __future__ import annotations

import io
import json
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from medtextseg.data.io import read_mask
from medtextseg.data.module import (
    load_arrays,
    make_dataset,
    make_loader,
    mask_to_labels,
    resize_mask,
)
from medtextseg.data.readers import read_dataset
from medtextseg.engine import RUN_FILE, RunError, load_run, predict_logits
from medtextseg.metrics import binarize
from medtextseg.utils import atomic_write_bytes, atomic_write_text

METRIC_COLUMNS = (("dice", "Dice"), ("iou", "IoU"), ("dice_orig", "Dice (orig. size)"), ("iou_orig", "IoU (orig. size)"))


def _metrics(run: Path) -> dict:
    path = run / "metrics.json"
    if not path.is_file():
        raise RunError(f"{run} has no metrics.json; train it or run `medtextseg evaluate {run}` first")
    return json.loads(path.read_text())


def _fmt(values: list[float]) -> str:
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} ± {statistics.stdev(pct):.2f}"


def metrics_table(runs: list[Path], split: str = "Test") -> str:
    """Markdown table, one row per (preset, tier), mean ± std over the runs' seeds."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for run in runs:
        m = _metrics(run)
        if split not in m:
            raise RunError(f"{run}/metrics.json has no {split} results; run `medtextseg evaluate {run} --split {split}`")
        groups[(m["model"]["preset"], m["model"]["tier"])].append(m)
    head = ["Model", "Tier", "Text", "Params (M)", "Seeds", *[c for _, c in METRIC_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (preset, tier), ms in groups.items():
        model = ms[0]["model"]
        text = model["text_encoder"] if model["use_text"] else "—"
        cells = [preset, tier, text, f"{model['parameters'] / 1e6:.2f}", str(len(ms))]
        cells += [_fmt([m[split][k] for m in ms]) for k, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    n = ms[0][split]["n"]
    lines.append("")
    lines.append(f"{split} split, {n} images; Dice/IoU per image (threshold 0.5), averaged over images, in %. "
                 "An image whose mask and prediction are both empty scores 100.")
    return "\n".join(lines)


def overlay_grid(runs: list[Path], data: Path, out_png: Path, split: str = "Test", n_images: int = 6) -> None:
    """Rows: images of ``split``; columns: image, ground truth, each run's prediction.
    The description is printed under each row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in read_dataset(data) if s.split == split and s.labeled]
    if not samples:
        raise RunError(f"{data} has no labeled {split} images to draw")
    step = max(1, len(samples) // n_images)
    chosen = samples[::step][:n_images]
    preds, names = [], []
    for run in runs:
        method, cfg, encoder, _ = load_run(run)
        ds = make_dataset(chosen, encoder, cfg.data)
        out: dict[int, np.ndarray] = {}

        def keep(batch, logits, out=out, cfg=cfg):
            labels = binarize(logits, cfg.data.threshold)[:, 0].numpy()
            for j, idx in enumerate(batch["index"].tolist()):
                out[idx] = labels[j]

        predict_logits(method, make_loader(ds, cfg.data.eval_batch_size, shuffle=False), keep)
        preds.append(out)
        names.append(f"{cfg.preset}" + (f" (seed {cfg.train.seed})" if len(runs) > len({r.name for r in runs}) else ""))
        size = cfg.data.img_size
    cols = 2 + len(runs)
    fig, axes = plt.subplots(len(chosen), cols, figsize=(2.2 * cols, 2.6 * len(chosen)), squeeze=False)
    for i, s in enumerate(chosen):
        image = load_arrays([s], cfg.data, with_masks=False)[0][0]
        gray = image.mean(0) if image.shape[0] > 1 else image[0]
        gt = resize_mask(mask_to_labels(read_mask(s.mask_path), cfg.data.num_classes), size)[0]
        panels = [("image", None), ("ground truth", gt)] + [(n, p[i]) for n, p in zip(names, preds)]
        for c, (title, mask) in enumerate(panels):
            ax = axes[i, c]
            ax.imshow(gray, cmap="gray", vmin=0, vmax=255)
            if mask is not None:
                ax.imshow(np.ma.masked_where(mask == 0, mask), cmap="autumn", alpha=0.5, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    # Axes positions are final only after the layout is set; captions go just under each row.
    fig.subplots_adjust(hspace=0.35, wspace=0.05, left=0.02, right=0.98, top=0.96, bottom=0.04)
    for i, s in enumerate(chosen):
        fig.text(0.5, axes[i, 0].get_position().y0 - 0.006, textwrap.fill(s.text, 110), ha="center", va="top",
                 fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(out_png, buf.getvalue())


def report(runs: list[Path], out: Path, *, data: Path | None = None, split: str = "Test", n_images: int = 6) -> Path:
    """Write ``<out>/report.md`` (table + figure link) and ``<out>/overlays.png``; return the .md path."""
    runs = [Path(r) for r in runs]
    table = metrics_table(runs, split)
    if data is None:
        data = Path(json.loads((runs[0] / RUN_FILE).read_text())["data"])
    out = Path(out)
    overlay_grid(runs, data, out / "overlays.png", split=split, n_images=n_images)
    md = f"# medtextseg report\n\nRuns: {', '.join(str(r) for r in runs)}\n\n{table}\n\n![overlays](overlays.png)\n"
    atomic_write_text(out / "report.md", md)
    return out / "report.md"
