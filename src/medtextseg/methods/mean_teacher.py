"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017), the semi-supervised baseline of
the LViT, DuSSS and TextMoE comparisons.

The student is trained on L = L_sup + w · L_cons, where L_cons is the mean squared
difference between the student's and the teacher's class probabilities (foreground
sigmoid for binary runs, softmax over the K classes otherwise) on
the unlabeled images, each seeing its own Gaussian input noise (σ =
``semi.noise_std``, clipped to ±2σ) on top of the shared spatial augmentation. The
teacher is the exponential moving average of the student,
θ' ← α θ' + (1 - α) θ with α = min(1 - 1/(step + 1), ``semi.ema_decay``) (the
paper's warm-start: early on the teacher follows the student closely). Buffers
(BatchNorm statistics) are averaged the same way after every step. The
teacher runs in train mode like the student (as in the original code), so its
BatchNorm normalises with batch statistics, but with momentum 0 so that its own
forward passes do not move the running statistics. The student is what is
validated, checkpointed as the model and used for prediction; the teacher is
saved in the checkpoint so a resumed run continues with it.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from medtextseg.methods.base import SemiSupervised


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, alpha: float) -> None:
    """θ' ← α θ' + (1 - α) θ for every parameter and floating-point buffer;
    integer buffers (BatchNorm's batch counter) are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.lerp_(s.detach(), 1.0 - alpha)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.is_floating_point():
            t.lerp_(s, 1.0 - alpha)
        else:
            t.copy_(s)


def ema_decay(step: int, decay: float) -> float:
    """α = min(1 - 1/(step + 1), decay): the teacher averages over the steps so far
    until there are 1/(1 - decay) of them."""
    return min(1.0 - 1.0 / (step + 1), decay)


class MeanTeacher(SemiSupervised, method="mean_teacher"):
    """Mean Teacher over any network (the preset uses U-Net, as the papers do).

    Batch: ``{"labeled": {image, mask, text}, "unlabeled": {image, text, ...}}``.

    The mean-teacher family (DuSSS, TextMoE, PromptSSL) subclasses this and overrides
    hooks instead of the training step:

    - :meth:`prepare_batch`: what a step adds to its halves before the forward passes
      (here: nothing; PromptSSL's prompt masks);
    - :meth:`student_view` / :meth:`teacher_view`: the unlabeled images each network
      sees (here: each its own Gaussian noise);
    - :meth:`pseudo_target`: what the teacher's logits become as the target (here: its
      foreground probabilities);
    - :meth:`unsup_loss`: the unlabeled term and its logged parts (here: L_cons, the
      mean squared difference of probabilities).

    The student view is drawn before the teacher view, so the random streams (and a
    run's metrics at a given seed) are those of the original single-function step.
    """

    unlabeled_keys = ()

    def __init__(self, config: dict, text_state: dict | None = None, text_dim: int = 256):
        super().__init__(config, text_state, text_dim)
        self.teacher = copy.deepcopy(self.net)
        self.teacher.requires_grad_(False)
        # The teacher normalises with batch statistics (train mode, as in the original
        # code), but its running statistics must stay the EMA of the student's: with
        # momentum 0 its own forward passes leave them untouched.
        for m in self.teacher.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = 0.0

    def noisy(self, images: torch.Tensor) -> torch.Tensor:
        std = self.cfg.semi.noise_std
        return images + (torch.randn_like(images) * std).clamp(-2 * std, 2 * std)

    # -- hooks ---------------------------------------------------------------------------
    def prepare_batch(self, lab: dict, unl: dict | None) -> tuple[dict, dict | None]:
        """The step's labeled and unlabeled halves as the other hooks see them (called
        first, with gradients enabled)."""
        return lab, unl

    def student_view(self, unl: dict) -> torch.Tensor:
        """``[B_u, C, H, W]`` unlabeled images as the student sees them."""
        return self.noisy(unl["image"])

    def teacher_view(self, unl: dict) -> torch.Tensor:
        """``[B_u, C, H, W]`` unlabeled images as the teacher sees them."""
        return self.noisy(unl["image"])

    def pseudo_target(self, teacher_logits: torch.Tensor, unl: dict) -> torch.Tensor:
        """Teacher logits ``[B_u, K, H, W]`` -> the target of the unlabeled term (no grad):
        its class probabilities (:meth:`SegMethod.probs`)."""
        return self.probs(teacher_logits)

    def unsup_loss(self, student_logits: torch.Tensor, target: torch.Tensor,
                   unl: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(L_unsup, named parts to log) from the student's logits ``[B_u, K, H, W]``."""
        l_cons = F.mse_loss(self.probs(student_logits), target)
        return l_cons, {"train/consistency": l_cons}

    # -- the step --------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        """L = L_sup + w · L_unsup, one student forward over labeled + unlabeled images."""
        lab, unl = self.prepare_batch(batch["labeled"], batch.get("unlabeled"))
        w = self.unsup_weight(batch_idx)
        if unl is None:
            return self.supervised_step(lab)
        n_l = len(lab["image"])
        # Composite data: each image's domain reaches the networks that read the modality
        # (the others ignore it), the student's and the teacher's alike.
        domain = torch.cat([lab["domain"], unl["domain"]]) if "domain" in lab and "domain" in unl else None
        logits = self(torch.cat([lab["image"], self.student_view(unl)]), torch.cat([lab["text"], unl["text"]]),
                      domain)
        l_sup = self.sup_loss(logits[:n_l], lab["mask"])
        with torch.no_grad():
            tokens = self.text_embedder(unl["text"]) if self.use_text else None
            target = self.pseudo_target(self.teacher(self.teacher_view(unl), tokens, domain=unl.get("domain")), unl)
        l_unsup, parts = self.unsup_loss(logits[n_l:], target, unl)
        loss = self.with_regulariser(l_sup + w * l_unsup)
        self.log("train/loss", loss, batch_size=len(logits), prog_bar=True)
        self.log_dict({"train/sup": l_sup, **parts, "train/w": w}, batch_size=len(logits))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        ema_update(self.teacher, self.net, ema_decay(self.global_step, self.cfg.semi.ema_decay))
