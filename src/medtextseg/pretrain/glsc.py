"""PromptSSL stage 1: GLsc, the global-local semantic constrained VLM (``../shared/papers/promptssl.txt``,
"GLsc for Robust Cross-Modal Alignment", Eq. 1-7), and the prompt-guided mask (Eq. 8).

The network is DuSSS's :class:`~medtextseg.nets.vlm.DualEncoderVLM` (here with a
1-channel ViT: ``data.in_channels = 1``), and this module subclasses
:class:`~medtextseg.pretrain.dusss.DuSSSPretrain` for the data, validation (retrieval)
and evaluation. Every Train image with its text trains it; masks only where kept:

    L = L_GS + w_ls L_LS + w_mask L_mask

- **L_GS** (Eq. 3-7, ``vlm.sss``): symmetric InfoNCE of the [CLS] embeddings whose
  every logit is the uncertainty cosine ``sim^ = 1 - (1 - sim) D^_u`` with ``D^_u =
  exp(-lambda D_u / D_s)``, ``D_u = a W2 + b`` between the Gaussian [CLS] heads: the
  same functions as DuSSS's SSS (:func:`~medtextseg.pretrain.similarity.pairwise_sss`,
  shared, not copied), the same constants (``vlm.sss_a/b/lam``) and the same plain-InfoNCE
  warm-up (``vlm.sss_warmup_epochs``). ``vlm.sss=false`` leaves plain InfoNCE (the
  ablation without L_GS). A choice: the image-to-text and text-to-image directions are
  averaged, as DuSSS's Eq. 8 does, where Eq. 7 adds them; the sum would double L_GS
  against L_LS (the weight ``vlm.local_weight`` is read against the average).
- **L_LS** (Eq. 1-2, ``vlm.local_constraint``): :func:`local_semantic_loss`.
- **L_mask** (``vlm.mask_supervision``; not in the paper, as for DuSSS): nothing in
  Eq. 1-7 trains the decoder f_d that Eq. 8 reads, and PromptSSL's L_region / L_feat
  (stage 2) only align pooled regions with texts; so the prompt-guided mask
  (:func:`prompt_mask`) is trained with Dice + CE over the K classes on the labeled
  Train masks of the same seeded split the segmentation run uses (the engine checks
  that the VLM saw no mask the segmentation run withholds).

Prompts (:mod:`medtextseg.text.prompts`): one per class, its name with the state the
slice's text gives it ("L3 link"); all possible prompts are tokenised once at build.

Validation and ``evaluate``: retrieval R@1/R@5 (as DuSSS), and ``text_dice`` /
``text_iou`` = the prompt mask's mDice / mIoU (argmax of Eq. 8) on the images that have a
mask, by the headline's protocol (:func:`~medtextseg.metrics.mean_of_scored`: per class
over the images that score it, then the mean over the classes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from medtextseg.config import TEMPERATURE_INIT, Config
from medtextseg.data.sample import Sample
from medtextseg.losses import DiceCE
from medtextseg.metrics import dice_iou_per_class
from medtextseg.pretrain.dusss import DuSSSPretrain, _zero_touch
from medtextseg.pretrain.similarity import DEFAULT_EPS, info_nce, same_text_positives
from medtextseg.text.prompts import ClassPrompts, check_prompt_texts

#: The local weights 1/sigma_k^2 are used relative to their batch mean and clipped to
#: [1/LS_MAX_WEIGHT, LS_MAX_WEIGHT], so one near-constant patch cannot dominate the batch.
LS_MAX_WEIGHT = 10.0
#: Token length of the class prompts ("L4/L5 exist" is 7 WordPiece tokens with [CLS]/[SEP]).
PROMPT_MAX_LEN = 12

__all__ = ["LS_MAX_WEIGHT", "GLscPretrain", "local_semantic_loss", "prompt_mask", "prompt_scores"]


def local_semantic_loss(patches: Tensor, txt: Tensor, temperature: float | Tensor = TEMPERATURE_INIT, *,
                        positives: Tensor | None = None, max_weight: float = LS_MAX_WEIGHT,
                        eps: float = DEFAULT_EPS) -> Tensor:
    """L_LS, PromptSSL Eq. 1-2: patch-text InfoNCE with a per-patch uncertainty weight.

    For patch k of image i, ``s_ikj = cos(x_{I_i,k}, x_{T_j})`` against every text j of
    the batch; ``sigma_ik^2`` is the variance of ``s_ikj`` over the *mismatched* texts
    (j not a positive of i; Eq. 1), and the loss is
    ``-log softmax_j(w_ik s_ikj / tau)`` at the positives, averaged over patches and
    images (Eq. 2), with ``w_ik`` the precision 1/sigma_ik^2.

    Choices (the paper is silent): ``w`` is the precision *relative to its batch mean*
    (``mean(sigma^2) / sigma_ik^2``, clipped to [1/max_weight, max_weight]), so equal
    variances give w = 1 and L_LS is then exactly plain patch-text InfoNCE at ``tau``;
    the weight is detached (it is an uncertainty estimate, and its gradient would reward
    spreading the negatives' similarities instead of aligning); an image without a
    mismatched text in the batch gets w = 1; same-text images are positives, as in DuSSS.

    Args:
        patches: ``[B, K, E]`` L2-normalised patch embeddings (K patches per image).
        txt: ``[B, E]`` L2-normalised text embeddings; row i is image i's text.
        temperature: tau.
        positives: optional ``[B, B]`` bool, pairs that share a text; the diagonal is positive.
        max_weight: the clip of the relative weight.

    Returns:
        Scalar loss.
    """
    if patches.ndim != 3 or txt.ndim != 2 or patches.shape[0] != txt.shape[0] or patches.shape[2] != txt.shape[1]:
        raise ValueError(f"expected patches [B, K, E] and txt [B, E], got {list(patches.shape)} and {list(txt.shape)}")
    b = patches.shape[0]
    pos = torch.eye(b, dtype=torch.bool, device=patches.device)
    if positives is not None:
        pos = pos | positives.to(device=patches.device, dtype=torch.bool)
    sim = torch.einsum("bke,je->bkj", F.normalize(patches, dim=-1), F.normalize(txt, dim=-1))  # [B, K, B]
    with torch.no_grad():
        neg = (~pos).float().unsqueeze(1)  # [B, 1, B]
        n_neg = neg.sum(-1, keepdim=True)  # [B, 1, 1]
        mean = (sim * neg).sum(-1, keepdim=True) / n_neg.clamp_min(1)
        var = (((sim - mean) ** 2) * neg).sum(-1) / n_neg[:, :, 0].clamp_min(1)  # [B, K]
        has = n_neg[:, 0, 0] > 0  # [B]
        w = torch.ones_like(var)
        if has.any():
            # Equal variances (zero included: one negative each) give w = 1 exactly.
            rel = var[has].mean().clamp_min(eps) / var.clamp_min(eps)
            w = torch.where(has[:, None], rel.clamp(1.0 / max_weight, max_weight), w)
    logits = w.unsqueeze(-1) * sim / temperature
    masked = logits.masked_fill(~pos.unsqueeze(1), float("-inf"))
    return (torch.logsumexp(logits, -1) - torch.logsumexp(masked, -1)).mean()


def prompt_scores(img_emb: Tensor, prompt_emb: Tensor, absent: Tensor | None = None) -> Tensor:
    """The similarity scores ``s_c`` of Eq. 8: ``(1 + cos(image [CLS], prompt c)) / 2`` in
    [0, 1], ``[B, E]`` x ``[B, C, E]`` -> ``[B, C]``; 0 where ``absent`` ``[B, C]`` is True
    (the text says the class is not in the image)."""
    s = (1.0 + torch.einsum("be,bce->bc", F.normalize(img_emb, dim=-1), F.normalize(prompt_emb, dim=-1))) / 2
    return s if absent is None else s.masked_fill(absent, 0.0)


def prompt_mask(dense: Tensor, prompt_emb: Tensor, scores: Tensor, size: Sequence[int] | None = None,
                eps: float = DEFAULT_EPS) -> Tensor:
    """The prompt-guided mask, PromptSSL Eq. 8.

    ``y_c = softmax_c(t_c^T f_d(v))`` per pixel, then ``stack(y_c s_c)``: each class map
    weighted by its score and renormalised over the classes (a choice: the paper's
    "stack according to the similarity score" leaves the normalisation open; this keeps
    a distribution, so the mask can be merged with the teacher as a probability).

    Args:
        dense: ``[B, E, h, w]`` decoder features ``f_d(v^patch)``.
        prompt_emb: ``[B, C, E]`` the image's C class-prompt embeddings.
        scores: ``[B, C]`` s_c in [0, 1] (:func:`prompt_scores`).
        size: ``(H, W)``: the per-class logits are upsampled bilinearly before the softmax.

    Returns:
        ``[B, C, H, W]`` probabilities summing to 1 over the classes.
    """
    if dense.ndim != 4 or prompt_emb.ndim != 3 or dense.shape[:2] != (prompt_emb.shape[0], prompt_emb.shape[2]):
        raise ValueError(f"expected dense [B, E, h, w] and prompt_emb [B, C, E], got {list(dense.shape)} "
                         f"and {list(prompt_emb.shape)}")
    logits = torch.einsum("bce,behw->bchw", prompt_emb, dense)
    if size is not None:
        logits = F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)
    y = torch.softmax(logits.float(), dim=1) * scores.float()[:, :, None, None]
    return y / y.sum(1, keepdim=True).clamp_min(eps)


class GLscPretrain(DuSSSPretrain, pretrain="glsc"):
    """GLsc pre-training (module docstring). Batches are :class:`~medtextseg.pretrain.dusss.PairDataModule`'s
    with ``prompts [B, K]`` (prompt-table indices) and ``absent [B, K]`` per item.

    Logged: ``train/loss``, ``train/gs``, ``train/ls``, ``train/mask`` (those on),
    ``train/tau``; ``val/r1``, ``val/text_dice`` (the prompt mask's mDice).
    """

    def __init__(self, config: dict):
        super().__init__(config)  # the VLM, the Val buffers
        cfg = self.cfg
        self.prompts = ClassPrompts.of(cfg)
        # Prompts are a few words: a short token length, not the descriptions' vlm.max_len.
        ids, attn = self.vlm.tokenize(self.prompts.texts, min(PROMPT_MAX_LEN, cfg.vlm.max_len))
        # Fixed token rows of every prompt, moved with the module (not saved: rebuilt from the config).
        self.register_buffer("prompt_ids", ids, persistent=False)
        self.register_buffer("prompt_attn", attn, persistent=False)
        self.mask_loss = DiceCE(cfg.data.num_classes, cfg.loss.dice, cfg.loss.ce)

    label = "GLsc"

    @classmethod
    def check_classes(cls, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError("GLsc prompts one text per class: set data.num_classes to K >= 2 "
                             "(binary data: the dusss-vlm preset)")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        v = cfg.vlm
        if v.local_weight < 0 or v.mask_weight < 0:
            raise ValueError("vlm.local_weight and vlm.mask_weight must be >= 0")

    @classmethod
    def check_samples(cls, cfg: Config, samples: Sequence[Sample]) -> None:
        super().check_samples(cfg, samples)
        check_prompt_texts(ClassPrompts.of(cfg), samples)

    def text_extras(self, texts: list[str]) -> dict[str, Tensor]:
        return {"prompts": self.prompts.rows(texts), "absent": self.prompts.absent(texts)}

    def run_info(self) -> dict:
        return {**super().run_info(), "classes": self.prompts.class_names, "prompts": self.cfg.vlm.prompts}

    # -- prompts -----------------------------------------------------------------------------
    def prompt_embeddings(self, rows: Tensor) -> Tensor:
        """``[B, K]`` prompt-table indices -> ``[B, K, E]`` embeddings; each distinct prompt
        of the batch goes through the text encoder once."""
        uniq, inverse = torch.unique(rows, return_inverse=True)
        emb = self.vlm.embed_text(self.prompt_ids[uniq], self.prompt_attn[uniq])
        return emb[inverse]

    def prompt_probs(self, img_emb: Tensor, patches: Tensor, rows: Tensor, absent: Tensor | None,
                     size: Sequence[int]) -> Tensor:
        """Eq. 8 for a batch: ``[B, K, H, W]`` probabilities (``patches``: the VLM's
        ``[B, hidden, h, w]`` patch features)."""
        emb = self.prompt_embeddings(rows)
        return prompt_mask(self.vlm.pixel_features(patches), emb, prompt_scores(img_emb, emb, absent), size)

    def log_prompt_mask(self, probs: Tensor) -> Tensor:
        """Probabilities -> logits whose softmax they are: log(clamp(p, eps))."""
        return probs.clamp_min(DEFAULT_EPS).log()

    # -- losses ------------------------------------------------------------------------------
    def losses(self, batch: dict) -> dict[str, Tensor]:
        v, m = self.cfg.vlm, self.vlm
        out = m(batch["image"], batch["ids"], batch["attn"])
        tau = m.temperature
        same = same_text_positives(batch["group"])
        w = self._sss(out.img_emb, out.img_mu, out.img_logsigma, out.txt_emb, out.txt_mu, out.txt_logsigma)
        terms = {"gs": info_nce(out.img_emb, out.txt_emb, w, tau, positives=same)}  # Eq. 3-7
        total = terms["gs"]
        if v.local_constraint:  # Eq. 1-2
            patches = F.normalize(m.img_proj(out.patch_features.flatten(2).transpose(1, 2)), dim=-1)
            terms["ls"] = local_semantic_loss(patches, out.txt_emb, tau, positives=same)
            total = total + v.local_weight * terms["ls"]
        has = batch["has_mask"].bool()
        if v.mask_supervision and bool(has.any()):
            probs = self.prompt_probs(out.img_emb[has], out.patch_features[has], batch["prompts"][has],
                                      batch["absent"][has], batch["image"].shape[-2:])
            terms["mask"] = self.mask_loss(self.log_prompt_mask(probs), batch["mask"][has])
            total = total + v.mask_weight * terms["mask"]
        # The Gaussian heads (without L_GS's SSS) and the decoder (without masks) stay in the graph, for DDP.
        terms["loss"] = total + _zero_touch(m.img_gauss, m.txt_gauss, m.decoder)
        return terms

    # -- validation: the prompt mask's mDice ------------------------------------------------
    def _embed_batch(self, batch: dict):
        img_emb, _, _, patches = self.vlm.encode_image(batch["image"])
        txt_emb = self.vlm.embed_text(batch["ids"], batch["attn"])
        has = batch["has_mask"].bool()
        scores = None
        if has.any():
            probs = self.prompt_probs(img_emb[has], patches[has], batch["prompts"][has], batch["absent"][has],
                                      batch["image"].shape[-2:])
            scores = dice_iou_per_class(probs.argmax(1, keepdim=True), batch["mask"][has], self.cfg.data.num_classes)
        return img_emb, txt_emb, scores
