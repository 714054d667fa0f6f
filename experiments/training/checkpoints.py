"""Training checkpoints that survive kills and are safe to load.

* Written atomically (temporary file in the same folder, fsync, ``os.replace``): a job killed
  while saving leaves the previous checkpoint intact, never a truncated one. (Lightning's
  default writer stages the file in the system temp dir and *copies* it over when that is
  another file system, e.g. node-local /tmp and a shared run dir.)
* Read with ``torch.load(weights_only=True)``: tensors and plain containers only, never
  arbitrary pickled objects, so a planted or foreign ``.ckpt`` cannot run code.
* Stamped with the run's signature (a hash of the settings that shape training), so a run
  dir reused with other settings fails clearly instead of resuming someone else's training.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback

from expansion.files import atomic_write_bytes, remove_temporaries

from .preemption import PREEMPTED_CHECKPOINT

LAST_CHECKPOINT = "last.ckpt"
SIGNATURE_KEY = "run_signature"


class CheckpointError(RuntimeError):
    """A checkpoint in the run dir cannot be resumed from (damaged, foreign or of other settings)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO: atomic writes, ``weights_only=True`` reads."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(Path(path), buffer.getvalue())

    def load_checkpoint(self, path: Any, *args: Any, weights_only: bool | None = None, **kwargs: Any) -> dict[str, Any]:
        return super().load_checkpoint(path, *args, weights_only=True, **kwargs)


class StampRunSignature(Callback):
    """Writes the run's signature into every checkpoint it saves."""

    def __init__(self, signature: str):
        self.signature = signature

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        checkpoint[SIGNATURE_KEY] = self.signature


def remove_partial_checkpoints(folder: Path) -> None:
    """Temporaries of a save that was killed (the checkpoint they were replacing is intact)."""
    remove_temporaries(folder)


def resume_point(folder: Path, signature: str) -> tuple[Path, dict[str, int]] | None:
    """The checkpoint to resume training from, with its epoch and step: the newer of
    ``last.ckpt`` (end of an epoch) and ``preempted.ckpt`` (written when a signal stopped
    training mid-epoch); None when training has not checkpointed yet."""
    remove_partial_checkpoints(folder)
    candidates = [p for p in (folder / LAST_CHECKPOINT, folder / PREEMPTED_CHECKPOINT) if p.is_file()]
    if not candidates:
        return None
    path = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    try:
        # mmap: the tensors are not read, only the small header fields below
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise CheckpointError(
            f"cannot resume training from {path}: {type(exc).__name__}: {str(exc).splitlines()[0]}. It is damaged "
            "or was not written by this framework (checkpoints are loaded with weights_only=True, never "
            "unpickled); delete it to train from scratch"
        ) from exc
    found = checkpoint.get(SIGNATURE_KEY) if isinstance(checkpoint, dict) else None
    if found != signature:
        raise CheckpointError(
            f"{path} belongs to a run with other settings (signature {found}, this run {signature}); use a "
            "fresh run dir (hydra.run.dir=...) or delete the checkpoints to train from scratch"
        )
    return path, {"epoch": int(checkpoint["epoch"]), "global_step": int(checkpoint["global_step"])}
