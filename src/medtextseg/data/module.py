"""Datasets, transforms and the Lightning DataModule.

Images are decoded and resized once (``setup``) and kept as uint8 in memory:
the datasets of the papers are small (24 to 7,145 training images), and decoding
a 1000x1000 PNG on every step would dominate a CPU epoch. Two resolution
protocols (:class:`medtextseg.config.DataConfig`): every image resized to
``img_size``² (the papers'), or with ``data.patches`` each image kept at
``data.scale`` × its own size, trained on random ``img_size``² crops
(``patches_per_image`` per image per epoch) and predicted whole by a sliding
window (:mod:`medtextseg.inference`). Text features are
computed once per unique description by the text encoder and gathered per
sample by index, so training never pays for text encoding.

A batch is a dict:

- ``image``: ``[B, C, H, W]`` float32 in [0, 1]; H = W = ``img_size`` except for
  whole images under the patch protocol (evaluation batches of one image)
- ``mask``: ``[B, 1, H, W]`` int64 labels ({0, 1} binary, class ids otherwise); only
  when every sample of the dataset has one
- ``text``: ``[B, L]`` int64 token ids (learned encoder) or ``[B, L, D]`` float32
  token embeddings (frozen encoders)
- ``index``: ``[B]`` int64, position of the sample in its dataset
- ``domain``: ``[B]`` int64, the sample's index in ``data.domains`` (0 with one domain)
- ``id``: list of B sample ids
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import lightning as L
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from PIL import Image
from torch.utils.data import DataLoader, Dataset, get_worker_info

from medtextseg.config import DataConfig
from medtextseg.data.io import read_image, read_mask
from medtextseg.data.sample import Sample
from medtextseg.utils import numpy_rng_state, set_numpy_rng_state

AUGMENTATIONS = ("none", "rotate", "lvit", "resize_crop", "rotate_elastic")


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def working_size(height: int, width: int, cfg: DataConfig) -> tuple[int, int]:
    """(h, w) an image of ``height`` × ``width`` pixels is kept at: ``img_size``² by
    default, ``scale`` × its own size under the patch protocol (at least 1 pixel)."""
    if not cfg.patches:
        return cfg.size
    return max(1, round(height * cfg.scale)), max(1, round(width * cfg.scale))


def check_patch_options(cfg: DataConfig) -> None:
    """``ValueError`` naming the option for patch settings that cannot work."""
    from medtextseg.inference import BLEND_MODES

    if not cfg.patches:
        return
    if not cfg.scale > 0:
        raise ValueError(f"data.scale={cfg.scale}: give a positive factor (1.0 = native resolution, 0.5 = half)")
    if cfg.patches_per_image < 1:
        raise ValueError(f"data.patches_per_image={cfg.patches_per_image}: give at least 1")
    if not 0 <= cfg.window_overlap < 1:
        raise ValueError(f"data.window_overlap={cfg.window_overlap}: give a fraction in [0, 1)")
    if cfg.window_blend not in BLEND_MODES:
        raise ValueError(f"data.window_blend must be one of {BLEND_MODES}, got {cfg.window_blend!r}")


def eval_batch_size(cfg: DataConfig) -> int:
    """Images per evaluation batch: whole images under the patch protocol may differ in
    size, so they go one at a time (the sliding window batches their windows)."""
    return 1 if cfg.patches else cfg.eval_batch_size


def resize_image(image: np.ndarray, size: int | tuple[int, int], in_channels: int) -> np.ndarray:
    """``[H, W, 3]`` uint8 -> ``[C, h, w]`` uint8 (``size`` = s for s × s, or (h, w)),
    bilinear (LViT's resize)."""
    pil = Image.fromarray(image)
    if in_channels == 1:
        pil = pil.convert("L")
    h, w = _hw(size)
    arr = np.asarray(pil if (pil.height, pil.width) == (h, w) else pil.resize((w, h), Image.BILINEAR))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy()


def mask_to_labels(mask: np.ndarray, num_classes: int) -> np.ndarray:
    """Raw mask values -> labels: binary masks ({0,255} or {0,1}) become {0,1}."""
    return (mask > 0).astype(np.uint8) if num_classes == 1 else mask.astype(np.uint8)


def resize_mask(mask: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """``[H, W]`` labels -> ``[1, h, w]`` labels, nearest (keeps class ids)."""
    h, w = _hw(size)
    if mask.shape == (h, w):
        return mask[None].copy()
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))[None].copy()


def build_augmentation(cfg: DataConfig, map_keys: Sequence[str] = ()) -> mt.Compose | None:
    """Training transform applied identically to the image, its mask and ``map_keys``:
    under the patch protocol first a random ``img_size``² crop (zero-padded where the
    image is smaller), then the spatial augmentation.

    ``lvit``: the official recipe (p = 0.5 random quarter turn + flip, otherwise
    p = 0.5 rotation within ±``rotate_degrees``). ``rotate``: only the rotation,
    the default, because quarter turns and flips contradict position words
    ("upper left lung") in the text. ``map_keys`` name float ``[C, S, S]`` maps
    (pseudo labels, contrastive labels) that must follow the image's geometry;
    they are interpolated bilinearly, masks with nearest neighbour.

    ``rotate_elastic`` (PromptSSL): the rotation (probability 0.5), then an elastic
    deformation (MONAI ``Rand2DElasticd``, control points every 32 pixels, magnitude 1-2,
    probability 0.3) and a random gamma contrast of the image (0.7-1.5, probability 0.3).

    ``resize_crop`` (TextMoE): always a crop of a random fraction in
    [``crop_min_scale``, 1] of each side (drawn per side) at a random position, resized
    back to ``img_size``²; no rotation or flip.
    """
    if cfg.augment not in AUGMENTATIONS:
        raise ValueError(f"data.augment must be one of {AUGMENTATIONS}, got {cfg.augment!r}")
    keys = ["image", "mask", *map_keys]
    crop = []
    if cfg.patches:
        roi = cfg.size
        crop = [mt.SpatialPadd(keys, roi, allow_missing_keys=True),
                mt.RandSpatialCropd(keys, roi, random_size=False, allow_missing_keys=True)]
    if cfg.augment == "none":
        return mt.Compose(crop) if crop else None
    modes = ("bilinear", "nearest", *("bilinear" for _ in map_keys))
    if cfg.augment == "resize_crop":
        if not 0 < cfg.crop_min_scale <= 1:
            raise ValueError(f"data.crop_min_scale must be in (0, 1], got {cfg.crop_min_scale}")
        return mt.Compose([*crop,
                           mt.RandScaleCropd(keys, roi_scale=cfg.crop_min_scale, max_roi_scale=1.0, random_size=True,
                                             allow_missing_keys=True),
                           mt.Resized(keys, cfg.size, mode=modes, allow_missing_keys=True)])
    radians = float(np.deg2rad(cfg.rotate_degrees))
    # Unlabeled images have no "mask": the same transform must skip it, not fail.
    rotate = mt.RandRotated(keys, range_x=radians, prob=0.5, mode=modes, padding_mode="zeros",
                            allow_missing_keys=True)
    if cfg.augment == "rotate":
        return mt.Compose([*crop, rotate])
    if cfg.augment == "rotate_elastic":
        # PromptSSL: rotation (±rotate_degrees), elastic deformation, contrast (gamma); the
        # contrast acts on the image alone, the geometry on the image and its maps.
        return mt.Compose([*crop, rotate,
                           mt.Rand2DElasticd(keys, spacing=(32, 32), magnitude_range=(1.0, 2.0), prob=0.3,
                                             mode=modes, padding_mode="zeros", allow_missing_keys=True),
                           mt.RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=0.3)])
    turn_flip = mt.Compose([mt.RandRotate90d(keys, prob=1.0, spatial_axes=(0, 1), allow_missing_keys=True),
                            mt.RandFlipd(keys, prob=1.0, spatial_axis=1, allow_missing_keys=True)])
    return mt.Compose([*crop, mt.OneOf([turn_flip, rotate])])


def domain_index(samples: Sequence[Sample], domains: Sequence[str]) -> np.ndarray:
    """``[N]`` int64 index of each sample's domain in ``domains`` (``data.domains``, the
    order of the modality indicator). With at most one domain every index is 0, so a
    one-domain run scores any dataset.

    Raises:
        ValueError: a sample's domain is not in ``domains`` (naming it and the known ones).
    """
    if len(domains) <= 1:
        return np.zeros(len(samples), np.int64)
    at = {d: i for i, d in enumerate(domains)}
    unknown = sorted({s.domain for s in samples} - set(at))
    if unknown:
        raise ValueError(f"domain(s) {', '.join(map(repr, unknown))} are not among the run's domains "
                         f"({', '.join(domains)}); name each root after the domain it holds: "
                         f"--data {domains[0]}=PATH ...")
    return np.array([at[s.domain] for s in samples], np.int64)


def parse_oversample(how: str, domains: Sequence[str]) -> dict[str, int] | str:
    """``data.oversample`` checked against the data's domain names: ``"balance"`` or
    ``"none"`` (keywords, any case), or ``{domain: factor}`` from ``"ct=3,cxr=1"`` (names
    as the domains are spelled; unnamed domains get 1).

    Raises:
        ValueError: a malformed value, a factor below 1, or a name that is not a domain.
    """
    if how.strip().lower() in ("balance", "none"):
        return how.strip().lower()
    factor: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in how.split(","))):
        name, _, value = (x.strip() for x in part.partition("="))
        try:
            factor[name] = int(value)
        except ValueError:
            raise ValueError(f"data.oversample={how!r}: write balance, none or NAME=INT,NAME=INT "
                             "(e.g. ct=3,cxr=1)") from None
        if factor[name] < 1:
            raise ValueError(f"data.oversample: the factor of {name!r} must be at least 1")
        if name not in domains:
            raise ValueError(f"data.oversample: {name!r} is not a domain of the data "
                             f"({', '.join(domains)}); name the domains as they are spelled")
    if not factor:
        raise ValueError(f"data.oversample={how!r}: write balance, none or NAME=INT,NAME=INT (e.g. ct=3,cxr=1)")
    return factor


def oversample_factors(samples: Sequence[Sample], how: str) -> np.ndarray:
    """``[N]`` times each sample appears in a training epoch (``data.oversample``).

    ``"balance"``: a domain of n_d images gets max(1, round(n_max / n_d)); ``"none"``:
    1 everywhere; ``"ct=3,cxr=1"``: the given factors (unnamed domains 1). One domain: 1.

    Raises:
        ValueError: see :func:`parse_oversample`.
    """
    counts: dict[str, int] = {}
    for s in samples:
        counts[s.domain] = counts.get(s.domain, 0) + 1
    rule = parse_oversample(how, sorted(counts))
    if rule == "none" or len(counts) <= 1:
        factor = dict.fromkeys(counts, 1)
    elif rule == "balance":
        largest = max(counts.values())
        factor = {d: max(1, round(largest / n)) for d, n in counts.items()}
    else:
        factor = rule
    return np.array([factor.get(s.domain, 1) for s in samples], np.int64)


class SegDataset(Dataset):
    """Resized images (+ masks) and per-sample text features of one split.

    Args:
        samples: the records of this split.
        images: ``[N, C, S, S]`` uint8, or (patch protocol, sizes that differ) a list
            of N ``[C, H_i, W_i]`` arrays.
        masks: ``[N, 1, S, S]`` uint8 labels (or a list, like ``images``), or None (no
            sample has a mask).
        text_features: ``[U, L]`` int64 or ``[U, L, D]`` float, one row per unique text.
        text_index: ``[N]`` row of ``text_features`` for each sample.
        transform: MONAI dict transform over ``image``/``mask`` (+ the map keys), or None.
        repeats: items per image per epoch (``patches_per_image`` for patch training:
            each item is another random crop).
        domains: ``[N]`` int64 domain index of each sample (:func:`domain_index`), or
            None (all 0); items carry it as ``"domain"``.
        oversample: ``[N]`` times each image appears per epoch (:func:`oversample_factors`),
            or None (once); ``len`` is ``sum(oversample) · repeats``.

    Attributes:
        targets: optional ``targets(i) -> {key: FloatTensor [C, S, S]}``, maps in the
            unaugmented frame that a method attaches (EPI pseudo labels, LV contrastive
            labels); they go through the same random transform as the image.
        hidden_masks: ``[N, 1, S, S]`` masks that a labeled-ratio split withheld, kept
            only to measure pseudo-label quality; never part of a batch.
    """

    def __init__(self, samples: Sequence[Sample], images: np.ndarray, masks: np.ndarray | None,
                 text_features: torch.Tensor, text_index: np.ndarray, transform: mt.Compose | None = None,
                 repeats: int = 1, domains: np.ndarray | None = None, oversample: np.ndarray | None = None):
        self.samples = list(samples)
        self.repeats = repeats
        n = len(self.samples)
        self.domains = torch.zeros(n, dtype=torch.long) if domains is None else torch.as_tensor(domains).long()
        self.oversample = np.ones(n, np.int64) if oversample is None else np.asarray(oversample, np.int64)
        # Item k of an epoch -> sample: each sample f_i times, the whole list `repeats` times.
        once = np.concatenate([np.flatnonzero(self.oversample >= k) for k in range(1, int(self.oversample.max(
            initial=1)) + 1)]) if n else np.zeros(0, np.int64)
        self.order = np.tile(once, repeats)
        self.images = images
        self.masks = masks
        self.text_features = text_features
        self.text_index = torch.as_tensor(text_index, dtype=torch.long)
        self.transform = transform
        self.targets: Callable[[int], dict[str, torch.Tensor]] | None = None
        self.hidden_masks: np.ndarray | None = None

    def plain(self) -> SegDataset:
        """The same images and texts without augmentation or targets (shares memory)."""
        return SegDataset(self.samples, self.images, self.masks, self.text_features, self.text_index.numpy(),
                          domains=self.domains.numpy())

    def __len__(self) -> int:
        return len(self.order)

    @property
    def num_images(self) -> int:
        """Distinct images (``len`` counts oversampled and repeated visits)."""
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        i = int(self.order[i])
        item = {"image": torch.from_numpy(self.images[i]).float().div_(255.0)}
        if self.masks is not None:
            item["mask"] = torch.from_numpy(self.masks[i]).float()
        if self.targets is not None:
            item.update(self.targets(i))
        if self.transform is not None:
            # MONAI returns MetaTensors; a batch of them would send every operation of the
            # network through MetaTensor.__torch_function__ (several times slower on CPU).
            item = {k: v.as_tensor() if isinstance(v, MetaTensor) else torch.as_tensor(v)
                    for k, v in self.transform(item).items()}
        if "mask" in item:
            item["mask"] = item["mask"].round().long()
        item["text"] = self.text_features[self.text_index[i]]
        item["index"] = i
        item["domain"] = self.domains[i]
        item["id"] = self.samples[i].id
        return item


def collate(items: list[dict]) -> dict:
    out = {k: torch.stack([it[k] for it in items]) for k, v in items[0].items() if isinstance(v, torch.Tensor)}
    out["index"] = torch.tensor([it["index"] for it in items], dtype=torch.long)
    out["id"] = [it["id"] for it in items]
    return out


def _seed_worker_transform(worker_id: int) -> None:
    """Give each loader worker its own augmentation stream, derived from torch's seed
    (which Lightning's ``seed_everything(workers=True)`` makes reproducible)."""
    info = get_worker_info()
    if info is not None and info.dataset.transform is not None:
        info.dataset.transform.set_random_state(seed=int(info.seed % (2**32)))


def load_arrays(samples: Sequence[Sample], cfg: DataConfig, with_masks: bool, threads: int = 4):
    """Decode and resize every sample once, to :func:`working_size`. Returns (images
    [N,C,h,w], masks [N,1,h,w] | None), or lists of arrays where the sizes differ."""
    def one(s: Sample):
        raw = read_image(s.image_path)
        size = working_size(*raw.shape[:2], cfg)
        img = resize_image(raw, size, cfg.in_channels)
        msk = resize_mask(mask_to_labels(read_mask(s.mask_path), cfg.num_classes), size) if with_masks else None
        return img, msk

    with ThreadPoolExecutor(threads) as pool:
        pairs = list(pool.map(one, samples))
    if not pairs:
        return np.zeros((0, cfg.in_channels, *cfg.size), np.uint8), None
    same = len({p[0].shape for p in pairs}) == 1

    def join(arrays: list[np.ndarray]):
        return np.stack(arrays) if same else arrays

    return join([p[0] for p in pairs]), join([p[1] for p in pairs]) if with_masks else None


def make_dataset(samples: Sequence[Sample], encoder, cfg: DataConfig, *, train: bool = False,
                 seed: int = 0, map_keys: Sequence[str] = ()) -> SegDataset:
    """Build a dataset for any list of samples (masks are used when all samples have one).

    ``map_keys``: names of the per-sample maps a method will attach as ``targets``
    (their augmentation must be built with them)."""
    texts = sorted({s.text for s in samples})
    row = {t: i for i, t in enumerate(texts)}
    features = encoder.features(texts) if texts else torch.zeros(0)
    with_masks = bool(samples) and all(s.mask_path is not None for s in samples)
    images, masks = load_arrays(samples, cfg, with_masks)
    transform = build_augmentation(cfg, map_keys) if train else None
    if transform is not None:
        transform.set_random_state(seed=seed)
    repeats = cfg.patches_per_image if train and cfg.patches else 1
    return SegDataset(samples, images, masks, features, np.array([row[s.text] for s in samples]), transform,
                      repeats, domains=domain_index(samples, cfg.domains),
                      oversample=oversample_factors(samples, cfg.oversample) if train else None)


def make_loader(dataset: SegDataset, batch_size: int, *, shuffle: bool, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                      collate_fn=collate, drop_last=drop_last, worker_init_fn=_seed_worker_transform,
                      persistent_workers=num_workers > 0)


def _randomizables(transform) -> list:
    """Every MONAI ``Randomizable`` reachable from ``transform``, in a fixed order: a
    ``Compose``'s children and the helpers a transform keeps as attributes (``RandRotated``
    draws through its own ``RandRotate``)."""
    from monai.transforms import Randomizable

    out, seen, todo = [], set(), [transform]
    while todo:
        t = todo.pop(0)
        if id(t) in seen or t is None or isinstance(t, (str, bytes, int, float, np.ndarray, torch.Tensor)):
            continue
        seen.add(id(t))
        if isinstance(t, Randomizable):
            out.append(t)
        if isinstance(t, (list, tuple)):
            todo.extend(t)
        elif hasattr(t, "__dict__") and t.__class__.__module__.startswith(("monai", "medtextseg")):
            todo.extend(v for k, v in vars(t).items() if k != "R")
    return out


class TransformStateMixin:
    """A LightningDataModule whose ``datasets`` carry augmentation ``transform`` s: their
    random streams go into the checkpoint (Lightning saves a datamodule's ``state_dict``)
    and come back on resume, so a resumed run draws the augmentations the uninterrupted
    one would have. With ``data.num_workers`` > 0 the workers hold their own streams
    (seeded from torch's generator when they start); only the main-process ones are kept."""

    datasets: dict

    def state_dict(self) -> dict:
        return {"transforms": {name: [numpy_rng_state(t.R) for t in _randomizables(ds.transform)]
                               for name, ds in self.datasets.items() if getattr(ds, "transform", None) is not None}}

    def load_state_dict(self, state: dict) -> None:
        for name, states in state.get("transforms", {}).items():
            ds = self.datasets.get(name)
            if ds is None or getattr(ds, "transform", None) is None:
                continue
            parts = _randomizables(ds.transform)
            if len(parts) == len(states):  # a config change would make them another experiment anyway
                for t, st in zip(parts, states, strict=True):
                    set_numpy_rng_state(t.R, st)


class SegDataModule(TransformStateMixin, L.LightningDataModule):
    """Train (labeled), Unlabeled, Val and Test data over validated samples.

    Args:
        samples: every record of the dataset (all splits), after any labeled-ratio
            split (unlabeled Train images have ``mask_path=None``).
        encoder: a fitted :class:`medtextseg.text.encoders.TextEncoder`.
        cfg: the data section of the run config.
        seed: seeds the augmentation streams.
        unlabeled_keys: ``None`` for supervised methods (unlabeled images are not
            loaded); otherwise the names of the maps the method attaches to the
            unlabeled images (may be empty), and training batches become
            ``{"labeled": batch, "unlabeled": batch}``.
        withheld: the samples before the split, to keep the withheld masks of the
            unlabeled images for pseudo-label diagnostics (``SegDataset.hidden_masks``).
    """

    def __init__(self, samples: Sequence[Sample], encoder, cfg: DataConfig, seed: int = 0,
                 unlabeled_keys: Sequence[str] | None = None, withheld: Sequence[Sample] | None = None):
        super().__init__()
        self.samples = list(samples)
        self.encoder = encoder
        self.cfg = cfg
        self.seed = seed
        self.unlabeled_keys = None if unlabeled_keys is None else tuple(unlabeled_keys)
        self.withheld = {(s.split, s.id): s for s in withheld or [] if s.labeled}
        self.datasets: dict[str, SegDataset] = {}

    def split(self, name: str, labeled_only: bool = False) -> list[Sample]:
        return [s for s in self.samples if s.split == name and (s.labeled or not labeled_only)]

    def setup(self, stage: str | None = None) -> None:
        if "Train" in self.datasets:
            return
        self.datasets["Train"] = make_dataset(self.split("Train", labeled_only=True), self.encoder, self.cfg,
                                              train=True, seed=self.seed)
        self.datasets["Val"] = make_dataset(self.split("Val"), self.encoder, self.cfg)
        if self.unlabeled_keys is not None:
            unlabeled = [s for s in self.split("Train") if not s.labeled]
            # A different stream from the labeled images', so the two halves of a batch
            # are not rotated in lockstep.
            ds = make_dataset(unlabeled, self.encoder, self.cfg, train=True, seed=self.seed + 1,
                              map_keys=self.unlabeled_keys)
            hidden = [self.withheld.get(("Train", s.id)) for s in unlabeled]
            if unlabeled and all(h is not None for h in hidden):
                ds.hidden_masks = load_arrays(hidden, self.cfg, with_masks=True)[1]
            self.datasets["Unlabeled"] = ds

    def train_dataloader(self):
        """Supervised: the labeled loader. Semi-supervised: ``batch_size`` labeled and
        ``batch_size`` unlabeled images per step (the convention of Mean Teacher
        implementations), so the supervised term has the batch size of supervised
        training. The longer of the two sets defines the epoch and the other is
        cycled: at 25 % labels an epoch passes over the labeled images three times,
        so epoch-based settings (warm-up, ramp, patience, EPI generations) span
        three times the labeled steps of a supervised epoch on those images."""
        ds = self.datasets["Train"]
        # Drop a last batch of one: BatchNorm cannot train on a single image.
        drop = len(ds) % self.cfg.batch_size == 1 and len(ds) > self.cfg.batch_size
        labeled = make_loader(ds, self.cfg.batch_size, shuffle=True, num_workers=self.cfg.num_workers, drop_last=drop)
        if self.unlabeled_keys is None:
            return labeled
        if not len(self.datasets["Unlabeled"]):
            return {"labeled": labeled}
        from lightning.pytorch.utilities import CombinedLoader

        unlabeled = make_loader(self.datasets["Unlabeled"], self.cfg.batch_size, shuffle=True,
                                num_workers=self.cfg.num_workers)
        return CombinedLoader({"labeled": labeled, "unlabeled": unlabeled}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.datasets["Val"], eval_batch_size(self.cfg), shuffle=False,
                           num_workers=self.cfg.num_workers)

    def plain_loader(self, name: str) -> DataLoader:
        """Loader over a dataset without augmentation, in order (pseudo-label refresh)."""
        return make_loader(self.datasets[name].plain(), eval_batch_size(self.cfg), shuffle=False,
                           num_workers=self.cfg.num_workers)
