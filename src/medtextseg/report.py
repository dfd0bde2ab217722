"""Compare runs: a Markdown table of Dice/IoU and a PNG grid of overlays.

Runs that share preset, tier and evaluation data (its fingerprint) but differ
in seed are grouped into one row, ``mean ± std`` over seeds; each row shows its
own data, image count and threshold. Figures are in percent, as in the papers' tables.
"""

from __future__ import annotations

import io
import json
import statistics
import textwrap
from collections import defaultdict
from pathlib import Path

import numpy as np

from medtextseg.classes import class_names, in_class_order, overlay_labels, palette
from medtextseg.config import read_config
from medtextseg.data.fingerprint import data_label
from medtextseg.data.io import read_image, read_mask
from medtextseg.data.module import load_arrays, make_dataset, make_loader, mask_to_labels
from medtextseg.data.readers import read_dataset
from medtextseg.data.sources import DataArg
from medtextseg.engine import CONFIG_FILE, RUN_FILE, RunError, load_run, predict_logits
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


def _data_label(entry: dict) -> str:
    return data_label(entry.get("data"))


def _threshold(run: Path, model: dict) -> float:
    if "threshold" in model:
        return float(model["threshold"])
    return read_config(run / CONFIG_FILE).data.threshold  # metrics written before thresholds were recorded


def metrics_table(runs: list[Path], split: str = "Test") -> str:
    """Markdown table, one row per (preset, tier, data), mean ± std over the runs' seeds.

    Every row states its own data (dataset name and fingerprint), image count and
    threshold; runs evaluated on different files never share a row.
    """
    groups: dict[tuple, list[tuple[Path, dict]]] = defaultdict(list)
    for run in runs:
        m = _metrics(run)
        if split not in m:
            raise RunError(f"{run}/metrics.json has no {split} results; run `medtextseg evaluate {run} --split {split}`")
        data = m[split].get("data") or {}
        groups[(m["model"]["preset"], m["model"]["tier"], data.get("fingerprint"))].append((run, m))
    thresholds = {_threshold(r, m["model"]) for ms in groups.values() for r, m in ms}
    per_row_threshold = len(thresholds) > 1
    head = ["Model", "Tier", "Text", "Params (M)", "Seeds", "Data", "Images",
            *(["Threshold"] if per_row_threshold else []), *[c for _, c in METRIC_COLUMNS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (preset, tier, _), ms in groups.items():
        _, m0 = ms[0]
        model = m0["model"]
        text = model["text_encoder"] if model["use_text"] else "—"
        counts = sorted({m[split]["n"] for _, m in ms})
        cells = [preset, tier, text, f"{model['parameters'] / 1e6:.2f}", str(len(ms)), _data_label(m0[split]),
                 "/".join(str(c) for c in counts)]
        if per_row_threshold:
            cells.append(" / ".join(f"{t:g}" for t in sorted({_threshold(r, m["model"]) for r, m in ms})))
        cells += [_fmt([m[split][k] for _, m in ms]) for k, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
        # Composite data: a row per domain, and the mean of the domain means.
        domains = sorted({d for _, m in ms for d in m[split].get("domains", {})})
        for domain in domains:
            have = [m[split]["domains"][domain] for _, m in ms if domain in m[split].get("domains", {})]
            sub = [f"{preset} · {domain}", tier, text, "", str(len(have)), domain,
                   "/".join(str(c) for c in sorted({h["n"] for h in have}))]
            sub += [""] if per_row_threshold else []
            lines.append("| " + " | ".join(sub + [_fmt([h[k] for h in have]) for k, _ in METRIC_COLUMNS]) + " |")
        if domains:
            have = [m[split]["domain_mean"] for _, m in ms if "domain_mean" in m[split]]
            sub = [f"{preset} · mean of domains", tier, text, "", str(len(have)), "+".join(domains), ""]
            sub += [""] if per_row_threshold else []
            lines.append("| " + " | ".join(sub + [_fmt([h[k] for h in have]) for k, _ in METRIC_COLUMNS]) + " |")
    how = "threshold per row" if per_row_threshold else f"threshold {thresholds.pop():g}"
    lines.append("")
    lines.append(f"{split} split; Dice/IoU per image ({how}), averaged over the row's images, in %. "
                 "An image whose mask and prediction are both empty scores 100. On composite data the "
                 "model's first row averages over all images of all domains; its `· <domain>` rows over "
                 "one domain's images; `· mean of domains` is the unweighted mean of the domain means.")
    lines += _class_table(groups, split)
    return "\n".join(lines)


def _run_class_names(run: Path) -> list[str]:
    """The names of class ids 0..K-1 of a multi-class run (its config.yaml); [] if unknown."""
    try:
        data = read_config(run / CONFIG_FILE).data
        return class_names(data.num_classes, data.classes) if data.num_classes > 1 else []
    except (OSError, ValueError):  # a run without its config: classes in the order first seen
        return []


def _row_labels(keys: list[tuple]) -> list[str]:
    """Column labels of the per-class table: the preset, with tier and data where presets repeat."""
    presets = [k[0] for k in keys]
    return [p if presets.count(p) == 1 else f"{p} · {tier} · {fp[:8] if fp else '?'}"
            for p, tier, fp in keys]


def _class_table(groups: dict, split: str) -> list[str]:
    """Multi-class rows of :func:`metrics_table` (metrics with ``classes``): Markdown lines of
    a table with a row per class (class-id order) and a Dice and an IoU column per model row
    (mean ± std over that row's runs in which the class is present); [] for binary runs."""
    rows = [(key, ms) for key, ms in groups.items() if any(m[split].get("classes") for _, m in ms)]
    if not rows:
        return []
    known = next((n for _, ms in rows for r, _ in ms if (n := _run_class_names(r))), [])
    names = in_class_order((c for _, ms in rows for _, m in ms for c in m[split].get("classes", {})), known)
    head = ["Class", *(f"{label} {what}" for label in _row_labels([k for k, _ in rows]) for what in ("Dice", "IoU"))]
    out = ["", f"Per class ({split}):", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in names:
        cells = [c]
        for _, ms in rows:
            have = [m[split]["classes"][c] for _, m in ms if c in m[split].get("classes", {})]
            cells += [_fmt([h[k] for h in have if k in h]) if any(k in h for h in have) else "—"
                      for k in ("dice", "iou")]
        out.append("| " + " | ".join(cells) + " |")
    out += ["", ("Dice/IoU per image and class, in %: each class averaged over the images whose mask or "
                 "prediction holds it, then mean ± std over the row's runs in which it is present; the "
                 "model's Dice / IoU above is the mean over its classes. —: the class is in no mask or "
                 "prediction of the row's runs.")]
    return out


def _predictions(run: Path, chosen: list) -> tuple[str, object, dict[int, np.ndarray]]:
    """One run's label maps ``[h, w]`` (thresholded or argmax; at its own input size h x w) for ``chosen``."""
    method, cfg, encoder, _ = load_run(run, device="auto")
    ds = make_dataset(chosen, encoder, cfg.data)
    out: dict[int, np.ndarray] = {}

    def keep(batch, logits):
        labels = binarize(logits, cfg.data.threshold)[:, 0].numpy()
        for j, idx in enumerate(batch["index"].tolist()):
            out[idx] = labels[j]

    predict_logits(method, make_loader(ds, cfg.data.eval_batch_size, shuffle=False), keep)
    return cfg.preset, cfg, out


def overlay_grid(runs: list[Path], data: DataArg, out_png: Path, split: str = "Test", n_images: int = 6) -> None:
    """Rows: images of ``split``; columns: image, ground truth, each run's prediction.

    The image and its ground truth are drawn at the image's own size; each run's
    prediction over the image as that run saw it (its own input size and
    channels). Labels are tinted as in predict's overlays (the fixed palette of
    :mod:`medtextseg.classes`: binary red, else one colour per class id, with a legend
    on top). The description is printed under each row.

    Raises:
        RunError: no labeled images in ``split``; runs with different ``data.num_classes``
            (their labels would not share colours).
    """
    from matplotlib.figure import Figure  # no pyplot: no backend is chosen for the process

    counts = {r: read_config(r / CONFIG_FILE).data.num_classes for r in runs if (r / CONFIG_FILE).is_file()}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{r} ({k})" for r, k in counts.items())
        raise RunError(f"the runs have different data.num_classes ({shown}); report runs with the same classes")
    samples = [s for s in read_dataset(data) if s.split == split and s.labeled]
    if not samples:
        raise RunError(f"{data} has no labeled {split} images to draw")
    step = max(1, len(samples) // n_images)
    chosen = samples[::step][:n_images]
    results = [_predictions(run, chosen) for run in runs]
    seeds_differ = len(runs) > len({r.name for r in runs})
    names = [f"{name}" + (f" (seed {cfg.train.seed})" if seeds_differ else "") for name, cfg, _ in results]
    cols = 2 + len(runs)
    data_cfg = results[0][1].data
    k = data_cfg.num_classes
    ncol = min(8, max(1, k - 1))
    # Inches above the first row for the legend (one line per ncol classes), none when binary.
    legend_in = 0.15 + 0.15 * -(-(k - 1) // ncol) if k > 1 else 0.0
    height = 2.6 * len(chosen) + legend_in
    fig = Figure(figsize=(2.2 * cols, height))
    axes = fig.subplots(len(chosen), cols, squeeze=False)
    for i, s in enumerate(chosen):
        image = read_image(s.image_path)
        gt = mask_to_labels(read_mask(s.mask_path), k)
        panels = [("image", image.mean(-1), None), ("ground truth", image.mean(-1), gt)]
        for name, (_, cfg, preds) in zip(names, results, strict=True):
            seen = load_arrays([s], cfg.data, with_masks=False)[0][0]
            panels.append((name, seen.mean(0), preds[i]))
        for c, (title, gray, mask) in enumerate(panels):
            ax = axes[i, c]
            rgb = np.repeat(np.asarray(gray).round().astype(np.uint8)[..., None], 3, axis=-1)
            ax.imshow(rgb if mask is None else overlay_labels(rgb, mask, k))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(title, fontsize=8)
    # Axes positions are final only after the layout is set; captions go just under each row.
    fig.subplots_adjust(hspace=0.35, wspace=0.05, left=0.02, right=0.98, top=1 - (0.4 + legend_in) / height,
                        bottom=0.5 / height)  # room for the last row's two-line caption
    if k > 1:
        from matplotlib.patches import Patch

        pal, labels = palette(k), class_names(k, data_cfg.classes)
        fig.legend(handles=[Patch(facecolor=pal[c] / 255.0, edgecolor="black", label=f"{c} {labels[c]}")
                            for c in range(1, k)],
                   loc="upper center", bbox_to_anchor=(0.5, 1 - 0.05 / height), ncol=ncol, fontsize=6,
                   frameon=False)
    for i, s in enumerate(chosen):
        fig.text(0.5, axes[i, 0].get_position().y0 - 0.006, textwrap.fill(s.text, 110), ha="center", va="top",
                 fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    atomic_write_bytes(out_png, buf.getvalue())


def report(runs: list[Path], out: Path, *, data: DataArg | None = None, split: str = "Test", n_images: int = 6) -> Path:
    """Write ``<out>/report.md`` (table + figure link) and ``<out>/overlays.png``; return the .md path."""
    runs = [Path(r) for r in runs]
    table = metrics_table(runs, split)
    if data is None:
        data = json.loads((runs[0] / RUN_FILE).read_text())["data"]
    out = Path(out)
    overlay_grid(runs, data, out / "overlays.png", split=split, n_images=n_images)
    md = f"# medtextseg report\n\nRuns: {', '.join(str(r) for r in runs)}\n\n{table}\n\n![overlays](overlays.png)\n"
    atomic_write_text(out / "report.md", md)
    return out / "report.md"
