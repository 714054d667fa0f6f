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


class EpochLog(EpochTimer):
    """One log line per finished epoch, for a log nobody watches live (a progress bar is not in a file):
    ``epoch 3/30: train loss 1.234, val acc 45.6%, 2.1 s, ETA 58 s`` (the ETA: the mean epoch time of this
    process times the epochs left). Keeps each epoch's train loss and val accuracy (None where the epoch
    did not validate) for the learning curve."""

    def __init__(self, logger: Any, what: str = "training") -> None:
        super().__init__()
        self.logger, self.what = logger, what
        self.train_loss: list[float | None] = []
        self.val_acc: list[float | None] = []
        self._validated: float | None = None

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not trainer.sanity_checking and "val/acc" in trainer.callback_metrics:
            self._validated = float(trainer.callback_metrics["val/acc"])

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        from expansion.progress import duration

        seconds = self._now(trainer) - self._start if self._start is not None else 0.0
        loss = trainer.callback_metrics.get("train/loss")
        loss = None if loss is None else float(loss)
        val, self._validated = self._validated, None
        self.train_loss.append(loss)
        self.val_acc.append(val)
        epoch, total = trainer.current_epoch + 1, int(trainer.max_epochs or 0)
        timed = [*self.epoch_seconds, seconds]
        parts = [f"{self.what} epoch {epoch}/{total}"]
        parts.append("train loss " + ("–" if loss is None else f"{loss:.4f}"))
        if val is not None:
            parts.append(f"val acc {100 * val:.2f}%")
        parts.append(duration(seconds))
        left = max(0, total - epoch)
        parts.append(f"ETA {duration(left * sum(timed) / len(timed))}" if left else "last epoch")
        self.logger.info("%s: %s", parts[0], ", ".join(parts[1:]))
