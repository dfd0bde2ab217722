"""Predict masks for new image + text pairs with a trained run.

Writes, for every image ``<stem>.<ext>`` of the input folder:
``<out>/masks/<stem>.png`` (the mask at the image's original size; {0,255} for
binary, class ids otherwise) and ``<out>/overlays/<stem>.png`` (the image with
the prediction drawn in red). Every input problem is reported before anything
is written.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from medtextseg.config import DataConfig
from medtextseg.data.io import ImageReadError, image_size, read_image, write_png_atomic
from medtextseg.data.module import make_dataset, make_loader
from medtextseg.data.sample import Sample
from medtextseg.data.validation import DataError, Problem
from medtextseg.engine import load_run, predict_logits, upsample_to
from medtextseg.metrics import binarize

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
OVERLAY_COLOR = np.array([255, 40, 40], dtype=np.float32)
OVERLAY_ALPHA = 0.45


def overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 image + ``[H, W]`` labels -> ``[H, W, 3]`` uint8 with the foreground tinted."""
    out = image.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - OVERLAY_ALPHA) * out[fg] + OVERLAY_ALPHA * OVERLAY_COLOR
    return out.clip(0, 255).astype(np.uint8)


def read_text_table(path: Path) -> dict[str, str]:
    """A CSV with columns ``image,text`` (``image`` = file name in the images folder)."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"image", "text"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a CSV with columns image,text, found {reader.fieldnames}")
        return {row["image"].strip(): (row["text"] or "").strip() for row in reader}


def collect_inputs(images: Path, texts: Path | None, text: str | None) -> list[Sample]:
    """Pair every image with its text; raise one DataError listing every problem."""
    if (texts is None) == (text is None):
        raise ValueError("give exactly one of --texts CSV or --text \"...\"")
    if not images.is_dir():
        raise ValueError(f"{images} is not a folder of images")
    files = sorted(p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{images} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    table = read_text_table(texts) if texts is not None else {}
    problems, samples = [], []
    for p in files:
        t = text if text is not None else table.get(p.name, table.get(p.stem))
        if not t or not t.strip():
            problems.append(Problem(p, "no text for this image", f"add a row '{p.name},<description>' to {texts}"))
        try:
            image_size(p)
        except ImageReadError as e:
            problems.append(Problem(p, f"unreadable image ({e})", "re-export it as PNG"))
        samples.append(Sample(id=p.stem, image_path=p, mask_path=None, text=(t or "").strip(), split="Test"))
    known = {p.name for p in files} | {p.stem for p in files}
    for name in table:
        if name not in known:
            problems.append(Problem(texts, f"row '{name}' names no image in {images}", "remove the row or add the image"))
    if problems:
        raise DataError(problems, dataset=images)
    return samples


def predict(run_or_ckpt: Path, images: Path, out: Path, *, texts: Path | None = None, text: str | None = None,
            batch_size: int | None = None) -> list[Path]:
    """Predict a mask and an overlay for every image; returns the mask paths."""
    samples = collect_inputs(Path(images), Path(texts) if texts else None, text)
    method, cfg, encoder, _ = load_run(run_or_ckpt)
    data_cfg = DataConfig(**cfg.data.__dict__)
    ds = make_dataset(samples, encoder, data_cfg)
    written: list[Path] = []

    def save(batch, logits):
        for j, idx in enumerate(batch["index"].tolist()):
            s = samples[idx]
            img = read_image(s.image_path)
            labels = binarize(upsample_to(logits[j:j + 1], img.shape[:2]), cfg.data.threshold)[0, 0]
            mask = labels.to(torch.uint8).numpy()
            if cfg.data.num_classes == 1:
                mask = mask * 255
            mask_path = Path(out) / "masks" / f"{s.id}.png"
            write_png_atomic(mask_path, mask)
            write_png_atomic(Path(out) / "overlays" / f"{s.id}.png", overlay(img, mask))
            written.append(mask_path)

    predict_logits(method, make_loader(ds, batch_size or cfg.data.eval_batch_size, shuffle=False), save)
    return written
