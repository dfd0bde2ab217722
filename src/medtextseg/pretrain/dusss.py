"""DuSSS stage 1: vision-language pre-training with SSS-weighted dual contrastive learning.

Trains :class:`~medtextseg.nets.vlm.DualEncoderVLM` on *every* Train image with its
text, labeled or not (``../shared/papers/dusss.txt``, "VLM Pre-training with DuSSS"):

    L = L_cmc + w_imc L_imc + w_tg L_tg + w_mask L_mask

- **L_cmc** (Eq. 6-8): symmetric InfoNCE between the raw image ``I_1`` and its text
  ``T_1`` over the batch. Images that carry the same text are positives of each
  other (:func:`~medtextseg.pretrain.similarity.same_text_positives`), not negatives.
- **L_imc** (Eq. 9, ``vlm.imc``): ``(L^{I2I}(I_1, I_2) + L^{T2T}(T_1, T_2)) / 2``
  against a second, augmented view ``(I_2, T_2)``. I2I positives: the two views of
  one image only; T2T positives: the views of one description.
- **SSS** (Eq. 1-5, ``vlm.sss``): every logit of *each* of these contrastive terms
  is the uncertainty cosine ``sim^ = 1 - (1 - sim) D_SSS`` with ``D_SSS`` of that
  pair, from the Gaussian heads of both sides (constants ``vlm.sss_a/b/lam``).
  Gradients flow through ``D_SSS``: they are what trains the Gaussian heads.
  **SSS starts after ``vlm.sss_warmup_epochs`` of plain InfoNCE** (a choice; the
  paper is silent). From a random start the [CLS] embeddings of all images are
  nearly equal and the loss sits above ``log N``; moving every image and text onto
  one point lowers it to ``log N``, and there ``D_s -> 0`` gives ``D_SSS -> 0``,
  ``sim^ -> 1`` for every pair and a zero gradient: an absorbing collapse. Measured
  on the smoke VLM overfitting six pairs (Adam 1e-3): with SSS from step 0 the loss
  stays at ``log 6`` with projection gradients of 1e-19 after 200 steps; plain
  InfoNCE leaves the plateau after ~80 steps, and switching SSS on at step 150
  keeps the loss falling (1.17 -> 0.48 in 100 steps). Once the space is spread,
  collapsing costs far more than it saves, so SSS stays safe.
- **L_tg** (Eq. 11, ``vlm.tg_loss``): Eq. 11 is an InfoNCE between a "text-guided
  visual feature" ``v_f^t`` and the text, and does not say what ``v_f^t`` is. Here
  ``v_f^t`` is the image's pixel features ``v_f = f_g(v_f^patch)`` (Eq. 10)
  averaged under its own text-guided mask ``sigmoid(t^T v_f)``
  (:func:`~medtextseg.pretrain.similarity.text_guided_features`), and L_tg is the
  symmetric plain-cosine InfoNCE of ``v_f^t`` against the batch's texts (same-text
  positives). It trains the decoder so that the region a text selects looks like
  that text and unlike the others.
- **L_mask** (``vlm.mask_supervision``): L_tg alone never says which pixels belong
  to the target: an all-ones mask pools the whole image, which L_tg rewards as much
  as the lesion, so nothing makes ``sigmoid(t^T v)`` a *segmentation* probability.
  Yet stage 2 uses it as one (a pseudo label in a cross-entropy, Eq. 15-16). So the
  text mask (upsampled to the image, Eq. 10) is also trained with Dice + CE
  (``loss.dice``/``loss.ce``) on the Train images that have a mask. **Default: on.**
  The masks it reads are the labeled set of the same seeded labeled-ratio split the
  segmentation runs use (``data.labeled_ratio`` / ``data.labeled_ids``, written to
  ``split.json``), so the VLM sees no mask that the semi-supervised stage withholds;
  with it off, the VLM uses no mask at all and its text-mask Dice shows what the
  contrastive terms alone give (benchmarks report both).

The second view: ``I_2`` is a random resized crop (at least ``vlm.aug_crop_min`` of
each side), a rotation within ±``vlm.aug_rotate_degrees``, intensity scaling,
contrast (gamma) and noise, clipped to [0, 1] (MONAI transforms). There is no flip
and no quarter turn: the texts say "left" and "upper". ``T_2`` is one of
``vlm.text_variants`` rewrites of the text made once at setup by
:func:`medtextseg.text.augment.augment` (clauses reordered, one dropped with
probability ``vlm.text_p_drop``: never a changed word). Every distinct text and
every variant is tokenised once at setup; a step only gathers token rows.

No momentum encoder: the paper describes none (the official code's EMA copy for the
augmented view is not in the paper), and both views here pass through the same
encoders, SimCLR-style, with gradients through both.

Validation: image -> text retrieval among the distinct Val texts and text -> image
retrieval over the Val images, scored by text (:mod:`medtextseg.pretrain.retrieval`);
``val/r1`` (mean of the two R@1) selects ``best.ckpt`` (``vlm.monitor=text_dice``: the
text mask's Val Dice instead; on 50 Val images sharing 19 texts R@1 is noisy enough
that an epoch near the random start can win, and stage 2 consumes the mask). ``val/text_dice`` is the
text mask's Dice (threshold ``data.threshold``) on the Val images that have a mask.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from math import ceil

import lightning as L
import numpy as np
import torch
from monai import transforms as mt
from monai.data import MetaTensor
from torch import Tensor
from torch.utils.data import Dataset

from medtextseg.config import Config
from medtextseg.data.io import read_mask
from medtextseg.data.module import (
    TransformStateMixin,
    eval_batch_size,
    load_arrays,
    make_loader,
    mask_to_labels,
    resize_mask,
)
from medtextseg.data.sample import Sample
from medtextseg.losses import DiceCE
from medtextseg.metrics import binarize, dice_iou_per_image, mean_of_scored, scored_totals
from medtextseg.nets.vlm import DualEncoderVLM
from medtextseg.pretrain.base import PretrainModule
from medtextseg.pretrain.retrieval import retrieval_recall
from medtextseg.pretrain.similarity import (
    info_nce,
    pairwise_sss,
    same_text_positives,
    text_guided_loss,
)
from medtextseg.text.augment import augment

Tokenize = Callable[[Sequence[str], int], tuple[Tensor, Tensor]]
# vlm.monitor -> the logged Val metric that selects best.ckpt and drives early stopping.
MONITORS = {"r1": "val/r1", "text_dice": "val/text_dice"}


def build_vlm(cfg: Config) -> DualEncoderVLM:
    """The :class:`DualEncoderVLM` of ``cfg.vlm`` at ``data.img_size`` / ``data.in_channels``."""
    v = cfg.vlm
    vit = {} if v.image_encoder.startswith("hf:") else {
        "patch_size": v.patch_size, "hidden_size": v.hidden_size, "depth": v.depth, "heads": v.heads,
        "mlp_ratio": v.mlp_ratio}
    text = {"text_hidden": v.text_hidden, "text_depth": v.text_depth, "text_heads": v.text_heads} \
        if v.text_encoder == "learned" else {}
    return DualEncoderVLM(image_encoder=v.image_encoder, image_size=cfg.data.size,
                          in_channels=cfg.data.in_channels, text_encoder=v.text_encoder, embed_dim=v.embed_dim,
                          decoder_channels=tuple(v.decoder_channels), temperature=v.temperature, **vit, **text)


class _TextVariant(mt.Randomizable, mt.Transform):
    """Draws which precomputed text variant an item's second view uses (``item["variant"]``).

    A MONAI randomizable, so the dataset's transform seeds it with the image view's
    augmentation (and each loader worker gets its own stream)."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, data: dict) -> dict:
        out = dict(data)
        out["variant"] = int(self.R.randint(self.n))
        return out


def view_augmentation(cfg: Config) -> mt.Compose:
    """The second image view (module docstring) over key ``image2`` ``[C, S, S]`` in [0, 1],
    plus the draw of the text variant."""
    v, (h, w) = cfg.vlm, cfg.data.size
    crop = (max(1, ceil(h * v.aug_crop_min)), max(1, ceil(w * v.aug_crop_min)))
    return mt.Compose([
        mt.RandSpatialCropd("image2", roi_size=crop, max_roi_size=(h, w), random_size=True),
        mt.Resized("image2", (h, w), mode="bilinear"),
        mt.RandRotated("image2", range_x=float(np.deg2rad(v.aug_rotate_degrees)), prob=1.0, mode="bilinear",
                       padding_mode="zeros"),
        mt.RandScaleIntensityd("image2", factors=0.1, prob=0.8),
        mt.RandAdjustContrastd("image2", gamma=(0.8, 1.25), prob=0.5),
        mt.RandGaussianNoised("image2", std=0.02, prob=0.5),
        # Identity on [0, 1] with clipping: the network contract is images in [0, 1].
        mt.ScaleIntensityRanged("image2", a_min=0.0, a_max=1.0, b_min=0.0, b_max=1.0, clip=True),
        _TextVariant(max(1, v.text_variants)),
    ])


def text_variants(text: str, n: int, seed: int, p_drop: float) -> list[str]:
    """``n`` fact-preserving rewrites of ``text`` (:func:`medtextseg.text.augment.augment`),
    each from its own seeded stream: the same for a text whatever else the dataset holds."""
    return [augment(text, random.Random(f"{seed}\0{j}\0{text}"), p_drop) for j in range(n)]


class PairDataset(Dataset):
    """Images with their texts' token rows (and masks where there are any).

    Args:
        samples: the records (``N``).
        images: ``[N, C, S, S]`` uint8.
        masks: ``[N, 1, H, W]`` uint8 labels ({0, 1}, or class ids for ``data.num_classes`` >= 2),
            zeros where ``has_mask`` is False.
        has_mask: ``[N]`` bool.
        groups: ``[N]`` int64, row of the split's distinct texts each sample carries.
        ids, attn: ``[U, L]`` token ids / attention mask of the distinct texts.
        variant_ids, variant_attn: ``[U, V, L]`` of their precomputed variants (training only).
        transform: :func:`view_augmentation` (training only).
        extras: ``{key: [U, ...]}`` per-text rows an item also carries (e.g. GLsc's class
            prompt indices), gathered by the item's text.

    Item: ``image [C, S, S]`` float in [0, 1], ``mask [1, S, S]`` int64, ``has_mask``,
    ``group``, ``ids``/``attn`` ``[L]``, ``index``, ``id``; training adds the second
    view ``image2`` and ``ids2``/``attn2``.
    """

    def __init__(self, samples, images, masks, has_mask, groups, ids, attn, variant_ids=None, variant_attn=None,
                 transform=None, extras: dict[str, Tensor] | None = None):
        self.samples = list(samples)
        self.images, self.masks = images, masks
        self.has_mask = torch.as_tensor(has_mask, dtype=torch.bool)
        self.groups = torch.as_tensor(groups, dtype=torch.long)
        self.ids, self.attn = ids, attn
        self.variant_ids, self.variant_attn = variant_ids, variant_attn
        self.transform = transform
        self.extras = extras or {}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        g = int(self.groups[i])
        image = torch.from_numpy(self.images[i]).float().div_(255.0)
        item = {"image": image, "mask": torch.from_numpy(self.masks[i]).long(), "has_mask": self.has_mask[i],
                "group": self.groups[i], "ids": self.ids[g], "attn": self.attn[g], "index": i,
                "id": self.samples[i].id, **{k: v[g] for k, v in self.extras.items()}}
        if self.transform is not None:
            view = self.transform({"image2": image.clone(), "variant": 0})
            im2 = view["image2"]
            item["image2"] = im2.as_tensor() if isinstance(im2, MetaTensor) else torch.as_tensor(im2)
            item["ids2"] = self.variant_ids[g, view["variant"]]
            item["attn2"] = self.variant_attn[g, view["variant"]]
        return item


def pair_dataset(samples: Sequence[Sample], cfg: Config, tokenize: Tokenize, *, train: bool = False,
                 seed: int = 0, extras: Callable[[list[str]], dict[str, Tensor]] | None = None) -> PairDataset:
    """Decode, resize and tokenise ``samples`` once (one tokenizer call for every distinct
    text and, for training, its ``vlm.text_variants`` rewrites); ``extras(distinct texts)``
    gives per-text rows the items carry (:class:`PairDataset`)."""
    v = cfg.vlm
    texts = sorted({s.text for s in samples})
    row = {t: i for i, t in enumerate(texts)}
    n_var = max(1, v.text_variants) if train else 0
    variants = [w for t in texts for w in text_variants(t, n_var, seed, v.text_p_drop)]
    all_ids, all_attn = tokenize(texts + variants, v.max_len)
    u = len(texts)
    ids, attn = all_ids[:u], all_attn[:u]
    images, _ = load_arrays(samples, cfg.data, with_masks=False)
    s = cfg.data.size
    masks = np.zeros((len(samples), 1, *s), np.uint8)
    has = np.array([x.labeled for x in samples], bool)
    for i, x in enumerate(samples):
        if x.labeled:
            masks[i] = resize_mask(mask_to_labels(read_mask(x.mask_path), cfg.data.num_classes), s)
    transform = None
    var_ids = var_attn = None
    if train:
        var_ids = all_ids[u:].view(u, n_var, -1)
        var_attn = all_attn[u:].view(u, n_var, -1)
        transform = view_augmentation(cfg)
        transform.set_random_state(seed=seed)
    return PairDataset(samples, images, masks, has, [row[x.text] for x in samples], ids, attn, var_ids, var_attn,
                       transform, extras(texts) if extras is not None else None)


def mask_repeats(n_labeled: int, n_train: int, share: float) -> int:
    """How many times each labeled image appears in a pre-training epoch so that labeled
    items make at least ``share`` of it (``vlm.mask_share``): the smallest r >= 1 with
    ``r L / (r L + N - L) >= share``; 1 without labeled images or with ``share = 0``."""
    if n_labeled == 0 or share <= 0:
        return 1
    return max(1, ceil(share * (n_train - n_labeled) / ((1.0 - share) * n_labeled) - 1e-9))


def check_mask_share(share: float) -> None:
    """``vlm.mask_share`` is a share of an epoch's items: in [0, 1) (shared by every VLM pre-training)."""
    if not 0 <= share < 1:
        raise ValueError(f"vlm.mask_share must be in [0, 1), got {share}")


class PairDataModule(TransformStateMixin, L.LightningDataModule):
    """Every Train image (labeled and unlabeled) for training, the Val images for selection;
    with ``vlm.mask_share`` the labeled ones repeated (:func:`mask_repeats`).

    Args:
        samples: every record after the labeled-ratio split (a withheld mask is ``None``).
        cfg: the run config.
        tokenize: the VLM's ``tokenize(texts, max_len) -> (ids, attn)``.
        seed: seeds the augmentation streams and the text variants.
        extras: per-text rows of the items (:func:`pair_dataset`).
    """

    def __init__(self, samples: Sequence[Sample], cfg: Config, tokenize: Tokenize, seed: int = 0,
                 extras: Callable[[list[str]], dict[str, Tensor]] | None = None):
        super().__init__()
        self.samples, self.cfg, self.tokenize, self.seed = list(samples), cfg, tokenize, seed
        self.extras = extras
        self.datasets: dict[str, PairDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if "Train" in self.datasets:
            return
        split = {name: [s for s in self.samples if s.split == name] for name in ("Train", "Val")}
        labeled = [s for s in split["Train"] if s.labeled]
        train = split["Train"] + labeled * (mask_repeats(len(labeled), len(split["Train"]), self.cfg.vlm.mask_share) - 1)
        self.datasets["Train"] = pair_dataset(train, self.cfg, self.tokenize, train=True, seed=self.seed,
                                              extras=self.extras)
        self.datasets["Val"] = pair_dataset(split["Val"], self.cfg, self.tokenize, extras=self.extras)

    def train_dataloader(self):
        ds, bs = self.datasets["Train"], self.cfg.data.batch_size
        # A last batch of one has no negatives: its contrastive terms carry no signal.
        drop = len(ds) % bs == 1 and len(ds) > bs
        return make_loader(ds, bs, shuffle=True, num_workers=self.cfg.data.num_workers, drop_last=drop)

    def val_dataloader(self):
        return make_loader(self.datasets["Val"], eval_batch_size(self.cfg.data), shuffle=False,
                           num_workers=self.cfg.data.num_workers)


def _zero_touch(*modules: torch.nn.Module) -> Tensor:
    """``0 * sum(params)``: keeps parameters that a switched-off term leaves unused in the
    graph, so DDP (``find_unused_parameters=False``) still reduces a gradient for them."""
    return sum(p.sum() for m in modules for p in m.parameters()) * 0.0


class DuSSSPretrain(PretrainModule, pretrain="dusss"):
    """DuSSS VLM pre-training (module docstring): ``forward`` is the VLM's.

    Batches are those of :class:`PairDataModule`. Logged: ``train/loss`` and each term
    (``train/cmc``, ``train/imc``, ``train/tg``, ``train/mask``, only those switched on),
    ``train/tau``; ``val/r1`` (monitored), ``val/i2t_r1`` ... ``val/t2i_r5``, ``val/text_dice``.
    """

    monitor = "val/r1"
    kind = "vlm"

    def __init__(self, config: dict):
        super().__init__(config)
        self.vlm = build_vlm(self.cfg)
        self.mask_loss = DiceCE(1, self.cfg.loss.dice, self.cfg.loss.ce)
        self._val: list[tuple[Tensor, Tensor, Tensor]] = []

    # Which paper's pre-training this is, for messages.
    label = "DuSSS"

    @classmethod
    def check_classes(cls, num_classes: int) -> None:
        """Refuse a ``data.num_classes`` this pre-training cannot use (DuSSS: binary only)."""
        if num_classes != 1:
            raise ValueError(f"the DuSSS text mask is binary (data.num_classes=1), got {num_classes} classes")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The checks of every pre-training built on this one (GLsc adds its own after these)."""
        v, d = cfg.vlm, cfg.data
        cls.check_classes(d.num_classes)
        if d.patches:
            raise ValueError(f"{cls.label} pre-training resizes every image to data.img_size; set data.patches=false")
        if len(v.decoder_channels) != 2:
            raise ValueError(f"vlm.decoder_channels must list two widths, got {v.decoder_channels!r}")
        check_mask_share(v.mask_share)
        if v.text_variants < 1:
            raise ValueError(f"vlm.text_variants must be at least 1, got {v.text_variants}")
        if not 0 < v.aug_crop_min <= 1:
            raise ValueError(f"vlm.aug_crop_min must be in (0, 1], got {v.aug_crop_min}")
        if d.batch_size < 2:
            raise ValueError("contrastive pre-training needs data.batch_size >= 2 (the batch holds the negatives)")
        if v.monitor not in MONITORS:
            raise ValueError(f"vlm.monitor must be one of {', '.join(MONITORS)}, got {v.monitor!r}")
        if v.sss and v.sss_warmup_epochs > cfg.train.patience:
            raise ValueError(f"vlm.sss_warmup_epochs ({v.sss_warmup_epochs}) > train.patience ({cfg.train.patience}): "
                             "early stopping would end the run before an epoch with SSS can be selected; raise "
                             "train.patience or lower the warm-up")

    @classmethod
    def monitor_for(cls, cfg: Config) -> str:
        return MONITORS.get(cfg.vlm.monitor, cls.monitor)

    @classmethod
    def check_samples(cls, cfg: Config, samples: Sequence[Sample]) -> None:
        if cfg.vlm.monitor == "text_dice":
            bare = [s.id for s in samples if s.split == "Val" and not s.labeled]
            if bare or not any(s.split == "Val" for s in samples):
                raise ValueError(f"vlm.monitor=text_dice selects on the Val masks, but {len(bare)} Val images have "
                                 f"none (e.g. {', '.join(bare[:3])}); give them masks or use vlm.monitor=r1")

    def datamodule(self, samples: Sequence[Sample], seed: int) -> PairDataModule:
        return PairDataModule(samples, self.cfg, self.vlm.tokenize, seed=seed, extras=self.text_extras)

    def text_extras(self, texts: list[str]) -> dict[str, Tensor] | None:
        """Per-text rows the items carry (none here; GLsc adds its class prompts)."""
        return None

    def run_info(self) -> dict:
        v = self.cfg.vlm
        return {"text_spec": v.text_encoder, "image_encoder": v.image_encoder, "img_size": self.cfg.data.img_size,
                "in_channels": self.cfg.data.in_channels, "embed_dim": v.embed_dim, "max_len": v.max_len}

    def forward(self, images: Tensor, text_ids: Tensor, text_mask: Tensor):
        return self.vlm(images, text_ids, text_mask)

    # -- losses ------------------------------------------------------------------------------

    def sss_active(self) -> bool:
        """Whether SSS weights the contrastive terms now: ``vlm.sss`` and the epoch is at
        least ``vlm.sss_warmup_epochs`` (module docstring: SSS from the first step collapses)."""
        v = self.cfg.vlm
        return v.sss and self.current_epoch >= v.sss_warmup_epochs

    def _sss(self, e1, mu1, ls1, e2, mu2, ls2) -> Tensor | None:
        """``D_SSS`` (Eq. 1-4) of every pair, or None when SSS is off or warming up (plain cosine)."""
        v = self.cfg.vlm
        if not self.sss_active():
            return None
        return pairwise_sss(e1, mu1, ls1.exp(), e2, mu2, ls2.exp(), a=v.sss_a, b=v.sss_b, lam=v.sss_lam)

    def losses(self, batch: dict) -> dict[str, Tensor]:
        """The loss terms of a training batch and their weighted sum ``"loss"`` (module docstring).

        Keys: ``cmc`` always; ``imc``, ``tg``, ``mask`` when switched on (``mask`` only
        when the batch has a labeled image); ``loss``.
        """
        v = self.cfg.vlm
        m = self.vlm
        out = m(batch["image"], batch["ids"], batch["attn"])
        tau = m.temperature
        same = same_text_positives(batch["group"])
        terms: dict[str, Tensor] = {}
        w = self._sss(out.img_emb, out.img_mu, out.img_logsigma, out.txt_emb, out.txt_mu, out.txt_logsigma)
        terms["cmc"] = info_nce(out.img_emb, out.txt_emb, w, tau, positives=same)  # Eq. 6-8
        total = terms["cmc"]
        if v.imc:  # Eq. 9
            img2, mu2, ls2, _ = m.encode_image(batch["image2"])
            txt2, tmu2, tls2 = m.encode_text(batch["ids2"], batch["attn2"])
            w_ii = self._sss(out.img_emb, out.img_mu, out.img_logsigma, img2, mu2, ls2)
            w_tt = self._sss(out.txt_emb, out.txt_mu, out.txt_logsigma, txt2, tmu2, tls2)
            # Copies of one image (vlm.mask_share repeats the labeled ones) are positives of each other.
            rows = {name: i for i, name in enumerate(dict.fromkeys(batch["id"]))}
            same_image = same_text_positives(torch.tensor([rows[name] for name in batch["id"]], device=out.img_emb.device))
            terms["imc"] = 0.5 * (info_nce(out.img_emb, img2, w_ii, tau, positives=same_image)
                                  + info_nce(out.txt_emb, txt2, w_tt, tau, positives=same))
            total = total + v.imc_weight * terms["imc"]
        has = batch["has_mask"].bool()
        use_mask = v.mask_supervision and bool(has.any())
        if v.tg_loss or use_mask:
            dense = m.pixel_features(out.patch_features)  # v_f of Eq. 10, [B, E, 4h, 4w]
            if v.tg_loss:  # Eq. 11
                terms["tg"] = text_guided_loss(dense, out.txt_emb, tau, positives=same)
                total = total + v.tg_weight * terms["tg"]
            if use_mask:
                logits = m.dense_logits(dense[has], out.txt_emb[has], batch["image"].shape[-2:])
                terms["mask"] = self.mask_loss(logits, batch["mask"][has])
                total = total + v.mask_weight * terms["mask"]
        # Heads a switch leaves out of the loss (Gaussians without SSS, the decoder without
        # L_tg and L_mask) stay in the graph with a zero gradient, for DDP.
        terms["loss"] = total + _zero_touch(m.img_gauss, m.txt_gauss, m.decoder)
        return terms

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        terms = self.losses(batch)
        n = len(batch["index"])
        loss = self.check_finite(terms["loss"])
        self.log("train/loss", loss, batch_size=n, prog_bar=True)
        for key, value in terms.items():
            if key != "loss":
                self.log(f"train/{key}", value, batch_size=n)
        self.log("train/tau", self.vlm.temperature.detach(), batch_size=n)
        return loss

    # -- validation and evaluation -----------------------------------------------------------

    def _embed_batch(self, batch: dict) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """``img_emb [B, E]``, ``txt_emb [B, E]`` (each image's own text) and the text mask's
        ``(dice, iou)`` ``[B_m]`` on the images with a mask (None when none has one;
        GLsc: ``[B_m, K-1]`` per class, NaN where not scored; both reduce through
        :func:`~medtextseg.metrics.mean_of_scored`)."""
        img_emb, _, _, patches = self.vlm.encode_image(batch["image"])
        txt_emb = self.vlm.embed_text(batch["ids"], batch["attn"])
        has = batch["has_mask"].bool()
        scores = None
        if has.any():
            logits = self.vlm.grounding_logits(patches[has], txt_emb[has], batch["image"].shape[-2:])
            scores = dice_iou_per_image(binarize(logits.float(), self.cfg.data.threshold), batch["mask"][has])
        return img_emb, txt_emb, scores

    @staticmethod
    def _retrieval(img: Tensor, txt: Tensor, groups: Tensor) -> dict:
        """Retrieval of images against their distinct texts (rows of equal ``groups`` share one)."""
        uniq, inverse = torch.unique(groups, return_inverse=True)
        # Equal texts have equal embeddings in eval mode: any row of a group stands for it.
        distinct = txt.new_zeros((len(uniq), txt.shape[1])).index_copy_(0, inverse, txt)
        return retrieval_recall(img, distinct, inverse)

    def on_validation_epoch_start(self) -> None:
        self._val = []
        # Dice and IoU totals (metrics.scored_totals) of the masked Val images: [2, 2, C].
        self._val_mask = None

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        img, txt, scores = self._embed_batch(batch)
        self._val.append((img.float(), txt.float(), batch["group"]))
        if scores is not None:
            totals = torch.stack([scored_totals(scores[0]), scored_totals(scores[1])])
            self._val_mask = totals if self._val_mask is None else self._val_mask + totals

    def on_validation_epoch_end(self) -> None:
        if not self._val:
            return
        totals = self._val_mask
        if self.trainer.world_size > 1:
            # Every rank joins the gather, also one whose shard held no mask.
            c = 1 if self.cfg.data.num_classes == 1 else self.cfg.data.num_classes - 1
            totals = self.all_gather(totals if totals is not None else torch.zeros((2, 2, c), device=self.device))
            totals = totals.sum(0)
        values = {}
        if totals is not None and bool(totals[0, 1].sum() > 0):
            values["val/text_dice"] = mean_of_scored(totals[0])
        img, txt, groups = (torch.cat(x) for x in zip(*self._val, strict=True))
        self._val = []
        if self.trainer.world_size > 1:
            # Retrieval ranks among every Val image: gather the ranks' shards (the
            # distributed sampler pads them to one length by repeating a few images).
            img, txt, groups = (self.all_gather(x).flatten(0, 1) for x in (img, txt, groups))
        r = self._retrieval(img, txt, groups)
        values.update({f"val/{key}": r[key] for key in ("r1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5")})
        selected = self.monitor_for(self.cfg)
        if self.cfg.vlm.sss and not self.sss_active() and selected in values:
            # Only epochs trained with SSS may be selected (best.ckpt) or count as progress for
            # early stopping: the warm-up epochs log the monitored figure as -1, its value
            # under <key>_warmup.
            values[f"{selected}_warmup"] = values[selected]
            values[selected] = -1.0
        for key, value in values.items():
            self.log(key, value, prog_bar=key in ("val/r1", "val/text_dice"))

    @torch.inference_mode()
    def evaluate_split(self, samples: Sequence[Sample]) -> dict:
        """Retrieval (both ways, R@1/R@5, with chance levels) and text-mask Dice/IoU on ``samples``.

        Returns ``{"r1", "i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "n_images", "n_texts",
        "chance": {...}, "text_dice", "text_iou", "n_masks"}`` (the last three only when
        some sample has a mask; Dice at ``data.img_size``, threshold ``data.threshold``).
        """
        ds = pair_dataset(samples, self.cfg, self.vlm.tokenize, extras=self.text_extras)
        imgs, txts, groups, dices, ious = [], [], [], [], []
        for batch in make_loader(ds, eval_batch_size(self.cfg.data), shuffle=False):
            batch = {k: v.to(self.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
            img, txt, scores = self._embed_batch(batch)
            if scores is not None:
                dices.append(scores[0].cpu())
                ious.append(scores[1].cpu())
            imgs.append(img.float().cpu())
            txts.append(txt.float().cpu())
            groups.append(batch["group"].cpu())
        out = self._retrieval(torch.cat(imgs), torch.cat(txts), torch.cat(groups))
        if dices:
            d, i = torch.cat(dices), torch.cat(ious)
            out.update(text_dice=mean_of_scored(scored_totals(d)), text_iou=mean_of_scored(scored_totals(i)),
                       n_masks=len(d))
        return out
