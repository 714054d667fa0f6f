"""Runs any :class:`~expansion.base.Expander` over a training split, through
Lightning's ``Trainer.predict`` (so generation shards over devices and nodes),
into a content-addressed :class:`~expansion.store.ExpansionStore`.

Only seeds without a finished expansion are scheduled, so an interrupted run
resumes where it stopped and a finished store is reused without generating.
"""

from __future__ import annotations

import json
import logging
import shutil
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

from .base import Expander, ExpansionContext, ExpansionError, ExpansionOutput, fewest_per_class
from .files import TMP_MARK, atomic_write_text, canonical_json
from .progress import ProgressLog
from .seeding import image_seeds
from .store import ExpandedSet, ExpansionStore, digest_of, encode_png, fit_key, image_name

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
    """Writes each predicted batch into the store as soon as it exists (resumable). With ``only``
    (file names of damaged images), it keeps those images' PNG bytes in ``replacements`` instead."""

    def __init__(self, store: ExpansionStore, only: set[str] | None = None, images: int = 0):
        super().__init__(write_interval="batch")
        self.store = store
        self.only = only
        self.replacements: dict[str, bytes] = {}
        self.images = images  # how many this generation makes (its progress lines' total)
        self.progress: ProgressLog | None = None
        self.done = 0

    def on_predict_start(self, trainer, pl_module) -> None:
        what = "generation" if self.only is None else "repair"
        self.progress = ProgressLog(what, self.images, "images", log)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        output: ExpansionOutput = prediction["output"]
        images = output.images.detach().cpu()
        b, k = images.shape[:2]
        self.done += b * k
        if self.progress is not None:
            self.progress.update(self.done)
        if self.only is not None:
            for i in range(b):
                for j in range(k):
                    name = image_name(int(prediction["index"][i]), j)
                    if name in self.only:
                        self.replacements[name] = encode_png(images[i, j])
            return
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
    fit_key: str | None = None  # the cached fit the expander uses (shared by methods of one fit signature)


def fit_expander(expander: Expander, train: Any, dataset_identity: Mapping[str, Any], fit_dir: Path | str) -> float:
    """Run ``expander.fit`` once per (dataset, fit signature); artifacts are cached by key. The files a
    fit leaves are recorded with their digests (``artifacts.json``); a later run that finds one of them
    missing or changed deletes the artifacts and fits again (a damaged fit is never loaded)."""
    key, payload = fit_key(dataset_identity, expander.fit_signature())
    artifact_dir = Path(fit_dir) / key  # methods with the same fit signature share it (gif_sd and sd_img2img)
    artifact_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with FileLock(str(artifact_dir / ".lock")):
        damaged = damaged_artifacts(artifact_dir)
        if damaged:
            log.warning("fitted artifacts in %s are damaged (%s): fitting again", artifact_dir, "; ".join(damaged[:3]))
            for path in artifact_dir.iterdir():
                if path.name not in (".lock", ARTIFACTS_FILE):
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
        atomic_write_text(artifact_dir / "key.json", json.dumps(payload, indent=2, default=str))
        expander.fit(train, artifact_dir)
        record_artifacts(artifact_dir)
    return time.perf_counter() - start


ARTIFACTS_FILE = "artifacts.json"


def _artifact_files(artifact_dir: Path) -> list[Path]:
    return sorted(
        p
        for p in artifact_dir.rglob("*")
        if p.is_file() and p.name not in (".lock", "key.json", ARTIFACTS_FILE) and TMP_MARK not in p.name
    )


def record_artifacts(artifact_dir: Path) -> None:
    """``artifacts.json``: every file a fit left, with its size and digest."""
    files = {
        str(p.relative_to(artifact_dir)): [p.stat().st_size, digest_of(p.read_bytes())]
        for p in _artifact_files(artifact_dir)
    }
    atomic_write_text(artifact_dir / ARTIFACTS_FILE, json.dumps(files, indent=1))


def damaged_artifacts(artifact_dir: Path) -> list[str]:
    """What is wrong with the recorded artifacts of a fit (empty: sound, or nothing recorded yet)."""
    path = artifact_dir / ARTIFACTS_FILE
    if not path.is_file():
        return []
    try:
        recorded = json.loads(path.read_text())
    except json.JSONDecodeError:
        return [f"{ARTIFACTS_FILE} is corrupt"]
    problems = []
    for name, (size, digest) in recorded.items():
        file = artifact_dir / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif file.stat().st_size != size or digest_of(file.read_bytes()) != digest:
            problems.append(f"{name} is not the file the fit wrote")
    if problems:
        path.unlink()
    return problems


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
    verify: str = "digests",
) -> ExpansionResult:
    """Expand every image of ``train`` into ``expander.ratio`` images, or reuse/resume the store.

    A finished store is checked before it is reused (:meth:`ExpansionStore.check`; ``verify``:
    ``digests`` reads every image, ``sizes`` only stats them): a cut, edited or corrupt manifest is
    refused with one error line; missing or changed images are regenerated from their per-image
    seeds and replaced. ``trainer_kwargs`` go to the predict ``Trainer`` (accelerator, devices,
    strategy, precision); logging and checkpointing are off for generation. ``callbacks`` run after
    the store writer (e.g. one that stops at a batch boundary when the job is preempted).
    """
    if verify not in VERIFY_LEVELS:
        raise ExpansionError(f"store_verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    store = ExpansionStore.at(store_dir, dataset_identity, expander.signature(), seed)
    start = time.perf_counter()
    digests = verify == "digests"
    fitted = fit_key(dataset_identity, expander.fit_signature())[0] if expander.needs_fit else None
    if store.is_complete() and not store.check(digests=digests):
        log.info("expansion store %s is complete: reusing it", store.root)
        store.remove_obsolete_chunks()
        return ExpansionResult(
            store.load(), store, 0, True, time.perf_counter() - start, info={"verified": verify}, fit_key=fitted
        )

    run = _Generation(
        expander, train, dataset_identity, context, fit_dir, seed, batch_size, num_workers, trainer_kwargs, callbacks
    )
    k = expander.ratio
    is_writer = rank_zero_only.rank == 0
    with store.lock(lock_timeout) if is_writer else nullcontext():
        if store.is_complete():  # damaged, or another job finished it while we waited for the lock
            damaged = store.check(digests=digests)
            if not damaged:
                return ExpansionResult(store.load(), store, 0, True, time.perf_counter() - start, fit_key=fitted)
            if not is_writer:
                raise ExpansionError(f"store {store.root} is damaged; repair it with one process (rank 0) first")
            log.warning(
                "store %s: %d damaged images (%s): regenerating them from their seeds",
                store.root,
                len(damaged),
                ", ".join(f"{r['file']} {r['problem']}" for r in damaged[:3]),
            )
            fit_seconds = run.setup()
            writer = StoreWriter(store, only={r["file"] for r in damaged}, images=len(damaged))
            run.predict(sorted({r["parent"] for r in damaged}), writer, devices=1)
            store.replace_images(writer.replacements)
            return ExpansionResult(
                store.load(),
                store,
                len(writer.replacements),
                True,
                time.perf_counter() - start,
                fit_seconds,
                info={"repaired": sorted(writer.replacements)},
                fit_key=fitted,
            )
        try:
            fit_seconds = run.setup()
            store.open_for_writing(k, writer=is_writer)
            done = store.done_parents(k)
            pending = [i for i in range(len(train)) if i not in done]
            if pending:
                log.info(
                    "expanding %d of %d seeds x%d into %s (%d already done)",
                    len(pending),
                    len(train),
                    k,
                    store.root,
                    len(done),
                )
                trainer = run.predict(pending, StoreWriter(store, images=len(pending) * k))
                if trainer.is_global_zero:
                    store.finalize(range(len(train)), k)
                trainer.strategy.barrier()
            else:
                store.finalize(range(len(train)), k)
        except BaseException:
            if is_writer and store.root.is_dir() and store.holds_nothing():  # a failed start leaves no empty store
                shutil.rmtree(store.root, ignore_errors=True)
            raise
    # every pending seed was written k times (by this process or, under DDP, by its ranks)
    return ExpansionResult(
        store.load(),
        store,
        len(pending) * k,
        False,
        time.perf_counter() - start,
        fit_seconds,
        info={"pending_at_start": len(pending), "signature": canonical_json(expander.signature())},
        fit_key=fitted,
    )


VERIFY_LEVELS = ("digests", "sizes")
#: at most this many images per generation batch: a huge ratio gets fewer seeds per batch, so that a
#: preemption (checked between batches) stops generation within one small batch
MAX_IMAGES_PER_BATCH = 4096


def seeds_per_batch(batch_size: int, ratio: int) -> int:
    """``batch_size`` seeds, or fewer so that a batch holds at most :data:`MAX_IMAGES_PER_BATCH` images
    (never fewer than one seed); the images do not depend on the batching (per-image seeds)."""
    return max(1, min(int(batch_size), MAX_IMAGES_PER_BATCH // max(1, int(ratio))))


@dataclass
class _Generation:
    """What expand_dataset needs to generate: preparing and fitting the expander once, then predicting
    the k images of some seeds into a writer."""

    expander: Expander
    train: Any
    dataset_identity: Mapping[str, Any]
    context: ExpansionContext | None
    fit_dir: Path | str
    seed: int
    batch_size: int
    num_workers: int
    trainer_kwargs: Mapping[str, Any] | None
    callbacks: Sequence[Callback]

    def setup(self) -> float:
        """prepare() (weights, guides) and, when the method has one, the cached fit; returns the fit's seconds."""
        identity = self.dataset_identity
        self.expander.prepare(
            self.context
            or ExpansionContext(
                dataset_name=str(identity.get("name", "")),
                class_names=list(identity.get("class_names", [])),
                channels=int(getattr(self.train, "channels", 3)),
                image_size=identity.get("image_size"),
                shots_per_class=fewest_per_class(self.train.labels),
            )
        )
        if not self.expander.needs_fit:
            return 0.0
        return fit_expander(self.expander, self.train, identity, self.fit_dir)

    def predict(self, parents: list[int], writer: StoreWriter, devices: int | None = None) -> L.Trainer:
        loader = DataLoader(
            SeedImages(self.train, parents),
            batch_size=seeds_per_batch(self.batch_size, self.expander.ratio),
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )
        kwargs = {
            "accelerator": "cpu",
            "devices": 1,
            "enable_progress_bar": False,
            **(self.trainer_kwargs or {}),
            # guided methods differentiate through their decoder: predict under no_grad, not inference_mode
            "inference_mode": not self.expander.needs_grad,
        }
        if devices is not None:  # a repair of a few images runs in this process alone
            kwargs.update(devices=devices, strategy="auto")
        trainer = L.Trainer(
            logger=False,
            enable_checkpointing=False,
            enable_model_summary=False,
            callbacks=[writer, *self.callbacks],
            **kwargs,
        )
        trainer.predict(ExpansionModule(self.expander, self.seed), loader, return_predictions=False)
        return trainer
