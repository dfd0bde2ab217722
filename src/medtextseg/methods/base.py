"""What every training method shares: the network, the text embedder, the
optimiser, and validation by per-image Dice/IoU. A method subclasses
:class:`SegMethod` and writes its ``training_step``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L
import torch

from medtextseg.config import Config
from medtextseg.data.module import check_patch_options
from medtextseg.data.sample import Sample
from medtextseg.inference import sliding_window_logits
from medtextseg.losses import DiceCE
from medtextseg.metrics import binarize, dice_iou_per_image
from medtextseg.nets import build_network, check_network_options
from medtextseg.registry import Registry
from medtextseg.text.encoders import build_text_encoder


def network_from_config(cfg: Config, text_dim: int):
    """The network of a run config: ``network.name`` with the data's channels, classes and
    size, the text width, ``network.options``, and an indicator of ``len(data.domains)``
    (at least 1) for the networks that read the modality."""
    return build_network(
        cfg.network.name, in_channels=cfg.data.in_channels, num_classes=cfg.data.num_classes,
        base_width=cfg.network.base_width, img_size=cfg.data.size, text_dim=text_dim,
        text_len=cfg.text.max_len, use_text=cfg.network.use_text, num_domains=max(1, len(cfg.data.domains)),
        **cfg.network.options)


def check_network_builds(cfg: Config) -> None:
    """Build the config's network on the meta device (no memory, no initialisation; well
    under a second) so that whatever its constructor refuses (a size it cannot take, a width
    its groups do not divide, a local checkpoint of other widths) is refused by
    ``check_config``, before anything is written. The text width is a stand-in
    (``text.dim``): it sizes layers, it constrains none. Local weights cannot be loaded on
    the meta device; a network that gets that far has passed its own checks and is built
    for real when the run starts."""
    try:
        with torch.device("meta"):
            network_from_config(cfg, cfg.text.dim)
    except RuntimeError as e:
        if "meta" not in str(e):
            raise


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


#: Every training method by the name a preset gives it (``method:``). A method joins by its
#: class statement in its own file of this package: ``class Foo(SegMethod, method="foo")``.
METHODS: Registry[type[SegMethod]] = Registry("method")


class SegMethod(L.LightningModule):
    """Base LightningModule: ``forward(images [B,C,H,W], text [B,L] | [B,L,D]) -> logits [B,K,H,W]``.

    ``unlabeled_keys`` tells the engine what data the method trains on: ``None``
    (supervised: labeled images only, batches as in :mod:`medtextseg.data.module`)
    or the names of the per-image maps the method attaches to the unlabeled
    images (semi-supervised: batches are ``{"labeled": ..., "unlabeled": ...}``).

    Args:
        config: the resolved run config as a dict (saved in the checkpoint).
        text_state: the text encoder's ``state()`` (the vocabulary of a learned encoder).
        text_dim: D, width of the token embeddings the network receives.
    """

    def __init_subclass__(cls, method: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if method is not None:
            METHODS.add(method, cls)

    unlabeled_keys: tuple[str, ...] | None = None
    # Whether the method can train on patches (``data.patches``): a method that keeps
    # per-image maps at ``data.img_size`` (LViT's EPI bank) cannot.
    supports_patches: bool = True
    # Whether the method trains K >= 2 classes (``data.num_classes``); a method whose
    # paper and pseudo labels are binary (LViT's EPI and LV loss, DuSSS's text mask,
    # TextMoE) says False and is refused in check_config.
    supports_multiclass: bool = True

    def __init__(self, config: dict, text_state: dict | None = None, text_dim: int = 256):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.from_dict(config)
        cfg = self.cfg
        self.use_text = cfg.network.use_text
        self.net = network_from_config(cfg, text_dim)
        # Only the learned encoder has weights to train; frozen encoders give Identity.
        self.text_embedder = (build_text_encoder(cfg.text.encoder, max_len=cfg.text.max_len, dim=cfg.text.dim,
                                                 state=text_state).embedder() if self.use_text else None)
        self.sup_loss = DiceCE(cfg.data.num_classes, cfg.loss.dice, cfg.loss.ce)
        if cfg.train.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ``ValueError`` for a config this method cannot train (called before anything is written)."""
        check_patch_options(cfg.data)
        check_network_options(cfg.network.name, cfg.network.options)
        check_network_builds(cfg)
        if cfg.data.num_classes != 1 and not cls.supports_multiclass:
            raise ValueError(f"{cls.__name__} is binary (its paper's pseudo labels are foreground "
                             f"probabilities): set data.num_classes=1, or train K={cfg.data.num_classes} classes "
                             "with a multi-class method (supervised, mean_teacher, promptssl)")
        if cfg.data.patches and not cls.supports_patches:
            raise ValueError(f"{cls.__name__} keeps per-image maps at data.img_size and cannot train on patches; "
                             "set data.patches=false")

    @classmethod
    def needs_text(cls, cfg: Config) -> bool:
        """Whether training or prediction reads the texts at all; when not, the engine
        builds the ``none`` text encoder and never loads a language model."""
        return cfg.network.use_text

    @classmethod
    def needs_pretrained(cls, cfg: Config) -> str:
        """The pre-training module (a :data:`medtextseg.pretrain.PRETRAINERS` name) whose
        run this method trains with (``medtextseg train --vlm RUN``), or "" for none.
        The engine copies that run's model into the run directory
        (:data:`medtextseg.pretrain.base.PRETRAINED_DIR`) before training starts."""
        return ""

    @classmethod
    def check_pretrained(cls, cfg: Config, pretrained: Config) -> None:
        """Raise ``ValueError`` when a pre-training run's config ``pretrained`` does not fit
        ``cfg`` (called before anything is written)."""

    @classmethod
    def check_pretrained_texts(cls, pretrained: Config, samples: Sequence[Sample]) -> None:
        """Raise ``ValueError`` when the pre-trained model (config ``pretrained``) cannot read
        the texts of ``samples`` (called before anything is written)."""

    def num_predictor_parameters(self) -> int:
        """Parameters of what predicts: the network and a trainable text embedder, not
        training-only copies such as a Mean Teacher's EMA teacher."""
        modules = [self.net] + ([self.text_embedder] if self.text_embedder is not None else [])
        return sum(p.numel() for m in modules for p in m.parameters())

    def forward(self, images: torch.Tensor, text: torch.Tensor | None = None,
                domain: torch.Tensor | None = None) -> torch.Tensor:
        """``images [B, C, S, S]`` at the network's input size -> logits ``[B, K, S, S]``;
        ``domain [B]``: the batch's domain indices (composite data), or None."""
        tokens = self.text_embedder(text) if self.use_text else None
        return self._net_forward(images, tokens, domain)

    def _net_forward(self, images: torch.Tensor, tokens: torch.Tensor | None,
                     domain: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images, tokens, domain=domain)

    def infer(self, images: torch.Tensor, text: torch.Tensor | None = None,
              domain: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of whole images ``[B, C, H, W]`` -> ``[B, K, H, W]``: one forward pass
        (resize protocol, H = W = ``data.img_size``), or with ``data.patches`` a sliding
        ``img_size``² window (:func:`medtextseg.inference.sliding_window_logits`), the
        text embedded once per image. Validation, evaluation and prediction use this."""
        d = self.cfg.data
        if not d.patches:
            return self(images, text, domain)
        tokens = self.text_embedder(text) if self.use_text else None
        return sliding_window_logits(self._net_forward, images, tokens, d.size, sw_batch_size=d.eval_batch_size,
                                     overlap=d.window_overlap, mode=d.window_blend, domain=domain)

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` -> class probabilities of the same shape, in float32:
        sigmoid for K = 1 (the foreground), softmax over the K classes otherwise."""
        logits = logits.float()
        return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)

    def check_finite(self, loss: torch.Tensor) -> torch.Tensor:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss became {loss.item()} at epoch {self.current_epoch}, step {self.global_step}; "
                "the last good checkpoint is kept. Lower optim.lr or check the data.")
        return loss

    def step_regulariser(self) -> torch.Tensor | None:
        """A weighted term on the step's student forward that joins the total of every
        training step (supervised and semi-supervised), or None (the default). TextMoE's
        L_diff (Eq. 8) is one; it reads what its forward kept."""
        return None

    def with_regulariser(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` + :meth:`step_regulariser`, checked finite: the one exit of a training step."""
        reg = self.step_regulariser()
        return self.check_finite(loss if reg is None else loss + reg)

    def supervised_step(self, batch: dict) -> torch.Tensor:
        """L_sup (Eq. 16) on a labeled batch, logged as ``train/loss``."""
        logits = self(batch["image"], batch["text"], batch.get("domain"))
        loss = self.with_regulariser(self.sup_loss(logits, batch["mask"]))
        self.log("train/loss", loss, batch_size=len(logits), prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self.infer(batch["image"], batch["text"], batch.get("domain"))
        loss = self.sup_loss(logits, batch["mask"])
        dice, iou = dice_iou_per_image(binarize(logits, self.cfg.data.threshold), batch["mask"], self.cfg.data.num_classes)
        n = len(dice)
        self.log("val/loss", loss, batch_size=n, sync_dist=True)
        self.log("val/dice", dice.mean(), batch_size=n, prog_bar=True, sync_dist=True)
        self.log("val/iou", iou.mean(), batch_size=n, sync_dist=True)

    def configure_optimizers(self):
        """Adam (``optim.optimizer: adam``, the default) or AdamW (``adamw``, decoupled weight
        decay ``optim.weight_decay``); the schedule (cosine warm restarts per epoch, T_0 =
        ``optim.t0``, the default; or ``cosine``: one cosine from lr to ``eta_min`` over the
        whole run) times a linear warm-up over the first ``optim.lr_warmup_epochs`` epochs,
        as one per-step LambdaLR so that neither overwrites the other's learning rate.

        Learning rate at optimizer step s of epoch e = floor(s / steps_per_epoch):
        lr · min(1, (s + 1) / warmup_steps) · c / lr, where c is, for ``cosine_restarts``,
        the cosine restarts value at epoch e (``eta_min`` + (lr - eta_min)(1 + cos(π T_cur / T_0)) / 2)
        and, for ``cosine``, ``eta_min`` + (lr - eta_min)(1 + cos(π min(s, S) / S)) / 2 with
        S = steps_per_epoch · ``train.max_epochs`` (PyTorch's CosineAnnealingLR, T_max = S, per step);
        for ``multistep``, ``gamma`` to the number of ``optim.milestones`` (epochs) reached (MultiStepLR).
        """
        o = self.cfg.optim
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if o.optimizer not in optimizers:
            raise ValueError(f"optim.optimizer must be 'adam' or 'adamw', got {o.optimizer!r}")
        opt = optimizers[o.optimizer](self.parameters(), lr=o.lr, weight_decay=o.weight_decay)
        if o.scheduler not in ("cosine_restarts", "cosine", "multistep", "none"):
            raise ValueError("optim.scheduler must be 'cosine_restarts', 'cosine', 'multistep' or 'none', "
                             f"got {o.scheduler!r}")
        milestones = sorted(int(m) for m in o.milestones)
        if o.scheduler == "none" and o.lr_warmup_epochs <= 0:
            return opt
        steps_per_epoch = max(1, self.steps_per_epoch())
        warmup_steps = max(0, round(o.lr_warmup_epochs * steps_per_epoch))
        total_steps = max(1, steps_per_epoch * max(1, self.cfg.train.max_epochs))

        def factor(step: int) -> float:
            f = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
            if o.scheduler == "cosine_restarts":
                t_cur = (step // steps_per_epoch) % o.t0
                f *= (o.eta_min + (o.lr - o.eta_min) * (1 + math.cos(math.pi * t_cur / o.t0)) / 2) / o.lr
            elif o.scheduler == "cosine":
                t = min(step, total_steps) / total_steps
                f *= (o.eta_min + (o.lr - o.eta_min) * (1 + math.cos(math.pi * t)) / 2) / o.lr
            elif o.scheduler == "multistep":
                f *= o.gamma ** sum(step // steps_per_epoch >= m for m in milestones)
            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def steps_per_epoch(self) -> int:
        """Optimizer steps in one epoch, known once the trainer has its train loader."""
        trainer = self._trainer
        if trainer is None:
            return 1
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or trainer.max_epochs in (None, -1):
            return max(1, int(trainer.num_training_batches)) if math.isfinite(trainer.num_training_batches) else 1
        return max(1, int(total // trainer.max_epochs))


def sigmoid_rampup(progress: float) -> float:
    """exp(-5 (1 - t)^2) for t = clip(progress, 0, 1) (Laine & Aila 2017, Tarvainen & Valpola 2017)."""
    t = min(max(progress, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class SemiSupervised(SegMethod):
    """Base of the semi-supervised methods: L = L_sup + w · L_unsup on batches
    ``{"labeled": batch, "unlabeled": batch}``.

    w = 0 during ``semi.warmup_epochs`` (supervised warm-up), then
    ``semi.unsup_weight`` · :func:`sigmoid_rampup` over ``semi.rampup_epochs``,
    evaluated at fractional epochs so it rises smoothly within an epoch.
    """

    unlabeled_keys: tuple[str, ...] = ()

    def __init__(self, config: dict, text_state: dict | None = None, text_dim: int = 256):
        super().__init__(config, text_state, text_dim)
        # Statistics of a set-up pass (pseudo-label or text-mask quality): Lightning
        # forbids self.log in setup / on_fit_start / on_train_start, so they wait for
        # the next epoch start.
        self.pending_stats: dict[str, float] = {}

    def on_train_epoch_start(self) -> None:
        if self.pending_stats:
            self.log_dict(self.pending_stats, on_epoch=True)
            self.pending_stats = {}

    def unsup_weight(self, batch_idx: int = 0) -> float:
        s = self.cfg.semi
        epoch = float(self.current_epoch)
        n = self._trainer.num_training_batches if self._trainer is not None else 0
        if 0 < n < float("inf"):
            epoch += batch_idx / n
        since = epoch - s.warmup_epochs
        if since < 0:
            return 0.0
        return s.unsup_weight * (sigmoid_rampup(since / s.rampup_epochs) if s.rampup_epochs > 0 else 1.0)

    @staticmethod
    def join(labeled: dict, unlabeled: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward for both halves: images ``[B_l + B_u, C, H, W]`` and their texts."""
        return torch.cat([labeled["image"], unlabeled["image"]]), torch.cat([labeled["text"], unlabeled["text"]])
