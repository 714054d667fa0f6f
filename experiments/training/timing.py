"""Wall time of every training epoch, as the framework runs it.

An epoch is measured from its ``on_train_epoch_start`` to the next epoch's (or, for the
last one, to ``on_train_end``), so it holds everything the epoch costs: the training steps,
the validation pass, checkpoint writes, logging and the scheduler step. Lightning's
one-off start-up (setup, moving the model, the first dataloader) comes before the first
epoch starts and is not part of any epoch.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback


class EpochTimer(Callback):
    """Records ``epoch_seconds``: one wall time per finished epoch, CUDA work included
    (the device is synchronised at each boundary, once per epoch)."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._start: float | None = None

    def _now(self, trainer: Any) -> float:
        root = trainer.strategy.root_device
        if root.type == "cuda":
            torch.cuda.synchronize(root)
        return time.perf_counter()

    def _close_epoch(self, now: float) -> None:
        if self._start is not None:
            self.epoch_seconds.append(now - self._start)
            self._start = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        now = self._now(trainer)
        self._close_epoch(now)
        self._start = now

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close_epoch(self._now(trainer))


def steady_epoch_seconds(epoch_seconds: list[float]) -> float:
    """Mean epoch time without the first epoch (kernel selection, allocator and
    cache warm-up land there); the only epoch when there is just one."""
    if not epoch_seconds:
        raise ValueError("no finished epoch")
    steady = epoch_seconds[1:] or epoch_seconds
    return sum(steady) / len(steady)
