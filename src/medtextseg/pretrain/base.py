"""What every pre-training module shares (DESIGN §2): a LightningModule outside the
:class:`~medtextseg.methods.SegMethod` hierarchy that the engine trains with the same
Trainer, run directory, checkpoints, resume rules and logs as a segmentation method.

A module declares what the engine needs to drive it:

- ``monitor`` / :meth:`monitor_for`: the logged Val metric ``best.ckpt`` and early
  stopping select on (higher is better);
- :meth:`check_config`: refuse a config before anything is written;
- :meth:`datamodule`: the data it trains and validates on;
- :meth:`evaluate_split`: the figures of one split (``metrics.json``);
- :meth:`run_info`: what ``run.json`` must record for a later stage to use the run.

A segmentation run that uses a pre-trained model keeps its own copy
(:func:`export_pretrained` into ``<run>/``:data:`PRETRAINED_DIR`, read back by
:func:`load_pretrained`), so it trains, resumes and predicts after the pre-training
run is deleted (DESIGN §9).
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch

from medtextseg.config import Config
from medtextseg.data.sample import Sample
from medtextseg.methods import SegMethod
from medtextseg.registry import Registry
from medtextseg.utils import atomic_write_bytes

# Inside a segmentation run: the pre-trained model it uses (config.yaml, run.json, weights.pt).
PRETRAINED_DIR = "vlm"
WEIGHTS_FILE = "weights.pt"


#: Every pre-training module by the name a preset gives it (``pretrain:``). A module joins by
#: its class statement in its own file of this package: ``class Foo(PretrainModule, pretrain="foo")``.
PRETRAINERS: Registry[type[PretrainModule]] = Registry("pre-training module")


class PretrainModule(L.LightningModule):
    """Base of the pre-training modules.

    Args:
        config: the resolved run config as a dict (saved in the checkpoint's
            hyper-parameters, so ``load_from_checkpoint`` rebuilds the model).
    """

    def __init_subclass__(cls, pretrain: str | None = None, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if pretrain is not None:
            PRETRAINERS.add(pretrain, cls)

    monitor: str = "val/r1"
    kind: str = "vlm"

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.from_dict(config)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ``ValueError`` for a config this module cannot train."""

    @classmethod
    def monitor_for(cls, cfg: Config) -> str:
        """The Val metric of this config's selection (:attr:`monitor` unless the config chooses)."""
        return cls.monitor

    @classmethod
    def check_samples(cls, cfg: Config, samples: Sequence[Sample]) -> None:
        """Raise ``ValueError`` when the data cannot serve this config (e.g. a selection on
        Val masks that some Val image lacks); called before anything is written."""

    def datamodule(self, samples: Sequence[Sample], seed: int) -> L.LightningDataModule:
        raise NotImplementedError

    def evaluate_split(self, samples: Sequence[Sample]) -> dict:
        raise NotImplementedError

    def run_info(self) -> dict:
        return {}

    # The one definition of the optim.* schedule (Adam, warm-up, cosine restarts), so a
    # pre-training preset's optim keys mean what they mean for every method.
    configure_optimizers = SegMethod.configure_optimizers
    steps_per_epoch = SegMethod.steps_per_epoch

    check_finite = SegMethod.check_finite


def export_pretrained(checkpoint: Path, config_file: Path, run_file: Path, dest: Path) -> None:
    """Copy what a later stage needs of a pre-training run into ``dest``: its config and
    run.json, and the module's weights from ``checkpoint`` (``state_dict`` only: no
    optimizer state), each written atomically. ``dest`` is replaced if it exists."""
    dest = Path(dest)
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    buf = io.BytesIO()
    torch.save({"state_dict": state}, buf)
    if dest.exists():
        shutil.rmtree(dest)
    atomic_write_bytes(dest / WEIGHTS_FILE, buf.getvalue())
    atomic_write_bytes(dest / "config.yaml", Path(config_file).read_bytes())
    atomic_write_bytes(dest / "run.json", Path(run_file).read_bytes())


def load_pretrained(folder: Path, map_location: str | torch.device = "cpu") -> tuple[PretrainModule, dict]:
    """The module saved by :func:`export_pretrained` (eval mode, frozen) and its run.json."""
    from medtextseg.config import read_config
    from medtextseg.pretrain import pretrain_class

    folder = Path(folder)
    missing = [n for n in ("config.yaml", "run.json", WEIGHTS_FILE) if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder} lacks {', '.join(missing)}: the pre-trained model of this run is "
                                "incomplete; start the run again with --vlm")
    cfg = read_config(folder / "config.yaml")
    # The random initialisation that the weights replace must not move the global generator:
    # a method that loads a VLM then draws the same data order and noise as one that does not.
    with torch.random.fork_rng(devices=[]):
        module = pretrain_class(cfg.pretrain)(cfg.to_dict())
    # The exported file holds tensors only (export_pretrained): no unpickling of code, so a
    # run folder from elsewhere cannot run anything when it is loaded.
    state = torch.load(folder / WEIGHTS_FILE, map_location=map_location, weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.to(map_location).eval().requires_grad_(False)
    return module, json.loads((folder / "run.json").read_text())
