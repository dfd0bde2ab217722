"""Synthetic MosMedData+-like lung CT slices: image, lesion mask and QaTa-style description.

Each image is one axial chest CT slice of a supine patient, built in Hounsfield units (HU)
and displayed in a lung window: black air around the patient (and outside the scanner's
circular field of view), the CT couch under the back, the body outline with a
subcutaneous fat layer over the chest-wall muscles (pectorals in front, paraspinal
muscles behind), rib cross-sections, sternum and scapulae, a vertebra with its spinal
canal, lamina, spinous and transverse processes, and the mediastinum between two dark
lungs: heart with epicardial fat (heart-level slices) or ascending aorta, pulmonary trunk
and trachea / main bronchi (great-vessel-level slices), descending aorta beside the spine
and the oesophagus. Inside the lungs: pulmonary vessels (in-plane branches from the hila
and round cross-sections that shrink towards the periphery), bronchi with air lumen and
wall beside their arteries, fissures, and the dependent (posterior) density gradient.
Then reconstruction blur, CT noise (band-limited, as filtered back-projection gives) and a
random lung window (about -1000 HU black, 0..250 HU white).

Lesions, in the zones named by a :class:`~medtextseg.data.synthetic.qata_grammar.Layout`
drawn with the real QaTa frequencies (the MosMedData+ texts follow the QaTa grammar; their
files are not available here, so the QaTa layout table stands in):

* ground-glass opacity: a hazy rise of ``lesion_hu`` above the parenchyma, vessels still
  visible through it, sometimes with a crazy-paving network;
* consolidation (share ``consolidation_fraction`` of the areas): a dense core near
  soft-tissue HU that hides the vessels, with air bronchograms, inside a ground-glass halo.

The mask is the whole lesion (ground-glass and consolidation) inside the lung.

Conventions (the same as the chest X-ray generator's):

* Left/right: images are displayed in the radiological convention, the patient's left on
  the image's right (heart apex and descending aorta to the image's right). The text's
  "left lung" / "right lung" are the grammar's viewer's-perspective words
  (:mod:`~medtextseg.data.synthetic.qata_grammar`): "left lung" is the lung on the image's
  left half, i.e. the patient's right lung.
* Zones: an axial slice has no cranio-caudal extent, so "upper", "middle" and "lower" are
  thirds of each lung's extent along the image's vertical axis, as a reader of one slice
  would name them: "upper" is the anterior third (image top), "lower" the posterior,
  dependent third.

Why the text helps: lesion strength is drawn log-uniformly from ``lesion_hu`` so many
ground-glass areas are faint against the dependent-density gradient and the noise, and
``distractor_rate`` adds lesion-like opacities and small nodules in zones the description
says are clean. Coordinates are canonical, ``(u, v)`` in [0, 1] with u to the image's
right and v down (anterior to posterior); a pixel ``(row, col)`` has centre
``((col + 0.5) / S, (row + 0.5) / S)``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medtextseg.data.synthetic.common import (
    LESION_EDGE,
    ItemJob,
    RngStreams,
    blur,
    check_generate_args,
    connected_components,
    item_name,
    item_rng,
    loguniform,
    noisy_text,
    smin,
    smooth_noise,
    smoothstep,
    write_dataset,
)
from medtextseg.data.synthetic.qata_grammar import (
    LEVELS,
    LUNGS,
    ZONES,
    Layout,
    describe,
    level_band,
    sample_layout,
)

# Disjoint from the chest X-ray generator's streams: a CT and an X-ray dataset written
# with the same seed get different layouts and splits, as two real datasets would.
STREAMS = RngStreams(layout=10, image=11, text=12, split=13)

__all__ = [
    "CONSOLIDATION",
    "GROUND_GLASS",
    "LungCTConfig",
    "LungCTItem",
    "generate_lung_ct",
    "item_name",
    "make_item",
    "render_lung_ct",
]

# Hounsfield units of non-contrast chest CT
HU_AIR = -1000.0
HU_FAT = -100.0
HU_SOFT = 40.0  # muscle, myocardium, blood
HU_LUNG = -860.0  # aerated parenchyma of the non-dependent lung
HU_CSF = 15.0
HU_MARROW = 250.0
HU_CORTEX = 900.0

GROUND_GLASS = "ground-glass"
CONSOLIDATION = "consolidation"

# the renderer draws pixel-sized quantities (line widths, blur) as tuned at this size
_REFERENCE_SIZE = 256.0
# drawn HU canvases use 0 for "nothing drawn here", so a structure never has exactly 0 HU
_EMPTY = 0.0
# a lesion must cover at least this share of each zone its text names (the zone's
# pixels in the lung); redraw otherwise
MIN_ZONE_COVER = 0.1
# ... and spill at most this share of its pixels into the lung's zones the text leaves clean
MAX_ZONE_SPILL = 0.03
_PLACEMENT_TRIES = 8
# "all X lung": the opacity keeps off an irregular rim of about this width (canonical)
_DIFFUSE_RIM = (0.003, 0.008)
# lesion field scale of a diffuse opacity: f = 1 this far (canonical) inside its rim
_DIFFUSE_DEPTH = 0.03
# half-width (in vertebral body radii) of the paraspinal muscles' bulge into the chest:
# just wider than the vertebral body, so the lungs reach behind it on both sides
_PARASPINAL_HALF = 1.35
# a whole-lung opacity is read against the patient's other structures, not against clear
# lung around it: drawn this much denser than a focal one of the same severity
_DIFFUSE_GAIN = 1.5
# share of the scanner's field of view (a circle in the image) that is reconstructed
_FOV_RADIUS = 0.5


@dataclass(frozen=True)
class LungCTConfig:
    """Rendering and difficulty settings (lengths canonical: 1 = image side; HU for
    densities).

    Attributes:
        size: output side in pixels (square images).
        lesion_hu: (low, high) rise of a ground-glass opacity above the parenchyma (HU),
            drawn log-uniformly per image. The parenchyma is ~-860 HU with a dependent
            gradient of 30-110 HU and noise of 12-35 HU, so 80 is faint and 450 obvious.
        consolidation_fraction: share of the lesion areas with a consolidated core.
        consolidation_hu: (low, high) density of a consolidated core (HU).
        distractor_rate: mean number (Poisson) of non-lesion distractors per image, placed
            in zones the description says are clean.
        distractor_opacity_fraction: share of distractors that are ground-glass
            look-alikes; the rest are small dense nodules.
        noise_hu: (low, high) standard deviation of the CT noise (HU).
        blur_px: (low, high) reconstruction blur sigma in pixels at 256 px.
        window_low: (low, high) HU shown black.
        window_high: (low, high) HU shown white.
        cardiac_fraction: share of slices at the level of the heart; the rest are at the
            level of the great vessels and the carina.
        zone_margin: how far (canonical v) a lesion may spill over the boundary of the
            zones it is named in; keeps text and mask consistent.
    """

    size: int = 256
    lesion_hu: tuple[float, float] = (80.0, 450.0)
    consolidation_fraction: float = 0.35
    consolidation_hu: tuple[float, float] = (-150.0, 40.0)
    distractor_rate: float = 1.0
    distractor_opacity_fraction: float = 0.6
    noise_hu: tuple[float, float] = (12.0, 35.0)
    blur_px: tuple[float, float] = (0.45, 0.8)
    window_low: tuple[float, float] = (-1040.0, -970.0)
    window_high: tuple[float, float] = (0.0, 250.0)
    cardiac_fraction: float = 0.65
    zone_margin: float = 0.012

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        lo, hi = self.lesion_hu
        if not 0 < lo <= hi:
            raise ValueError(f"lesion_hu must be 0 < low <= high, got {self.lesion_hu}")
        for name in ("consolidation_fraction", "distractor_opacity_fraction", "cardiac_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.distractor_rate < 0:
            raise ValueError(f"distractor_rate must be >= 0, got {self.distractor_rate}")
        if max(self.window_low) >= min(self.window_high):
            raise ValueError("window_low must lie below window_high")


@dataclass
class LungCTItem:
    """One rendered CT slice.

    Attributes:
        image: ``(S, S)`` uint8 lung-window image.
        mask: ``(S, S)`` uint8 lesion mask, values {0, 255}.
        zones: ``(S, S)`` uint8 zone map: 0 outside the lungs, ``k`` for ``ZONES[k - 1]``
            (``(lung, level)``, lungs from the viewer's perspective, levels by image row).
        hu: ``(S, S)`` float32 Hounsfield units before the window (with noise).
        layout: the lesion layout the slice was drawn from.
        text: the clean description of ``layout``.
        kinds: one entry per infected area, :data:`GROUND_GLASS` or :data:`CONSOLIDATION`
            (a consolidated core in a ground-glass halo), in the order of
            ``layout.findings()`` and their runs.
        cardiac: ``True`` for a heart-level slice, ``False`` for a great-vessel level.
        n_distractors: number of distractors drawn.
    """

    image: np.ndarray
    mask: np.ndarray
    zones: np.ndarray
    hu: np.ndarray
    layout: Layout
    text: str
    kinds: tuple[str, ...] = ()
    cardiac: bool = True
    n_distractors: int = 0


# --------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------


@dataclass
class _Anatomy:
    """One patient's slice geometry in canonical units (see the module docstring)."""

    bx: float  # body centre
    by: float
    a: float  # half-width of the body
    b_ant: float  # half-height in front of the centre ...
    b_post: float  # ... and behind it
    p_ant: float  # superellipse exponents: the back, lying on the couch, is flatter
    p_post: float
    fat: float  # mean subcutaneous fat thickness
    fat_wave: tuple[float, float, float]  # its variation: cos 2θ, cos(θ - φ) amplitudes, φ
    muscle: float  # chest-wall muscle thickness
    pectoral: float  # extra muscle anterolaterally
    latissimus: float  # extra muscle posterolaterally
    rib: float  # thickness of the rib layer
    r_vb: float  # vertebral body radius
    y_vb: float  # vertebral body centre (v; u = bx)
    paraspinal: float  # extra wall thickness behind the lungs at the midline
    cardiac: bool
    heart: tuple[float, float, float, float, float]  # cx, cy, rx, ry, angle
    aorta: tuple[float, float, float]  # descending aorta cx, cy, r
    great: list[tuple[float, float, float]] = field(default_factory=list)  # asc. aorta, trunk
    column: tuple[float, float, float] = (0.0, 0.0, 0.0)  # mediastinum half-widths a/m/p
    y_top: float = 0.0  # anterior cavity boundary at the midline
    carina: tuple[float, float, float] = (0.0, 0.0, 0.0)  # trachea/carina cx, cy, lumen r
    main_bronchi: bool = False


def _angle_diff(theta: np.ndarray, centre: float) -> np.ndarray:
    """``theta - centre`` wrapped to [-pi, pi)."""
    return (theta - centre + np.pi) % (2 * np.pi) - np.pi


def _body_fields(
    an: _Anatomy, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Depth below the skin and the layer thicknesses at each point.

    Returns:
        ``(depth, fat, muscle, wall)`` float32 arrays shaped like ``u``: ``depth`` is the
        approximate distance inside the body outline (< 0 outside), ``fat`` the fat
        thickness, ``muscle`` the depth where the muscle ends (fat + muscle, with the
        paraspinal muscles) and ``wall`` the depth of the pleural cavity (muscle + ribs).
    """
    dx, dy = u - an.bx, v - an.by
    post = dy > 0
    b = np.where(post, an.b_post, an.b_ant).astype(np.float32)
    p = np.where(post, an.p_post, an.p_ant).astype(np.float32)
    x, y = np.abs(dx) / an.a, np.abs(dy) / b
    xp, yp = x ** (p - 1), y ** (p - 1)
    r = np.maximum((xp * x + yp * y) ** (1 / p), 0.05)
    # distance ~ (1 - r) / |grad r|: exact on the axes, close near the outline
    grad = r ** (1 - p) * np.sqrt((xp / an.a) ** 2 + (yp / b) ** 2)
    depth = (1 - r) / np.maximum(grad, 1e-3)
    theta = np.arctan2(dy / b, dx / an.a)  # elliptic angle, -pi/2 = anterior midline
    a2, a1, phi = an.fat_wave
    fat = an.fat * np.clip(1 + a2 * np.cos(2 * theta) + a1 * np.cos(theta - phi), 0.3, None)
    muscle = np.full_like(depth, an.muscle)
    for c in (-0.5 * np.pi - 0.75, -0.5 * np.pi + 0.75):  # pectoral muscles
        muscle += an.pectoral * np.exp(-((_angle_diff(theta, c) / 0.35) ** 2))
    for c in (0.5 * np.pi - 1.1, 0.5 * np.pi + 1.1):  # latissimus dorsi
        muscle += an.latissimus * np.exp(-((_angle_diff(theta, c) / 0.3) ** 2))
    # paraspinal muscles and the vertebral arch push the cavity forward at the midline
    # (flat-topped in u, so the lungs reach deep on both sides of the spine)
    muscle += an.paraspinal * np.exp(-((dx / (_PARASPINAL_HALF * an.r_vb)) ** 4)) * post
    muscle = fat + muscle
    return depth, fat, muscle, muscle + an.rib


def _sample_anatomy(rng: np.random.Generator, cfg: LungCTConfig) -> _Anatomy:
    a = rng.uniform(0.39, 0.46)
    b_ant = a * rng.uniform(0.62, 0.74)
    b_post = b_ant * rng.uniform(0.95, 1.06)
    fat = rng.uniform(0.008, 0.04)
    muscle = rng.uniform(0.016, 0.028)
    rib = rng.uniform(0.012, 0.017)
    r_vb = a * rng.uniform(0.095, 0.115)
    bx = 0.5 + rng.uniform(-0.02, 0.02)
    by = 0.47 + rng.uniform(-0.02, 0.02)  # a little high: the couch lies under the back
    an = _Anatomy(
        bx=bx,
        by=by,
        a=a,
        b_ant=b_ant,
        b_post=b_post,
        p_ant=rng.uniform(2.0, 2.3),
        p_post=rng.uniform(2.4, 3.0),
        fat=fat,
        fat_wave=(rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3), rng.uniform(-np.pi, np.pi)),
        muscle=muscle,
        pectoral=rng.uniform(0.004, 0.02),
        latissimus=rng.uniform(0.002, 0.012),
        rib=rib,
        r_vb=r_vb,
        y_vb=0.0,
        paraspinal=0.0,
        cardiac=bool(rng.random() < cfg.cardiac_fraction),
        heart=(0.0, 0.0, 0.0, 0.0, 0.0),
        aorta=(0.0, 0.0, 0.0),
    )
    # the spine from the back: skin, fat, spinous process tip, then the arch and the body
    y_skin = by + b_post
    fat_back = float(_body_fields(an, np.float32(bx), np.float32(y_skin - 1e-3))[1])
    an.y_vb = y_skin - fat_back - 0.01 - 2.9 * r_vb
    # the cavity's posterior edge at the midline runs just behind the vertebral body's
    # centre, so the body bulges into the chest between the lungs
    an.paraspinal = max(0.0, y_skin - (an.y_vb + 0.25 * r_vb) - fat_back - muscle - rib)
    an.y_top = (
        by - b_ant + float(_body_fields(an, np.float32(bx), np.float32(by - b_ant + 1e-3))[3])
    )
    an.aorta = (
        bx + r_vb * rng.uniform(0.95, 1.2),
        an.y_vb - r_vb * rng.uniform(0.8, 1.05),
        r_vb * rng.uniform(0.55, 0.7),
    )
    height = an.y_vb - an.y_top
    if an.cardiac:
        hs = rng.uniform(0.85, 1.1)
        an.heart = (
            bx + a * rng.uniform(0.1, 0.16),
            an.y_top + height * rng.uniform(0.4, 0.48),
            a * rng.uniform(0.34, 0.4) * hs,
            height * rng.uniform(0.24, 0.3) * hs,
            rng.uniform(-0.6, -0.3),  # long axis towards the patient's left front
        )
        an.column = (a * rng.uniform(0.02, 0.05), a * rng.uniform(0.09, 0.12), r_vb * 0.65)
    else:
        asc_r = r_vb * rng.uniform(0.7, 0.85)
        y_gv = an.y_top + height * rng.uniform(0.28, 0.36)
        an.great = [
            (bx - a * rng.uniform(0.03, 0.07), y_gv, asc_r),  # ascending aorta
            (bx + a * rng.uniform(0.1, 0.14), y_gv - height * 0.05, asc_r * 0.9),  # trunk
        ]
        an.column = (a * rng.uniform(0.03, 0.06), a * rng.uniform(0.12, 0.16), r_vb * 0.7)
    an.carina = (bx + rng.uniform(-0.005, 0.01), an.y_vb - 2.4 * r_vb, r_vb * rng.uniform(0.4, 0.5))
    an.main_bronchi = (not an.cardiac) and bool(rng.random() < 0.5)
    return an


def _mediastinum(an: _Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed margin (> 0 inside, canonical units) of the mediastinum and the spine, the
    part of the pleural cavity that is not lung; shaped like ``u``."""
    dx = u - an.bx
    w_ant, w_mid, w_post = an.column
    w = w_ant + (w_mid - w_ant) * smoothstep(an.y_top + 0.02, an.y_top + 0.1, v)
    w -= (w_mid - w_post) * smoothstep(an.y_vb - 2.5 * an.r_vb, an.y_vb - an.r_vb, v)
    m = w - np.abs(dx)
    circles = [(an.bx, an.y_vb, an.r_vb), an.aorta, *an.great]
    for cx, cy, r in circles:
        m = -smin(-m, -(r - np.sqrt((u - cx) ** 2 + (v - cy) ** 2)), 0.01)
    if an.cardiac:
        hx, hy, rx, ry, ang = an.heart
        c, s = math.cos(ang), math.sin(ang)
        x1 = c * (u - hx) + s * (v - hy)
        y1 = -s * (u - hx) + c * (v - hy)
        rho = np.sqrt((x1 / rx) ** 2 + (y1 / ry) ** 2)
        m = -smin(-m, -(1 - rho) * min(rx, ry), 0.015)
    return m


def _lungs(
    an: _Anatomy, u: np.ndarray, v: np.ndarray, wall_depth: np.ndarray
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The lungs: each is the cavity minus the mediastinum on one side of the midline,
    one connected piece (stray pixels cut off by the heart are dropped).

    Args:
        wall_depth: ``(S, S)`` float32 depth below the inner chest wall (> 0 in the cavity).

    Returns:
        ``({lung: (S, S) bool}, margin)``: ``margin`` is the ``(S, S)`` float32 signed
        distance (canonical, > 0 inside) to the lung fields.
    """
    margin = smin(wall_depth, -_mediastinum(an, u, v), 0.012)
    out = {}
    for name in LUNGS:
        side = (u < an.bx) if name == "left" else (u > an.bx)
        out[name] = _largest((margin > 0) & side)[1]
    return out, margin


# --------------------------------------------------------------------------------------
# drawing helpers
# --------------------------------------------------------------------------------------


def _to_px(pts: np.ndarray, size: int) -> list[tuple[float, float]]:
    """Canonical ``(N, 2)`` (u, v) points -> PIL pixel (x, y) coordinates."""
    p = np.asarray(pts, dtype=np.float64) * size - 0.5
    return [tuple(q) for q in p.tolist()]


def _ellipse(
    cx: float, cy: float, rx: float, ry: float, angle: float = 0.0, n: int = 28
) -> np.ndarray:
    """``(n, 2)`` canonical points of a rotated ellipse outline."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    x, y = rx * np.cos(t), ry * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([cx + c * x - s * y, cy + s * x + c * y], axis=1)


def _bar(p0: tuple[float, float], p1: tuple[float, float], half: float) -> np.ndarray:
    """``(4, 2)`` canonical corners of a bar of half-width ``half`` from p0 to p1."""
    d = np.subtract(p1, p0)
    nrm = np.array([-d[1], d[0]]) / (np.hypot(*d) + 1e-9) * half
    return np.array([p0 + nrm, p1 + nrm, p1 - nrm, p0 - nrm])


def _outline_point(an: _Anatomy, theta: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Canonical points at ``depth`` below the skin along the elliptic angles ``theta``
    (``(N,)`` arrays) -> ``(N, 2)``; searched along rays, so they agree with
    :func:`_body_fields`."""
    b = np.where(np.sin(theta) > 0, an.b_post, an.b_ant)
    dir_u, dir_v = an.a * np.cos(theta), b * np.sin(theta)  # the outline at t = 1
    t = np.linspace(0.6, 1.0, 81)[None, :]
    pu = (an.bx + dir_u[:, None] * t).astype(np.float32)
    pv = (an.by + dir_v[:, None] * t).astype(np.float32)
    d = _body_fields(an, pu, pv)[0]
    k = np.argmin(np.abs(d - np.asarray(depth)[:, None]), axis=1)
    rows = np.arange(len(theta))
    return np.stack([pu[rows, k], pv[rows, k]], axis=1)


def _draw_skeleton(
    draw: ImageDraw.ImageDraw, rng: np.random.Generator, an: _Anatomy, s: int
) -> None:
    """Ribs, sternum, scapulae and the vertebra, as HU values on an "F" canvas."""

    def bone(pts: np.ndarray, marrow_scale: float = 0.6) -> None:
        draw.polygon(_to_px(pts, s), fill=HU_CORTEX)
        c = pts.mean(axis=0)
        draw.polygon(_to_px(c + (pts - c) * marrow_scale, s), fill=HU_MARROW)

    # ribs: oblique cross-sections in the rib layer, from the sternum round to the spine
    for sign in (-1.0, 1.0):
        n = int(rng.integers(6, 9))
        thetas = np.linspace(-0.5 * np.pi + 0.35, 0.5 * np.pi - 0.45, n)
        thetas = thetas + rng.uniform(-0.06, 0.06, n)
        thetas = np.where(sign < 0, np.pi - thetas, thetas)  # mirror to the image's left
        fat_muscle = _body_fields(an, *_outline_point(an, thetas, np.full(n, 0.0)).T)[2]
        depth = fat_muscle + 0.5 * an.rib
        centres = _outline_point(an, thetas, depth)
        for (cu, cv), th in zip(centres, thetas):
            # long along the outline (tangent), thin across it
            b = an.b_post if math.sin(th) > 0 else an.b_ant
            tang = math.atan2(b * math.cos(th), -an.a * math.sin(th))
            length = rng.uniform(0.018, 0.04) * (1.3 if abs(math.sin(th)) < 0.7 else 1.0)
            bone(_ellipse(cu, cv, length, 0.42 * an.rib, tang, 14), 0.55)
    # sternum in the anterior wall
    y_ant = an.by - an.b_ant
    fat_front = float(_body_fields(an, np.float32(an.bx), np.float32(y_ant + 1e-3))[1])
    st_y = y_ant + fat_front + 0.55 * (an.muscle + an.rib)
    bone(_ellipse(an.bx, st_y, an.a * rng.uniform(0.06, 0.09), 0.4 * (an.muscle + an.rib)))
    # scapulae: thin blades behind the ribs, posterolaterally, inside the muscles
    for th in (0.5 * np.pi + 1.05 + rng.uniform(-0.1, 0.1), 0.5 * np.pi - 1.05):
        if rng.random() < 0.75:
            fm = _body_fields(an, *_outline_point(an, np.array([th]), np.zeros(1)).T)[1]
            (p,) = _outline_point(an, np.array([th]), fm + 0.45 * an.muscle)
            b = an.b_post
            tang = math.atan2(b * math.cos(th), -an.a * math.sin(th))
            half_len = rng.uniform(0.04, 0.065)
            d = np.array([math.cos(tang), math.sin(tang)]) * half_len
            bone(_bar(p - d, p + d, rng.uniform(0.003, 0.005)), 0.3)
    # vertebra: body, arch round the canal, spinous and transverse processes
    r, y = an.r_vb, an.y_vb
    bone(_ellipse(an.bx, y, r * 1.05, r, 0.0, 32), 0.85)
    yc = y + 1.55 * r
    ring = _ellipse(an.bx, yc, 0.8 * r, 0.75 * r, 0.0, 24)
    draw.polygon(_to_px(ring, s), fill=HU_CORTEX)
    tip = (an.bx + rng.uniform(-0.1, 0.1) * r, y + 2.9 * r)
    draw.polygon(_to_px(_bar((an.bx, yc), tip, 0.14 * r), s), fill=HU_CORTEX)
    for sgn in (-1, 1):
        draw.polygon(
            _to_px(
                _bar((an.bx + sgn * 0.5 * r, yc - 0.2 * r), (an.bx + sgn * 1.6 * r, yc), 0.16 * r),
                s,
            ),
            fill=HU_CORTEX,
        )
    draw.polygon(_to_px(_ellipse(an.bx, yc, 0.5 * r, 0.45 * r, 0.0, 20), s), fill=HU_CSF)


def _draw_mediastinum(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    an: _Anatomy,
    s: int,
    hila: dict[str, tuple[float, float]],
) -> None:
    """Heart or great vessels, aorta, oesophagus and the central airway (HU canvas)."""
    if an.cardiac:
        hx, hy, rx, ry, ang = an.heart
        draw.polygon(_to_px(_ellipse(hx, hy, rx, ry, ang, 40), s), fill=HU_FAT)  # epicardial
        epi = rng.uniform(0.06, 0.14)
        # the fat is thickest over the front of the heart: shift the muscle backwards
        draw.polygon(
            _to_px(
                _ellipse(
                    hx - 0.3 * epi * rx,
                    hy + 0.5 * epi * ry,
                    rx * (1 - epi),
                    ry * (1 - epi),
                    ang,
                    40,
                ),
                s,
            ),
            fill=HU_SOFT,
        )
    for cx, cy, r in [an.aorta, *an.great]:
        draw.polygon(_to_px(_ellipse(cx, cy, r, r, 0.0, 28), s), fill=HU_SOFT)
    # oesophagus between the airway and the spine, often with a little air
    ex, ey = an.bx + 0.25 * an.r_vb, an.y_vb - 1.5 * an.r_vb
    draw.polygon(_to_px(_ellipse(ex, ey, 0.4 * an.r_vb, 0.32 * an.r_vb), s), fill=HU_SOFT)
    if rng.random() < 0.5:
        draw.polygon(_to_px(_ellipse(ex, ey, 0.1 * an.r_vb, 0.08 * an.r_vb, 0, 10), s), fill=HU_AIR)
    cx, cy, r = an.carina
    if an.main_bronchi:  # just below the carina: the main bronchi run out to the hila
        # (a little narrower than the trachea, running out and slightly backwards)
        segs = [_to_px(np.array([(cx, cy), (hu_, hv_ + 0.01)]), s) for hu_, hv_ in hila.values()]
        for seg in segs:
            draw.line(seg, fill=HU_SOFT, width=max(1, round(2.0 * r * s)))
        for seg in segs:
            draw.line(seg, fill=HU_AIR, width=max(1, round(1.4 * r * s)))
    elif not an.cardiac:  # trachea above the carina
        draw.polygon(_to_px(_ellipse(cx, cy, r * 1.3, r * 1.2), s), fill=HU_SOFT)
        draw.polygon(_to_px(_ellipse(cx, cy, r, r * 0.9), s), fill=HU_AIR)


def _hilum(inside: np.ndarray, name: str, level: float, s: int) -> tuple[float, float]:
    """Canonical point on a lung's medial edge at canonical height ``level`` (the
    carina's), kept within the middle of the lung's rows."""
    rows = np.flatnonzero(inside.any(axis=1))
    r = int(
        np.clip(
            level * s, rows[0] + 0.35 * (rows[-1] - rows[0]), rows[0] + 0.65 * (rows[-1] - rows[0])
        )
    )
    cols = np.flatnonzero(inside[r])  # never empty: a connected piece spans its rows
    c = cols.max() if name == "left" else cols.min()
    return (c + 0.5) / s, (r + 0.5) / s


def _draw_lung_structures(
    rng: np.random.Generator,
    an: _Anatomy,
    inside: dict[str, np.ndarray],
    hila: dict[str, tuple[float, float]],
    s: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vessels, fissures and bronchi inside the lungs.

    Returns:
        ``(vessels, walls, lumens)``: ``(S, S)`` float32 fractions in [0, 1] of blood
        (vessels and fissures), of bronchial wall, and of bronchial air.
    """
    px = s / _REFERENCE_SIZE
    vess = Image.new("F", (s, s), 0.0)
    wall = Image.new("F", (s, s), 0.0)
    lumen = Image.new("F", (s, s), 0.0)
    dv, dw, dl = ImageDraw.Draw(vess), ImageDraw.Draw(wall), ImageDraw.Draw(lumen)
    for name in LUNGS:
        lung = inside[name]
        hu_, hv_ = hila[name]
        out_dir = -1.0 if name == "left" else 1.0  # lateral, towards the chest wall
        # in-plane branches fanning out of the hilum
        for _ in range(int(rng.integers(4, 8))):
            ang = rng.uniform(-1.1, 1.1)
            step = rng.uniform(0.05, 0.13) / 5
            width = rng.uniform(2.0, 3.4)
            pts = [(hu_, hv_ + rng.uniform(-0.02, 0.02))]
            for _k in range(5):
                ang += rng.normal(0, 0.2)
                pu, pv = pts[-1]
                pts.append((pu + out_dir * step * math.cos(ang), pv + step * math.sin(ang)))
            pix = _to_px(np.array(pts), s)
            for k in range(5):
                dv.line(
                    [pix[k], pix[k + 1]], fill=1.0, width=max(1, round(width * (1 - k / 6) * px))
                )
        # lobar bronchus leaving the hilum
        if rng.random() < 0.6:
            r = an.carina[2] * rng.uniform(0.45, 0.7)
            ang = rng.uniform(-0.8, 0.8)
            end = (hu_ + out_dir * 0.05 * math.cos(ang), hv_ + 0.05 * math.sin(ang))
            seg = _to_px(np.array([(hu_, hv_), end]), s)
            dw.line(seg, fill=1.0, width=max(1, round(2.8 * r * s)))
            dl.line(seg, fill=1.0, width=max(1, round(2 * r * s)))
        # vessels seen end-on: round, shrinking from the hilum to the periphery
        rows, cols = np.nonzero(lung)
        n_dots = int(rng.integers(22, 40))
        pick = rng.integers(0, rows.size, n_dots)
        cu, cv = (cols[pick] + 0.5) / s, (rows[pick] + 0.5) / s
        dist = np.hypot(cu - hu_, cv - hv_)
        dmax = max(float(dist.max()), 1e-3)
        radius = 0.0075 * (1 - 0.75 * dist / dmax) * rng.uniform(0.6, 1.1, n_dots)
        for x, y, rr, dd in zip(cu, cv, radius, dist):
            rp = rr * s
            if rp < 0.6:  # thinner than a pixel: partial volume
                dv.point(_to_px(np.array([[x, y]]), s), fill=float(min(1.0, rp / 0.6) * 0.8))
                continue
            dv.ellipse(
                [x * s - 0.5 - rp, y * s - 0.5 - rp, x * s - 0.5 + rp, y * s - 0.5 + rp], fill=1.0
            )
            if dd < 0.55 * dmax and rng.random() < 0.4:
                # its bronchus alongside: air lumen in a thin wall
                a = rng.uniform(0, 2 * np.pi)
                bx_, by_ = (
                    x * s - 0.5 + 2.2 * rp * math.cos(a),
                    y * s - 0.5 + 2.2 * rp * math.sin(a),
                )
                rl = rp * rng.uniform(0.8, 1.1)
                rw = rl + max(0.8 * px, 0.35 * rp)
                dw.ellipse([bx_ - rw, by_ - rw, bx_ + rw, by_ + rw], fill=1.0)
                dl.ellipse([bx_ - rl, by_ - rl, bx_ + rl, by_ + rl], fill=1.0)
        # major fissure: a faint curved line from behind the hilum to the lateral wall
        if rng.random() < 0.6:
            rows_in = np.flatnonzero(lung.any(axis=1))
            v_end = (rows_in[0] + rng.uniform(0.55, 0.85) * (rows_in[-1] - rows_in[0])) / s
            t = np.linspace(0, 1, 8)[:, None]
            p0 = np.array([hu_, hv_ + 0.03])
            p2 = np.array([hu_ + out_dir * 0.3, v_end])
            p1 = 0.5 * (p0 + p2) + np.array([0.0, rng.uniform(-0.05, 0.03)])
            curve = (1 - t) ** 2 * p0 + 2 * t * (1 - t) * p1 + t**2 * p2
            dv.line(_to_px(curve, s), fill=float(rng.uniform(0.15, 0.3)), width=1)
    lung_any = (inside["left"] | inside["right"]).astype(np.float32)
    return tuple(np.asarray(im, dtype=np.float32) * lung_any for im in (vess, wall, lumen))


# --------------------------------------------------------------------------------------
# lesions
# --------------------------------------------------------------------------------------


@dataclass
class _LungGeom:
    """Pixel-grid facts of one lung used to place lesions."""

    inside: np.ndarray  # (S, S) bool
    top: int  # first and last+1 row of the lung
    bottom: int
    level_of_row: np.ndarray  # (S,) int: 0 upper, 1 middle, 2 lower, -1 outside the lung

    def bounds(self, s: int) -> list[tuple[float, float]]:
        """Canonical v ranges of the upper, middle and lower zones (thirds of the rows)."""
        h = (self.bottom - self.top) / 3
        b = [(self.top + k * h) / s for k in range(4)]
        return [(b[k], b[k + 1]) for k in range(3)]

    def zone(self, level: str) -> np.ndarray:
        """``(S, S)`` bool: the lung's pixels in ``level``'s rows."""
        return self.inside & (self.level_of_row == LEVELS.index(level))[:, None]


def _lung_geom(inside: np.ndarray) -> _LungGeom:
    s = inside.shape[0]
    rows = np.flatnonzero(inside.any(axis=1))
    top, bottom = int(rows[0]), int(rows[-1]) + 1
    centre = np.arange(s) + 0.5
    level = np.floor(3 * (centre - top) / (bottom - top)).astype(np.intp)
    level = np.where((centre > top) & (centre < bottom), np.clip(level, 0, 2), -1)
    return _LungGeom(inside, top, bottom, level)


def _zone_window(
    geom: _LungGeom, levels: tuple[str, ...], v: np.ndarray, margin: float, s: int
) -> np.ndarray:
    """``(S, 1)`` bool: rows within the named levels' band +- ``margin`` (open towards
    the lung's front or back edge when the band reaches it)."""
    lo, hi = level_band(geom.bounds(s), levels, margin)
    col = v[:, :1]
    return (col >= lo) & (col <= hi)


def _blob(
    rng: np.random.Generator,
    centre: tuple[float, float],
    radii: tuple[float, float],
    u: np.ndarray,
    v: np.ndarray,
) -> np.ndarray:
    """Irregular rotated ellipse: ``(S, S)`` float32 field, 1 at the centre, 0 on the
    outline, < 0 outside (-1 beyond the window where it is computed)."""
    s = u.shape[0]
    (uc, vc), (ru, rv) = centre, radii
    ang = rng.uniform(-0.5, 0.5)
    harmonics = [(k, rng.uniform(0.03, 0.1), rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4)]
    reach = 1.7 * max(ru, rv)  # beyond it the field is below any threshold used
    r0, r1 = max(0, int((vc - reach) * s)), min(s, int((vc + reach) * s) + 2)
    c0, c1 = max(0, int((uc - reach) * s)), min(s, int((uc + reach) * s) + 2)
    out = np.full((s, s), -1.0, np.float32)
    if r0 >= r1 or c0 >= c1:
        return out
    du, dv = u[r0:r1, c0:c1] - uc, v[r0:r1, c0:c1] - vc
    c, sn = math.cos(ang), math.sin(ang)
    x, y = (c * du + sn * dv) / ru, (-sn * du + c * dv) / rv
    rho = np.sqrt(x * x + y * y)
    theta = np.arctan2(y, x)
    wob = np.ones_like(rho)
    for k, amp, ph in harmonics:
        wob += amp * np.cos(k * theta + ph)
    out[r0:r1, c0:c1] = np.maximum(1.0 - rho / wob, -1.0)
    return out


def _largest(region: np.ndarray) -> tuple[int, np.ndarray]:
    """``(components, largest component)`` of a bool ``(S, S)`` region."""
    count, labels = connected_components(region)
    if count <= 1:
        return count, region
    sizes = np.bincount(labels.ravel())[1:]
    return count, labels == 1 + int(np.argmax(sizes))


def _place_area(
    rng: np.random.Generator,
    geom: _LungGeom,
    name: str,
    run: tuple[str, ...],
    u: np.ndarray,
    v: np.ndarray,
    margin: float,
) -> tuple[np.ndarray, np.ndarray]:
    """One focal lesion over the levels of ``run`` in one lung, peripheral as COVID-19
    opacities usually are.

    Redraws until the lesion is one connected area covering :data:`MIN_ZONE_COVER` of
    every named zone and spilling at most :data:`MAX_ZONE_SPILL` of itself into the
    others (keeps the largest piece of the last draw otherwise).

    Returns:
        ``(field, region)``: the lesion field (see :func:`_blob`) cut to the zone band,
        and its ``(S, S)`` bool mask region.
    """
    s = u.shape[0]
    bounds = geom.bounds(s)
    v0, v1 = bounds[LEVELS.index(run[0])][0], bounds[LEVELS.index(run[-1])][1]
    window = _zone_window(geom, run, v, margin, s)
    zones = [geom.zone(lv) for lv in run]
    named = np.logical_or.reduce(zones)
    for _ in range(_PLACEMENT_TRIES):
        fill = rng.uniform(0.75, 0.95) if len(run) > 1 else rng.uniform(0.65, 0.9)
        vc = 0.5 * (v0 + v1) + rng.uniform(-0.1, 0.1) * (v1 - v0) * (1 - fill)
        rv = 0.5 * (v1 - v0) * fill
        row = int(np.clip(vc * s, geom.top, geom.bottom - 1))
        cols = np.flatnonzero(geom.inside[row])
        if cols.size == 0:
            cols = np.flatnonzero(geom.inside.any(axis=0))
        lo_u, hi_u = (cols.min() + 0.5) / s, (cols.max() + 0.5) / s
        medial, lateral = (hi_u, lo_u) if name == "left" else (lo_u, hi_u)
        uc = medial + (lateral - medial) * rng.uniform(0.45, 0.75)
        ru = max(abs(lateral - medial) * rng.uniform(0.3, 0.45), 0.5 * rv)
        f = _blob(rng, (uc, vc), (ru, rv), u, v)
        f = np.where(window, f, np.minimum(f, -1.0))
        region = (f > 0) & geom.inside
        count, main = _largest(region)
        cover = min((main & z).sum() / max(int(z.sum()), 1) for z in zones)
        spill = (main & ~named).sum() / max(int(main.sum()), 1)
        if count == 1 and cover >= MIN_ZONE_COVER and spill <= MAX_ZONE_SPILL:
            return f, main
    return f, main


def _texture(rng: np.random.Generator, s: int) -> np.ndarray:
    """Ground-glass mottling in [0, 1], ``(S, S)`` float32: two noise scales, finer than
    the lobules."""
    a = 0.7 * smooth_noise(rng, s, 12) + 0.3 * smooth_noise(rng, s, 32)
    return np.clip(0.5 + 0.28 * a, 0.0, 1.0)


# --------------------------------------------------------------------------------------
# the renderer
# --------------------------------------------------------------------------------------


def render_lung_ct(
    layout: Layout, rng: np.random.Generator, config: LungCTConfig | None = None
) -> LungCTItem:
    """Draw one axial CT slice with lesions where ``layout`` says.

    Args:
        layout: where the lesions are (lungs from the viewer's perspective, levels by
            image row: see the module docstring).
        rng: the only random source used (anatomy, lesions, distractors, noise, window).
        config: rendering and difficulty settings; defaults to :class:`LungCTConfig`.

    Returns:
        A :class:`LungCTItem` (image, mask and zone map ``(S, S)`` uint8; HU float32).
    """
    cfg = config or LungCTConfig()
    s = cfg.size
    px = s / _REFERENCE_SIZE
    grid = (np.arange(s, dtype=np.float32) + 0.5) / s
    u = np.broadcast_to(grid[None, :], (s, s))
    v = np.broadcast_to(grid[:, None], (s, s))
    an = _sample_anatomy(rng, cfg)

    # ---- body layers
    depth, fat, muscle, wall = _body_fields(an, u, v)
    body = depth > 0
    inside, lung_margin = _lungs(an, u, v, depth - wall)
    lung_any = inside["left"] | inside["right"]
    geoms = {name: _lung_geom(inside[name]) for name in LUNGS}
    hila = {name: _hilum(inside[name], name, an.carina[1], s) for name in LUNGS}

    hu = np.full((s, s), HU_AIR, np.float32)
    hu[body] = HU_FAT + 10.0 * smooth_noise(rng, s, 8)[body]
    wall_muscle = body & (depth > fat)
    hu[wall_muscle] = HU_SOFT
    # a fat plane between the superficial and deep chest-wall muscles
    plane = wall_muscle & (np.abs(depth - fat - 0.55 * (muscle - fat)) < 0.0025)
    if rng.random() < 0.7:
        hu[plane] = HU_FAT
    cavity = depth > wall
    hu[cavity] = HU_FAT + 15.0  # mediastinal fat, where no organ is drawn

    # ---- drawn structures (HU canvases; _EMPTY = nothing drawn)
    canvas = Image.new("F", (s, s), _EMPTY)
    draw = ImageDraw.Draw(canvas)
    _draw_mediastinum(draw, rng, an, s, hila)
    organs = np.asarray(canvas, dtype=np.float32)
    hu = np.where((organs != _EMPTY) & cavity & ~lung_any, organs, hu)
    bones = Image.new("F", (s, s), _EMPTY)
    _draw_skeleton(ImageDraw.Draw(bones), rng, an, s)
    bone_hu = np.asarray(bones, dtype=np.float32)
    hu = np.where((bone_hu != _EMPTY) & body & ~lung_any, bone_hu, hu)
    # CT couch under the patient's back, outside the body
    if rng.random() < 0.85:
        y_back = an.by + an.b_post
        yc = y_back + rng.uniform(0.012, 0.035) - rng.uniform(0.0, 0.35) * (u - an.bx) ** 2
        couch = (v > yc) & (v < yc + rng.uniform(0.008, 0.016)) & ~body
        hu[couch] = rng.uniform(-300.0, 50.0)

    # ---- lungs: parenchyma with the dependent gradient, vessels, fissures
    t = smoothstep(an.y_top, an.y_vb + an.r_vb, v)
    paren = HU_LUNG + rng.uniform(30.0, 110.0) * t * t + 15.0 * smooth_noise(rng, s, 10)
    vessels, walls, lumens = _draw_lung_structures(rng, an, inside, hila, s)
    hu = np.where(lung_any, paren, hu)
    hu += vessels * (HU_SOFT - hu)

    # ---- lesions
    texture = _texture(rng, s)
    mask = np.zeros((s, s), bool)
    ggo = np.zeros((s, s), np.float32)  # HU rise
    core = np.zeros((s, s), np.float32)  # consolidation weight in [0, 1]
    cons_hu = rng.uniform(*cfg.consolidation_hu)
    severity = loguniform(rng, *cfg.lesion_hu)  # one patient's lesions share a severity
    kinds: list[str] = []
    bronchograms = Image.new("F", (s, s), 0.0)
    dbg = ImageDraw.Draw(bronchograms)
    for name, finding in layout.findings().items():
        geom = geoms[name]
        for run in finding.runs():
            rise = severity * rng.uniform(0.8, 1.25)
            consolidated = bool(rng.random() < cfg.consolidation_fraction)
            kinds.append(CONSOLIDATION if consolidated else GROUND_GLASS)
            if finding.diffuse:
                # whole-lung opacity: patchy, keeping off a thin irregular rim
                rim = rng.uniform(*_DIFFUSE_RIM) + 0.003 * smooth_noise(rng, s, 6)
                f = (lung_margin - np.clip(rim, 0.0, None)) / _DIFFUSE_DEPTH
                _, region = _largest((f > 0) & geom.inside)
                patches = np.clip(0.55 + 0.35 * smooth_noise(rng, s, 6), 0.0, 1.0)
                opacity = smoothstep(*LESION_EDGE, f) * (0.25 + 0.75 * patches)
                rise *= _DIFFUSE_GAIN
                if consolidated:  # dense patches gather in the dependent (posterior) lung
                    core_w = smoothstep(0.85, 1.15, 0.45 * smooth_noise(rng, s, 7) + t)
                else:
                    core_w = 0.0
            else:
                f, region = _place_area(rng, geom, name, run, u, v, cfg.zone_margin)
                opacity = smoothstep(*LESION_EDGE, f)
                core_w = 0.0
                if consolidated:
                    c0 = rng.uniform(0.2, 0.5)
                    core_w = smoothstep(c0, c0 + 0.2, f)
                    _draw_bronchogram(dbg, rng, region, hila[name], s)
            # keep opacity on the kept lesion (and its soft rim) only
            keep = np.clip(3.0 * blur(region.astype(np.float32), 1.2 * px), 0.0, 1.0)
            tex = 0.35 + 0.65 * texture
            if rng.random() < 0.3:  # crazy paving: a septal network over the haze
                net = smoothstep(0.18, 0.0, np.abs(smooth_noise(rng, s, max(8, s // 10))))
                tex = tex + 0.5 * net
            ggo = np.maximum(ggo, rise * opacity * tex * keep)
            core = np.maximum(core, core_w * keep * region)
            mask |= region
    hu += ggo * lung_any
    hu += core * lung_any * (cons_hu + 25.0 * (texture - 0.5) - hu)
    air_bg = np.asarray(bronchograms, dtype=np.float32) * (core > 0.5)
    hu += air_bg * (HU_AIR + 80.0 - hu)

    # ---- distractors in zones the text calls clean
    clean = layout.clean_zones()
    n_distractors = int(rng.poisson(cfg.distractor_rate)) if clean else 0
    for _ in range(n_distractors):
        name, level = clean[int(rng.integers(len(clean)))]
        geom = geoms[name]
        window = _zone_window(geom, (level,), v, -cfg.zone_margin, s)
        rows = np.flatnonzero(geom.zone(level).any(axis=1))
        if rows.size == 0:
            continue
        row = int(rows[int(rng.integers(rows.size))])
        cols = np.flatnonzero(geom.inside[row])
        uc = (cols[int(rng.integers(cols.size))] + 0.5) / s
        vc = (row + 0.5) / s
        zone_h = (geom.bottom - geom.top) / (3 * s)
        if rng.random() < cfg.distractor_opacity_fraction:
            r = zone_h * rng.uniform(0.2, 0.4)
            f = _blob(rng, (uc, vc), (r * rng.uniform(0.8, 1.4), r), u, v)
            rise = loguniform(rng, *cfg.lesion_hu)
            hu += (
                rise * smoothstep(*LESION_EDGE, f) * (0.35 + 0.65 * texture) * window * geom.inside
            )
        else:
            r = rng.uniform(0.005, 0.011)
            f = _blob(rng, (uc, vc), (r, r), u, v)
            hu += smoothstep(-0.1, 0.3, f) * (HU_SOFT - hu) * window * geom.inside

    # ---- bronchi last: their air stays visible inside consolidation (air bronchograms)
    hu += walls * (1 - lumens) * (HU_SOFT - 100.0 - hu) * 0.7
    hu += lumens * (HU_AIR - hu)

    # ---- scanner: reconstruction blur, band-limited noise, field of view, lung window
    hu = blur(hu, rng.uniform(*cfg.blur_px) * px)
    white = rng.standard_normal((s, s)).astype(np.float32)
    noise = blur(white, 0.7 * px) - 0.6 * blur(white, 2.0 * px)
    hu += rng.uniform(*cfg.noise_hu) * noise / (noise.std() + 1e-6)
    lo, hi = rng.uniform(*cfg.window_low), rng.uniform(*cfg.window_high)
    img = np.clip((hu - lo) / (hi - lo), 0.0, 1.0)
    fov = (u - 0.5) ** 2 + (v - 0.5) ** 2 < _FOV_RADIUS**2
    img = np.where(fov, img, 0.0)
    image = np.round(img * 255.0).astype(np.uint8)

    mask &= lung_any
    return LungCTItem(
        image=image,
        mask=mask.astype(np.uint8) * 255,
        zones=_zone_map(geoms),
        hu=np.where(fov, hu, HU_AIR).astype(np.float32),
        layout=layout,
        text=describe(layout),
        kinds=tuple(kinds),
        cardiac=an.cardiac,
        n_distractors=n_distractors,
    )


def _draw_bronchogram(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    region: np.ndarray,
    hilum: tuple[float, float],
    s: int,
) -> None:
    """Air-filled bronchi inside a consolidation: a short branching line from the lesion
    centre pointing away from the hilum (drawn where the core is dense only)."""
    rows, cols = np.nonzero(region)
    if rows.size == 0:
        return
    cu, cv = (cols.mean() + 0.5) / s, (rows.mean() + 0.5) / s
    d = np.array([cu - hilum[0], cv - hilum[1]])
    d /= np.hypot(*d) + 1e-9
    extent = 0.5 * math.sqrt(rows.size) / s
    start = np.array([cu, cv]) - d * extent * 0.6
    for _ in range(int(rng.integers(1, 4))):
        a = rng.uniform(-0.5, 0.5)
        c, sn = math.cos(a), math.sin(a)
        e = start + extent * rng.uniform(0.8, 1.3) * np.array(
            [c * d[0] - sn * d[1], sn * d[0] + c * d[1]]
        )
        draw.line(
            _to_px(np.array([start, e]), s), fill=1.0, width=max(1, round(s / _REFERENCE_SIZE))
        )


def _zone_map(geoms: dict[str, _LungGeom]) -> np.ndarray:
    """``(S, S)`` uint8: 0 outside the lungs, ``k`` for ``ZONES[k - 1]``."""
    s = next(iter(geoms.values())).inside.shape[0]
    zones = np.zeros((s, s), np.uint8)
    for name, g in geoms.items():
        zid = np.array([ZONES.index((name, lv)) + 1 for lv in LEVELS], np.uint8)
        level = np.broadcast_to(g.level_of_row[:, None], (s, s))
        sel = g.inside & (level >= 0)
        zones[sel] = zid[level[sel]]
    return zones


# --------------------------------------------------------------------------------------
# dataset generation
# --------------------------------------------------------------------------------------


def make_item(
    seed: int, index: int, config: LungCTConfig | None = None, text_noise: float = 0.0
) -> tuple[LungCTItem, str]:
    """Item ``index`` of the dataset with ``seed`` (independent of the dataset size).

    Returns:
        ``(item, text)``: ``text`` is ``item.text`` with annotation noise applied with
        probability ``text_noise``.
    """
    layout = sample_layout(item_rng(seed, index, STREAMS.layout))
    item = render_lung_ct(layout, item_rng(seed, index, STREAMS.image), config)
    return item, noisy_text(item.text, item_rng(seed, index, STREAMS.text), text_noise)


def generate_lung_ct(
    out: Path | str,
    n: int,
    seed: int = 0,
    size: int = 256,
    text_noise: float = 0.0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    *,
    overwrite: bool = False,
    lesion_hu: tuple[float, float] = LungCTConfig.lesion_hu,
    distractor_rate: float = LungCTConfig.distractor_rate,
    config: LungCTConfig | None = None,
    workers: int = 1,
) -> dict:
    """Write a synthetic MosMedData+-like lung CT dataset in the LViT layout.

    ``out/{Train,Val,Test}_Folder/img/synth_XXXXX.png`` (8-bit gray lung-window slices,
    ``size`` x ``size``), ``.../labelcol/synth_XXXXX.png`` (lesion mask {0, 255}) and
    ``.../<Split>_text.xlsx`` (``Image, Description``). Same seed -> byte-identical files
    whatever ``workers`` is; image ``k`` does not depend on ``n``.

    Args:
        out: dataset root; must be absent or empty unless ``overwrite``.
        n: number of images.
        seed: non-negative seed.
        size: image side in pixels.
        text_noise: probability that a description gets one real-style annotation slip
            (:func:`~medtextseg.data.synthetic.qata_grammar.add_annotation_noise`).
        split_fractions: Train, Val, Test fractions.
        overwrite: replace a non-empty ``out``.
        lesion_hu: (low, high) ground-glass rise in HU, see :class:`LungCTConfig`.
        distractor_rate: mean distractors per image, see :class:`LungCTConfig`.
        config: full rendering settings; ``size``, ``lesion_hu`` and ``distractor_rate``
            override its fields.
        workers: rendering processes (``spawn``ed: a calling script needs the usual
            ``if __name__ == "__main__":`` guard). Output does not depend on it.

    Returns:
        Summary dict: ``splits`` (images per split), ``n``, ``unique_texts``,
        ``noisy_texts``, ``bilateral_fraction``, ``seconds``, ``out``.

    Raises:
        FileExistsError: ``out`` exists, is not empty and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    check_generate_args(n, seed, text_noise)
    cfg = replace(
        config or LungCTConfig(),
        size=size,
        lesion_hu=tuple(lesion_hu),
        distractor_rate=distractor_rate,
    )
    job = ItemJob(make_item, seed, cfg, text_noise)
    return write_dataset(
        out, n, job, STREAMS, split_fractions, overwrite=overwrite, workers=workers, started=t0
    )
