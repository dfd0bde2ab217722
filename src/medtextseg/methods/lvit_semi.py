"""Semi-supervised LViT: Exponential Pseudo-label Iteration (EPI, LViT §3.2, Eq. 9-12)
and the Language-Vision loss (LV, §3.3 and appendix D, Eq. 13-15 / 25-27), trained
with L = L_sup + w · L_unsup, L_unsup = (L_Dice + L_CE)/2 + α · L_LV (Eq. 16-17).

The authors never released this half of LViT; the choices the paper leaves open:

**Generation.** Eq. 9 updates P_t from "the prediction of model M_{t-1}", one
model per generation. A generation here is one training epoch: at the end of
every epoch that is followed by a post-warm-up epoch, the model just trained
(eval mode, no augmentation) predicts every unlabeled image once and the bank is
updated,
P_t = β · P_{t-1} + (1 - β) · p_t, the first generation setting P_0 = p_1 (the
paper's P_0 ≈ P_1 in Eq. 12). Epochs are the natural unit of the proof: its
assumption is that the *weights* dither around an optimum over the last n
generations, which needs a generation to be long enough for the weights to move
(one optimizer step is not), and n = 1/(1 - β) generations form the averaging
window — 100 epochs at β = 0.99, which fits the paper's runs (early stopping
with patience 50 over hundreds of epochs). Short runs (the ``cpu`` tier) use a
smaller β so the window fits the epochs they have. The refresh runs in the
module's ``on_train_epoch_end``, after validation and before the checkpoint
callbacks save (the engine saves on train-epoch end), so ``last.ckpt`` holds the
bank the next epoch trains on, and the next epoch's data loader (and its
workers) is only created afterwards. (With ``semi.warmup_epochs = 0`` the first
generation is made in ``on_train_start``.)

**Frame.** The bank stores P_t at network resolution in the unaugmented frame;
the data module passes it through the same random transform as the image, so
the target of a rotated image is the rotated pseudo label.

**Target.** The pseudo label used in L_unsup is P_t > ``data.threshold`` (0.5) (``semi.hard_labels``;
P_t itself when false).

**Contrastive labels (LV).** For every unlabeled image the contrastive label
whose text is most similar (cosine of the text encoder's sentence vectors,
Eq. 13; first on ties) is chosen once at the start of training; L_LV = 1 - cos
between the predicted probabilities and that mask (Eq. 14-15), computed only on
unlabeled images (appendix D). The labels come from ``semi.lv_contrastive``:
``mean_per_text`` (the mean labeled mask of each distinct description — for
structured text such as QaTa's this is one soft template per description),
``labeled`` (every labeled mask with its own text: the paper's MoNuSeg choice)
or ``templates`` (masks + ``LV_loss.xlsx`` in ``semi.lv_templates``, e.g. the
14 QaTa templates).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medtextseg.data.module import resize_mask
from medtextseg.data.readers import read_contrastive_templates
from medtextseg.losses import lv_loss, lv_valid
from medtextseg.methods.base import SemiSupervised
from medtextseg.metrics import dice_iou_per_image

log = logging.getLogger(__name__)

BANK_FILE = "pseudo_labels.bin"
BANK_DTYPES = {"float16": np.float16, "float32": np.float32}


class PseudoLabelBank:
    """EPI pseudo labels: P_t ``[N, 1, S, S]`` foreground probabilities of the N
    unlabeled images in the unaugmented frame, updated by Eq. 9.

    Stored as float32 (QaTa's 5,359 unlabeled images at 25 % labels and 224²: 1.0
    GiB) in memory or, when ``path`` is given, in a memory-mapped file.
    ``float16`` halves that but cannot hold slow EMA moves: at β = 0.99 a step
    (1 - β)·Δ smaller than half the float16 spacing (2^-12 near 0.5) is rounded
    away, so a pixel predicted 0.52 generation after generation stays at 0.5.

    Data-loader workers read the bank while the main process updates it: with
    ``shared`` the in-memory tensor lives in shared memory, and a memory-mapped
    bank is reopened from its file by every worker (also under the spawn and
    forkserver start methods, where a pickled tensor would become a copy).

    Args:
        n: number of unlabeled images.
        size: ``(H, W)`` (or an int S: S x S), the network's input size.
        beta: momentum β of Eq. 9 (0 keeps only the latest prediction).
        dtype: ``float32`` or ``float16``.
        path: file for a memory-mapped bank, or None for memory.
        shared: put an in-memory bank in shared memory (needed with loader workers).
    """

    def __init__(self, n: int, size: int | tuple[int, int], beta: float, dtype: str = "float32", path: Path | None = None,
                 shared: bool = False):
        if dtype not in BANK_DTYPES:
            raise ValueError(f"semi.bank_dtype must be one of {', '.join(BANK_DTYPES)}, got {dtype!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"semi.beta must be in [0, 1), got {beta}")
        h, w = (size, size) if isinstance(size, int) else size
        self.shape = (n, 1, h, w)
        self.dtype = dtype
        self.beta = beta
        self.path = Path(path) if path is not None else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.data = self._open("w+")
        else:
            self.data = torch.zeros(self.shape, dtype=getattr(torch, dtype))
            if shared:
                self.data.share_memory_()
        self.generation = 0

    def _open(self, mode: str) -> torch.Tensor:
        return torch.from_numpy(np.memmap(self.path, dtype=BANK_DTYPES[self.dtype], mode=mode, shape=self.shape))

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if self.path is not None:
            state["data"] = None  # reopened from the file, never copied
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        if self.data is None:
            self.data = self._open("r+")

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()

    def update(self, index: torch.Tensor, probs: torch.Tensor) -> None:
        """Eq. 9 for the images ``index`` ``[b]`` with new predictions ``probs`` ``[b, 1, S, S]``.
        In generation 0 the bank takes the predictions as they are (P_0 = p_1)."""
        index = index.cpu()
        p = probs.detach().float().cpu()
        if self.generation > 0:
            p = self.beta * self.data[index].float() + (1.0 - self.beta) * p
        self.data[index] = p.to(self.data.dtype)

    def end_generation(self) -> None:
        self.generation += 1

    def read(self, i: int) -> torch.Tensor:
        """P_t of image ``i`` as float32 ``[1, S, S]``."""
        return self.data[i].float()

    def state_dict(self) -> dict:
        return {"data": self.data.clone(), "generation": self.generation, "beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        data = state["data"]
        if tuple(data.shape) != tuple(self.data.shape):
            raise ValueError(f"checkpoint bank has shape {tuple(data.shape)}, this run needs {tuple(self.data.shape)}; "
                             "was the dataset or the labeled split changed?")
        self.data.copy_(data.to(self.data.dtype))
        self.generation = int(state["generation"])


class UnlabeledTargets:
    """``targets(i)`` for the unlabeled dataset: the EPI pseudo label and the LV
    contrastive label of image ``i``, both float ``[1, S, S]`` in the unaugmented frame."""

    def __init__(self, bank: PseudoLabelBank, contrast: torch.Tensor | None, match: torch.Tensor | None):
        self.bank, self.contrast, self.match = bank, contrast, match

    def __call__(self, i: int) -> dict[str, torch.Tensor]:
        out = {"pseudo": self.bank.read(i)}
        if self.contrast is not None:
            out["contrast"] = self.contrast[self.match[i]]
        return out


def contrastive_labels(mode: str, texts: Sequence[str], masks: np.ndarray, size: int | tuple[int, int],
                       templates: str = "") -> tuple[list[str], torch.Tensor]:
    """The LV loss's (text, mask) pairs, masks float ``[M, 1, S, S]`` in [0, 1].

    Args:
        mode: ``mean_per_text`` | ``labeled`` | ``templates`` (see the module docstring).
        texts: the N labeled training texts.
        masks: their masks ``[N, 1, S, S]`` {0, 1} at network resolution.
        size: ``(H, W)`` or S.
        templates: folder of template masks + LV_loss.xlsx (``templates`` mode).
    """
    if mode == "labeled":
        return list(texts), torch.from_numpy(masks).float()
    if mode == "mean_per_text":
        uniq = sorted(set(texts))
        rows = {t: [i for i, x in enumerate(texts) if x == t] for t in uniq}
        return uniq, torch.stack([torch.from_numpy(masks[rows[t]]).float().mean(0) for t in uniq])
    if mode == "templates":
        if not templates:
            raise ValueError("semi.lv_contrastive=templates needs semi.lv_templates=<folder with LV_loss.xlsx>")
        pairs = read_contrastive_templates(templates)
        return ([t for t, _ in pairs],
                torch.stack([torch.from_numpy(resize_mask(m.astype(np.uint8), size)).float() for _, m in pairs]))
    raise ValueError(f"semi.lv_contrastive must be mean_per_text, labeled or templates, got {mode!r}")


def match_by_text(query: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 13: for each query text vector ``[Q, E]`` the key ``[M, E]`` of highest cosine.
    Returns (index ``[Q]``, its TextSim ``[Q]``); ties go to the first key."""
    sim = F.normalize(query.float(), dim=1) @ F.normalize(keys.float(), dim=1).T
    best = sim.max(dim=1)
    return best.indices, best.values


class LViTSemi(SemiSupervised, method="lvit_semi"):
    """LViT with EPI pseudo labels and the LV loss (any network; the presets use LViT-T/TW).

    Batch: ``{"labeled": {image, mask, text, ...}, "unlabeled": {image, text, pseudo, contrast, ...}}``,
    ``pseudo`` and ``contrast`` ``[B_u, 1, H, W]`` float, augmented like ``image``.
    """

    unlabeled_keys = ("pseudo", "contrast")
    supports_patches = False
    supports_multiclass = False

    @classmethod
    def needs_text(cls, cfg) -> bool:
        # The LV loss matches texts even when the network itself ignores them (LViT-TW).
        return cfg.network.use_text or cfg.semi.lv_loss

    def __init__(self, config: dict, text_state: dict | None = None, text_dim: int = 256):
        super().__init__(config, text_state, text_dim)
        self.bank: PseudoLabelBank | None = None
        self.has_contrast = False

    # -- set-up: bank and contrastive labels, once per fit ------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self.bank is not None:
            return
        dm = self.trainer.datamodule
        unl = dm.datasets.get("Unlabeled")
        if unl is None or unl.num_images == 0:
            log.warning("no unlabeled training images: %s trains on the labeled images only", type(self).__name__)
            return
        s, size = self.cfg.semi, self.cfg.data.size
        nbytes = unl.num_images * size[0] * size[1] * np.dtype(BANK_DTYPES.get(s.bank_dtype, np.float32)).itemsize
        workers = self.cfg.data.num_workers > 0
        path = None
        if nbytes > s.bank_memmap_mb * 2**20:
            # One file per DDP rank: each rank keeps (identical) banks of its own.
            name = BANK_FILE if self.trainer.world_size == 1 else f"rank{self.global_rank}.{BANK_FILE}"
            path = Path(self.trainer.default_root_dir) / name
        self.bank = PseudoLabelBank(unl.num_images, size, s.beta if s.epi else 0.0, s.bank_dtype, path, shared=workers)
        contrast = match = None
        if s.lv_loss:
            lab = dm.datasets["Train"]
            texts, contrast = contrastive_labels(s.lv_contrastive, [x.text for x in lab.samples], lab.masks, size,
                                                 s.lv_templates)
            encoder = dm.encoder
            match, sim = match_by_text(encoder.similarity_vectors([x.text for x in unl.samples]),
                                       encoder.similarity_vectors(texts))
            self.has_contrast = True
            self.pending_stats = {"lv/text_sim": float(sim.mean()),
                                   "lv/exact_text": float((sim > 1 - 1e-6).float().mean())}
            if unl.hidden_masks is not None:
                # Diagnostic only: how well the chosen contrastive labels fit the withheld masks.
                hard = (contrast[match] > self.cfg.data.threshold).long()
                self.pending_stats["lv/contrast_dice"] = float(
                    dice_iou_per_image(hard, torch.from_numpy(unl.hidden_masks).long(), 1)[0].mean())
        unl.targets = UnlabeledTargets(self.bank, contrast, match)

    # -- EPI generations -------------------------------------------------------------
    def on_train_start(self) -> None:
        # warmup_epochs = 0 (or a resume into a post-warm-up epoch without a bank yet).
        if self.bank is not None and self.bank.generation == 0 and self.current_epoch >= self.cfg.semi.warmup_epochs:
            self.pending_stats.update(self.refresh_pseudo_labels())

    def on_train_epoch_end(self) -> None:
        nxt = self.current_epoch + 1
        # (Early stopping decides after this hook, so a stopped run pays one unused refresh.)
        if self.bank is None or nxt < self.cfg.semi.warmup_epochs or nxt >= self.trainer.max_epochs:
            return
        self.log_dict(self.refresh_pseudo_labels(), on_epoch=True)

    @torch.no_grad()
    def refresh_pseudo_labels(self) -> dict[str, float]:
        """One EPI generation: predict every unlabeled image with the current model and
        apply Eq. 9. Under DDP every rank refreshes the whole bank (no communication, so
        the banks stay identical). Returns diagnostics when withheld masks exist."""
        dm = self.trainer.datamodule
        hidden = dm.datasets["Unlabeled"].hidden_masks
        was_training = self.training
        self.eval()
        dice_now = []
        try:
            with self.trainer.precision_plugin.forward_context():
                for b in dm.plain_loader("Unlabeled"):
                    probs = torch.sigmoid(self(b["image"].to(self.device), b["text"].to(self.device)).float())
                    self.bank.update(b["index"], probs)
                    if hidden is not None:
                        gt = torch.from_numpy(hidden[b["index"].numpy()]).long()
                        dice_now.append(dice_iou_per_image((probs.cpu() > self.cfg.data.threshold).long(), gt, 1)[0])
        finally:
            self.train(was_training)
        self.bank.end_generation()
        stats = {"epi/generation": float(self.bank.generation)}
        if hidden is not None:
            bank_hard = (self.bank.data.float() > self.cfg.data.threshold).long()
            stats["epi/pseudo_dice"] = float(dice_iou_per_image(bank_hard, torch.from_numpy(hidden).long(), 1)[0].mean())
            stats["epi/prediction_dice"] = float(torch.cat(dice_now).mean())
        return stats

    # -- training step ----------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        lab, unl = batch["labeled"], batch.get("unlabeled")
        w = self.unsup_weight(batch_idx)
        if unl is None or self.bank is None or self.bank.generation == 0 or w == 0.0:
            return self.supervised_step(lab)
        images, texts = self.join(lab, unl)
        logits = self(images, texts)
        n_l = len(lab["image"])
        l_sup = self.sup_loss(logits[:n_l], lab["mask"])
        logits_u = logits[n_l:]
        target = (unl["pseudo"] > self.cfg.data.threshold).long() if self.cfg.semi.hard_labels else unl["pseudo"].clamp(0, 1)
        l_unsup = self.sup_loss(logits_u, target)
        if self.has_contrast:
            valid = lv_valid(unl["contrast"])
            per_image = lv_loss(torch.sigmoid(logits_u.float()), unl["contrast"])
            l_lv = per_image.sum() / valid.sum().clamp_min(1)
            l_unsup = l_unsup + self.cfg.semi.lv_alpha * l_lv
            self.log("train/lv", l_lv, batch_size=len(logits_u))
        loss = self.with_regulariser(l_sup + w * l_unsup)
        b = len(logits)
        self.log("train/loss", loss, batch_size=b, prog_bar=True)
        self.log_dict({"train/sup": l_sup, "train/unsup": l_unsup, "train/w": w}, batch_size=b)
        return loss

    # -- the bank travels with the checkpoint -----------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.bank is not None:
            checkpoint["epi_bank"] = self.bank.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if self.bank is not None and "epi_bank" in checkpoint:
            self.bank.load_state_dict(checkpoint["epi_bank"])


__all__ = ["LViTSemi", "PseudoLabelBank", "UnlabeledTargets", "contrastive_labels", "match_by_text"]
