"""A stand-in for killing a training run, shared by the resume tests."""

from __future__ import annotations

import lightning as L


class Killed(Exception):
    pass


class Kill(L.Callback):
    """Dies at the start of the given epoch, after the previous one was checkpointed."""

    def __init__(self, epoch: int):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, module):
        if trainer.current_epoch == self.epoch:
            raise Killed
