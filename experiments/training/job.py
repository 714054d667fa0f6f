"""A job's objects and typed settings, built from the composed config and checked before any data is
loaded or any image generated (:meth:`Job.from_config`), and the checks that need the data but no work:
memory and disk for the expansion (:func:`check_resources`). The run (:mod:`.pipeline`) and the pre-flight
(:mod:`.preflight`) both start here."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from expansion.base import Expander, ExpansionError
from expansion.store import ExpansionStore
from experiments.data.datasets import DatasetSplits
from experiments.data.datasets import core as datasets_core
from experiments.data.datasets.core import set_max_image_pixels
from experiments.quality import QualitySettings, quality_settings
from experiments.training.identity import FRAMEWORK_METHOD_KEYS

from .settings import ClassifierSettings, GenerationSettings, TrainSettings, core_settings

log = logging.getLogger(__name__)

#: Trainer arguments of classifier training that generation does not take
TRAINING_ONLY_TRAINER_KEYS = ("max_epochs", "gradient_clip_val", "deterministic", "log_every_n_steps", "benchmark")


def build_expander(method_cfg: DictConfig) -> Expander | None:
    """Instantiate the expander of ``cfg.method`` (None for ``original``)."""
    if method_cfg.get("_target_") is None:
        return None
    kwargs = {
        k: v for k, v in OmegaConf.to_container(method_cfg, resolve=True).items() if k not in FRAMEWORK_METHOD_KEYS
    }
    try:
        expander = instantiate(kwargs, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ExpansionError):
            raise cause from None
        raise ExpansionError(f"method {method_cfg.get('name')!r}: {cause or exc}") from exc
    if not isinstance(expander, Expander):
        raise ExpansionError(f"method {method_cfg.get('name')!r}: {method_cfg._target_} is not an Expander")
    return expander


@dataclass
class Job:
    """One job's objects and settings, built from the composed config and checked before any work."""

    cfg: DictConfig  # kept for what records the whole job: W&B's job config, the dataset loader
    expander: Expander | None
    train: TrainSettings
    classifier: ClassifierSettings
    quality: QualitySettings
    trainer: dict[str, Any]
    generation: GenerationSettings
    seed: int
    expansion_seed: int
    progress: bool
    threads: int = 1  # torch CPU threads while the job runs
    labels: dict[str, Any] = field(default_factory=dict)  # names and table ids for metrics.json
    imported: str | None = None  # method=imported: the shared set's folder or hub id

    @classmethod
    def from_config(cls, cfg: DictConfig) -> Job:
        """Every setting of the job, checked: a bad value is one :class:`ExpansionError` naming its key."""
        expander = build_expander(cfg.method)  # the method's settings and ratio
        ratio = cfg.method.get("ratio")
        if (
            expander is None
            and ratio not in (0, None)
            and (isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 1)
        ):
            # a valid ratio is ignored (one sweep sets it for original and the methods alike); a bad one is an error
            raise ExpansionError(
                f"method.ratio={ratio!r} is not a ratio (an integer >= 1; method={cfg.method.name} generates no "
                "images and ignores it)"
            )
        train, classifier, threads = core_settings(cfg)
        trainer = OmegaConf.to_container(cfg.trainer, resolve=True)
        imported = None
        if cfg.method.name == "imported":
            imported = cfg.method.get("path") if not OmegaConf.is_missing(cfg.method, "path") else None
            if not imported:
                raise ExpansionError("method=imported needs method.path: an exported folder or a hub dataset id")
            imported = str(imported)
        if expander is None and imported is None and not train.include_original:
            raise ExpansionError(
                "train.include_original=false trains on generated images only, but method=original "
                "generates none; pick an expansion method"
            )
        if expander is None and imported is None and train.synthetic.replaces:
            raise ExpansionError(
                f"train.synthetic.mode={train.synthetic.mode} replaces real images by generated ones, but "
                f"method={cfg.method.name} generates none; pick an expansion method or mode=concat"
            )
        if train.synthetic.soft_labels and imported is None and (expander is None or not expander.emits_soft_labels):
            raise ExpansionError(
                f"train.synthetic.soft_labels=true trains on soft labels, but method={cfg.method.name} emits none; "
                "set it false (an imported store is checked when it loads)"
            )
        check_accelerator(trainer)
        generation_trainer = {k: v for k, v in trainer.items() if k not in TRAINING_ONLY_TRAINER_KEYS}
        generation_trainer["precision"] = "32-true"
        if cfg.method.get("trainer"):  # a method may override trainer settings for generation (e.g. precision)
            generation_trainer.update(OmegaConf.to_container(cfg.method.trainer, resolve=True))
        progress = progress_bar_on(cfg.get("progress_bar", "auto"))
        generation_trainer["enable_progress_bar"] = progress
        generation = GenerationSettings(
            batch_size=int(cfg.method.get("batch_size", 64)),
            num_workers=int(cfg.method.get("num_workers", 0)),
            trainer=generation_trainer,
            store_dir=str(cfg.paths.store_dir),
            fit_dir=str(cfg.paths.fit_dir),
            lock_timeout=float(cfg.get("store_lock_timeout", -1)),
            verify=str(cfg.get("store_verify", "digests")),
        )
        return cls(
            cfg=cfg,
            expander=expander,
            train=train,
            classifier=classifier,
            quality=quality_settings(cfg.quality),
            trainer=trainer,
            generation=generation,
            seed=int(cfg.seed),
            expansion_seed=int(cfg.expansion_seed),
            progress=progress,
            threads=threads,
            imported=imported,
            labels={
                "table": cfg.get("table"),
                "method": cfg.method.name,
                "paper_method": cfg.method.get("paper_name"),
                "classifier": classifier.name,
                "train_per_class": cfg.dataset.get("train_per_class"),
                "extra_real_per_class": cfg.dataset.get("extra_real_per_class"),
                "prompt_prefix": cfg.dataset.get("prompt_prefix"),
                "recipe": cfg.dataset.recipe.augment,
                "tensor_dir": cfg.paths.get("tensor_dir"),
            },
        )

    @property
    def device(self) -> str:
        """Where the quality step runs: the GPU when the job trains on one."""
        accelerator = str(self.trainer.get("accelerator", "cpu"))
        return "cuda" if torch.cuda.is_available() and accelerator in ("gpu", "cuda", "auto") else "cpu"


def progress_bar_on(value: bool | str) -> bool:
    """``progress_bar``: true, false or ``auto`` (on when the output is a terminal; a job whose output goes to
    a file logs progress lines instead, :mod:`expansion.progress`)."""
    if value == "auto":
        return sys.stderr.isatty()
    if not isinstance(value, bool):
        raise ExpansionError(f"progress_bar={value!r}: use true, false or auto")
    return value


def check_accelerator(trainer: dict[str, Any]) -> None:
    """``trainer=gpu`` (or ddp) on a machine without a CUDA device is an error now, not after generation."""
    if str(trainer.get("accelerator", "cpu")) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ExpansionError(
            f"trainer.accelerator={trainer['accelerator']} but no CUDA device is visible here; "
            "use trainer=cpu (or run where a GPU is)"
        )


def check_resources(data: DatasetSplits, job: Job) -> None:
    """Refuse an expansion that would not fit, with the numbers, before anything is generated: its
    images decoded for training in this machine's memory (e.g. method.ratio=1e9), and the store's files
    on the disk of ``generation.store_dir`` (a complete store is reused and needs no room)."""
    expander = job.expander
    if expander is None:
        return
    images = len(data.train) * expander.ratio
    side = data.image_size or int(data.train[0][0].shape[-1])
    needed = images * data.channels * side * side
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > memory:
        raise ExpansionError(
            f"method.ratio={expander.ratio} would make {images:,} images of {data.channels}x{side}x{side}, "
            f"{needed / 2**30:,.1f} GiB decoded for training, more than this machine's {memory / 2**30:,.1f} GiB "
            "of memory; lower method.ratio or dataset.train_per_class"
        )
    store = ExpansionStore.at(job.generation.store_dir, data.identity, expander.signature(), job.expansion_seed)
    if store.is_complete():
        return
    disk = store_disk_estimate(images, expander, data.channels, side)
    folder = Path(job.generation.store_dir)
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if disk > free:
        raise ExpansionError(
            f"method.ratio={expander.ratio} would write {images:,} images, about {disk / 2**30:,.1f} GiB in "
            f"{job.generation.store_dir}, which has {free / 2**30:,.1f} GiB free; lower method.ratio or "
            "point paths.cache_dir at a larger disk"
        )
    size = f"{disk / 2**30:,.1f} GiB" if disk >= 2**30 else f"{disk / 2**20:,.1f} MiB"
    log.info("expansion: %s images to store, about %s on disk (%.1f GiB free)", f"{images:,}", size, free / 2**30)


def store_disk_estimate(images: int, expander: Expander, channels: int, side: int) -> int:
    """Rough bytes a store of ``images`` takes, on the low side (a refusal must not stop a store that
    would fit): each PNG half its raw pixels (generated images rarely compress better at PNG's level 1),
    in whole 4 KiB blocks, plus its manifest row and digest (~300 bytes). Images are stored with the
    dataset's channels at the method's ``output_size``, else its generator ``resolution``, else the
    dataset's side."""
    settings = getattr(expander, "settings", None)
    side = getattr(settings, "output_size", None) or getattr(settings, "resolution", None) or side
    block = 4096
    per_image = max(1, -(-(channels * int(side) ** 2 // 2) // block)) * block + 300
    return images * per_image


def configure_data_reading(cfg: DictConfig) -> None:
    """The process-wide settings of reading a dataset: the decompression-bomb limit, where content
    fingerprints are cached."""
    set_max_image_pixels(cfg.get("max_image_pixels"))
    datasets_core.FINGERPRINT_CACHE = Path(cfg.paths.cache_dir) / "fingerprints"


def data_fingerprint_of(cfg: DictConfig) -> Callable[[], str]:
    """The fingerprint of the data a job trains and is tested on (every split's content; see
    ``DatasetSplits.fingerprint``), computed on the first call only: a job's identity is its config hash
    and this (a relabelled dataset is another job)."""

    @functools.cache
    def fingerprint() -> str:
        from experiments.data.datasets import build_dataset

        configure_data_reading(cfg)
        return build_dataset(cfg.dataset).fingerprint()

    return fingerprint
