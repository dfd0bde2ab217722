"""TextMoE (Zeng et al.; ``../shared/papers/textmoe.txt``, §2.3-2.4, Eq. 5-9), on the
mean-teacher family.

Student and teacher are a TextMoE network (``network.name``: ``textmoe`` = ConvNeXt +
TMoE decoder, ``textmoe-plain`` = the Plain-MoE decoder of Table 2); the teacher is the
EMA of the student with the family's α = min(1 - 1/(step + 1), ``semi.ema_decay``)
(the paper: momentum 0.99). Both receive the text tokens (frozen MiniLM, 24 tokens in
the preset) and the batch's ``"domain"`` LongTensor ``[B]`` as the modality indicator
when the batch has one (domain 0 for every image otherwise, as today's one-domain data).

L = L_sup + w · ``cr_weight`` · L_cr + ``diff_weight`` · L_diff (Eq. 9 with weights):

- **L_sup** (Eq. 5): Dice + CE of the student on the labeled images (``loss.dice``,
  ``loss.ce``; the preset 1 + 1, the paper's "combination of Dice and Cross-Entropy").
- **L_cr** (Eq. 6-7): the teacher sees the original unlabeled image x_i, the student the
  frequency-exchanged one x_{i,f} (:func:`~medtextseg.methods.frequency.frequency_exchange`:
  the low-frequency amplitude of the centred spectrum of a partner x_j, the phase and high
  frequencies of x_i; band ``textmoe.band``; partner from another domain of the batch
  where there is one, else another image of the batch). The target is the teacher's hard
  pseudo label ŷ = [σ(teacher logit) > ``data.threshold``], and L_cr is the same Dice + CE
  as L_sup against it. No Gaussian noise on either view (the paper mentions none).
  w is the family's ramp (``semi.unsup_weight`` over ``semi.rampup_epochs``; the preset
  keeps ``semi.unsup_weight = 1`` so ``cr_weight`` is the weight).
- **L_diff** (Eq. 8): for each of the decoder's six MoE layers the per-sample absolute
  cosine similarity of the student's two visual experts' outputs (Eq. 1) over the whole
  flattened feature (:func:`~medtextseg.nets.textmoe.expert_difference`; the official
  code took it along the width axis only), averaged over the N = N_l + N_u images of the
  student's forward (labeled and frequency-exchanged unlabeled ones) and then over the
  layers. It is not ramped.

``textmoe.cr = false`` keeps every Mean Teacher hook (Gaussian-noise views, MSE
consistency on probabilities): the "naive unsupervised teacher-student loss" of the
paper's Table 2 rows 2-3. ``textmoe.diff = false`` drops L_diff. The labeled-only row
(Table 2 row 1) is ``--set method=supervised textmoe.diff=false`` on this preset: the same
network and optimiser trained on the labeled images of ``data.labeled_ratio`` alone. A
stand-in: the paper's row 1 has no MoE decoder at all (both MoE columns unticked) and does
not say which decoder it used; the TMoE network keeps the row's only difference from the
others the loss.

How the pieces reach the reused Mean Teacher step (which is not copied):
``training_step`` records the batch's domains; :meth:`_net_forward` (the student's
forward) passes them to the network with ``return_aux=True`` and keeps the expert
outputs; the teacher is wrapped (:class:`DomainBound`) so that its call in the step
gets the unlabeled images' domains; and λ·L_diff joins the total through the family's
:meth:`step_regulariser` hook, so ``train/loss`` is the whole Eq. 9. Logged: ``train/sup``,
``train/cr`` (or ``train/consistency``), ``train/diff``, ``train/w``, ``train/loss``.

Optimiser (paper tier): AdamW, lr 3e-4 → 1e-6 along one cosine over the run
(``optim.optimizer: adamw``, ``optim.scheduler: cosine``, :meth:`SegMethod.configure_optimizers`).
"""

from __future__ import annotations

import torch
from torch import nn

from medtextseg.config import Config
from medtextseg.methods.frequency import exchange_partners, frequency_exchange
from medtextseg.methods.mean_teacher import MeanTeacher
from medtextseg.nets import TEXTMOE_DECODERS
from medtextseg.nets.textmoe import expert_difference

__all__ = ["DomainBound", "TextMoE", "differential_loss"]


def differential_loss(experts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """L_diff (Eq. 8): mean over layers of the mean over samples of
    :func:`~medtextseg.nets.textmoe.expert_difference` of each layer's ``(e_1, e_2)``."""
    return torch.stack([expert_difference(e1.float(), e2.float()).mean() for e1, e2 in experts]).mean()


class DomainBound(nn.Module):
    """``net(images, text)`` → ``net.net(images, text, domain=self.domain)``: lets a caller
    that knows only ``(images, text)`` (the family's teacher call) pass the modality.
    It holds ``net`` as its only submodule, so its parameters and buffers are the net's,
    in the same order (the EMA update zips them with the student's)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        self.domain: torch.Tensor | None = None

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None,
                domain: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(images, text, domain=domain if domain is not None else self.domain)


class TextMoE(MeanTeacher, method="textmoe"):
    """TextMoE mean teacher (module docstring).

    Batch: ``{"labeled": {image, mask, text[, domain]}, "unlabeled": {image, text[, domain]}}``.
    """

    unlabeled_keys = ()
    # The paper's resize protocol; the indicator of sliding-window crops is not wired.
    supports_patches = False
    supports_multiclass = False

    def __init__(self, config: dict, text_state: dict | None = None, text_dim: int = 256):
        super().__init__(config, text_state, text_dim)
        self.teacher = DomainBound(self.teacher)
        t = self.cfg.textmoe
        self.use_cr, self.use_diff = t.cr, t.diff
        # Per training/validation step: the domains of the student's images, whether to keep
        # its expert outputs, and L_diff waiting to join the total.
        self._domain: torch.Tensor | None = None
        self._capture = False
        self._experts: list | None = None

    # -- config --------------------------------------------------------------------------
    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)  # patches, binary only
        if cfg.network.name.strip().lower().replace("_", "-") not in TEXTMOE_DECODERS:
            raise ValueError(f"TextMoE trains the TextMoE networks ({', '.join(TEXTMOE_DECODERS)}), "
                             f"got network.name={cfg.network.name!r}")
        if not cfg.network.use_text:
            raise ValueError("TextMoE is text-guided (the TMoE experts attend to the text): "
                             "set network.use_text=true")
        t = cfg.textmoe
        if not 0.0 <= t.band <= 1.0:
            raise ValueError(f"textmoe.band is a fraction of the spectrum side in [0, 1], got {t.band}")
        if t.cr_weight < 0 or t.diff_weight < 0:
            raise ValueError(f"textmoe.cr_weight and textmoe.diff_weight must be >= 0, "
                             f"got {t.cr_weight} and {t.diff_weight}")

    @classmethod
    def needs_text(cls, cfg: Config) -> bool:
        return True

    # -- the network calls ---------------------------------------------------------------
    def _net_forward(self, images: torch.Tensor, tokens: torch.Tensor | None,
                     domain: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if domain is None and self._domain is not None and len(self._domain) == len(images):
            # The family's step calls self(images, text): the domains come from training_step.
            domain = self._domain
        if not self._capture:
            return self.net(images, tokens, domain=domain)
        logits, aux = self.net(images, tokens, domain=domain, return_aux=True)
        self._experts = aux["experts"]
        return logits

    @staticmethod
    def _batch_domain(part: dict) -> torch.Tensor:
        d = part.get("domain")
        return torch.zeros(len(part["image"]), dtype=torch.long, device=part["image"].device) if d is None \
            else torch.as_tensor(d, device=part["image"].device).long()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """The family's step (L_sup + w · L_unsup) with the domains wired in and λ · L_diff
        added by :meth:`step_regulariser`."""
        lab, unl = batch["labeled"], batch.get("unlabeled")
        parts = [lab] if unl is None else [lab, unl]
        self._domain = torch.cat([self._batch_domain(p) for p in parts])
        self.teacher.domain = None if unl is None else self._batch_domain(unl)
        self._capture, self._experts = self.use_diff, None
        try:
            return super().training_step(batch, batch_idx)
        finally:
            self._domain, self.teacher.domain, self._capture, self._experts = None, None, False, None

    def step_regulariser(self) -> torch.Tensor | None:
        """With ``textmoe.diff``: ``diff_weight`` · L_diff of this step's student forward (Eq. 8-9)."""
        if not (self._capture and self._experts is not None):
            return None
        l_diff = differential_loss(self._experts)
        self._experts = None
        self.log("train/diff", l_diff, batch_size=len(self._domain) if self._domain is not None else None)
        return self.cfg.textmoe.diff_weight * l_diff

    # -- hooks -----------------------------------------------------------------------------
    def student_view(self, unl: dict) -> torch.Tensor:
        """x_{i,f} (Eq. 6): each unlabeled image with its partner's low-frequency amplitude."""
        if not self.use_cr:
            return super().student_view(unl)
        images = unl["image"]
        partners = exchange_partners(len(images), unl.get("domain"))
        return frequency_exchange(images, partners, self.cfg.textmoe.band)

    def teacher_view(self, unl: dict) -> torch.Tensor:
        """The original unlabeled image (Eq. 7: the teacher sees x_i)."""
        if not self.use_cr:
            return super().teacher_view(unl)
        return unl["image"]

    def pseudo_target(self, teacher_logits: torch.Tensor, unl: dict) -> torch.Tensor:
        """ŷ: the teacher's hard pseudo label ``[B_u, 1, H, W]`` int64 (σ > ``data.threshold``)."""
        if not self.use_cr:
            return super().pseudo_target(teacher_logits, unl)
        return (torch.sigmoid(teacher_logits.float()) > self.cfg.data.threshold).long()

    def unsup_loss(self, student_logits: torch.Tensor, target: torch.Tensor,
                   unl: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``cr_weight`` · L_cr (Eq. 7): Dice + CE of the student on x_{i,f} against ŷ."""
        if not self.use_cr:
            return super().unsup_loss(student_logits, target, unl)
        l_cr = self.sup_loss(student_logits, target)
        return self.cfg.textmoe.cr_weight * l_cr, {"train/cr": l_cr}
