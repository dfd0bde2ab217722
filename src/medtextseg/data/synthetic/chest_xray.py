"""Synthetic QaTa-like chest X-rays: image, lesion mask and QaTa-style description.

Each image is a frontal (PA) chest radiograph drawn from a small anatomical model: body
silhouette, two lung fields, mediastinum with trachea, spine and aortic knob, heart
(bulging to the image's right = the patient's left), posterior and anterior ribs,
clavicles, diaphragm domes with a gastric bubble, pulmonary vessels fanning out of the
hila, then detector blur, noise, pose (rotation / shift / scale) and a random
window/gamma. Lesions are ground-glass opacities placed in the zones named by a
:class:`~medtextseg.data.synthetic.qata_grammar.Layout` drawn with the real QaTa
frequencies; the mask is the lesion region inside the lung field.

Why the text helps: lesion contrast is drawn log-uniformly from ``lesion_contrast`` so many
lesions are faint (close to the noise level), and ``distractor_rate`` adds lesion-like
opacities and bright nodules (vessels seen end-on) in zones the description says are
clean. An image-only model must guess which blobs count; the description says where to
look. All geometry is computed in a canonical body frame (u, v in [0, 1], u to the
viewer's right, v down) and mapped through the pose, so masks and zones stay exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from medtextseg.data.synthetic.common import (
    LESION_EDGE,
    ItemJob,
    RngStreams,
    blur,
    check_generate_args,
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
    ZONES,
    Layout,
    describe,
    level_band,
    sample_layout,
)

# Independent random streams per image, so e.g. changing text_noise or the difficulty
# knobs never changes the drawn layouts, and image k is the same whatever n is.
STREAMS = RngStreams(layout=0, image=1, text=2, split=3)

__all__ = [
    "ChestXrayConfig",
    "ChestXrayItem",
    "generate_chest_xray",
    "item_name",
    "make_item",
    "render_chest_xray",
]

# "all X lung" opacities get this factor on top of the drawn lesion contrast
DIFFUSE_CONTRAST_GAIN = 1.3


@dataclass(frozen=True)
class ChestXrayConfig:
    """Rendering and difficulty settings (all lengths in canonical units: 1 = image side).

    Attributes:
        size: output side in pixels (square images).
        lesion_contrast: (low, high) added brightness of a lesion, drawn log-uniformly.
            The lung-to-soft-tissue step is ~0.3 and the noise sigma 0.01-0.025 on the
            same scale, so 0.03 is barely visible and 0.2 is an obvious consolidation.
        distractor_rate: mean number (Poisson) of non-lesion distractors per image, placed
            in zones the description says are clean.
        distractor_opacity_fraction: share of distractors that are lesion look-alikes
            (same texture and contrast range as lesions); the rest are compact bright
            nodules (vessels end-on).
        noise_sigma: (low, high) detector noise standard deviation.
        blur_px: (low, high) Gaussian blur sigma in pixels at 256 px (scaled with size).
        max_rotation_deg: pose rotation is uniform in +-this.
        max_shift: pose shift is uniform in +-this (per axis).
        scale: (low, high) pose scale.
        zone_margin: how far (canonical v) a lesion may spill over the boundary of the
            zones it is named in; keeps text and mask consistent.
    """

    size: int = 256
    lesion_contrast: tuple[float, float] = (0.03, 0.2)
    distractor_rate: float = 1.0
    distractor_opacity_fraction: float = 0.6
    noise_sigma: tuple[float, float] = (0.01, 0.025)
    blur_px: tuple[float, float] = (0.6, 1.2)
    max_rotation_deg: float = 6.0
    max_shift: float = 0.04
    scale: tuple[float, float] = (0.92, 1.06)
    zone_margin: float = 0.02

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError(f"size must be >= 16 pixels, got {self.size}")
        lo, hi = self.lesion_contrast
        if not 0 < lo <= hi:
            raise ValueError(f"lesion_contrast must be 0 < low <= high, got {self.lesion_contrast}")
        if self.distractor_rate < 0:
            raise ValueError(f"distractor_rate must be >= 0, got {self.distractor_rate}")
        if not 0 <= self.distractor_opacity_fraction <= 1:
            raise ValueError("distractor_opacity_fraction must be in [0, 1]")


@dataclass
class ChestXrayItem:
    """One rendered radiograph.

    Attributes:
        image: ``(S, S)`` uint8 grayscale radiograph.
        mask: ``(S, S)`` uint8 lesion mask, values {0, 255}.
        zones: ``(S, S)`` uint8 zone map: 0 outside the lungs, ``k`` for ``ZONES[k - 1]``
            (``(lung, level)``, lungs from the viewer's perspective).
        layout: the lesion layout the image was drawn from.
        text: the clean description of ``layout``.
        n_distractors: number of distractors drawn.
    """

    image: np.ndarray
    mask: np.ndarray
    zones: np.ndarray
    layout: Layout
    text: str
    n_distractors: int = 0


# --------------------------------------------------------------------------------------
# anatomy
# --------------------------------------------------------------------------------------


@dataclass
class _Lung:
    """One lung in the canonical frame. ``sign`` = -1 for the viewer's left lung
    (image left), +1 for the right; ``e`` = outward distance from the midline / ``width``;
    ``t`` = (v - apex) / (bottom - apex)."""

    name: str
    sign: float
    width: float  # canonical u from the midline to the lateral wall
    apex: float  # canonical v of the apex
    dome: float  # canonical v of the dome top
    cpa: float  # extra depth of the costophrenic angle below the dome top
    half: float  # half-width of the lung shape in e units at its widest
    center0: float  # e of the lung axis at the apex ...
    center1: float  # ... and its drift towards the base
    exp_n: float  # shape exponents of the lung outline
    exp_m: float
    dome_peak: float  # e of the dome's highest point

    @property
    def bottom(self) -> float:
        return self.dome + self.cpa

    def zone_bounds(self) -> list[tuple[float, float]]:
        """Canonical v ranges of the upper, middle and lower zone (thirds of the height
        from the apex to the mid-depth of the diaphragm's slope)."""
        h = (self.dome + 0.5 * self.cpa) - self.apex
        b = [self.apex, self.apex + h / 3, self.apex + 2 * h / 3, self.bottom]
        return [(b[i], b[i + 1]) for i in range(3)]

    def e_range(self, t: np.ndarray | float) -> tuple[np.ndarray, np.ndarray]:
        """Medial and lateral boundary (e units) of the lung outline at height ``t``."""
        tt = np.clip(t, 0.0, 1.0)
        h = self.half * (1.0 - (1.0 - tt) ** self.exp_m) ** (1.0 / self.exp_n)
        c = self.center0 + self.center1 * tt
        return c - h, c + h

    def dome_v(self, e: np.ndarray) -> np.ndarray:
        lateral = self.cpa * np.clip((e - self.dome_peak) / (1.0 - self.dome_peak), 0, None) ** 2
        medial = 0.35 * self.cpa * np.clip((self.dome_peak - e) / self.dome_peak, 0, None) ** 2
        return self.dome + lateral + medial


@dataclass
class _Anatomy:
    cx: float
    lungs: dict[str, _Lung]
    mediastinum: float  # half-width of the mediastinum (canonical u)
    heart: tuple[float, float, float, float]  # cx, cy, rx, ry
    knob: tuple[float, float, float]  # aortic knob cx, cy, r
    body_half: float  # half-width of the chest wall
    rib_spacing: float
    rib_thick: float  # fraction of the rib spacing
    rib_bend: float  # how steeply the posterior ribs bend down laterally
    clavicle_v: float
    neck: float  # half-width of the neck
    shoulder: float  # how far the shoulder tips reach past the chest wall
    shoulder_v: float  # height of the shoulder tips


def _sample_anatomy(rng: np.random.Generator) -> _Anatomy:
    cx = 0.5 + rng.uniform(-0.015, 0.015)
    apex = rng.uniform(0.12, 0.17)
    dome_l = rng.uniform(0.64, 0.72)  # the patient's right dome (viewer's left) sits higher
    dome_r = dome_l + rng.uniform(0.0, 0.04)
    width = rng.uniform(0.30, 0.35)
    lungs = {}
    for name, sign, dome in (("left", -1.0, dome_l), ("right", 1.0, dome_r)):
        lungs[name] = _Lung(
            name=name,
            sign=sign,
            width=width * rng.uniform(0.97, 1.03),
            apex=apex + rng.uniform(-0.01, 0.01),
            dome=dome,
            cpa=rng.uniform(0.05, 0.09),
            half=rng.uniform(0.39, 0.44),
            center0=rng.uniform(0.46, 0.52),
            center1=rng.uniform(0.06, 0.1),
            exp_n=rng.uniform(2.4, 3.2),
            exp_m=rng.uniform(2.6, 3.4),
            dome_peak=rng.uniform(0.4, 0.55),
        )
    heart_rx = rng.uniform(0.12, 0.15)
    # the heart's lower half hides under the diaphragm
    heart = (
        cx + rng.uniform(0.03, 0.055),
        dome_r - rng.uniform(0.02, 0.05),
        heart_rx,
        rng.uniform(0.11, 0.14),
    )
    return _Anatomy(
        cx=cx,
        lungs=lungs,
        mediastinum=rng.uniform(0.05, 0.065),
        heart=heart,
        knob=(
            cx + rng.uniform(0.04, 0.05),
            apex + rng.uniform(0.16, 0.2),
            rng.uniform(0.025, 0.032),
        ),
        body_half=width + rng.uniform(0.06, 0.1),
        rib_spacing=(dome_l - apex) / rng.uniform(7.5, 8.5),
        rib_thick=rng.uniform(0.4, 0.5),
        rib_bend=rng.uniform(0.16, 0.24),
        clavicle_v=apex + rng.uniform(0.01, 0.04),
        neck=rng.uniform(0.08, 0.11),
        shoulder=rng.uniform(0.08, 0.2),
        shoulder_v=apex + rng.uniform(-0.04, 0.0),
    )


@dataclass
class _Frame:
    """Pixel grid mapped to the canonical frame, plus the forward map for drawing."""

    size: int
    u: np.ndarray  # (S, S) float32 canonical u of each pixel
    v: np.ndarray  # (S, S) float32 canonical v
    angle: float
    scale: float
    shift: tuple[float, float]

    def to_pixels(self, pts: np.ndarray) -> list[tuple[float, float]]:
        """Canonical ``(N, 2)`` (u, v) points -> pixel (x, y) coordinates."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        d = pts - 0.5
        x = self.scale * (c * d[:, 0] - s * d[:, 1]) + 0.5 + self.shift[0]
        y = self.scale * (s * d[:, 0] + c * d[:, 1]) + 0.5 + self.shift[1]
        return list(zip((x * self.size - 0.5).tolist(), (y * self.size - 0.5).tolist()))


def _make_frame(rng: np.random.Generator, cfg: ChestXrayConfig) -> _Frame:
    angle = math.radians(rng.uniform(-cfg.max_rotation_deg, cfg.max_rotation_deg))
    scale = rng.uniform(*cfg.scale)
    shift = (rng.uniform(-cfg.max_shift, cfg.max_shift), rng.uniform(-cfg.max_shift, cfg.max_shift))
    return _frame_grid(cfg.size, angle, scale, shift)


def _frame_grid(s: int, angle: float, scale: float, shift: tuple[float, float]) -> _Frame:
    x = ((np.arange(s, dtype=np.float32) + 0.5) / s)[None, :] - 0.5 - shift[0]
    y = ((np.arange(s, dtype=np.float32) + 0.5) / s)[:, None] - 0.5 - shift[1]
    c, sn = math.cos(angle), math.sin(angle)
    u = (c * x + sn * y) / scale + 0.5
    v = (-sn * x + c * y) / scale + 0.5
    return _Frame(s, u.astype(np.float32), v.astype(np.float32), angle, scale, shift)


# value of the fields below outside the window where they are computed: far outside
_FAR = -1.0


def _window(frame: _Frame, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
    """Pixel rows/columns covering the canonical rectangle [u0, u1] x [v0, v1] (after the
    pose), so local shapes are computed on a window instead of the whole image."""
    pts = np.array(frame.to_pixels(np.array([[u0, v0], [u1, v0], [u0, v1], [u1, v1]])))
    x0, y0 = np.floor(pts.min(axis=0)).astype(int) - 2
    x1, y1 = np.ceil(pts.max(axis=0)).astype(int) + 3
    s = frame.size
    return slice(max(0, y0), min(s, max(0, y1))), slice(max(0, x0), min(s, max(0, x1)))


def _lung_margin(lung: _Lung, anat: _Anatomy, frame: _Frame) -> np.ndarray:
    """Approximate signed distance (canonical units, > 0 inside) to one lung field,
    ``(S, S)`` float32 (:data:`_FAR` away from the lung)."""
    inner, outer = anat.cx, anat.cx + lung.sign * (lung.width * 1.1 + 0.02)
    win = _window(frame, min(inner, outer), max(inner, outer), lung.apex - 0.02, lung.bottom + 0.02)
    out = np.full((frame.size, frame.size), _FAR, np.float32)
    out[win] = _lung_margin_at(lung, anat, frame.u[win], frame.v[win])
    return out


def _lung_margin_at(lung: _Lung, anat: _Anatomy, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    d = lung.sign * (u - anat.cx)
    e = d / lung.width
    t = (v - lung.apex) / (lung.bottom - lung.apex)
    e_med, e_lat = lung.e_range(t)
    m = np.minimum((e_lat - e) * lung.width, (e - e_med) * lung.width)
    m = smin(m, d - _mediastinum_half(anat, lung, v), 0.02)
    m = smin(m, lung.dome_v(e) - v, 0.01)
    m = np.minimum(m, (v - lung.apex) * 0.5)
    hx, hy, rx, ry = anat.heart
    rho = np.sqrt(((u - hx) / rx) ** 2 + ((v - hy) / ry) ** 2)
    m = smin(m, (rho - 1.0) * min(rx, ry), 0.025)
    kx, ky, kr = anat.knob
    m = smin(m, np.sqrt((u - kx) ** 2 + (v - ky) ** 2) - kr, 0.03)
    return m


def _mediastinum_half(anat: _Anatomy, lung: _Lung, v: np.ndarray) -> np.ndarray:
    """Half-width of the mediastinum at height ``v``: narrow between the apices, widening
    towards the hila."""
    return anat.mediastinum * (0.7 + 0.3 * smoothstep(lung.apex, lung.apex + 0.3, v))


# --------------------------------------------------------------------------------------
# lesions and distractors
# --------------------------------------------------------------------------------------


def _blob_field(
    rng: np.random.Generator,
    lung: _Lung,
    anat: _Anatomy,
    frame: _Frame,
    v_range: tuple[float, float],
    fill: float,
    radius: float | None = None,
) -> np.ndarray:
    """Irregular elliptical blob covering ``fill`` of the lung's height range ``v_range``
    (or a round one of canonical ``radius`` centred in that range).

    Returns ``(S, S)`` float32 field: > 0 inside (1 at the centre), < 0 outside
    (:data:`_FAR` well away from the blob).
    """
    v0, v1 = v_range
    if radius is not None:
        fill = 2 * radius / (v1 - v0)
    vc = 0.5 * (v0 + v1) + rng.uniform(-0.08, 0.08) * (v1 - v0) * (1 - fill)
    rv = 0.5 * (v1 - v0) * fill
    t = (vc - lung.apex) / (lung.bottom - lung.apex)
    e_med, e_lat = lung.e_range(t)
    e_med = max(float(e_med), anat.mediastinum / lung.width + 0.03)
    span = max(float(e_lat) - e_med, 0.2)
    ec = e_med + span * rng.uniform(0.4, 0.65)
    ru = span * lung.width * rng.uniform(0.28, 0.42) if radius is None else radius
    uc = anat.cx + lung.sign * ec * lung.width
    amps = rng.uniform(0.04, 0.12, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    # the field is below _FAR's threshold uses (-0.25) beyond 1.8 radii even at full wobble
    reach = 1.8
    win = _window(frame, uc - reach * ru, uc + reach * ru, vc - reach * rv, vc + reach * rv)
    du, dv = (frame.u[win] - uc) / ru, (frame.v[win] - vc) / rv
    rho = np.sqrt(du * du + dv * dv)
    theta = np.arctan2(dv, du)
    wobble = np.ones_like(rho)
    for k, a, ph in zip((2, 3, 5), amps, phases):
        wobble += a * np.cos(k * theta + ph)
    out = np.full((frame.size, frame.size), _FAR, np.float32)
    out[win] = np.maximum(1.0 - rho / wobble, _FAR)
    return out


def _diffuse_field(rng: np.random.Generator, margin: np.ndarray, size: int) -> np.ndarray:
    """Opacity over most of one lung field ("all"): ``(S, S)`` float32, > 0 inside.

    Covers the lung except a thin, irregular rim, so it stays one connected area.
    """
    rim = rng.uniform(0.004, 0.012) + 0.008 * smooth_noise(rng, size, 5)
    return (margin - np.clip(rim, 0.0, None)) / 0.04


def _texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Ground-glass texture in [0, 1]: mottled mid-frequency noise, ``(S, S)`` float32."""
    a = 0.6 * smooth_noise(rng, size, 14) + 0.4 * smooth_noise(rng, size, 28)
    return np.clip(0.5 + 0.3 * a, 0.0, 1.0)


def _zone_window(lung: _Lung, levels: tuple[str, ...], v: np.ndarray, margin: float) -> np.ndarray:
    """Boolean ``(S, S)``: canonical v within the named levels' band +- margin."""
    lo, hi = level_band(lung.zone_bounds(), levels, margin)
    return (v >= lo) & (v <= hi)


def _zone_map(anat: _Anatomy, lung_in: dict[str, np.ndarray], v: np.ndarray) -> np.ndarray:
    zones = np.zeros(v.shape, np.uint8)
    for name, inside in lung_in.items():
        b = anat.lungs[name].zone_bounds()
        level = (v >= b[0][1]).astype(np.intp) + (v >= b[1][1])  # 0 upper, 1 middle, 2 lower
        zid = np.array([ZONES.index((name, lv)) + 1 for lv in LEVELS], np.uint8)
        zones[inside] = zid[level[inside]]
    return zones


# --------------------------------------------------------------------------------------
# the renderer
# --------------------------------------------------------------------------------------


def _draw_vessels(
    rng: np.random.Generator, frame: _Frame, anat: _Anatomy, px_scale: float
) -> np.ndarray:
    """Pulmonary vessels fanning out of each hilum, ``(S, S)`` float32 in [0, 1]."""
    img = Image.new("F", (frame.size, frame.size), 0.0)
    draw = ImageDraw.Draw(img)
    for lung in anat.lungs.values():
        hil_u = anat.cx + lung.sign * (anat.mediastinum + 0.02)
        hil_v = lung.apex + 0.45 * (lung.dome - lung.apex)
        for _ in range(int(rng.integers(9, 14))):
            # fan from pointing up-and-out to down-and-out; the lower lobes carry more
            ang = rng.uniform(-1.2, 1.1)
            length = rng.uniform(0.12, 0.26)
            width = rng.uniform(1.8, 3.0)
            pts = [(hil_u, hil_v + rng.uniform(-0.03, 0.03))]
            n_seg = 6
            for k in range(n_seg):
                ang += rng.normal(0, 0.18)
                step = length / n_seg
                pu, pv = pts[-1]
                pts.append((pu + lung.sign * step * math.cos(ang), pv + step * math.sin(ang)))
            pix = frame.to_pixels(np.array(pts))
            for k in range(n_seg):
                frac = 1.0 - k / n_seg
                draw.line(
                    [pix[k], pix[k + 1]],
                    fill=float(0.4 + 0.6 * frac),
                    width=max(1, round(width * frac * px_scale)),
                )
                if k == 2 and rng.random() < 0.6:  # a side branch
                    b_ang = ang + rng.choice([-1, 1]) * rng.uniform(0.4, 0.8)
                    pu, pv = pts[k + 1]
                    bl = length * rng.uniform(0.25, 0.45)
                    end = (pu + lung.sign * bl * math.cos(b_ang), pv + bl * math.sin(b_ang))
                    bp = frame.to_pixels(np.array([pts[k + 1], end]))
                    draw.line(bp, fill=0.45, width=max(1, round(width * 0.4 * px_scale)))
    return np.asarray(img, dtype=np.float32)


def _anatomy_density(
    rng: np.random.Generator, anat: _Anatomy, frame: _Frame, px: float
) -> np.ndarray:
    """Everything but vessels, lesions and the detector: ``(S, S)`` float32 density
    (0 = air; ~0.55 = the mediastinum) on ``frame``'s grid; ``px`` = pixels per 1/256."""
    S = frame.size
    u, v = frame.u, frame.v
    du = u - anat.cx
    margins = {name: _lung_margin(lung, anat, frame) for name, lung in anat.lungs.items()}
    lung_soft = np.zeros((S, S), np.float32)
    for m in margins.values():
        lung_soft = np.maximum(lung_soft, smoothstep(-0.006, 0.012, m))

    # body: soft-tissue chord length through the trunk; neck and shoulders on top
    # the trapezius slopes from the neck out to the shoulder tips, which reach past the
    # chest wall; below them the outline comes back in at the axillae
    slope = smoothstep(-0.02, anat.shoulder_v, v)
    half = anat.neck + (anat.body_half + anat.shoulder - anat.neck) * np.sqrt(slope)
    half -= anat.shoulder * smoothstep(anat.shoulder_v + 0.02, anat.shoulder_v + 0.2, v)
    body = np.sqrt(np.clip(1.0 - (du / half) ** 2, 0.0, None))
    dens = 0.56 * body

    # lungs: air replaces tissue; bases a little denser (soft tissue overlay)
    for name, lung in anat.lungs.items():
        tl = np.clip((v - lung.apex) / (lung.bottom - lung.apex), 0, 1)
        lung_part = smoothstep(-0.006, 0.012, margins[name])
        dens -= lung_part * (0.36 - 0.05 * tl - 0.05 * smoothstep(0.2, 0.0, tl))
    dens += 0.025 * smooth_noise(rng, S, 6) * lung_soft  # lung parenchyma density varies

    # heart and aortic knob: a little denser than the mediastinal fat
    hx, hy, rx, ry = anat.heart
    rho_h = np.sqrt(((u - hx) / rx) ** 2 + ((v - hy) / ry) ** 2)
    # (only above the domes: below them the heart merges with the liver and stomach)
    dome_line = np.where(du < 0, anat.lungs["left"].dome, anat.lungs["right"].dome)
    below = smoothstep(dome_line - 0.01, dome_line + 0.04, v)
    dens += 0.03 * smoothstep(1.05, 0.7, rho_h) * body * (1.0 - below)
    # liver and spleen under the domes: as dense as the heart and ribs above them, so the
    # heart does not stand out as a ball against the abdomen
    dens += 0.05 * below * body
    kx, ky, kr = anat.knob
    dens += 0.02 * smoothstep(kr * 1.1, kr * 0.4, np.sqrt((u - kx) ** 2 + (v - ky) ** 2))

    # trachea: air column in the upper mediastinum, ending at the carina
    carina = anat.lungs["left"].apex + 0.2
    dens -= (
        0.08 * smoothstep(0.02, 0.012, np.abs(du)) * smoothstep(carina, carina - 0.05, v) * body
    )

    # spine: vertebral bodies behind the mediastinum, end plates every ~4% of height
    spine = smoothstep(0.045, 0.03, np.abs(du))
    vert = 0.8 + 0.2 * np.cos(2 * np.pi * v / 0.042) ** 8
    dens += 0.05 * spine * vert * body

    # gastric bubble under the viewer's right dome
    lr = anat.lungs["right"]
    gb_u = anat.cx + 0.55 * lr.width
    gb_v = lr.dome + 0.06
    gb = (((u - gb_u) / 0.07) ** 2 + ((v - gb_v) / 0.035) ** 2) < 1
    dens -= 0.1 * smoothstep(0.0, 1.0, blur(gb.astype(np.float32), 2 * px)) * (v > lr.dome)

    # bones
    bones = np.zeros((S, S), np.float32)
    rib_amp = rng.uniform(0.7, 1.15, 16).astype(np.float32)  # ribs differ in density
    for lung in anat.lungs.values():
        d = lung.sign * du
        e = d / lung.width
        side = (d > 0).astype(np.float32)
        # posterior ribs: level near the spine, bending down towards the lateral wall;
        # one curvilinear coordinate that is periodic in the rib spacing draws them all
        q = v - (anat.rib_bend * e * e + 0.06 * e**3 - 0.04 * e) * lung.width / 0.32
        x = (q - (lung.apex - 0.02)) / anat.rib_spacing
        phase = x - 0.012 * x * x  # lower ribs sit further apart
        k = np.round(phase)
        z = (phase - k) / (0.5 * anat.rib_thick)
        band = np.exp(-(z**4)) + 0.4 * np.exp(-(((np.abs(z) - 0.95) / 0.25) ** 2))
        band *= rib_amp[np.clip(k, 0, len(rib_amp) - 1).astype(np.intp)]
        rib_on = smoothstep(0.05, 0.2, e) * smoothstep(1.2, 1.05, e)
        rib_on *= smoothstep(-0.3, 0.2, phase)
        # ribs fade below the diaphragm, where the abdomen's soft tissue swamps them
        rib_on *= 0.35 + 0.65 * smoothstep(lung.bottom + 0.06, lung.bottom - 0.02, v)
        bones += 0.05 * band * rib_on * side
        # anterior ribs: fainter, running down towards the sternum, ending at cartilage
        qa = v + 0.14 * e * lung.width / 0.32
        pa = (qa - lung.apex) / (1.3 * anat.rib_spacing)
        fa = pa - np.round(pa)
        za = fa / (0.3 * anat.rib_thick)
        on_a = smoothstep(0.3, 0.5, e) * smoothstep(1.05, 0.95, e) * smoothstep(0, 0.5, pa)
        on_a *= smoothstep(6.5, 5.5, pa)
        bones += 0.03 * np.exp(-(za**2)) * on_a * side
        # clavicle: gentle S from the sternal end out over the apex
        vc = anat.clavicle_v + 0.02 - 0.07 * e + 0.025 * np.sin(np.pi * np.clip(e, 0, 1))
        zc = (v - vc) / 0.014
        clav_on = smoothstep(0.05, 0.12, e) * smoothstep(1.15, 1.0, e)
        bones += (
            0.1
            * (np.exp(-(zc**4)) + 0.4 * np.exp(-(((np.abs(zc) - 1) / 0.3) ** 2)))
            * clav_on
            * side
        )
    dens += bones * np.sqrt(body)

    return dens


def render_chest_xray(
    layout: Layout, rng: np.random.Generator, config: ChestXrayConfig | None = None
) -> ChestXrayItem:
    """Draw one radiograph with lesions where ``layout`` says.

    Args:
        layout: where the lesions are (lungs from the viewer's perspective).
        rng: the only random source used (anatomy, pose, lesions, distractors, noise).
        config: rendering and difficulty settings; defaults to :class:`ChestXrayConfig`.

    Returns:
        A :class:`ChestXrayItem` (image, mask and zone map are ``(S, S)`` uint8).
    """
    cfg = config or ChestXrayConfig()
    S = cfg.size
    px = S / 256.0  # pixel-sized quantities are tuned at 256 px
    anat = _sample_anatomy(rng)
    frame = _make_frame(rng, cfg)
    v = frame.v

    # ---- lungs
    margins = {name: _lung_margin(lung, anat, frame) for name, lung in anat.lungs.items()}
    inside = {name: m > 0 for name, m in margins.items()}
    lung_soft = np.zeros((S, S), np.float32)
    for m in margins.values():
        lung_soft = np.maximum(lung_soft, smoothstep(-0.006, 0.012, m))

    # ---- anatomy: smooth, so drawn at half resolution and upsampled (4x fewer pixels)
    lo_size = S // 2 if S >= 128 else S
    lo_frame = (
        frame if lo_size == S else _frame_grid(lo_size, frame.angle, frame.scale, frame.shift)
    )
    dens = _anatomy_density(rng, anat, lo_frame, lo_size / 256.0)
    if lo_size != S:
        dens = np.array(Image.fromarray(dens).resize((S, S), Image.BICUBIC), dtype=np.float32)

    # ---- vessels (inside the lungs only; the hila themselves stay bright)
    vessels = blur(_draw_vessels(rng, frame, anat, px), 0.7 * px)
    dens += 0.08 * vessels * lung_soft

    # ---- lesions
    # one ground-glass texture per image: lesions and look-alikes sit in different places,
    # so sharing it costs no realism and halves the rendering time of small images
    texture = _texture(rng, S)
    mask = np.zeros((S, S), bool)
    lesion = np.zeros((S, S), np.float32)
    lo, hi = cfg.lesion_contrast
    image_contrast = loguniform(rng, lo, hi)  # one patient's lesions share a severity
    for name, finding in layout.findings().items():
        lung = anat.lungs[name]
        for run in finding.runs():
            contrast = image_contrast * rng.uniform(0.8, 1.25)
            window = _zone_window(lung, run, v, cfg.zone_margin)
            if finding.diffuse:
                f = _diffuse_field(rng, margins[name], S)
            else:
                bounds = lung.zone_bounds()
                v_rng = (bounds[LEVELS.index(run[0])][0], bounds[LEVELS.index(run[-1])][1])
                fill = rng.uniform(0.75, 0.95) if len(run) > 1 else rng.uniform(0.6, 0.9)
                f = _blob_field(rng, lung, anat, frame, v_rng, fill)
            region = (f > 0) & inside[name] & window
            mask |= region
            # soft opacity whose half-maximum contour is the mask boundary
            if finding.diffuse:
                # a whole-lung opacity is only visible as patchy, uneven whitening, and
                # is denser than a focal one (it is read against the other lung)
                patches = np.clip(0.5 + 0.35 * smooth_noise(rng, S, 5), 0.0, 1.0)
                tex = (0.15 + 0.85 * patches) * (0.5 + 0.5 * texture)
                opacity = smoothstep(*LESION_EDGE, f) * tex * DIFFUSE_CONTRAST_GAIN
            else:
                opacity = smoothstep(*LESION_EDGE, f) * (0.35 + 0.65 * texture)
            lesion = np.maximum(lesion, contrast * opacity * window)
    dens += lesion * lung_soft

    # ---- distractors in zones the text calls clean
    clean = layout.clean_zones()
    n_distractors = int(rng.poisson(cfg.distractor_rate)) if clean else 0
    for _ in range(n_distractors):
        name, level = clean[int(rng.integers(len(clean)))]
        lung = anat.lungs[name]
        window = _zone_window(lung, (level,), v, -cfg.zone_margin)
        bounds = lung.zone_bounds()[LEVELS.index(level)]
        if rng.random() < cfg.distractor_opacity_fraction:
            f = _blob_field(rng, lung, anat, frame, bounds, rng.uniform(0.45, 0.8))
            contrast = loguniform(rng, lo, hi)
            opacity = smoothstep(*LESION_EDGE, f) * (0.35 + 0.65 * texture)
        else:
            # a vessel seen end-on / nipple shadow: small, round, brighter
            f = _blob_field(rng, lung, anat, frame, bounds, 0.0, radius=rng.uniform(0.012, 0.025))
            contrast = rng.uniform(0.08, 0.18)
            opacity = smoothstep(-0.1, 0.3, f)
        dens += contrast * opacity * window * lung_soft

    # ---- detector: blur, noise, window and gamma
    dens = blur(dens, rng.uniform(*cfg.blur_px) * px)
    sigma = rng.uniform(*cfg.noise_sigma)
    dens += sigma * rng.standard_normal((S, S)).astype(np.float32)
    dens += 0.5 * sigma * smooth_noise(rng, S, max(8, S // 4))  # correlated quantum mottle
    black = rng.uniform(-0.02, 0.06)
    white = rng.uniform(0.62, 0.72)
    gamma = rng.uniform(0.8, 1.25)
    x = (dens - black) / (white - black)
    # soft shoulder instead of a hard clip: the mediastinum and abdomen keep some detail
    # rather than burning out into flat white shapes
    knee = 0.8
    x = np.where(x > knee, knee + (1 - knee) * np.tanh((x - knee) / (1 - knee)), x)
    img = np.clip(x, 0.0, 1.0) ** gamma
    image = np.round(img * 255.0).astype(np.uint8)

    lung_any = inside["left"] | inside["right"]
    mask &= lung_any
    return ChestXrayItem(
        image=image,
        mask=mask.astype(np.uint8) * 255,
        zones=_zone_map(anat, inside, v),
        layout=layout,
        text=describe(layout),
        n_distractors=n_distractors,
    )


# --------------------------------------------------------------------------------------
# dataset generation
# --------------------------------------------------------------------------------------


def make_item(
    seed: int, index: int, config: ChestXrayConfig | None = None, text_noise: float = 0.0
) -> tuple[ChestXrayItem, str]:
    """Item ``index`` of the dataset with ``seed`` (independent of the dataset size).

    Returns:
        ``(item, text)``: ``text`` is ``item.text`` with annotation noise applied with
        probability ``text_noise``.
    """
    layout = sample_layout(item_rng(seed, index, STREAMS.layout))
    item = render_chest_xray(layout, item_rng(seed, index, STREAMS.image), config)
    return item, noisy_text(item.text, item_rng(seed, index, STREAMS.text), text_noise)


def generate_chest_xray(
    out: Path | str,
    n: int,
    seed: int = 0,
    size: int = 256,
    text_noise: float = 0.0,
    split_fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    *,
    overwrite: bool = False,
    lesion_contrast: tuple[float, float] = ChestXrayConfig.lesion_contrast,
    distractor_rate: float = ChestXrayConfig.distractor_rate,
    config: ChestXrayConfig | None = None,
    workers: int = 1,
) -> dict:
    """Write a synthetic QaTa-like chest X-ray dataset in the LViT layout.

    ``out/{Train,Val,Test}_Folder/img/synth_XXXXX.png`` (8-bit gray, ``size`` x ``size``),
    ``.../labelcol/synth_XXXXX.png`` (mask {0, 255}) and ``.../<Split>_text.xlsx``
    (``Image, Description``). Same seed -> byte-identical files whatever ``workers`` is;
    image ``k`` does not depend on ``n``.

    Args:
        out: dataset root; must be absent or empty unless ``overwrite``.
        n: number of images.
        seed: non-negative seed.
        size: image side in pixels.
        text_noise: probability that a description gets one real-style annotation slip
            (:func:`~medtextseg.data.synthetic.qata_grammar.add_annotation_noise`); the
            real QaTa rate is ~0.07-0.10.
        split_fractions: Train, Val, Test fractions.
        overwrite: replace a non-empty ``out``.
        lesion_contrast: (low, high) lesion contrast, see :class:`ChestXrayConfig`.
        distractor_rate: mean distractors per image, see :class:`ChestXrayConfig`.
        config: full rendering settings; ``size``, ``lesion_contrast`` and
            ``distractor_rate`` override its fields.
        workers: rendering processes (``spawn``ed: a calling script needs the usual
            ``if __name__ == "__main__":`` guard). Output does not depend on it. Serial
            rendering takes ~25-30 ms per 256 px image on one core.

    Returns:
        Summary dict: ``splits`` (images per split), ``n``, ``unique_texts``,
        ``noisy_texts``, ``bilateral_fraction``, ``seconds``, ``out``.

    Raises:
        FileExistsError: ``out`` exists, is not empty and ``overwrite`` is false.
    """
    t0 = time.perf_counter()
    check_generate_args(n, seed, text_noise)
    cfg = replace(
        config or ChestXrayConfig(),
        size=size,
        lesion_contrast=tuple(lesion_contrast),
        distractor_rate=distractor_rate,
    )
    job = ItemJob(make_item, seed, cfg, text_noise)
    return write_dataset(
        out, n, job, STREAMS, split_fractions, overwrite=overwrite, workers=workers, started=t0
    )
