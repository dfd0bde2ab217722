"""PromptSSL stage 2: prompt-guided semi-supervised segmentation (``../shared/papers/promptssl.txt``,
"PromptSSL for Pseudo Label Quality Improvement", Eq. 8-15), on the mean-teacher family.

Student and teacher are the run's network (the preset: MONAI's residual U-Net, 32 base
maps, group norm 8); the teacher is the EMA of the student (``semi.ema_decay`` 0.99,
shared with :class:`~medtextseg.methods.mean_teacher.MeanTeacher`). The pre-trained GLsc
VLM (``medtextseg pretrain --preset glsc-vlm``, copied into ``<run>/vlm/``) gives, for
every image of a step, the **prompt-guided mask** ``y^text`` (Eq. 8,
:func:`~medtextseg.pretrain.glsc.prompt_mask`): per-class maps from the dot product of
the decoder's dense features with each class prompt ("L3 link", the class name with the
state the slice's text gives it; :mod:`medtextseg.text.prompts`), softmax over classes,
weighted by the scores s_c and renormalised.

Its image and text encoders are frozen: the prompt and text embeddings are computed
**once** at set-up; the decoder f_d is trained here (that is what L_region and L_feat
are for), so the prompt mask is recomputed in each step from the frozen patch features.

- **Merged pseudo label** (Eq. 13): ``softmax(y^t + log y^text)``, the teacher's logits
  plus the prompt mask as logits (log of its probabilities, clamped at
  ``promptssl.eps``): odds multiply, as in DuSSS.
- **L_semi** (Eq. 13-15): ``(CE(y^s, merged) + CE(y^s, y^text)) / 2``, cross-entropies
  of the student's logits against the soft targets (detached).
- **L_region** (Eq. 9, ``promptssl.region``): the region image ``I · (1 - y^text_0)``
  (the image under the prompt mask's foreground) through the frozen image encoder gives
  V_I; symmetric InfoNCE of V_I against the texts' embeddings T_f (same-text positives).
- **L_feat** (Eq. 10, ``promptssl.feat``): V_F, the decoder features pooled under the
  foreground, against T_f, the same way: a mask that also covers structures the text
  does not describe makes V_F look like other slices' texts. For both, the two directions
  are averaged (as L_GS in stage 1), where Eq. 9-10 add them: ``promptssl.region_weight``
  and ``feat_weight`` are read against the average (the paper's sum = twice the weight).
- **L_mask** (``promptssl.mask_supervision``, our addition, as in stage 1): Dice + CE of
  the prompt mask on the labeled images, so the decoder keeps segmenting while
  L_region / L_feat move it.
- L = L_sup + w · L_semi + lambda_i L_region + lambda_f L_feat (+ L_mask), w the family's
  ramped ``semi.unsup_weight`` (1 after the ramp: the paper's plain sum).

Where the paper is silent: L_region / L_feat and L_mask see the labeled and the unlabeled
images of the step; the prompt mask is computed on the augmented image the student sees
(before the family's Gaussian noise); ``promptssl.absent_from_text`` gives s_c = 0 to a
class the text calls ``none`` (the text's strongest fact, what the issue asks the text to
carry). ``promptssl.prompt_mask=false`` is Mean Teacher's step exactly (no VLM needed):
the ablation's baseline.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from medtextseg.config import Config
from medtextseg.losses import DiceCE
from medtextseg.methods.mean_teacher import MeanTeacher
from medtextseg.metrics import dice_iou_per_class, mean_of_scored, scored_totals
from medtextseg.pretrain.similarity import info_nce, same_text_positives

log = logging.getLogger(__name__)

VLM_PREFIX = "glsc."
# The part of the VLM that stage 2 trains (L_region, L_feat, L_mask reach only f_d).
VLM_TRAINED_PREFIX = VLM_PREFIX + "vlm.decoder."


def merged_prompt_label(teacher_logits: torch.Tensor, prompt_probs: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 13: ``softmax(y^t + log y^text)`` of teacher logits ``[B, K, H, W]`` and the
    prompt mask's probabilities ``[B, K, H, W]`` (clamped at ``eps``); float32 probabilities."""
    return torch.softmax(teacher_logits.float() + prompt_probs.float().clamp_min(eps).log(), dim=1)


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """ℓ_ce of Eq. 13-14 averaged over pixels and images: ``-sum_c p_c log softmax(logits)_c``
    of logits ``[B, K, H, W]`` against soft targets ``[B, K, H, W]`` summing to 1 over K."""
    return -(target.float() * F.log_softmax(logits.float(), dim=1)).sum(1).mean()


class PromptSSL(MeanTeacher, method="promptssl"):
    """PromptSSL prompt-guided Mean Teacher (module docstring).

    Batch: ``{"labeled": {image, mask, text, index}, "unlabeled": {image, text, index}}``.
    Logged: ``train/semi_merged``, ``train/semi_text``, ``train/region``, ``train/feat``,
    ``train/prompt_sup`` (those on); ``promptssl/prompt_mask_dice`` (the prompt mask's mDice
    against the withheld masks, when the split kept them) at the first epoch (the
    pre-trained decoder) and the last (after stage 2 trained it).
    """

    # The prompt masks and the VLM's patch grid live at data.img_size.
    supports_patches = False

    def __init__(self, config: dict, text_state: dict | None = None, text_dim: int = 256):
        super().__init__(config, text_state, text_dim)
        self.use_prompt = self.cfg.promptssl.prompt_mask
        self.glsc = None
        self.prompt_sup = DiceCE(self.cfg.data.num_classes, self.cfg.loss.dice, self.cfg.loss.ce)
        self._tables: dict[str, dict[str, torch.Tensor]] = {}
        self._reg: torch.Tensor | None = None

    @classmethod
    def needs_pretrained(cls, cfg: Config) -> str:
        return "glsc" if cfg.promptssl.prompt_mask else ""

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        p = cfg.promptssl
        if p.prompt_mask and cfg.data.num_classes < 2:
            raise ValueError("PromptSSL prompts one text per class: set data.num_classes to K >= 2, "
                             "or promptssl.prompt_mask=false (Mean Teacher)")
        if p.region_weight < 0 or p.feat_weight < 0:
            raise ValueError("promptssl.region_weight and promptssl.feat_weight must be >= 0")
        if not 0 < p.eps < 0.5:
            raise ValueError(f"promptssl.eps must be in (0, 0.5), got {p.eps}")

    @classmethod
    def check_pretrained(cls, cfg: Config, pretrained: Config) -> None:
        """The prompt mask is computed at the segmentation input size on the same classes:
        the VLM must take ``data.img_size`` / ``data.in_channels`` and know ``data.num_classes``
        classes (the same names when both runs name them)."""
        d, p = cfg.data, pretrained.data
        if (p.size, p.in_channels) != (d.size, d.in_channels):
            raise ValueError(
                f"its input is {p.size_label} with {p.in_channels} channels, this run's is {d.size_label} with "
                f"{d.in_channels}: train with --set data.img_size={list(p.size)} data.in_channels={p.in_channels}, "
                f"or pre-train with --set data.img_size={list(d.size)} data.in_channels={d.in_channels}")
        if p.num_classes != d.num_classes or (p.classes and d.classes and p.classes != d.classes):
            raise ValueError(f"it prompts {p.num_classes} classes ({', '.join(p.classes) or 'unnamed'}), this run "
                             f"trains {d.num_classes} ({', '.join(d.classes) or 'unnamed'}): pre-train on the same "
                             "classes")

    @classmethod
    def check_pretrained_texts(cls, pretrained: Config, samples) -> None:
        """Every text must be one the VLM's class prompts read (``vlm.prompts=spine``: the
        MRSpineSeg grammar), or set-up would fail after the run directory exists."""
        from medtextseg.text.prompts import ClassPrompts, check_prompt_texts

        check_prompt_texts(ClassPrompts.of(pretrained), samples)

    # -- set-up: the frozen VLM and the per-image tables, once per fit -----------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or not self.use_prompt or self.glsc is not None:
            return
        from medtextseg.pretrain.base import PRETRAINED_DIR, load_pretrained

        module, _ = load_pretrained(Path(self.trainer.default_root_dir) / PRETRAINED_DIR)
        module.requires_grad_(False)
        # f_d is what L_region / L_feat (and L_mask) train; the encoders stay frozen.
        module.vlm.decoder.requires_grad_(True)
        module.eval()
        self.glsc = module
        dm = self.trainer.datamodule
        with torch.inference_mode():
            prompt_emb = module.vlm.embed_text(module.prompt_ids, module.prompt_attn)
        self.register_buffer("prompt_emb", prompt_emb.clone(), persistent=False)
        texts = {name: [s.text for s in ds.samples] for name in ("Train", "Unlabeled")
                 if (ds := dm.datasets.get(name)) is not None}
        # One id per distinct text across both tables: equal texts are positives in L_region / L_feat.
        text_ids = {t: i for i, t in enumerate(sorted({t for ts in texts.values() for t in ts}))}
        for name, ts in texts.items():
            self._tables[name] = self._text_table(ts, text_ids)

    @torch.no_grad()
    def _text_table(self, texts: list[str], text_ids: dict[str, int]) -> dict[str, torch.Tensor]:
        """Per image of a dataset: its text's embedding ``txt [N, E]`` (T_f), the rows of its
        class prompts ``rows [N, K]``, which classes its text calls absent ``absent [N, K]``
        and its text's id ``text_id [N]`` (``text_ids``): each distinct text encoded once."""
        vlm, prompts = self.glsc.vlm, self.glsc.prompts
        distinct = sorted(set(texts))
        row = {t: i for i, t in enumerate(distinct)}
        group = torch.tensor([row[t] for t in texts], dtype=torch.long)
        emb = []
        for start in range(0, len(distinct), 64):
            ids, attn = vlm.tokenize(distinct[start:start + 64], self.glsc.cfg.vlm.max_len)
            emb.append(vlm.embed_text(ids, attn))
        txt = torch.cat(emb) if emb else torch.zeros((0, vlm.embed_dim))
        absent = prompts.absent(distinct) if self.cfg.promptssl.absent_from_text else \
            torch.zeros((len(distinct), prompts.num_classes), dtype=torch.bool)
        return {"txt": txt[group], "rows": prompts.rows(distinct)[group], "absent": absent[group],
                "text_id": torch.tensor([text_ids[t] for t in texts], dtype=torch.long)}

    def on_fit_start(self) -> None:
        if self.glsc is None:
            return
        for name, table in self._tables.items():
            self._tables[name] = {k: v.to(self.device) for k, v in table.items()}
        self._log_prompt_mask_dice()

    def _log_prompt_mask_dice(self) -> None:
        """Diagnostic only: the prompt mask's mDice against the withheld masks of the
        unlabeled images (when the split kept them), into ``promptssl/prompt_mask_dice``."""
        unl = self.trainer.datamodule.datasets.get("Unlabeled")
        if unl is None or unl.hidden_masks is None or not unl.num_images:
            return
        plain = unl.plain()
        dices = []
        with torch.inference_mode():
            for start in range(0, unl.num_images, self.cfg.data.eval_batch_size):
                idx = torch.arange(start, min(start + self.cfg.data.eval_batch_size, unl.num_images))
                images = torch.stack([plain[int(i)]["image"] for i in idx]).to(self.device)
                probs = self.prompt_probs(images, "Unlabeled", idx.to(self.device))[0]
                gt = torch.from_numpy(unl.hidden_masks[idx.numpy()]).long().to(self.device)
                dices.append(dice_iou_per_class(probs.argmax(1, keepdim=True), gt, self.cfg.data.num_classes)[0])
        # The headline's protocol (per class over the images that score it, then the mean).
        self.pending_stats["promptssl/prompt_mask_dice"] = mean_of_scored(scored_totals(torch.cat(dices)))
        log.info("prompt-guided masks of %d unlabeled images: mDice %.3f against the withheld masks",
                 unl.num_images, self.pending_stats["promptssl/prompt_mask_dice"])

    def on_train_epoch_start(self) -> None:
        if self.glsc is not None and self.current_epoch > 0 and self.current_epoch == self.trainer.max_epochs - 1:
            # Again before the last epoch: stage 2 trains the decoder f_d (L_region, L_feat, L_mask).
            self.glsc.eval()
            self._log_prompt_mask_dice()
        super().on_train_epoch_start()
        if self.glsc is not None:
            self.glsc.eval()  # frozen encoders: no dropout; Lightning put every child in train mode

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep, of the VLM, only the decoder f_d that stage 2 trains: its frozen encoders are
        in ``<run>/vlm/`` already (at the paper tier ~110 M parameters, ~0.45 GB per
        checkpoint). Runs after the callbacks' hooks, so the weight average's
        ``current_model_state`` is slimmed too."""
        for key in ("state_dict", "current_model_state"):
            state = checkpoint.get(key)
            if state is not None:
                for name in [k for k in state if k.startswith(VLM_PREFIX) and not k.startswith(VLM_TRAINED_PREFIX)]:
                    del state[name]

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A run loaded for evaluate / predict has no VLM (the student alone predicts): drop
        its decoder's weights. A resumed fit (VLM set up first, from ``<run>/vlm/``) gets the
        frozen weights that :meth:`on_save_checkpoint` left out back from that copy."""
        for key in ("state_dict", "current_model_state"):
            state = checkpoint.get(key)
            if state is None:
                continue
            if self.glsc is None:
                for name in [k for k in state if k.startswith(VLM_PREFIX)]:
                    del state[name]
            else:
                for name, value in self.glsc.state_dict(prefix=VLM_PREFIX).items():
                    state.setdefault(name, value)

    # -- the prompt mask ---------------------------------------------------------------------
    def prompt_probs(self, images: torch.Tensor, dataset: str, index: torch.Tensor):
        """Eq. 8 for images ``[B, C, H, W]`` of ``dataset`` (rows ``index`` of its table):
        ``(probs [B, K, H, W], fg_low [B, 1, h, w], dense [B, E, h, w], txt [B, E])``;
        the decoder's outputs carry gradients, the encoders' do not."""
        from medtextseg.pretrain.glsc import prompt_mask, prompt_scores

        vlm, table = self.glsc.vlm, self._tables[dataset]
        with torch.no_grad():
            img_emb, _, _, patches = vlm.encode_image(images)
        dense = vlm.pixel_features(patches)
        rows = table["rows"][index]
        emb = self.prompt_emb[rows]
        # The mask GLsc trained and selected: logits upsampled, then the softmax (its Eq. 8).
        probs = prompt_mask(dense, emb, prompt_scores(img_emb, emb, table["absent"][index]), images.shape[-2:])
        # L_feat pools f_d at its own resolution: each feature cell weighted by its foreground share.
        fg_low = F.adaptive_avg_pool2d(1.0 - probs[:, :1], dense.shape[-2:])
        return probs, fg_low, dense, table["txt"][index]

    def prepare_batch(self, lab: dict, unl: dict | None) -> tuple[dict, dict | None]:
        """The prompt masks of the step's images; L_region, L_feat and L_mask for
        :meth:`step_regulariser`."""
        self._reg = None
        if self.glsc is None or unl is None:
            return lab, unl
        p, vlm = self.cfg.promptssl, self.glsc.vlm
        probs_l, fg_l, dense_l, txt_l = self.prompt_probs(lab["image"], "Train", lab["index"])
        probs_u, fg_u, dense_u, txt_u = self.prompt_probs(unl["image"], "Unlabeled", unl["index"])
        terms: dict[str, torch.Tensor] = {}
        reg = probs_u.new_zeros(())
        txt = torch.cat([txt_l, txt_u])
        # Equal texts (in either half) are positives, not negatives.
        same = same_text_positives(torch.cat([self._tables["Train"]["text_id"][lab["index"]],
                                              self._tables["Unlabeled"]["text_id"][unl["index"]]]))
        tau = vlm.temperature.detach()
        if p.region and p.region_weight > 0:  # Eq. 9
            images = torch.cat([lab["image"], unl["image"]])
            fg = torch.cat([1.0 - probs_l[:, :1], 1.0 - probs_u[:, :1]])
            v_i = vlm.encode_image(images * fg.to(images.dtype))[0]
            terms["train/region"] = info_nce(v_i, txt, None, tau, positives=same)
            reg = reg + p.region_weight * terms["train/region"]
        if p.feat and p.feat_weight > 0:  # Eq. 10
            dense, fg = torch.cat([dense_l, dense_u]), torch.cat([fg_l, fg_u])
            v_f = (dense * fg).sum((2, 3)) / fg.sum((2, 3)).clamp_min(1e-6)
            terms["train/feat"] = info_nce(v_f, txt, None, tau, positives=same)
            reg = reg + p.feat_weight * terms["train/feat"]
        if p.mask_supervision:
            terms["train/prompt_sup"] = self.prompt_sup(probs_l.clamp_min(p.eps).log(), lab["mask"])
            reg = reg + terms["train/prompt_sup"]
        if terms:
            self.log_dict(terms, batch_size=len(txt))
            self._reg = reg
        return lab, {**unl, "prompt_probs": probs_u.detach()}

    def step_regulariser(self) -> torch.Tensor | None:
        reg, self._reg = self._reg, None
        return reg

    # -- hooks -------------------------------------------------------------------------------
    def pseudo_target(self, teacher_logits: torch.Tensor, unl: dict) -> torch.Tensor:
        """Eq. 13's merged pseudo label (Mean Teacher's target without the prompt mask)."""
        if "prompt_probs" not in unl:
            return super().pseudo_target(teacher_logits, unl)
        return merged_prompt_label(teacher_logits, unl["prompt_probs"], self.cfg.promptssl.eps)

    def unsup_loss(self, student_logits: torch.Tensor, target: torch.Tensor,
                   unl: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_semi = (L_semi^merged + L_semi^text) / 2 (Eq. 13-15)."""
        if "prompt_probs" not in unl:
            return super().unsup_loss(student_logits, target, unl)
        merged = soft_ce(student_logits, target)
        text = soft_ce(student_logits, unl["prompt_probs"])
        return (merged + text) / 2, {"train/semi_merged": merged, "train/semi_text": text}


__all__ = ["PromptSSL", "merged_prompt_label", "soft_ce"]
