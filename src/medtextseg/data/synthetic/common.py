"""What every synthetic generator shares: numeric helpers, seeded streams, the writer loop.

* Numeric helpers on float32 ``(H, W)`` arrays (the renderers are memory-bound, so nothing
  is promoted to float64): :func:`smoothstep`, :func:`smin`, :func:`blur`,
  :func:`smooth_noise`, :func:`loguniform`, and :func:`connected_components` for checking
  that a drawn lesion is one area.
* Seeded random streams: item ``k`` of a dataset draws from
  ``default_rng([seed, k, stream])``, one stream per purpose (:class:`RngStreams`), so
  item ``k`` is the same whatever the dataset size or worker count, and turning a knob of
  one purpose (e.g. text noise) never changes the draws of another (e.g. the layouts).
* :func:`write_dataset`: renders items ``0..n-1`` serially or in ``spawn``ed worker
  processes, encodes them to PNG in the workers and writes them through
  :class:`~medtextseg.data.synthetic.layout.LViTLayoutWriter` in index order, so the files
  are byte-identical whatever the worker count.

A generator supplies a module-level ``make_item(seed, index, config, text_noise)`` that
returns ``(item, text)``, where ``item`` has ``image``, ``mask`` (``(H, W)`` uint8),
``text`` (the clean description) and ``layout`` (a
:class:`~medtextseg.data.synthetic.qata_grammar.Layout`, or ``None`` for a generator
without lesion layouts). Binary generators write masks {0, 255}; a multi-class one
(``spine-mr``) writes class ids ``0..K-1`` as they are (the PNG holds the uint8 values,
nothing here rescales them). Case-based generators pass ``names`` (file names carrying
case and slice) and ``groups`` (the case of each item) so a split holds whole cases.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image

from medtextseg.data.sample import SPLITS
from medtextseg.data.synthetic.layout import LViTLayoutWriter, assign_splits, png_bytes
from medtextseg.data.synthetic.qata_grammar import Layout, add_annotation_noise

FILE_PREFIX = "synth_"
# fewest digits in a file name's index, so names sort the same for most dataset sizes
_MIN_INDEX_DIGITS = 5
# soft lesion edge: smoothstep(LESION_EDGE[0], LESION_EDGE[1], f) of a lesion field ``f``
# (> 0 inside, 1 at the centre) reaches half its maximum close to ``f = 0``, the mask
# boundary, so the visible opacity and the mask agree
LESION_EDGE: tuple[float, float] = (-0.25, 0.35)
# pool.map chunk: big enough to amortise pickling, small enough to balance two workers
_CHUNKSIZE = 16


# --------------------------------------------------------------------------------------
# numeric helpers
# --------------------------------------------------------------------------------------


def smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Hermite step from 0 at ``e0`` to 1 at ``e1`` (``e1 < e0`` gives a falling step);
    same shape and dtype as ``x``."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def smin(a: np.ndarray, b: np.ndarray | float, k: float) -> np.ndarray:
    """Smooth minimum (polynomial, blend width ``k``): rounds the corners where two
    outlines meet, e.g. the lung edge against the heart."""
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a ``(H, W)`` float32 array (reflect padding); sigmas
    below 0.3 pixel return ``a`` itself."""
    if sigma < 0.3:
        return a
    r = max(1, math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    p = np.pad(a, r, mode="reflect")
    h, w = a.shape
    tmp = np.zeros((h + 2 * r, w), np.float32)
    for i, kv in enumerate(k):
        tmp += kv * p[:, i : i + w]
    out = np.zeros((h, w), np.float32)
    for i, kv in enumerate(k):
        out += kv * tmp[i : i + h, :]
    return out


def smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Band-limited noise, ``(size, size)`` float32, ~zero mean, unit std: a ``cells`` x
    ``cells`` Gaussian grid upsampled bicubically."""
    g = rng.standard_normal((cells + 3, cells + 3)).astype(np.float32)
    img = Image.fromarray(g).resize(
        (size, size), Image.BICUBIC, box=(1.5, 1.5, cells + 1.5, cells + 1.5)
    )
    a = np.asarray(img, dtype=np.float32)
    return (a - a.mean()) / (a.std() + 1e-6)


def loguniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    """One draw, log-uniform in ``[lo, hi]`` (``0 < lo <= hi``)."""
    return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def connected_components(mask: np.ndarray) -> tuple[int, np.ndarray]:
    """4-connected components of a boolean ``(H, W)`` mask.

    Works on the runs of each row (union-find over runs), so the Python work grows with
    the number of runs, not pixels: a lesion or a lung at 256 px is a few hundred runs.

    Returns:
        ``(count, labels)``: ``labels`` is ``(H, W)`` int32, 0 outside the mask and
        ``1..count`` inside, numbered in raster order of each component's first pixel.
    """
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = m
    d = np.diff(padded, axis=1)
    rows_s, starts = np.nonzero(d == 1)  # run [start, end) in each row, raster order
    _, ends = np.nonzero(d == -1)
    parent = list(range(len(starts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows_s, np.arange(h + 1))  # runs of row r: [rf[r], rf[r+1])
    rs, st, en = rows_s.tolist(), starts.tolist(), ends.tolist()
    for r in range(1, h):
        a, a_end = int(row_first[r - 1]), int(row_first[r])
        b, b_end = a_end, int(row_first[r + 1])
        while a < a_end and b < b_end:  # two-pointer sweep over overlapping intervals
            if st[a] < en[b] and st[b] < en[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if en[a] < en[b]:
                a += 1
            else:
                b += 1
    labels = np.zeros((h, w), np.int32)
    ids: dict[int, int] = {}
    for i in range(len(st)):
        root = find(i)
        if root not in ids:
            ids[root] = len(ids) + 1
        labels[rs[i], st[i] : en[i]] = ids[root]
    return len(ids), labels


# --------------------------------------------------------------------------------------
# seeded streams and items
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RngStreams:
    """Stream ids of one generator. Generators use disjoint ids, so two domains written
    with the same seed do not share their layouts, splits or noise."""

    layout: int
    image: int
    text: int
    split: int


def item_rng(seed: int, index: int, stream: int) -> np.random.Generator:
    """The random source of item ``index``'s ``stream`` (independent of the dataset size)."""
    return np.random.default_rng([seed, index, stream])


def split_rng(seed: int, streams: RngStreams) -> np.random.Generator:
    """The random source of the split assignment of a dataset."""
    return np.random.default_rng([seed, streams.split])


def noisy_text(text: str, rng: np.random.Generator, text_noise: float) -> str:
    """``text`` with one real-style annotation slip with probability ``text_noise``
    (one ``rng.random()`` draw first, so the stream is stable across rates)."""
    if rng.random() < text_noise:
        return add_annotation_noise(text, rng)
    return text


def item_name(index: int, n: int) -> str:
    """File name of item ``index`` (``synth_00012.png``); at least five digits."""
    digits = max(_MIN_INDEX_DIGITS, len(str(max(n - 1, 0))))
    return f"{FILE_PREFIX}{index:0{digits}d}.png"


class RenderedItem(Protocol):
    """What :func:`write_dataset` needs of a rendered item."""

    image: np.ndarray  # (H, W) uint8
    mask: np.ndarray  # (H, W) uint8, {0, 255} or class ids 0..K-1 (multi-class)
    text: str  # clean description of layout
    layout: Layout | None  # None: no lesion layout (bilateral counts as False)


MakeItem = Callable[[int, int, Any, float], tuple[RenderedItem, str]]


@dataclass(frozen=True)
class ItemJob:
    """Everything a worker needs to render item ``k``: a module-level ``make_item`` (so it
    pickles by reference into ``spawn``ed workers), the seed, the generator's config and
    the text-noise rate."""

    make_item: MakeItem
    seed: int
    config: Any
    text_noise: float


class EncodedItem(NamedTuple):
    index: int
    image_png: bytes
    mask_png: bytes
    text: str
    noisy: bool
    bilateral: bool


def encode_item(job: ItemJob, index: int) -> EncodedItem:
    """Worker body: render item ``index`` and encode its image and mask as PNG."""
    item, text = job.make_item(job.seed, index, job.config, job.text_noise)
    return EncodedItem(
        index,
        png_bytes(item.image),
        png_bytes(item.mask),
        text,
        text != item.text,
        item.layout is not None and item.layout.bilateral,
    )


def check_generate_args(n: int, seed: int, text_noise: float) -> None:
    """The argument checks every ``generate_*`` function starts with."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= text_noise <= 1.0:
        raise ValueError(f"text_noise must be in [0, 1], got {text_noise}")


def write_dataset(
    out: Path | str,
    n: int,
    job: ItemJob,
    streams: RngStreams,
    split_fractions: tuple[float, float, float],
    *,
    overwrite: bool = False,
    workers: int = 1,
    started: float | None = None,
    names: Sequence[str] | None = None,
    groups: Sequence[int] | None = None,
) -> dict:
    """Render items ``0..n-1`` of ``job`` and write them in the LViT layout.

    Args:
        out: dataset root; must be absent or empty unless ``overwrite``.
        n: number of items.
        job: the generator's item maker, seed, config and text-noise rate.
        streams: the generator's stream ids (the split assignment uses ``streams.split``).
        split_fractions: Train, Val, Test fractions.
        overwrite: replace a non-empty ``out``.
        workers: rendering processes (``spawn``, not fork: the caller may hold threads,
            e.g. torch's, that fork would break; a calling script needs the usual
            ``if __name__ == "__main__":`` guard). The files do not depend on it.
        started: ``time.perf_counter()`` at the start of the caller's work (for
            ``seconds``); now if not given.
        names: ``n`` distinct file names (default :func:`item_name`), e.g. a case-based
            generator's ``case_012_s07.png``.
        groups: ``n`` group ids (e.g. the case of each slice): the groups, not the items,
            are assigned to splits (fractions of groups), so no group spans two splits.
            Default: every item its own group.

    Returns:
        Summary dict: ``out``, ``n``, ``splits`` (images per split), ``unique_texts``,
        ``noisy_texts``, ``bilateral_fraction``, ``seconds``.
    """
    t0 = time.perf_counter() if started is None else started
    if groups is None:
        splits = assign_splits(n, split_fractions, split_rng(job.seed, streams))
    else:
        if len(groups) != n:
            raise ValueError(f"groups must have n={n} entries, got {len(groups)}")
        order = sorted(set(groups))
        by_group = dict(
            zip(order, assign_splits(len(order), split_fractions, split_rng(job.seed, streams)))
        )
        splits = [by_group[g] for g in groups]
    if names is not None and (len(names) != n or len(set(names)) != n):
        raise ValueError(f"names must be {n} distinct file names")
    workers = max(1, min(int(workers), n))
    counts = dict.fromkeys(SPLITS, 0)
    texts: set[str] = set()
    noisy = bilateral = 0
    with LViTLayoutWriter(out, overwrite=overwrite) as writer, ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
            )
            results = pool.map(partial(encode_item, job), range(n), chunksize=_CHUNKSIZE)
        else:
            results = (encode_item(job, i) for i in range(n))
        for r in results:
            name = item_name(r.index, n) if names is None else names[r.index]
            writer.add_encoded(splits[r.index], name, r.image_png, r.mask_png, r.text)
            counts[splits[r.index]] += 1
            texts.add(r.text)
            noisy += r.noisy
            bilateral += r.bilateral
    return {
        "out": str(Path(out)),
        "n": n,
        "splits": counts,
        "unique_texts": len(texts),
        "noisy_texts": noisy,
        "bilateral_fraction": bilateral / n,
        "seconds": round(time.perf_counter() - t0, 3),
    }
