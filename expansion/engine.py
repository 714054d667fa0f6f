"""Runs any :class:`~expansion.base.Expander` over a training split, through
Lightning's ``Trainer.predict`` (so generation shards over devices and nodes),
into a content-addressed :class:`~expansion.store.ExpansionStore`.

Only seeds without a finished expansion are scheduled, so an interrupted run
resumes where it stopped and a finished store is reused without generating.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from filelock import FileLock
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader, Dataset

from .base import Expander, ExpansionContext, ExpansionError, ExpansionOutput
from .files import atomic_write_text, canonical_json
from .seeding import image_seeds
from .store import ExpandedSet, ExpansionStore, fit_key

log = logging.getLogger(__name__)


class SeedImages(Dataset):
    """The pending seeds: ``{"index": parent index, "image": uint8 [C,H,W], "label": int}``."""

    def __init__(self, images: Any, indices: list[int]):
        self.images = images
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self.indices[i]
        image, label = self.images[index]
        return {"index": index, "image": image, "label": label}


class ExpansionModule(L.LightningModule):
    """Wraps an expander for ``Trainer.predict``: one batch of seeds in, ``[B, k]`` images out."""

    def __init__(self, expander: Expander, store_seed: int):
        super().__init__()
        self.expander = expander
        self.store_seed = int(store_seed)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, Any]:
        k = self.expander.ratio
        seeds = image_seeds(self.store_seed, batch["index"], k)
        extra = {"parents": batch["index"]} if self.expander.wants_parents else {}
        output = self.expander.expand(batch["image"], batch["label"], seeds.to(batch["image"].device), **extra)
        if not isinstance(output, ExpansionOutput):
            raise ExpansionError(f"{self.expander.name}.expand must return an ExpansionOutput")
        output.validate(batch["image"].shape[0], k)
        return {"index": batch["index"].cpu(), "label": batch["label"].cpu(), "seeds": seeds, "output": output}


class StoreWriter(BasePredictionWriter):
    """Writes each predicted batch into the store as soon as it exists (resumable)."""

    def __init__(self, store: ExpansionStore):
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        output: ExpansionOutput = prediction["output"]
        images = output.images.detach().cpu()
        b, k = images.shape[:2]
        fields = [{k: _round_float(v) for k, v in row.items()} for row in output.field_rows()]
        rows = []
        for i in range(b):
            for j in range(k):
                rows.append(
                    {
                        "parent": int(prediction["index"][i]),
                        "copy": j,
                        "label": int(prediction["label"][i]),
                        "seed": int(prediction["seeds"][i, j]),
                        **fields[i * k + j],
                    }
                )
        self.store.write_batch(images.reshape(b * k, *images.shape[2:]), rows)


def _round_float(value: Any) -> Any:
    """Manifest floats to 6 significant digits: readable, and not dependent on float noise."""
    return float(f"{value:.6g}") if isinstance(value, float) else value


@dataclass
class ExpansionResult:
    expanded: ExpandedSet
    store: ExpansionStore
    generated_images: int
    reused: bool
    seconds: float
    fit_seconds: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


def fit_expander(expander: Expander, train: Any, dataset_identity: Mapping[str, Any], fit_dir: Path | str) -> float:
    """Run ``expander.fit`` once per (dataset, fit signature); artifacts are cached by key."""
    key, payload = fit_key(dataset_identity, expander.fit_signature())
    artifact_dir = Path(fit_dir) / key  # methods with the same fit signature share it (gif_sd and sd_img2img)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with FileLock(str(artifact_dir / ".lock")):
        atomic_write_text(artifact_dir / "key.json", json.dumps(payload, indent=2, default=str))
        expander.fit(train, artifact_dir)
    return time.perf_counter() - start


def expand_dataset(
    expander: Expander,
    train: Any,
    dataset_identity: Mapping[str, Any],
    *,
    context: ExpansionContext | None = None,
    store_dir: Path | str,
    fit_dir: Path | str,
    seed: int,
    batch_size: int = 64,
    num_workers: int = 0,
    trainer_kwargs: Mapping[str, Any] | None = None,
    lock_timeout: float = -1,
    callbacks: Sequence[Callback] = (),
) -> ExpansionResult:
    """Expand every image of ``train`` into ``expander.ratio`` images, or reuse/resume the store.

    ``trainer_kwargs`` go to the predict ``Trainer`` (accelerator, devices, strategy,
    precision); logging and checkpointing are off for generation. ``callbacks`` run after the
    store writer (e.g. one that stops at a batch boundary when the job is preempted).
    """
    store = ExpansionStore.at(store_dir, dataset_identity, expander.signature(), seed)
    start = time.perf_counter()
    if store.is_complete():
        log.info("expansion store %s is complete: reusing it", store.root)
        store.remove_obsolete_chunks()
        return ExpansionResult(store.load(), store, 0, True, time.perf_counter() - start)

    k = expander.ratio
    is_writer = rank_zero_only.rank == 0
    lock = store.lock(lock_timeout) if is_writer else nullcontext()
    with lock:
        if store.is_complete():  # another job finished it while we waited for the lock
            return ExpansionResult(store.load(), store, 0, True, time.perf_counter() - start)
        expander.prepare(
            context
            or ExpansionContext(
                dataset_name=str(dataset_identity.get("name", "")),
                class_names=list(dataset_identity.get("class_names", [])),
                channels=int(getattr(train, "channels", 3)),
                image_size=dataset_identity.get("image_size"),
            )
        )
        fit_seconds = fit_expander(expander, train, dataset_identity, fit_dir) if expander.needs_fit else 0.0
        store.open_for_writing(k)
        done = store.done_parents(k)
        pending = [i for i in range(len(train)) if i not in done]
        writer = StoreWriter(store)
        if pending:
            log.info(
                "expanding %d of %d seeds x%d into %s (%d already done)",
                len(pending),
                len(train),
                k,
                store.root,
                len(done),
            )
            loader = DataLoader(
                SeedImages(train, pending),
                batch_size=batch_size,
                shuffle=False,
                num_workers=num_workers,
                pin_memory=torch.cuda.is_available(),
            )
            kwargs = {
                "accelerator": "cpu",
                "devices": 1,
                "enable_progress_bar": False,
                **(trainer_kwargs or {}),
                # guided methods differentiate through their decoder: predict under no_grad, not inference_mode
                "inference_mode": not expander.needs_grad,
            }
            trainer = L.Trainer(
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                callbacks=[writer, *callbacks],
                **kwargs,
            )
            trainer.predict(ExpansionModule(expander, seed), loader, return_predictions=False)
            if trainer.is_global_zero:
                store.finalize(range(len(train)), k)
            trainer.strategy.barrier()
        else:
            store.finalize(range(len(train)), k)
    # every pending seed was written k times (by this process or, under DDP, by its ranks)
    return ExpansionResult(
        store.load(),
        store,
        len(pending) * k,
        False,
        time.perf_counter() - start,
        fit_seconds,
        info={"pending_at_start": len(pending), "signature": canonical_json(expander.signature())},
    )
