"""One experiment run: data -> expand -> train -> evaluate -> metrics.json.

``run(cfg)`` is what ``run.py`` calls; every object is built from the Hydra
config, so a run is fully described by its ``.hydra/config.yaml``.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from omegaconf import DictConfig, OmegaConf

from expansion.base import Expander, ExpansionContext, ExpansionError
from expansion.engine import ExpansionResult, expand_dataset
from expansion.files import atomic_write_text

from . import wandb_logging
from .checkpoints import LAST_CHECKPOINT, AtomicCheckpointIO, StampRunSignature, resume_point, training_signature
from .classifier import ImageClassifier
from .data import ExpansionDataModule, load_expanded_images
from .datasets import DatasetSplits, build_dataset
from .preemption import PREEMPTED_CHECKPOINT, PREEMPTION, StopOnPreemption
from .timing import EpochTimer

log = logging.getLogger(__name__)

#: method config keys that belong to the framework, not to the expander's constructor
FRAMEWORK_METHOD_KEYS = ("name", "paper_name", "paper_settings", "batch_size", "num_workers", "trainer")


def build_expander(method_cfg: DictConfig) -> Expander | None:
    """Instantiate the expander of ``cfg.method`` (None for ``original``)."""
    if method_cfg.get("_target_") is None:
        return None
    kwargs = {k: v for k, v in OmegaConf.to_container(method_cfg, resolve=True).items()
              if k not in FRAMEWORK_METHOD_KEYS}
    try:
        expander = instantiate(kwargs, _convert_="all")
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ExpansionError):
            raise cause from None
        # e.g. an unknown option: TypeError "got an unexpected keyword argument 'foo'"
        raise ExpansionError(f"method {method_cfg.get('name')!r}: {cause or exc}") from exc
    if not isinstance(expander, Expander):
        raise ExpansionError(f"method {method_cfg.get('name')!r}: {method_cfg._target_} is not an Expander")
    return expander


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.trainer, resolve=True)  # type: ignore[return-value]


def run_expansion(cfg: DictConfig, data: DatasetSplits, expander: Expander) -> ExpansionResult:
    gen_trainer = dict(trainer_kwargs(cfg))
    # expanders manage their own dtypes (e.g. fp16 UNet, fp32 VAE): no autocast around generation
    gen_trainer["precision"] = "32-true"
    if cfg.method.get("trainer"):  # a method may override trainer settings for generation (e.g. precision)
        gen_trainer.update(OmegaConf.to_container(cfg.method.trainer, resolve=True))
    for key in ("max_epochs", "gradient_clip_val", "deterministic", "log_every_n_steps", "benchmark"):
        gen_trainer.pop(key, None)
    gen_trainer["enable_progress_bar"] = bool(cfg.get("progress_bar", False))
    context = ExpansionContext(dataset_name=data.name, class_names=data.class_names, channels=data.channels,
                               image_size=data.image_size, prompt_prefix=cfg.dataset.get("prompt_prefix"),
                               auxiliary=data.unused_train)
    return expand_dataset(
        expander,
        data.train,
        data.identity,
        context=context,
        store_dir=cfg.paths.store_dir,
        fit_dir=cfg.paths.fit_dir,
        seed=int(cfg.expansion_seed),
        batch_size=int(cfg.method.get("batch_size", 64)),
        num_workers=int(cfg.method.get("num_workers", 0)),
        trainer_kwargs=gen_trainer,
        lock_timeout=float(cfg.get("store_lock_timeout", -1)),
        callbacks=[StopOnPreemption()],
    )


def classifier_input_size(cfg: DictConfig, data: DatasetSplits) -> int:
    input_size = int(cfg.classifier.get("input_size") or data.image_size or 0)
    if input_size <= 0:
        raise ValueError("set classifier.input_size or dataset.image_size")
    return input_size


def build_datamodule(cfg: DictConfig, data: DatasetSplits, expanded_images, expanded_labels,
                     include_original: bool = True) -> ExpansionDataModule:
    return ExpansionDataModule(
        data, expanded_images, expanded_labels,
        recipe=cfg.dataset.recipe.augment, input_size=classifier_input_size(cfg, data),
        batch_size=int(cfg.train.batch_size), eval_batch_size=int(cfg.train.eval_batch_size),
        num_workers=int(cfg.train.num_workers),
        include_original=include_original,
    )


def build_classifier(cfg: DictConfig, data: DatasetSplits) -> ImageClassifier:
    net_kwargs = cfg.classifier.get("kwargs")  # an empty mapping is falsy: {}
    return ImageClassifier(
        cfg.classifier.arch, data.num_classes, data.channels, classifier_input_size(cfg, data),
        lr=float(cfg.train.lr), momentum=float(cfg.train.momentum), weight_decay=float(cfg.train.weight_decay),
        epochs=int(cfg.train.epochs), warmup_epochs=int(cfg.train.warmup_epochs),
        label_smoothing=float(cfg.train.label_smoothing),
        channels_last=bool(cfg.classifier.get("channels_last", False)),
        net_kwargs=OmegaConf.to_container(net_kwargs, resolve=True) if net_kwargs else {},
        compile=cfg.train.get("compile", False),
    )


def train_and_evaluate(cfg: DictConfig, data: DatasetSplits, expanded_images, expanded_labels, run_dir: Path,
                       logger: Any, include_original: bool = True) -> dict[str, Any]:
    """Train on original (+ expanded) images, or on the expanded images alone; report final-epoch
    test accuracy and test accuracy at the best validation epoch (never selecting on test)."""
    datamodule = build_datamodule(cfg, data, expanded_images, expanded_labels, include_original)
    model = build_classifier(cfg, data)
    checkpoints = run_dir / "checkpoints"
    # best.ckpt only serves the test at the best val epoch: weights only, half the bytes of a full checkpoint
    checkpoint = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val/acc", mode="max", save_top_k=1,
                                 save_weights_only=True)
    # last.ckpt after every epoch (Lightning >= 2.6's save_last only refreshes it with a new best)
    latest = ModelCheckpoint(dirpath=checkpoints, filename=LAST_CHECKPOINT.removesuffix(".ckpt"), save_top_k=1,
                             enable_version_counter=False)
    # a requeued or rerun job with the same run dir resumes from its newest checkpoint
    signature = training_signature(cfg, data.identity, expanded_images is not None, include_original)
    resume = resume_point(checkpoints, signature)
    kwargs = trainer_kwargs(cfg)
    kwargs.setdefault("enable_progress_bar", bool(cfg.get("progress_bar", False)))
    epoch_timer = EpochTimer()
    callbacks = [checkpoint, latest, StampRunSignature(signature),
                 StopOnPreemption(checkpoint_path=str(checkpoints / PREEMPTED_CHECKPOINT)), epoch_timer]
    trainer = L.Trainer(max_epochs=int(cfg.train.epochs), logger=logger, callbacks=callbacks,
                        # checkpoints are written by a background thread from a copy of the state (atomic as
                        # before; fit waits for the last one), so the epochs do not wait for the disk
                        plugins=[AsyncCheckpointIO(AtomicCheckpointIO())], default_root_dir=str(run_dir),
                        num_sanity_val_steps=0, enable_model_summary=False, **kwargs)
    if resume:
        log.info("resuming training from %s (epoch %d, step %d)", resume[0], resume[1]["epoch"],
                 resume[1]["global_step"])
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume[0] if resume else None, weights_only=True)
    train_seconds = time.perf_counter() - start
    (checkpoints / PREEMPTED_CHECKPOINT).unlink(missing_ok=True)  # superseded by last.ckpt
    history = list(model.val_history)
    final = trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]
    best = trainer.test(model, datamodule=datamodule, ckpt_path=checkpoint.best_model_path, verbose=False,
                        weights_only=True)[0]["test/acc"]
    best_epoch = int(np.argmax(history)) if history else -1
    steps_now = trainer.global_step - (resume[1]["global_step"] if resume else 0)
    epochs_now = int(cfg.train.epochs) * steps_now / max(trainer.global_step, 1)
    return {
        "test_acc_final": 100.0 * float(final),
        "test_acc_best_val": 100.0 * float(best),
        "best_val_acc": 100.0 * float(max(history)) if history else None,
        "best_val_epoch": best_epoch,
        "epochs": int(cfg.train.epochs),
        "num_train_images": datamodule.num_train,
        "train_seconds": round(train_seconds, 3),
        "epoch_seconds": [round(t, 4) for t in epoch_timer.epoch_seconds],
        "images_per_second": round(datamodule.num_train * epochs_now / max(train_seconds, 1e-9), 1),
        "resumed_from": {"checkpoint": resume[0].name, **resume[1]} if resume else None,
    }


def make_logger(cfg: DictConfig, run_dir: Path) -> Any:
    logger_cfg = cfg.get("logger")
    if not logger_cfg or logger_cfg.get("_target_") is None:
        return False
    if wandb_logging.is_wandb_config(logger_cfg):
        return wandb_logging.make_wandb_logger(cfg, run_dir)
    return instantiate(logger_cfg, save_dir=str(run_dir))


def run(cfg: DictConfig, run_dir: Path | str | None = None) -> dict[str, Any]:
    """Run one experiment; returns (and writes to ``run_dir/metrics.json``) its metrics.
    Its W&B run (if any) is finished however the job ends, marked failed unless it succeeded."""
    try:
        metrics = _run(cfg, run_dir)
    except BaseException as exc:
        wandb_logging.finish_run(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
        raise
    wandb_logging.finish_run(0)
    return metrics


def _run(cfg: DictConfig, run_dir: Path | str | None = None) -> dict[str, Any]:
    run_dir = Path(run_dir) if run_dir is not None else _hydra_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    total_start = time.perf_counter()
    expander = build_expander(cfg.method)  # validates the method (ratio, options) before any data work
    include_original = bool(cfg.train.get("include_original", True))
    if expander is None and not include_original:
        raise ValueError("train.include_original=false trains on generated images only, but method=original "
                         "generates none; pick an expansion method")
    # decode every split once, before any expansion or training: data that fits in memory stays
    # there, and an unreadable file fails now, with nothing generated
    data = build_dataset(cfg.dataset).in_memory(tensor_dir=cfg.paths.get("tensor_dir"))
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    logger = make_logger(cfg, run_dir)

    metrics: dict[str, Any] = {
        "table": cfg.get("table"),
        "dataset": data.name,
        "method": cfg.method.name,
        "paper_method": cfg.method.get("paper_name"),
        "classifier": cfg.classifier.name,
        "ratio": expander.ratio if expander else 0,
        "train_data": "original+generated" if include_original else "generated only",
        "train_per_class": cfg.dataset.get("train_per_class"),
        "extra_real_per_class": cfg.dataset.get("extra_real_per_class"),
        "seed": int(cfg.seed),
        "expansion_seed": int(cfg.expansion_seed),
        "num_classes": data.num_classes,
        "sizes": data.sizes(),
    }
    expanded_images = expanded_labels = None
    if expander is not None:
        result = run_expansion(cfg, data, expander)
        expanded_images = load_expanded_images(result.expanded, data.channels, data.image_size,
                                               tensor_dir=cfg.paths.get("tensor_dir"))
        expanded_labels = result.expanded.labels
        metrics["expansion"] = {
            "store": str(result.store.root), "key": result.store.key, "num_images": len(result.expanded),
            "generated_images": result.generated_images, "reused": result.reused,
            "seconds": round(result.seconds, 3), "fit_seconds": round(result.fit_seconds, 3),
        }
        log.info("expansion: %d images (%d generated now) in %.1fs", len(result.expanded),
                 result.generated_images, result.seconds)
        if (cfg.get("quality") or {}).get("enabled", False):
            from .quality import evaluate_expansion

            metrics["quality"] = evaluate_expansion(cfg, data, result.expanded, expanded_images, run_dir)
            log.info("quality (%s): FID %.3f, label agreement %s, Vendi %.2f (original %.2f), "
                     "near-duplicates %d, in %.1fs", metrics["quality"]["feature_extractor"],
                     metrics["quality"]["fid"], metrics["quality"]["label_agreement"],
                     metrics["quality"]["vendi_expanded"], metrics["quality"]["vendi_original"],
                     metrics["quality"]["near_duplicates"], metrics["quality"]["seconds"])
        if isinstance(logger, WandbLogger):
            wandb_logging.log_expansion(logger, cfg, metrics, data, result.expanded, expanded_images, run_dir)
    PREEMPTION.stop_if_requested()  # a signal during expansion or quality: stop before training
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    metrics.update(train_and_evaluate(cfg, data, expanded_images, expanded_labels, run_dir / "train",
                                      logger, include_original))
    if expander is not None and _compare_original(cfg):
        PREEMPTION.stop_if_requested()
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        metrics["original"] = train_and_evaluate(cfg, data, None, None, run_dir / "train_original", False)
    metrics["total_seconds"] = round(time.perf_counter() - total_start, 3)
    if isinstance(logger, WandbLogger):
        wandb_logging.log_results(logger, metrics)
    atomic_write_text(run_dir / "metrics.json", json.dumps(metrics, indent=2))
    print(summary_line(metrics))
    return metrics


def summary_line(m: dict[str, Any]) -> str:
    data = "" if m.get("train_data", "original+generated") == "original+generated" else f" ({m['train_data']})"
    line = (f"[{m['dataset']} | {m['method']} x{m['ratio']}{data} | {m['classifier']} | seed {m['seed']}] "
            f"test acc: final {m['test_acc_final']:.2f}%, at best val epoch {m['test_acc_best_val']:.2f}%")
    if "original" in m:
        o = m["original"]
        line += (f"\n[{m['dataset']} | original (no expansion) | {m['classifier']} | seed {m['seed']}] "
                 f"test acc: final {o['test_acc_final']:.2f}%, at best val epoch {o['test_acc_best_val']:.2f}%"
                 f"\nexpanded - original: {m['test_acc_final'] - o['test_acc_final']:+.2f} points (final epoch)")
    return line


def _compare_original(cfg: DictConfig) -> bool:
    """``train.compare_original``: true/false, or ``auto`` = only in a single run (in a
    multirun, ``method=original`` is a job of its own and training it again in every job is waste)."""
    value = cfg.train.get("compare_original", "auto")
    if value == "auto":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN)
    return bool(value)


def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
