"""Synthetic MRSpineSeg-like sagittal T2 spine MR slices: image, 20-class label map, text.

A *case* is one patient's sagittal stack of 12 or 15 slices (the real split is 172 : 42
of 215 cases, one 18-slice case left out), ordered across the spine from one side through
the mid-sagittal plane to the other. A slice is ``H x W = 2 S x S`` (default 512 x 256):
rows run cranial (top) to caudal, columns anterior (left) to posterior (right). Each slice
shows, in T2-like contrast: vertebral bodies (intermediate marrow, dark cortex/endplates),
discs (bright nucleus, darker annulus; some degenerated, dark), the spinal canal with
bright CSF, the cord down to L1 and the cauda equina below, the posterior elements
(pedicles, articular pillars, laminae, spinous processes), the sacrum, the aorta's flow
void in front of the spine, viscera, paraspinal muscle, subcutaneous fat, skin and air;
then partial-volume blur, a multiplicative coil/bias field and Rician noise.

Classes (:data:`CLASS_NAMES`; the official MRSpineSeg order, counted from the sacrum):
0 background, 1 S, 2 L5, 3 L4, 4 L3, 5 L2, 6 L1, 7 T12, 8 T11, 9 T10, 10 T9, then the
discs 11 L5/S, 12 L4/L5, ..., 19 T9/T10. A vertebra's label covers its body and its
posterior elements. The field of view's top edge cuts the case's top vertebra (T9, T10,
T11 or T12, drawn with the real top-level frequencies); nothing above it is drawn (a T8
would be unlabelled background in the real set), so a class is always its level counted
from the sacrum, never its position in the image.

Text: the 19 structures top to bottom, ``"T9 none, T910 none, T10 link, ..., L5 link,
L56 exist, S split"`` (:data:`TOKENS`, the real files' spelling). The state of each
structure is *read off the label map* (after dropping classes of fewer than
``min_area_px`` pixels), so text and mask agree exactly:

* ``none``: the class is absent from the slice (outside the field of view, or the slice
  misses the structure laterally).
* discs: ``exist`` iff the disc class is present.
* vertebrae, with *body* and *posterior* the pixels of the class drawn as the vertebral
  body or as posterior elements (pedicle, pillar, lamina, spinous process; the item's
  ``parts`` map):

  - ``spinous``: posterior pixels only (a lateral slice through the articular pillars /
    processes beside the body; the real files call every such slice 'spinous');
  - ``vertebral``: body pixels only (here: the top edge cut away the posterior elements,
    which sit higher than the body's lower part);
  - ``link``: body and posterior pixels, forming one 4-connected region (a parasagittal
    slice through a pedicle, which joins the body to the pillar);
  - ``split``: body and posterior pixels in more than one region (a slice through the
    spinal canal, which separates the body from the lamina and spinous process).

Lateral geometry: slice ``j`` of ``m`` sits at ``z = linspace(-1, 1, m)[j]``, relative to
each level's midline (a per-case offset, width scale and mild scoliosis). Each level has
half-widths ``canal < body <= posterior`` (:data:`LATERAL_WIDTHS`): ``|z| < canal`` cuts
the canal (split), ``canal <= |z| < body`` the pedicle (link), ``body <= |z| < posterior``
the pillars only (spinous). The widths are the real per-level state frequencies read as
shares of the slab (e.g. L3: 54 % split, 33 % link, 13 % spinous of its slices), so the
generated frequencies land near the real ones (:data:`REAL_STATE_FREQUENCIES`; compare
with :func:`state_frequencies`). Discs are in a slice iff it passes through their width
(:data:`DISC_WIDTH_SHARE` of the narrower neighbouring body).

Files: ``case_012_s07.png`` (case 12, slice 7, both 0-based); the split assignment draws
whole cases. Determinism: a case draws from ``item_rng(seed, case, stream)`` and a slice's
noise from ``item_rng(seed, index, STREAMS.image)``, so case ``k`` is the same whatever
``n_cases``.
"""

from __future__ import annotations

import difflib
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from medtextseg.classes import CLASSES_FILE
from medtextseg.data.synthetic.common import (
    ItemJob,
    RngStreams,
    blur,
    check_generate_args,
    connected_components,
    item_rng,
    smooth_noise,
    write_dataset,
)
from medtextseg.utils import atomic_write_text

# disjoint from the chest X-ray (0..3) and lung CT (10..13) streams
STREAMS = RngStreams(layout=20, image=21, text=22, split=23)
# per-case textures (marrow, viscera): one draw per case shared by its slices
_TEXTURE_STREAM = 24

__all__ = [
    "CLASS_NAMES",
    "DISC_STATES",
    "REAL_STATE_FREQUENCIES",
    "TOKENS",
    "VERTEBRA_STATES",
    "SpineMRConfig",
    "SpineMRItem",
    "SpineStateError",
    "generate_spine_mr",
    "make_item",
    "parse_spine_text",
    "render_spine_slice",
    "slice_name",
    "state_frequencies",
]

# vertebrae top to bottom (text order); a vertebra's class id is its level from the sacrum
VERTEBRAE = ("T9", "T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5", "S")
# text token of each structure, top to bottom, as spelled in the real files
TOKENS = (
    "T9", "T910", "T10", "T1011", "T11", "T1112", "T12", "T121", "L1", "L12",
    "L2", "L23", "L3", "L34", "L4", "L45", "L5", "L56", "S",
)  # fmt: skip
VERTEBRA_STATES = ("none", "spinous", "link", "split", "vertebral")
DISC_STATES = ("none", "exist")
N_CLASSES = 20
CLASS_NAMES = ("background",) + VERTEBRAE[::-1] + tuple(
    f"{VERTEBRAE[i]}/{VERTEBRAE[i + 1]}" for i in reversed(range(len(VERTEBRAE) - 1))
)


def vertebra_class(v: int) -> int:
    """Class id of vertebra ``VERTEBRAE[v]`` (S -> 1 ... T9 -> 10)."""
    return len(VERTEBRAE) - v


def disc_class(v: int) -> int:
    """Class id of the disc below ``VERTEBRAE[v]`` (L5/S -> 11 ... T9/T10 -> 19)."""
    return N_CLASSES - 1 - v


def token_class(t: int) -> int:
    """Class id of text token ``TOKENS[t]`` (even tokens vertebrae, odd discs)."""
    return vertebra_class(t // 2) if t % 2 == 0 else disc_class(t // 2)


# Per-structure state counts of the 2,712 real slices (train_val_text.xlsx; misspelled
# states folded into the word they misspell). The generator's widths are fitted to them.
# Measured (seed 0, 60 cases, 756 slices), real -> synthetic share of slices:
#   L3 split 54 -> 51 %, link 33 -> 34 %, spinous 13 -> 15 %, none 0.3 -> 0 %;
#   T12 split 41 -> 41 %, link 30 -> 28 %, spinous 26 -> 30 %, none 4 -> 2 %;
#   T11 none 18 -> 15 %, split 33 -> 42 %; T10 none 81 -> 71 %; S link 64 -> 66 %;
#   discs 'exist' within ~6 points (L5/S 81 -> 87 %). 'vertebral' (real 0.1-1 %) is
#   possible (top-edge cuts) but did not occur in that run.
REAL_STATE_FREQUENCIES: dict[str, dict[str, int]] = {
    "T9": {"none": 2639, "spinous": 11, "link": 11, "split": 42, "vertebral": 9},
    "T910": {"none": 2630, "exist": 82},
    "T10": {"none": 2188, "spinous": 125, "link": 158, "split": 218, "vertebral": 23},
    "T1011": {"none": 2157, "exist": 555},
    "T11": {"none": 475, "spinous": 592, "link": 723, "split": 894, "vertebral": 28},
    "T1112": {"none": 1055, "exist": 1657},
    "T12": {"none": 110, "spinous": 691, "link": 799, "split": 1112},
    "T121": {"none": 830, "exist": 1882},
    "L1": {"none": 54, "spinous": 635, "link": 709, "split": 1314},
    "L12": {"none": 667, "exist": 2045},
    "L2": {"none": 24, "spinous": 467, "link": 739, "split": 1481, "vertebral": 1},
    "L23": {"none": 506, "exist": 2206},
    "L3": {"none": 7, "spinous": 357, "link": 888, "split": 1459, "vertebral": 1},
    "L34": {"none": 411, "exist": 2301},
    "L4": {"none": 8, "spinous": 298, "link": 1005, "split": 1398, "vertebral": 3},
    "L45": {"none": 414, "exist": 2298},
    "L5": {"none": 0, "spinous": 259, "link": 1055, "split": 1396, "vertebral": 2},
    "L56": {"none": 513, "exist": 2199},
    "S": {"none": 2, "link": 1728, "split": 982},
}

# (canal, body, posterior) lateral half-widths per vertebra, in slab units ([-1, 1] is the
# slab): the real shares of split, split + link and non-none slices of each fully visible
# level (T9..T11 are mostly cut by the field of view, so theirs continue T12's trend),
# widened ~6 % because 12 evenly spaced slices undersample the centre; the lumbar pillars
# reach past the slab's edge (real lumbar levels are almost never 'none'). The sacrum has
# no 'spinous' slices: its lateral masses are as wide as its posterior part.
LATERAL_WIDTHS: tuple[tuple[float, float, float], ...] = (
    (0.38, 0.66, 0.92),  # T9
    (0.39, 0.68, 0.95),  # T10
    (0.41, 0.71, 1.00),  # T11
    (0.44, 0.75, 1.08),  # T12
    (0.51, 0.79, 1.15),  # L1
    (0.58, 0.87, 1.15),  # L2
    (0.57, 0.92, 1.15),  # L3
    (0.55, 0.94, 1.15),  # L4
    (0.55, 0.95, 1.15),  # L5
    (0.38, 1.20, 1.20),  # S
)
# a disc is in the slice within this share of its narrower neighbouring body's half-width
DISC_WIDTH_SHARE = 1.0
# real share of each level as the case's top visible vertebra (T9 10, T10 47, T11 143,
# T12 15 of 215 cases; the one L1-top case counted as T12)
TOP_LEVEL_PROBS = {"T9": 0.047, "T10": 0.219, "T11": 0.665, "T12": 0.069}

# reference geometry, in pixels of a 256-wide slice before the per-case scale
_REFERENCE_WIDTH = 256.0
_BODY_HEIGHT = (34, 34, 35, 36, 39, 40, 41, 41, 40, 46)  # T9..L5, S1
_BODY_DEPTH = (38, 40, 42, 44, 47, 49, 51, 52, 52, 50)
_DISC_HEIGHT = (8, 9, 9, 10, 12, 13, 14, 14, 12)  # below T9 .. below L5
_CANAL_DEPTH = 15.0
_LAMINA_DEPTH = 9.0
_PILLAR_DEPTH = 20.0
_SACRUM_LENGTH = 170.0  # S1 top to the sacral tip, runs off the image bottom
_CONUS_LEVEL = VERTEBRAE.index("L1")  # the cord ends at L1: cauda equina below
_AORTA_END_LEVEL = VERTEBRAE.index("L4")  # the aorta bifurcates at L4

# T2-weighted signal (arbitrary units, ~1 = CSF) of each tissue
T2_CSF = 1.0
T2_FAT = 0.78
T2_NUCLEUS = (0.45, 0.9)  # (degenerated, healthy) disc nucleus
T2_ANNULUS = 0.3
T2_MARROW = (0.36, 0.5)
T2_CORTEX = 0.1
T2_CORD = 0.48
T2_MUSCLE = 0.24
T2_VISCERA = (0.2, 0.6)
T2_FLOW_VOID = 0.04
T2_AIR = 0.0


@dataclass(frozen=True)
class SpineMRConfig:
    """Rendering settings (lengths in pixels of a 256-wide slice unless said otherwise).

    Attributes:
        size: slice width ``W`` in pixels; the height is ``2 * size`` (MRSpineSeg slices
            are used at 512 x 256).
        slice_counts: slices per case, drawn with ``slice_count_probs``.
        slice_count_probs: probabilities of ``slice_counts`` (real: 172 : 42 cases).
        top_level_probs: probability of each top vertebra (T9, T10, T11, T12).
        top_visible: (low, high) share of the top vertebra's body height inside the field
            of view (the top edge cuts it).
        width_scale: (low, high) per-case scale of the lateral widths.
        lateral_offset: per-case midline offset, uniform in +-this (slab units).
        scoliosis: largest per-level lateral midline shift (slab units).
        sacrum_room: (low, high) share of the height below the S1 top endplate.
        lordosis: (low, high) lumbar lordosis, the column's anterior bulge (pixels).
        noise_sigma: (low, high) Rician noise sigma (share of CSF signal).
        bias_strength: (low, high) log-amplitude of the smooth bias field.
        coil_gain: (low, high) extra signal at the posterior edge (spine coil under the
            back).
        blur_px: (low, high) partial-volume blur sigma.
        degenerated_disc_rate: share of discs with a dark (degenerated) nucleus.
        min_area_px: a class with fewer pixels (at 256 wide, scaled with the area) is
            dropped from the label map and reads 'none'.
    """

    size: int = 256
    slice_counts: tuple[int, ...] = (12, 15)
    slice_count_probs: tuple[float, ...] = (0.8, 0.2)
    top_level_probs: tuple[float, ...] = tuple(TOP_LEVEL_PROBS.values())
    top_visible: tuple[float, float] = (0.12, 1.0)
    width_scale: tuple[float, float] = (0.94, 1.06)
    lateral_offset: float = 0.05
    scoliosis: float = 0.06
    sacrum_room: tuple[float, float] = (0.13, 0.22)
    lordosis: tuple[float, float] = (6.0, 20.0)
    noise_sigma: tuple[float, float] = (0.015, 0.045)
    bias_strength: tuple[float, float] = (0.1, 0.3)
    coil_gain: tuple[float, float] = (0.1, 0.5)
    blur_px: tuple[float, float] = (0.5, 0.8)
    degenerated_disc_rate: float = 0.25
    min_area_px: float = 20.0

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {self.size}")
        if len(self.slice_counts) != len(self.slice_count_probs) or min(self.slice_counts) < 1:
            raise ValueError("slice_counts and slice_count_probs must pair up, counts >= 1")
        if len(self.top_level_probs) != len(TOP_LEVEL_PROBS):
            raise ValueError(f"top_level_probs needs {len(TOP_LEVEL_PROBS)} entries")
        for name in ("slice_count_probs", "top_level_probs"):
            p = np.asarray(getattr(self, name))
            if (p < 0).any() or not np.isclose(p.sum(), 1.0):
                raise ValueError(f"{name} must be non-negative and sum to 1")
        if not 0 < self.top_visible[0] <= self.top_visible[1] <= 1:
            raise ValueError(f"top_visible must be 0 < low <= high <= 1, got {self.top_visible}")

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)`` of a slice."""
        return 2 * self.size, self.size


@dataclass(frozen=True)
class SpinePlan:
    """What a worker needs besides the seed: the rendering settings and, per item, its
    case and slice (so item ``k`` maps to a slice without redrawing earlier cases)."""

    config: SpineMRConfig
    cases: tuple[int, ...]
    slices: tuple[int, ...]


@dataclass
class SpineMRItem:
    """One rendered slice.

    Attributes:
        image: ``(H, W)`` uint8 T2-like image.
        mask: ``(H, W)`` uint8 class ids 0..19 (:data:`CLASS_NAMES`).
        parts: ``(H, W)`` uint8: 1 where ``mask`` is a vertebral body, 2 where it is a
            vertebra's posterior elements, 0 elsewhere (discs, background).
        states: the 19 structure states, :data:`TOKENS` order.
        text: the clean description of ``states``.
        case, slice: the slice's case and position in the case (0-based).
        top_level: the case's top vertebra (``"T9"`` .. ``"T12"``).
        layout: always ``None`` (no lesion layout; for the shared writer).
    """

    image: np.ndarray
    mask: np.ndarray
    parts: np.ndarray
    states: tuple[str, ...]
    text: str
    case: int
    slice: int
    top_level: str
    layout: None = None


@dataclass(frozen=True)
class _Case:
    """Per-case geometry (pixels of the output slice; slab units for lateral values)."""

    n_slices: int
    top: int  # index into VERTEBRAE of the top vertebra
    centers: tuple[tuple[float, float], ...]  # body centre (x, y) per vertebra
    angles: tuple[float, ...]  # axis tilt per vertebra (radians, + = caudal end posterior)
    heights: tuple[float, ...]
    depths: tuple[float, ...]
    discs: tuple[float, ...]  # disc height below each vertebra (T9..L5)
    midline: tuple[float, ...]  # lateral midline of each level
    width_scale: float
    nucleus: tuple[float, ...]  # nucleus signal per disc
    marrow: tuple[float, ...]  # marrow signal per vertebra
    spinous_angle: tuple[float, ...]  # spinous process slope below horizontal
    skin_x: float
    fat_depth: float
    scale: float  # pixels per reference pixel


def case_slice_count(seed: int, case: int, config: SpineMRConfig) -> int:
    """Number of slices of ``case`` (the first draw of its layout stream)."""
    rng = item_rng(seed, case, STREAMS.layout)
    return int(rng.choice(config.slice_counts, p=config.slice_count_probs))


def _draw_case(seed: int, case: int, cfg: SpineMRConfig) -> _Case:
    rng = item_rng(seed, case, STREAMS.layout)
    n_slices = int(rng.choice(cfg.slice_counts, p=cfg.slice_count_probs))  # as case_slice_count
    h_img, w_img = cfg.shape
    top = int(rng.choice(len(TOP_LEVEL_PROBS), p=cfg.top_level_probs))
    visible = rng.uniform(*cfg.top_visible)
    jitter = rng.uniform(0.94, 1.06, size=len(VERTEBRAE))  # per-level size variation
    heights_ref = np.asarray(_BODY_HEIGHT, float) * jitter
    depths_ref = np.asarray(_BODY_DEPTH, float) * jitter * rng.uniform(0.92, 1.08)
    discs_ref = np.asarray(_DISC_HEIGHT, float) * rng.uniform(0.8, 1.2, size=len(_DISC_HEIGHT))
    # scale so the column from the top edge to S1's top endplate fills the room above
    # the sacrum: a high top level gives smaller vertebrae, as a fixed real FOV would
    span = visible * heights_ref[top] + sum(
        discs_ref[v] + (heights_ref[v + 1] if v + 1 < len(VERTEBRAE) - 1 else 0.0)
        for v in range(top, len(VERTEBRAE) - 1)
    )
    room = rng.uniform(*cfg.sacrum_room) * h_img
    scale = (h_img - room) / span
    heights = heights_ref * scale
    depths = depths_ref * scale
    discs = discs_ref * scale
    # column centreline: lordotic bulge forward, deepest around L3
    y_s1 = h_img - room
    x0 = rng.uniform(0.36, 0.44) * w_img
    amp = rng.uniform(*cfg.lordosis) * w_img / _REFERENCE_WIDTH

    def x_of(y: float) -> float:
        return x0 - amp * math.sin(math.pi * min(max(y / y_s1, 0.0), 1.0))

    def tilt_of(y: float) -> float:
        # the axis points caudally; d(x)/d(y) of the centreline
        t = min(max(y / y_s1, 0.0), 1.0)
        return math.atan(-amp * math.pi / y_s1 * math.cos(math.pi * t))

    centers: list[tuple[float, float]] = [(0.0, 0.0)] * len(VERTEBRAE)
    angles = [0.0] * len(VERTEBRAE)
    y = visible * heights[top] - heights[top] / 2
    for v in range(top, len(VERTEBRAE) - 1):
        centers[v] = (x_of(y), y)
        angles[v] = tilt_of(y)
        if v + 1 < len(VERTEBRAE) - 1:
            y += heights[v] / 2 + discs[v] + heights[v + 1] / 2
    # sacrum: S1 below the L5/S disc, tilted by the sacral slope
    l5 = len(VERTEBRAE) - 2
    a5 = angles[l5]
    bottom5 = (
        centers[l5][0] + math.sin(a5) * heights[l5] / 2,
        centers[l5][1] + math.cos(a5) * heights[l5] / 2,
    )
    sacral = math.radians(rng.uniform(25.0, 42.0))
    mid = (a5 + sacral) / 2
    top_s = (bottom5[0] + math.sin(mid) * discs[l5], bottom5[1] + math.cos(mid) * discs[l5])
    centers[-1] = (
        top_s[0] + math.sin(sacral) * heights[-1] / 2,
        top_s[1] + math.cos(sacral) * heights[-1] / 2,
    )
    angles[-1] = sacral
    phase = rng.uniform(0, 2 * math.pi)
    sco = rng.uniform(0, cfg.scoliosis)
    offset = rng.uniform(-cfg.lateral_offset, cfg.lateral_offset)
    midline = tuple(offset + sco * math.sin(phase + 0.5 * v) for v in range(len(VERTEBRAE)))
    healthy = rng.random(len(_DISC_HEIGHT)) >= cfg.degenerated_disc_rate
    nucleus = tuple(
        float(rng.uniform(0.8, 1.0) * (T2_NUCLEUS[1] if ok else T2_NUCLEUS[0])) for ok in healthy
    )
    marrow = tuple(float(m) for m in rng.uniform(*T2_MARROW, size=len(VERTEBRAE)))
    # thoracic spinous processes slope steeply, lumbar ones run nearly horizontal
    spinous = tuple(math.radians(45.0 - 30.0 * v / (len(VERTEBRAE) - 2)) for v in range(10))
    return _Case(
        n_slices=n_slices,
        top=top,
        centers=tuple(centers),
        angles=tuple(angles),
        heights=tuple(float(h) for h in heights),
        depths=tuple(float(d) for d in depths),
        discs=tuple(float(d) for d in discs),
        midline=midline,
        width_scale=float(rng.uniform(*cfg.width_scale)),
        nucleus=nucleus,
        marrow=marrow,
        spinous_angle=spinous,
        skin_x=float(rng.uniform(0.86, 0.97) * w_img),
        fat_depth=float(rng.uniform(0.04, 0.12) * w_img),
        scale=float(scale),
    )


class _Canvas:
    """The slice being drawn: ``t2`` (float32 signal), ``label`` (class ids) and
    ``parts`` (1 body, 2 posterior elements), all ``(H, W)``."""

    def __init__(self, t2: np.ndarray) -> None:
        self.t2 = t2
        h, w = t2.shape
        self.label = np.zeros((h, w), np.uint8)
        self.parts = np.zeros((h, w), np.uint8)

    def frame(
        self,
        cx: float,
        cy: float,
        angle: float,
        radius: float,
        extents: tuple[float, float, float, float] | None = None,
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """Local coordinates around ``(cx, cy)`` within ``radius`` (or the pixel
        ``extents`` up, down, left, right of it): ``along`` (caudal along the axis tilted
        by ``angle``) and ``across`` (posterior), both ``(h, w)`` float32 for the returned
        box; ``None`` if the box misses the slice."""
        h, w = self.t2.shape
        up, down, left, right = extents or (radius,) * 4
        r0, r1 = max(0, int(cy - up)), min(h, int(cy + down) + 1)
        c0, c1 = max(0, int(cx - left)), min(w, int(cx + right) + 1)
        if r0 >= r1 or c0 >= c1:
            return None
        ys = np.arange(r0, r1, dtype=np.float32)[:, None] + 0.5 - cy
        xs = np.arange(c0, c1, dtype=np.float32)[None, :] + 0.5 - cx
        s, c = math.sin(angle), math.cos(angle)
        return (slice(r0, r1), slice(c0, c1)), xs * s + ys * c, xs * c - ys * s

    def paint(self, box, inside: np.ndarray, value, cls: int = 0, part: int = 0) -> None:
        """Set ``t2`` to ``value`` (scalar or box-shaped) inside; label it ``cls`` unless
        0 (unlabelled tissue leaves the labels as they are)."""
        t2 = self.t2[box]
        t2[inside] = value[inside] if isinstance(value, np.ndarray) else value
        if cls:
            self.label[box][inside] = cls
            self.parts[box][inside] = part


def _superellipse(along: np.ndarray, across: np.ndarray, ha: float, hc: float) -> np.ndarray:
    """``< 1`` inside a rounded box of half-sizes ``ha`` (along) and ``hc`` (across)."""
    a = along * np.float32(1.0 / ha)
    c = across * np.float32(1.0 / hc)
    a *= a  # squares by multiplication: numpy's float power is many times slower
    c *= c
    return a * a + c * c


def _capsule(along, across, p0, p1, radius: float) -> np.ndarray:
    """True within ``radius`` of the segment ``p0 -> p1`` (``(along, across)`` points)."""
    da, dc = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((along - p0[0]) * da + (across - p0[1]) * dc) / (da * da + dc * dc), 0, 1)
    return (along - p0[0] - t * da) ** 2 + (across - p0[1] - t * dc) ** 2 < radius * radius


def _zone(dz: float, widths: tuple[float, float, float]) -> str:
    """Which part of a level a slice at lateral ``dz`` cuts: 'canal', 'pedicle',
    'pillar' or 'out'."""
    canal, body, posterior = widths
    a = abs(dz)
    if a < canal:
        return "canal"
    if a < body:
        return "pedicle"
    if a < posterior:
        return "pillar"
    return "out"


def _draw_disc(cv: _Canvas, case: _Case, v: int, dz: float, widths) -> None:
    """The disc below vertebra ``v``, if the slice passes through its width."""
    half = DISC_WIDTH_SHARE * min(widths[v][1], widths[v + 1][1]) * case.width_scale
    if abs(dz) >= half:
        return
    (x1, y1), (x2, y2) = case.centers[v], case.centers[v + 1]
    h1, h2 = case.heights[v], case.heights[v + 1]
    a1, a2 = case.angles[v], case.angles[v + 1]
    # the disc's centre: halfway between the facing endplates' centres
    bx, by = x1 + math.sin(a1) * h1 / 2, y1 + math.cos(a1) * h1 / 2
    tx, ty = x2 - math.sin(a2) * h2 / 2, y2 - math.cos(a2) * h2 / 2
    angle = (a1 + a2) / 2
    chord = math.sqrt(max(0.0, 1 - (dz / half) ** 2))
    depth = min(case.depths[v], case.depths[v + 1]) * (0.4 + 0.6 * chord)
    gap = math.hypot(tx - bx, ty - by)
    # a wedge-shaped disc (L5/S) is filled to its anterior corner; the bodies overwrite
    ha = gap / 2 + 2 * case.scale + depth / 2 * abs(math.sin(a2 - a1))
    fr = cv.frame((bx + tx) / 2, (by + ty) / 2, angle, max(ha, depth / 2) * 1.5)
    if fr is None:
        return
    box, along, across = fr
    field = _superellipse(along, across - 0.03 * depth, ha, depth / 2)
    inside = field < 1
    nucleus = np.where(field < 0.35, case.nucleus[v], T2_ANNULUS).astype(np.float32)
    cv.paint(box, inside, nucleus, disc_class(v))


def _draw_vertebra(
    cv: _Canvas, case: _Case, v: int, dz: float, widths, texture: np.ndarray
) -> None:
    """Body and posterior elements of lumbar/thoracic vertebra ``v`` for lateral ``dz``,
    with the canal behind the body (CSF in the canal zone, foramen fat beside it)."""
    zone = _zone(dz, tuple(w * case.width_scale for w in widths[v]))
    if zone == "out":
        return
    cls = vertebra_class(v)
    cx, cy = case.centers[v]
    h, d, ang, k = case.heights[v], case.depths[v], case.angles[v], case.scale
    body_half = widths[v][1] * case.width_scale
    chord = math.sqrt(max(0.0, 1 - (dz / body_half) ** 2)) if zone != "pillar" else 0.0
    ds = d * (0.35 + 0.65 * chord)  # the body's AP chord in this slice
    disc_below = case.discs[v] if v < len(case.discs) else case.discs[-1]
    canal = _CANAL_DEPTH * k
    # the box only needs the body and what lies behind it (posterior elements reach
    # about 1.5 body depths back and 0.7 below), widened by the tilt
    right = 1.5 * d + (_LAMINA_DEPTH + _CANAL_DEPTH + 4) * k
    lift = right * abs(math.sin(ang))
    extents = (0.9 * h + lift + 2, h / 2 + disc_below + 0.75 * d + lift + 2, 0.6 * d + 4, right)
    fr = cv.frame(cx, cy, ang, 0.0, extents)
    if fr is None:
        return
    box, along, across = fr
    back = d / 2  # posterior wall of the full body: the canal starts here
    reach = h / 2 + disc_below + 1  # canal/foramen segment down to the next body
    seg = (along > -h / 2 - 1) & (along < reach) & (across >= back) & (across < back + canal)
    if zone == "canal":
        csf = np.full(along.shape, T2_CSF, np.float32)
        mid = np.abs(across - back - canal / 2)
        if v <= _CONUS_LEVEL:
            csf[mid < 0.24 * canal] = T2_CORD
        else:  # cauda equina: thin dark roots in the CSF
            roots = np.sin((across - back) * (2.4 / k)) > 0.75
            csf[roots & (mid < 0.35 * canal)] = T2_CORD
        cv.paint(box, seg, csf)
    elif zone == "pedicle":
        cv.paint(box, seg, T2_FAT * 0.85)
        root = ((along - 0.35 * h) / (0.16 * h)) ** 2 + ((across - back - canal / 2) / (0.3 * canal)) ** 2
        cv.paint(box, seg & (root < 1), T2_MUSCLE)
    if zone != "pillar":
        field = _superellipse(along, across - (d - ds) / 2 * 0.3, h / 2, ds / 2)
        inside = field < 1
        sig = np.where(field > 0.72, T2_CORTEX, case.marrow[v] + 0.06 * texture[box])
        cv.paint(box, inside, sig.astype(np.float32), cls, 1)
    post = _posterior(along, across, zone, case, v, back, canal, dz, widths)
    sig = np.where(post[1], T2_CORTEX, case.marrow[v] * 0.9 + 0.05 * texture[box])
    cv.paint(box, post[0], sig.astype(np.float32), cls, 2)


def _posterior(along, across, zone, case, v, back, canal, dz, widths):
    """``(inside, cortex)`` masks of vertebra ``v``'s posterior elements in its frame."""
    h, k = case.heights[v], case.scale
    pillar_d = _PILLAR_DEPTH * k
    if zone == "canal":
        # lamina behind the canal, spinous process from its back, sloping caudally
        lam0 = back + canal
        lam = (along > -0.55 * h) & (along < 0.2 * h)
        lam &= (across >= lam0) & (across < lam0 + _LAMINA_DEPTH * k)
        rel = abs(dz) / (widths[v][0] * case.width_scale)
        length = (0.95 - 0.45 * rel * rel) * case.depths[v]
        ang = case.spinous_angle[v]
        p0 = (-0.2 * h, lam0 + _LAMINA_DEPTH * k * 0.5)
        p1 = (p0[0] + math.sin(ang) * length, p0[1] + math.cos(ang) * length)
        sp = _capsule(along, across, p0, p1, 0.17 * h)
        inside = lam | sp
        cortex = inside & ~_capsule(along, across, p0, p1, 0.17 * h - 2 * k)
        cortex &= ~((along > -0.55 * h + 2 * k) & (along < 0.2 * h - 2 * k))
        return inside, cortex
    if zone == "pedicle":
        # pedicle from the body's upper half to the articular pillar
        ped = (along > -0.45 * h) & (along < -0.02 * h)
        ped &= (across > back - 0.35 * case.depths[v]) & (across < back + canal + 1)
        pil = _superellipse(along + 0.15 * h, across - back - canal - pillar_d / 2, 0.48 * h, pillar_d / 2) < 1
        inside = ped | pil
        return inside, inside & (np.abs(along + 0.15 * h) > 0.4 * h)
    # lateral: the pillar / transverse process only, shrinking towards the level's edge
    _, body, posterior = (w * case.width_scale for w in widths[v])
    s = 0.55 + 0.45 * (posterior - abs(dz)) / max(posterior - body, 1e-6)
    pil = _superellipse(
        along + 0.15 * h, across - back - canal * 0.5 - pillar_d / 2, 0.45 * h * s, pillar_d / 2 * s
    ) < 1
    return pil, pil & (np.abs(along + 0.15 * h) > 0.38 * h * s)


def _draw_sacrum(cv: _Canvas, case: _Case, dz: float, widths, texture: np.ndarray) -> None:
    """S1 and the sacral mass below it; the sacral canal separates the posterior plate
    in the canal zone, the lateral masses are one piece elsewhere."""
    zone = _zone(dz - 0.0, tuple(w * case.width_scale for w in widths[-1]))
    if zone == "out":
        return
    cx, cy = case.centers[-1]
    h, d, ang, k = case.heights[-1], case.depths[-1], case.angles[-1], case.scale
    length = _SACRUM_LENGTH * k
    fr = cv.frame(cx + math.sin(ang) * length / 2, cy + math.cos(ang) * length / 2, ang, length)
    if fr is None:
        return
    box, along, across = fr
    along = along + length / 2  # along from S1's centre
    across = across + 0.0
    t = np.clip((along - h / 2) / length, 0, 1)
    shift = 0.35 * d * t * t  # the sacrum curves posteriorly (kyphotic)
    half = d / 2 * (1 - 0.45 * t)
    s1 = _superellipse(along, across, h / 2, d / 2) < 1
    mass = (along >= 0) & (along < h / 2 + length) & (np.abs(across - shift) < half)
    body = s1 | mass
    canal = 0.7 * _CANAL_DEPTH * k
    plate = 0.55 * _LAMINA_DEPTH * k + 4 * k
    edge = shift + half  # posterior surface of the sacral body
    post = (along > -h / 2) & (along < h / 2 + length)
    cls = vertebra_class(len(VERTEBRAE) - 1)
    sig = (case.marrow[-1] + 0.06 * texture[box]).astype(np.float32)
    if zone == "canal":
        gap = post & (across >= edge) & (across < edge + canal)
        cv.paint(box, gap & (along < h / 2 + 0.6 * length), T2_CSF)
        plate_m = post & (across >= edge + canal) & (across < edge + canal + plate)
    else:
        plate_m = post & (across >= edge - 1) & (across < edge + canal * 0.6 + plate)
    cv.paint(box, body, sig, cls, 1)
    # fused segment remnants: faint dark lines across the sacral body
    seams = body & (np.abs(np.mod(along - h / 2, 0.2 * length)) < 1.2 * k) & (along > h / 2)
    cv.paint(box, seams, T2_CORTEX * 2.5)
    cv.paint(box, plate_m & ~body, sig * 0.9, cls, 2)


def _soft_tissue(case: _Case, cfg: SpineMRConfig, rng: np.random.Generator) -> np.ndarray:
    """``(H, W)`` float32 background: viscera in front of the spine, paraspinal muscle
    behind it, subcutaneous fat, skin and air."""
    h, w = cfg.shape
    x = np.arange(w, dtype=np.float32)[None, :] + 0.5
    visc = smooth_noise(rng, h, 9)[:, :w]
    fine = smooth_noise(rng, h, 60)[:, :w]
    t2 = T2_VISCERA[0] + (T2_VISCERA[1] - T2_VISCERA[0]) * np.clip(0.5 + 0.3 * visc, 0, 1)
    col = np.interp(
        np.arange(h) + 0.5,
        [c[1] for c in case.centers[case.top :]],
        [c[0] for c in case.centers[case.top :]],
    ).astype(np.float32)[:, None]
    depth = np.interp(
        np.arange(h) + 0.5,
        [c[1] for c in case.centers[case.top :]],
        case.depths[case.top :],
    ).astype(np.float32)[:, None]
    behind = x > col - 0.3 * depth  # posterior muscle compartment from mid-body back
    t2 = np.where(behind, T2_MUSCLE + 0.04 * fine, t2)
    t2 = np.where(x > case.skin_x - case.fat_depth, T2_FAT + 0.04 * fine, t2)
    t2 = np.where(x > case.skin_x, T2_AIR, t2)
    return t2.astype(np.float32)


def _aorta(cv: _Canvas, case: _Case, dz: float) -> None:
    """The aorta's flow void in front of the column, down to its bifurcation (L4), in
    slices left of the midline."""
    if not -0.75 < dz < 0.05:
        return
    h, w = cv.t2.shape
    ys = [c[1] for c in case.centers[case.top : _AORTA_END_LEVEL + 1]]
    if len(ys) < 2:
        return
    front = [c[0] - d / 2 for c, d in zip(case.centers[case.top :], case.depths[case.top :])]
    rows = np.arange(h) + 0.5
    fx = np.interp(rows, ys, front[: len(ys)])
    width = 0.085 * w * math.sqrt(max(0.0, 1 - ((dz + 0.35) / 0.4) ** 2))
    x = np.arange(w)[None, :] + 0.5
    inside = (x < fx[:, None] - 3 * case.scale) & (x > fx[:, None] - 3 * case.scale - width)
    inside &= (rows < ys[-1])[:, None]
    cv.t2[inside] = T2_FLOW_VOID


def _read_states(label: np.ndarray, parts: np.ndarray) -> tuple[str, ...]:
    """The 19 structure states of a label map and its parts map (module docstring)."""
    present = np.bincount(label.ravel(), minlength=N_CLASSES)
    body = np.bincount(label[parts == 1], minlength=N_CLASSES) > 0
    post = np.bincount(label[parts == 2], minlength=N_CLASSES) > 0
    states = []
    for t in range(len(TOKENS)):
        c = token_class(t)
        if t % 2:
            states.append("exist" if present[c] else "none")
        elif not present[c]:
            states.append("none")
        elif body[c] and post[c]:
            n, _ = connected_components(label == c)
            states.append("link" if n == 1 else "split")
        else:
            states.append("vertebral" if body[c] else "spinous")
    return tuple(states)


def describe(states: Sequence[str]) -> str:
    """``"T9 none, T910 none, ..., S split"`` for the 19 ``states``."""
    return ", ".join(f"{tok} {s}" for tok, s in zip(TOKENS, states, strict=True))


def parse_spine_text(text: str) -> tuple[str, ...]:
    """The 19 states of a description, checking the tokens' order and spelling.

    A state word that is not one of its structure's states (:data:`VERTEBRA_STATES` for a
    vertebra, :data:`DISC_STATES` for a disc) is a slip when exactly one of them is close
    to it (:data:`STATE_SLIP_CUTOFF`): the real file has 31 such words in 2,712 x 19
    ('eixst', 'spnious', 'spilt', 'nonee', 'lin', 'enone', 'lnik'), each folded into the
    word it misspells. Anything else raises :class:`SpineStateError` (a ``ValueError``)
    naming the token, the word and the states allowed.
    """
    pairs = [p.strip().split(" ") for p in text.split(",")]
    if [p[0] for p in pairs] != list(TOKENS) or any(len(p) != 2 for p in pairs):
        raise ValueError(f"not a spine description: {text!r}")
    return tuple(_state_word(t, p[1], text) for t, p in enumerate(pairs))


# difflib ratio a misspelt state word must reach against the one state it is taken for:
# every slip of the real file scores >= 0.75 against its word and <= 0.55 against the others.
STATE_SLIP_CUTOFF = 0.7


class SpineStateError(ValueError):
    """A description in the MRSpineSeg grammar with a state word no structure has."""


def _state_word(t: int, word: str, text: str) -> str:
    allowed = VERTEBRA_STATES if t % 2 == 0 else DISC_STATES
    if word in allowed:
        return word
    close = difflib.get_close_matches(word, allowed, n=2, cutoff=STATE_SLIP_CUTOFF)
    if len(close) == 1:
        return close[0]
    raise SpineStateError(f"{TOKENS[t]} {word!r} in {text!r}: a {'vertebra' if t % 2 == 0 else 'disc'} state is one "
                     f"of {', '.join(allowed)}; correct the text")


def render_spine_slice(
    seed: int, case_id: int, slice_id: int, index: int, config: SpineMRConfig | None = None
) -> SpineMRItem:
    """Slice ``slice_id`` of case ``case_id`` (``index`` seeds its noise).

    Returns:
        A :class:`SpineMRItem` with ``(2 S, S)`` image, label map and parts map.
    """
    cfg = config or SpineMRConfig()
    case = _draw_case(seed, case_id, cfg)
    if not 0 <= slice_id < case.n_slices:
        raise ValueError(f"case {case_id} has {case.n_slices} slices, asked for {slice_id}")
    h, w = cfg.shape
    tex_rng = item_rng(seed, case_id, _TEXTURE_STREAM)
    texture = smooth_noise(tex_rng, h, 48)[:, :w]
    cv = _Canvas(_soft_tissue(case, cfg, tex_rng))
    z = -1.0 + 2.0 * slice_id / max(case.n_slices - 1, 1)
    dzs = [z - m for m in case.midline]
    widths = LATERAL_WIDTHS
    _aorta(cv, case, dzs[_AORTA_END_LEVEL])
    last = len(VERTEBRAE) - 1
    for v in range(case.top, last):
        _draw_disc(cv, case, v, (dzs[v] + dzs[v + 1]) / 2, widths)
    _draw_sacrum(cv, case, dzs[last], widths, texture)
    for v in range(case.top, last):
        _draw_vertebra(cv, case, v, dzs[v], widths, texture)
    # drop specks (a sliver at the top edge): too small to call the structure present
    counts = np.bincount(cv.label.ravel(), minlength=N_CLASSES)
    min_area = cfg.min_area_px * case.scale**2
    for c in np.flatnonzero((counts > 0) & (counts < min_area)):
        if c:
            drop = cv.label == c
            cv.label[drop] = 0
            cv.parts[drop] = 0
    states = _read_states(cv.label, cv.parts)

    # acquisition: partial volume, coil/bias field, Rician noise, display scaling
    rng = item_rng(seed, index, STREAMS.image)
    img = blur(cv.t2, rng.uniform(*cfg.blur_px) * w / _REFERENCE_WIDTH)
    bias = np.exp(rng.uniform(*cfg.bias_strength) * smooth_noise(rng, h, 3)[:, :w])
    coil = 1.0 + rng.uniform(*cfg.coil_gain) * (np.arange(w, dtype=np.float32) / w)[None, :]
    img = img * bias * coil
    sigma = rng.uniform(*cfg.noise_sigma)
    re = img + sigma * rng.standard_normal(img.shape, dtype=np.float32)
    im = sigma * rng.standard_normal(img.shape, dtype=np.float32)
    mag = np.sqrt(re * re + im * im)
    top = np.percentile(mag, 99.7) + 1e-6
    image = np.clip(mag / top * 255.0, 0, 255).astype(np.uint8)
    return SpineMRItem(
        image=image,
        mask=cv.label,
        parts=cv.parts,
        states=states,
        text=describe(states),
        case=case_id,
        slice=slice_id,
        top_level=VERTEBRAE[case.top],
    )


def _misspell(text: str, rng: np.random.Generator) -> str:
    """One real-style slip in one state word ('spilt', 'lin', 'nonee', 'eixst')."""
    pairs = [p.split(" ") for p in text.split(", ")]
    t = int(rng.integers(len(pairs)))
    word = pairs[t][1]
    op = int(rng.integers(3))
    if op == 0:  # swap two neighbouring letters
        i = int(rng.integers(1, len(word) - 1))
        word = word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    elif op == 1:  # drop the last letter
        word = word[:-1]
    else:  # double the last letter
        word = word + word[-1]
    pairs[t][1] = word
    return ", ".join(" ".join(p) for p in pairs)


def make_item(
    seed: int, index: int, plan: SpinePlan, text_noise: float = 0.0
) -> tuple[SpineMRItem, str]:
    """Item ``index`` of a dataset planned by ``plan``.

    Returns:
        ``(item, text)``: ``text`` is ``item.text`` with one misspelt state word with
        probability ``text_noise``.
    """
    item = render_spine_slice(seed, plan.cases[index], plan.slices[index], index, plan.config)
    rng = item_rng(seed, index, STREAMS.text)
    text = _misspell(item.text, rng) if rng.random() < text_noise else item.text
    return item, text


def slice_name(case: int, slice_id: int, n_cases: int) -> str:
    """``case_012_s07.png`` (case digits grow with ``n_cases``)."""
    digits = max(3, len(str(max(n_cases - 1, 0))))
    return f"case_{case:0{digits}d}_s{slice_id:02d}.png"


def state_frequencies(texts: Iterable[str]) -> dict[str, Counter]:
    """Per-token state counts of descriptions (e.g. to compare with
    :data:`REAL_STATE_FREQUENCIES`)."""
    out: dict[str, Counter] = {t: Counter() for t in TOKENS}
    for text in texts:
        for tok, s in zip(TOKENS, parse_spine_text(text), strict=True):
            out[tok][s] += 1
    return out


DEFAULT_N_CASES = 60


def generate_spine_mr(
    out: Path | str,
    n: int | None = None,
    seed: int = 0,
    size: int = SpineMRConfig.size,
    n_cases: int | None = None,
    text_noise: float = 0.0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    *,
    overwrite: bool = False,
    config: SpineMRConfig | None = None,
    workers: int = 1,
) -> dict:
    """Write a synthetic MRSpineSeg-like sagittal spine MR dataset in the LViT layout.

    ``out/{Train,Val,Test}_Folder/img/case_CCC_sSS.png`` (8-bit gray, ``2 size`` x
    ``size``), ``.../labelcol/`` (class ids 0..19, :data:`CLASS_NAMES`) and
    ``.../<Split>_text.xlsx``, and ``out/classes.txt`` (:data:`CLASS_NAMES`, line i = class
    id i). Splits hold whole cases. Same seed -> byte-identical files
    whatever ``workers``; case ``k`` does not depend on ``n_cases``.

    Args:
        out: dataset root; must be absent or empty unless ``overwrite``.
        n: at most this many slices (the first cases' slices, the last case possibly
            cut short); ``None``: all slices of ``n_cases`` cases. Alone, it takes as many
            cases as needed.
        seed: non-negative seed.
        size: slice width in pixels (height ``2 size``).
        n_cases: number of cases (default :data:`DEFAULT_N_CASES` unless ``n`` is given).
        text_noise: probability that a description gets one misspelt state word.
        split_fractions: Train, Val, Test fractions of the cases.
        overwrite: replace a non-empty ``out``.
        config: rendering settings; ``size`` overrides its field.
        workers: rendering processes (``spawn``ed); output does not depend on it.

    Returns:
        Summary dict: ``out``, ``n`` (slices), ``n_cases``, ``splits`` (slices per
        split), ``unique_texts``, ``noisy_texts``, ``top_levels`` (cases per top
        vertebra), ``seconds``.
    """
    t0 = time.perf_counter()
    if n_cases is not None and n_cases < 1:
        raise ValueError(f"n_cases must be >= 1, got {n_cases}")
    check_generate_args(1 if n is None else n, seed, text_noise)
    cfg = replace(config or SpineMRConfig(), size=size)
    cases: list[int] = []
    slices: list[int] = []
    limit = math.inf if n is None else n
    n_target = n_cases if n_cases is not None else (DEFAULT_N_CASES if n is None else None)
    case = 0
    while len(cases) < limit and (n_target is None or case < n_target):
        count = case_slice_count(seed, case, cfg)
        take = int(min(count, limit - len(cases)))
        cases += [case] * take
        slices += list(range(take))
        case += 1
    plan = SpinePlan(cfg, tuple(cases), tuple(slices))
    names = [slice_name(c, s, case) for c, s in zip(cases, slices)]
    job = ItemJob(make_item, seed, plan, text_noise)
    summary = write_dataset(
        out,
        len(cases),
        job,
        STREAMS,
        split_fractions,
        overwrite=overwrite,
        workers=workers,
        started=t0,
        names=names,
        groups=cases,
    )
    summary.pop("bilateral_fraction", None)  # a lesion-layout statistic, meaningless here
    # The class names, so that `train` and the tables name class ids (medtextseg.classes).
    atomic_write_text(Path(out) / CLASSES_FILE, "\n".join(CLASS_NAMES) + "\n")
    tops = Counter(VERTEBRAE[_draw_case(seed, c, cfg).top] for c in range(case))
    summary["n_cases"] = case
    summary["top_levels"] = {v: tops[v] for v in TOP_LEVEL_PROBS}
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    return summary
