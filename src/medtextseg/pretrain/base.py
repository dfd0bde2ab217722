"""What every pre-training module shares (DESIGN §2): a LightningModule outside the
:class:`~medtextseg.methods.SegMethod` hierarchy that the engine trains with the same
Trainer, run directory, checkpoints, resume rules and logs as a segmentation method.

A module declares what the engine needs to drive it:

- ``monitor``: the logged Val metric ``best.ckpt`` and early stopping select on
  (higher is better);
- :meth:`check_config`: refuse a config before anything is written;
- :meth:`datamodule`: the data it trains and validates on;
- :meth:`evaluate_split`: the figures of one split (``metrics.json``);
- :meth:`run_info`: what ``run.json`` must record for a later stage to use the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L

from medtextseg.config import Config
from medtextseg.data.sample import Sample
from medtextseg.methods import SegMethod


class PretrainModule(L.LightningModule):
    """Base of the pre-training modules.

    Args:
        config: the resolved run config as a dict (saved in the checkpoint's
            hyper-parameters, so ``load_from_checkpoint`` rebuilds the model).
    """

    monitor: str = "val/r1"
    kind: str = "vlm"

    def __init__(self, config: dict):
        super().__init__()
        self.save_hyperparameters()
        self.cfg = Config.from_dict(config)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Raise ``ValueError`` for a config this module cannot train."""

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
