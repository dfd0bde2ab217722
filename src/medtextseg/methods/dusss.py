"""DuSSS stage 2: text-guided semi-supervised segmentation (``../shared/papers/dusss.txt``,
"Text-guided SSMIS", Eq. 12-17), on the mean-teacher family.

Student and teacher are the run's network (the preset: U-Net); the teacher is the EMA
of the student, α = min(1 - 1/(step + 1), ``semi.ema_decay``) (Eq. 12, shared with
:class:`~medtextseg.methods.mean_teacher.MeanTeacher`). On the unlabeled images:

- **Text-guided mask** (Eq. 10): ``y^text = σ(t^T v)`` of the frozen pre-trained VLM
  (``medtextseg pretrain --preset dusss-vlm``), each image under *its own* text, one
  sigmoid. It depends only on the image and its text, so it is computed **once**, at
  the start of fitting, in the unaugmented frame (no VLM forward in a training step),
  stored as a probability ``[N, 1, S, S]`` (float16) and handed to the data module as
  a per-image map (``SegDataset.targets``): it goes through the image's random
  rotation like the image (padding = 0 = background).
- **Merged pseudo label** (Eq. 15): ``σ(y^t + y^text_logit)``, where ``y^t`` is the
  teacher's *logit* and ``y^text_logit = logit(y^text)`` the text mask's logit
  ``t^T v`` (recovered from the stored probability as logit(clamp(p, eps, 1 - eps)),
  ``dusss.eps``; this only caps |t^T v| at ≈ 9.2). Summing the logits multiplies the
  two odds: where the teacher and the text agree the label is surer than either, where
  they disagree the surer one wins. (The official code summed two *probabilities*
  that had each been through a sigmoid, and its text mask had been through two.)
- **L_semi** (Eq. 15-17): ``(CE(y^s, merged) + CE(y^s, y^text)) / 2``, both binary
  cross-entropies of the student's logits against soft targets.
- **L_sup** (Eq. 14): cross-entropy on the labeled images (the preset sets
  ``loss.dice = 0``, ``loss.ce = 1``).
- **L_tg** (Eq. 11) is *not* in this step, although the paper describes it beside
  the text-guided mask of step 2: it trains the grounding decoder f_g, and training
  f_g here would make the text mask change every step (a VLM forward per batch, and
  a mask that no longer depends only on the image and its text). We train f_g with
  L_tg in pre-training (:mod:`medtextseg.pretrain.dusss`) and keep the VLM frozen
  here, so the masks are computed once. The paper's Table 2 rows with L_tg are the
  ``vlm.tg_loss`` switch of the VLM.

L = L_sup + w · L_semi, with w = ``semi.unsup_weight`` ramped in over
``semi.rampup_epochs`` (the family's schedule; the paper gives no weight or ramp:
the preset uses w = 1, i.e. Eq. 17's sum, reached after the ramp, because early
teacher logits are those of a random network). Both networks see the family's views
(each its own Gaussian input noise on the same augmented image), which the paper
does not mention and the Mean Teacher baseline has.

With ``dusss.text_mask = false`` every hook is Mean Teacher's (MSE consistency on
probabilities): the first row of the paper's Table 2, with no VLM needed.

The segmentation run keeps a copy of the VLM (``<run>/vlm/``, written by the engine
from ``train --vlm RUN``), so a resume recomputes the same text masks and ``predict``
(which uses the student alone) never needs the VLM run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medtextseg.config import Config
from medtextseg.methods.mean_teacher import MeanTeacher
from medtextseg.metrics import dice_iou_per_image

log = logging.getLogger(__name__)

TEXT_MASK = "text_mask"


def merged_pseudo_label(teacher_logits: torch.Tensor, text_mask: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 15: ``σ(y^t + logit(y^text))``, the teacher's logits ``[B, 1, H, W]`` plus the
    text mask's logits (from its probabilities ``[B, 1, H, W]``, clamped to
    ``[eps, 1 - eps]``). Returns probabilities ``[B, 1, H, W]`` float32."""
    return torch.sigmoid(teacher_logits.float() + torch.logit(text_mask.float(), eps=eps))


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_ce of Eq. 15-16 averaged over pixels and images: binary cross-entropy of logits
    ``[B, 1, H, W]`` against soft targets in [0, 1] of the same shape."""
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


class TextMasks:
    """``targets(i)`` of the unlabeled dataset: ``{"text_mask": [1, S, S] float32}``.

    ``probs``: ``[N, 1, S, S]`` float16 text-mask probabilities (0.4 MB per 224² image
    at float32, 0.1 MB here; a text mask is never accumulated, so float16 loses nothing
    that matters)."""

    def __init__(self, probs: torch.Tensor):
        self.probs = probs

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        return {TEXT_MASK: self.probs[i].float()}


@torch.inference_mode()
def compute_text_masks(vlm, images: np.ndarray | Sequence[np.ndarray], texts: Sequence[str], max_len: int,
                       batch_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The text-guided masks (Eq. 10) of N images under their own texts, once.

    Args:
        vlm: a :class:`~medtextseg.nets.vlm.DualEncoderVLM` (eval mode).
        images: ``[N, C, S, S]`` uint8 at the VLM's input size.
        texts: the N texts, row ``i`` is image ``i``'s.
        max_len: the VLM's token length (``vlm.max_len`` of its run).
        batch_size: images per forward pass.

    Returns:
        ``[N, 1, S, S]`` float16 probabilities in (0, 1), on the CPU.
    """
    ids, attn = vlm.tokenize(list(texts), max_len)
    out = []
    for start in range(0, len(texts), batch_size):
        stop = start + batch_size
        x = torch.as_tensor(np.asarray(images[start:stop])).to(device).float().div_(255.0)
        out.append(vlm.mask_probs(x, ids[start:stop].to(device), attn[start:stop].to(device)).half().cpu())
    if not out:
        return torch.zeros((0, 1, *np.asarray(images).shape[-2:]), dtype=torch.float16)
    return torch.cat(out)


class DuSSS(MeanTeacher, method="dusss"):
    """DuSSS text-guided Mean Teacher (module docstring).

    Batch: ``{"labeled": {image, mask, text}, "unlabeled": {image, text, text_mask}}``,
    ``text_mask`` ``[B_u, 1, H, W]`` float probabilities, augmented like ``image``.
    Logged: ``train/semi_merged``, ``train/semi_text`` (text mask on) or
    ``train/consistency`` (off); once, ``dusss/text_mask_dice`` (against the withheld
    masks, when the split kept them) and ``dusss/text_mask_seconds``.
    """

    unlabeled_keys = (TEXT_MASK,)
    # The text masks live at data.img_size in the resized frame.
    supports_patches = False
    supports_multiclass = False

    def __init__(self, config: dict, text_state: dict | None = None, text_dim: int = 256):
        super().__init__(config, text_state, text_dim)
        self.use_text_mask = self.cfg.dusss.text_mask
        self.text_masks: TextMasks | None = None

    @classmethod
    def needs_pretrained(cls, cfg: Config) -> str:
        return "dusss" if cfg.dusss.text_mask else ""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if not 0 < cfg.dusss.eps < 0.5:
            raise ValueError(f"dusss.eps must be in (0, 0.5), got {cfg.dusss.eps}")

    @classmethod
    def check_pretrained(cls, cfg: Config, pretrained: Config) -> None:
        """The text mask is computed at the segmentation input size from the same images:
        the VLM must take ``data.img_size`` / ``data.in_channels``, and it must be the
        VLM this config names (``vlm.text_encoder``, ``vlm.max_len``)."""
        d, p = cfg.data, pretrained.data
        if (p.size, p.in_channels) != (d.size, d.in_channels):
            raise ValueError(
                f"its input is {p.size_label} with {p.in_channels} channels, this run's is {d.size_label} with "
                f"{d.in_channels}: train with --set data.img_size={p.img_size} data.in_channels={p.in_channels}, "
                f"or pre-train a VLM with --set data.img_size={d.img_size} data.in_channels={d.in_channels}")
        for key in ("text_encoder", "max_len"):
            mine, theirs = getattr(cfg.vlm, key), getattr(pretrained.vlm, key)
            if mine != theirs:
                raise ValueError(f"its text encoder has vlm.{key}={theirs!r}, this config expects {mine!r}: "
                                 f"train with --set vlm.{key}={theirs}, or pre-train with --set vlm.{key}={mine}")

    # -- the text masks, once per fit (after the model is on its device, before the loaders) --
    def on_fit_start(self) -> None:
        if not self.use_text_mask or self.text_masks is not None:
            return
        from medtextseg.pretrain.base import PRETRAINED_DIR, load_pretrained

        unl = self.trainer.datamodule.datasets.get("Unlabeled")
        if unl is None or unl.num_images == 0:
            log.warning("no unlabeled training images: DuSSS trains on the labeled images only")
            return
        start = time.perf_counter()
        module, _ = load_pretrained(Path(self.trainer.default_root_dir) / PRETRAINED_DIR, self.device)
        probs = compute_text_masks(module.vlm, unl.images, [s.text for s in unl.samples], module.cfg.vlm.max_len,
                                   self.cfg.data.eval_batch_size, self.device)
        del module
        if self.cfg.data.num_workers > 0:
            probs.share_memory_()
        self.text_masks = TextMasks(probs)
        unl.targets = self.text_masks
        seconds = time.perf_counter() - start
        self.pending_stats["dusss/text_mask_seconds"] = seconds
        if unl.hidden_masks is not None:
            # Diagnostic only: how good the text masks are on the images whose masks were withheld.
            hard = (probs.float() > self.cfg.data.threshold).long()
            self.pending_stats["dusss/text_mask_dice"] = float(
                dice_iou_per_image(hard, torch.from_numpy(unl.hidden_masks).long(), 1)[0].mean())
        log.info("text-guided masks of %d unlabeled images in %.1f s%s", len(probs), seconds,
                 f" (Dice {self.pending_stats['dusss/text_mask_dice']:.3f} against the withheld masks)"
                 if "dusss/text_mask_dice" in self.pending_stats else "")

    # -- hooks -------------------------------------------------------------------------------
    def pseudo_target(self, teacher_logits: torch.Tensor, unl: dict) -> torch.Tensor:
        """Eq. 15's merged pseudo label (Mean Teacher's target without the text mask)."""
        if not self.use_text_mask or TEXT_MASK not in unl:
            return super().pseudo_target(teacher_logits, unl)
        return merged_pseudo_label(teacher_logits, unl[TEXT_MASK], self.cfg.dusss.eps)

    def unsup_loss(self, student_logits: torch.Tensor, target: torch.Tensor,
                   unl: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_semi = (L_semi^merged + L_semi^text) / 2 (Eq. 15-17)."""
        if not self.use_text_mask or TEXT_MASK not in unl:
            return super().unsup_loss(student_logits, target, unl)
        merged = soft_ce(student_logits, target)
        text = soft_ce(student_logits, unl[TEXT_MASK])
        return (merged + text) / 2, {"train/semi_merged": merged, "train/semi_text": text}


__all__ = ["DuSSS", "TextMasks", "compute_text_masks", "merged_pseudo_label", "soft_ce"]
