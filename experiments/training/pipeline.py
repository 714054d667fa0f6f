"""One experiment run: data -> expand -> train -> evaluate -> metrics.json.

``run(cfg)`` is what ``run.py`` calls. :meth:`Job.from_config` builds every object and typed setting
from the Hydra config and checks them all before any data is loaded or any image generated; the
steps below receive only what they need. A run is fully described by its ``.hydra/config.yaml``.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from omegaconf import DictConfig

from expansion import progress
from expansion.base import Expander, ExpansionContext, ExpansionError, fewest_per_class
from expansion.engine import ExpansionResult, expand_dataset
from experiments.data.datamodule import ExpansionDataModule, load_expanded_images
from experiments.data.datasets import DatasetSplits, build_dataset
from experiments.environment import environment
from experiments.record import ExpansionRecord, RunRecord, TrainingResult
from experiments.training.identity import config_hash, experiment_settings, training_signature

from . import preflight, wandb_logging
from .checkpoints import LAST_CHECKPOINT, AtomicCheckpointIO, StampRunSignature, resume_point
from .classifier import ImageClassifier
from .job import Job, check_resources, configure_data_reading
from .preemption import PREEMPTED_CHECKPOINT, PREEMPTION, StopOnPreemption
from .settings import optimizer_budget
from .timing import EpochLog

log = logging.getLogger(__name__)


def run_expansion(job: Job, data: DatasetSplits, expander: Expander | None = None) -> ExpansionResult:
    """The job's expansion (``expander``: another expander object than the job's own, e.g. a wrapped one)."""
    expander = expander or job.expander
    gen = job.generation
    context = ExpansionContext(
        dataset_name=data.name,
        class_names=data.class_names,
        channels=data.channels,
        image_size=data.image_size,
        prompt_prefix=job.labels["prompt_prefix"],
        auxiliary=data.unused_train,
        shots_per_class=fewest_per_class(data.train.labels),
    )
    return expand_dataset(
        expander,
        data.train,
        data.identity,
        context=context,
        store_dir=gen.store_dir,
        fit_dir=gen.fit_dir,
        seed=job.expansion_seed,
        batch_size=gen.batch_size,
        num_workers=gen.num_workers,
        trainer_kwargs=gen.trainer,
        lock_timeout=gen.lock_timeout,
        callbacks=[StopOnPreemption()],
        verify=gen.verify,
    )


def classifier_input_size(job: Job, data: DatasetSplits) -> int:
    input_size = int(job.classifier.input_size or data.image_size or 0)
    if input_size <= 0:
        raise ExpansionError("set classifier.input_size or dataset.image_size")
    return input_size


def build_datamodule(
    job: Job,
    data: DatasetSplits,
    expanded_images,
    expanded_labels,
    include_original: bool = True,
    expanded_parents=None,
) -> ExpansionDataModule:
    t = job.train
    return ExpansionDataModule(
        data,
        expanded_images,
        expanded_labels,
        recipe=job.labels["recipe"],
        input_size=classifier_input_size(job, data),
        batch_size=t.batch_size,
        eval_batch_size=t.eval_batch_size,
        num_workers=t.num_workers,
        include_original=include_original,
        test_every_epoch=t.test_every_epoch,
        online_augment=online_augmenter(t.online_augment),
        synthetic=t.synthetic if expanded_images is not None else None,
        expanded_parents=expanded_parents,
    )


def online_augmenter(name: str):
    """The offline baseline ``name`` at its configured defaults, one image per seed (None for none)."""
    if name == "none":
        return None
    from experiments.presets import create_expander

    return create_expander(name, ratio=1)


def build_classifier(job: Job, data: DatasetSplits, epochs: int | None = None) -> ImageClassifier:
    """The job's network and optimizer; ``epochs``: the schedule's length (default ``train.epochs``)."""
    t, c = job.train, job.classifier
    return ImageClassifier(
        c.arch,
        data.num_classes,
        data.channels,
        classifier_input_size(job, data),
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        epochs=epochs or t.epochs,
        warmup_epochs=t.warmup_epochs,
        label_smoothing=t.label_smoothing,
        channels_last=c.channels_last,
        net_kwargs=dict(c.kwargs),
        compile=t.compile,
    )


def train_and_evaluate(
    job: Job,
    data: DatasetSplits,
    expanded_images,
    expanded_labels,
    run_dir: Path,
    logger: Any,
    include_original: bool = True,
    store_key: str | None = None,
    what: str = "training",
    expanded_parents=None,
) -> TrainingResult:
    """Train on original (+ expanded) images, or on the expanded images alone; report final-epoch
    test accuracy and test accuracy at the best validation epoch (never selecting on test). With
    ``train.test_every_epoch`` also the official scripts' selection, the best test accuracy over the
    epochs (``test_acc_best_test``: optimistic, reported beside the others, never used to select)."""
    datamodule = build_datamodule(job, data, expanded_images, expanded_labels, include_original, expanded_parents)
    budget = optimizer_budget(job.train, datamodule.num_train, len(data.train))
    model = build_classifier(job, data, budget.epochs)
    checkpoints = run_dir / "checkpoints"
    # best.ckpt only serves the test at the best val epoch: weights only, half the bytes of a full checkpoint
    checkpoint = ModelCheckpoint(
        dirpath=checkpoints, filename="best", monitor="val/acc", mode="max", save_top_k=1, save_weights_only=True
    )
    # last.ckpt after every epoch (Lightning >= 2.6's save_last only refreshes it with a new best)
    latest = ModelCheckpoint(
        dirpath=checkpoints, filename=LAST_CHECKPOINT.removesuffix(".ckpt"), save_top_k=1, enable_version_counter=False
    )
    # a requeued or rerun job with the same run dir resumes from its newest checkpoint
    signature = training_signature(
        dataset_identity=data.identity,
        store_key=store_key,
        include_original=include_original,
        classifier=job.classifier,
        train=job.train,
        seed=job.seed,
        extra_real=len(data.extra_train) if data.extra_train is not None else 0,
    )
    resume = resume_point(checkpoints, signature)
    kwargs = dict(job.trainer)
    kwargs.setdefault("enable_progress_bar", job.progress)
    epoch_timer = EpochLog(log, what)
    callbacks = [
        checkpoint,
        latest,
        StampRunSignature(signature),
        StopOnPreemption(checkpoint_path=str(checkpoints / PREEMPTED_CHECKPOINT)),
        epoch_timer,
    ]
    epochs = budget.epochs
    trainer = L.Trainer(
        max_epochs=epochs,
        max_steps=budget.max_steps,
        check_val_every_n_epoch=budget.val_every,
        logger=logger,
        callbacks=callbacks,
        # checkpoints are written by a background thread from a copy of the state (atomic as
        # before; fit waits for the last one), so the epochs do not wait for the disk
        plugins=[AsyncCheckpointIO(AtomicCheckpointIO())],
        default_root_dir=str(run_dir),
        num_sanity_val_steps=0,
        enable_model_summary=False,
        **kwargs,
    )
    if resume:
        log.info(
            "resuming training from %s (epoch %d, step %d)", resume[0], resume[1]["epoch"], resume[1]["global_step"]
        )
    start = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume[0] if resume else None, weights_only=True)
    train_seconds = time.perf_counter() - start
    (checkpoints / PREEMPTED_CHECKPOINT).unlink(missing_ok=True)  # superseded by last.ckpt
    validated_at_end = not checkpoint.best_model_path
    if validated_at_end:
        # a step budget that ends inside the first validation interval stops mid-epoch, before any validation:
        # the final weights are validated once and are the best-val candidate (the only one)
        trainer.validate(model, datamodule=datamodule, verbose=False)
    history = list(model.val_history)
    # taken before testing the best checkpoint, whose loading restores the histories up to its epoch;
    # only when every validation also tested (a run resumed with test_every_epoch switched on did not)
    test_history = list(model.test_history) if model.test_history and len(model.test_history) == len(history) else None
    final = trainer.test(model, datamodule=datamodule, verbose=False)[0]["test/acc"]
    final_scores = dict(model.test_scores)
    if validated_at_end:
        best, best_epoch = final, epochs - 1
    else:
        best = trainer.test(
            model, datamodule=datamodule, ckpt_path=checkpoint.best_model_path, verbose=False, weights_only=True
        )[0]["test/acc"]
        best_epoch = (int(np.argmax(history)) + 1) * budget.val_every - 1 if history else -1
    steps_now = trainer.global_step - (resume[1]["global_step"] if resume else 0)
    epochs_now = epochs * steps_now / max(trainer.global_step, 1)
    return TrainingResult(
        test_acc_final=100.0 * float(final),
        test_acc_best_val=100.0 * float(best),
        best_val_acc=100.0 * float(max(history)) if history else None,
        best_val_epoch=best_epoch,
        test_acc_best_test=100.0 * max(test_history) if test_history else None,
        test_acc_per_epoch=[round(100.0 * a, 4) for a in test_history] if test_history else None,
        test_balanced_acc_final=final_scores.get("balanced_acc"),
        test_auc_final=final_scores.get("auc"),
        test_per_class_acc_final=final_scores.get("per_class_acc"),
        epochs=epochs,
        optimizer_steps=trainer.global_step,
        optimizer_budget=budget.as_dict(),
        num_train_images=datamodule.num_train,
        train_seconds=round(train_seconds, 3),
        epoch_seconds=[round(t, 4) for t in epoch_timer.epoch_seconds],
        train_loss_per_epoch=[None if v is None else round(v, 5) for v in epoch_timer.train_loss],
        val_acc_per_epoch=[round(100.0 * v, 4) for v in history],
        images_per_second=round(datamodule.num_train * epochs_now / max(train_seconds, 1e-9), 1),
        resumed_from={"checkpoint": resume[0].name, **resume[1]} if resume else None,
    )


def make_logger(cfg: DictConfig, run_dir: Path) -> Any:
    logger_cfg = cfg.get("logger")
    if not logger_cfg or logger_cfg.get("_target_") is None:
        return False
    if wandb_logging.is_wandb_config(logger_cfg):
        return wandb_logging.make_wandb_logger(cfg, run_dir)
    return instantiate(logger_cfg, save_dir=str(run_dir))


#: third-party messages that say nothing about the run: Lightning's advertisement for its cloud logger
#: (once per Trainer) and a deprecation inside Lightning's own code (once per fit)
KNOWN_NOISE_LOGS = ("💡 Tip:",)
KNOWN_NOISE_WARNINGS = (r"`isinstance\(treespec, LeafSpec\)` is deprecated",)


class _DropKnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(KNOWN_NOISE_LOGS)


def silence_known_noise() -> None:
    """Filter :data:`KNOWN_NOISE_LOGS` and :data:`KNOWN_NOISE_WARNINGS` (nothing else) from the job's output."""
    import warnings

    for message in KNOWN_NOISE_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropKnownNoise) for f in rank_zero.filters):
        rank_zero.addFilter(_DropKnownNoise())


def run(cfg: DictConfig, run_dir: Path | str | None = None) -> RunRecord:
    """Run one experiment; returns (and writes to ``run_dir/metrics.json``) its record.
    Its W&B run (if any) is finished however the job ends, marked failed unless it succeeded."""
    silence_known_noise()
    try:
        record = _run(cfg, run_dir)
    except BaseException as exc:
        wandb_logging.finish_run(exc.code if isinstance(exc, SystemExit) and isinstance(exc.code, int) else 1)
        raise
    wandb_logging.finish_run(0)
    return record


def _run(cfg: DictConfig, run_dir: Path | str | None = None) -> RunRecord:
    run_dir = Path(run_dir) if run_dir is not None else _hydra_run_dir()
    total_start = time.perf_counter()
    job = Job.from_config(cfg)  # every setting checked before any data work or generation
    if preflight.mode(cfg) != "off":
        preflight.check_weights(job)  # every missing pretrained weight named at once, before any work
    run_dir.mkdir(parents=True, exist_ok=True)
    progress.EVERY_SECONDS = float(cfg.get("progress_every_s", progress.EVERY_SECONDS))
    with exclusive_run_dir(run_dir), torch_threads(job.threads):
        return _run_job(cfg, job, run_dir, total_start)


@contextmanager
def torch_threads(threads: int):
    """torch's CPU threads set to ``threads`` while the job runs, then restored (an in-process caller keeps its own)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def exclusive_run_dir(run_dir: Path):
    """One job at a time in a run dir (two would train into the same checkpoints): a second is refused
    (run.py owns the folder already; ownership is re-entrant within a process)."""
    from experiments.jobs import RunFolderBusy, own_run_folder

    try:
        with own_run_folder(run_dir, wait=False):
            yield
    except RunFolderBusy as exc:
        raise ExpansionError(str(exc)) from None


def _run_job(cfg: DictConfig, job: Job, run_dir: Path, total_start: float) -> RunRecord:
    # decode every split once, before any expansion or training: data that fits in memory stays
    # there, and an unreadable file fails now, with nothing generated
    configure_data_reading(cfg)
    data = build_dataset(cfg.dataset)
    data_fingerprint = data.fingerprint()  # with the config hash, the job's identity
    data = data.in_memory(tensor_dir=job.labels["tensor_dir"])
    check_resources(data, job)
    L.seed_everything(job.seed, workers=True, verbose=False)
    logger = make_logger(cfg, run_dir)
    expander, include_original = job.expander, job.train.include_original
    imported = ratio = None
    if job.imported is not None:  # a shared set stands in for the expansion
        from experiments.data.sharing import import_set

        imported, ratio, made_by = import_set(
            job.imported, Path(job.generation.store_dir), data, verify_digests=job.generation.verify == "digests"
        )
        job.labels["method"] = f"imported({made_by})"
    elif expander is not None:
        ratio = expander.ratio

    facts: dict[str, Any] = dict(
        config_hash=config_hash(cfg),  # the job's identity, with data_fingerprint: a finished twin is not redone
        data_fingerprint=data_fingerprint,
        settings=experiment_settings(cfg),  # the experiment (one results row): the identity less the seed
        table=job.labels["table"],
        dataset=data.name,
        dataset_source=data.identity["source"],  # how the splits were made (official, npz file, flat folder ...)
        method=job.labels["method"],
        paper_method=job.labels["paper_method"],
        classifier=job.labels["classifier"],
        ratio=ratio or 0,
        train_data="original" if ratio is None else "original+generated" if include_original else "generated only",
        train_per_class=job.labels["train_per_class"],
        extra_real_per_class=job.labels["extra_real_per_class"],
        seed=job.seed,
        expansion_seed=job.expansion_seed,
        num_classes=data.num_classes,
        sizes=data.sizes(),
    )
    expanded_images = expanded_labels = expanded_parents = store_key = None
    if ratio is not None:
        cpu_start = time.process_time()  # every thread of this process: the generation's CPU cost (not a lock's wait)
        result = imported or run_expansion(job, data)
        expansion_cpu_seconds = time.process_time() - cpu_start
        store_key = result.store.key
        expanded_images = load_expanded_images(
            result.expanded, data.channels, data.image_size, tensor_dir=job.labels["tensor_dir"]
        )
        expanded_labels = (
            result.expanded.soft_labels(data.num_classes) if job.train.synthetic.soft_labels else result.expanded.labels
        )
        expanded_parents = result.expanded.parents
        facts["expansion"] = ExpansionRecord(
            store=str(result.store.root),
            key=result.store.key,
            num_images=len(result.expanded),
            generated_images=result.generated_images,
            reused=bool(result.reused),
            seconds=round(result.seconds, 3),
            fit_seconds=round(result.fit_seconds, 3),
            cpu_seconds=round(expansion_cpu_seconds, 3),
            fit_key=result.fit_key,
        )
        log.info(
            "expansion: %d images (%d generated now) in %.1fs",
            len(result.expanded),
            result.generated_images,
            result.seconds,
        )
        if job.quality.enabled:
            from experiments.quality import evaluate_expansion

            title = f"{data.name} | {job.labels['method']} x{ratio} | expansion seed {job.expansion_seed}"
            q = evaluate_expansion(
                job.quality,
                data,
                result.expanded,
                expanded_images,
                run_dir,
                seed=job.expansion_seed,
                device=job.device,
                title=title,
                progress=job.progress,
                cache_dir=Path(job.generation.fit_dir) / "quality_probes",
            )
            facts["quality"] = q
            log.info(
                "quality (%s): FID %.3f, label agreement %s, Vendi %.2f (original %.2f), near-duplicates %d, in %.1fs",
                q["feature_extractor"],
                q["fid"],
                q["label_agreement"],
                q["vendi_expanded"],
                q["vendi_original"],
                q["near_duplicates"],
                q["seconds"],
            )
        if isinstance(logger, WandbLogger):
            wandb_logging.log_expansion(logger, cfg, facts, data, result.expanded, expanded_images, run_dir)
    PREEMPTION.stop_if_requested()  # a signal during expansion or quality: stop before training
    L.seed_everything(job.seed, workers=True, verbose=False)
    facts["training"] = train_and_evaluate(
        job,
        data,
        expanded_images,
        expanded_labels,
        run_dir / "train",
        logger,
        include_original,
        store_key=store_key,
        expanded_parents=expanded_parents,
    )
    if ratio is not None and compare_original(job.train.compare_original):
        PREEMPTION.stop_if_requested()
        L.seed_everything(job.seed, workers=True, verbose=False)
        facts["original"] = train_and_evaluate(
            job, data, None, None, run_dir / "train_original", False, what="training (original)"
        )
    facts["total_seconds"] = round(time.perf_counter() - total_start, 3)
    facts["environment"] = environment(job.device)
    record = RunRecord(**facts)
    if isinstance(logger, WandbLogger):
        wandb_logging.log_results(logger, record)
    record = dataclasses.replace(record, path=record.write(run_dir))
    plot_learning_curves(record, run_dir / LEARNING_CURVE_FILE)
    log.info("%s", phase_times(record))
    print(summary_line(record))
    return record


LEARNING_CURVE_FILE = "learning_curve.png"


def phase_times(r: RunRecord) -> str:
    """``done in 3 min 05 s: expansion 40 s (fit 12 s), quality 80 s, training 52 s, ...``: where the time went."""
    from expansion.progress import duration

    phases = []
    if r.expansion is not None:
        fit = f" (fit {duration(r.expansion.fit_seconds)})" if r.expansion.fit_seconds else ""
        reused = " (reused)" if r.expansion.reused else ""
        phases.append(f"expansion {duration(r.expansion.seconds)}{fit}{reused}")
    if r.quality is not None and r.quality.get("seconds") is not None:
        phases.append(f"quality {duration(float(r.quality['seconds']))}")
    for name, result in (("training", r.training), ("training (original)", r.original)):
        if result is not None and result.train_seconds is not None:
            phases.append(f"{name} {duration(result.train_seconds)}")
    total = duration(r.total_seconds or 0.0)
    return f"done in {total}: " + ", ".join(phases) + " (the rest: loading data, testing, writing)"


def plot_learning_curves(r: RunRecord, path: Path) -> Path | None:
    """The run's learning curves (train loss, val and test accuracy per epoch; the original's too when the
    job trained it) in one figure beside its metrics.json; None when no epoch was recorded."""
    curves = [(name, t) for name, t in (("expanded", r.training), ("original", r.original)) if t is not None]
    if r.train_data == "original":
        curves = [("original", r.training)]
    if not any(t.train_loss_per_epoch or t.val_acc_per_epoch for _, t in curves):
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from expansion.files import atomic_write_bytes

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.4))
    for (name, t), color in zip(curves, ("tab:blue", "tab:gray")):
        every = int((t.optimizer_budget or {}).get("val_every", 1) or 1)
        first = int((t.resumed_from or {}).get("epoch", -1)) + 1 if t.resumed_from else 0
        losses = [(first + i + 1, v) for i, v in enumerate(t.train_loss_per_epoch or []) if v is not None]
        if losses:
            loss_ax.plot(*zip(*losses), color=color, label=name)
        if t.val_acc_per_epoch:
            epochs = [every * (i + 1) for i in range(len(t.val_acc_per_epoch))]
            acc_ax.plot(epochs, t.val_acc_per_epoch, color=color, label=f"{name}: val")
        if t.test_acc_per_epoch:
            epochs = [every * (i + 1) for i in range(len(t.test_acc_per_epoch))]
            acc_ax.plot(epochs, t.test_acc_per_epoch, color=color, linestyle="--", label=f"{name}: test")
        acc_ax.plot([t.epochs or 0], [t.test_acc_final], marker="o", color=color, linestyle="none")
    loss_ax.set(xlabel="epoch", ylabel="train loss (epoch mean)")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", ylim=(0, 100))
    acc_ax.set_title("dot: final test accuracy; axis from 0", fontsize=8)
    for ax in (loss_ax, acc_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    what = "original" if r.train_data == "original" else f"{r.method} x{r.ratio}"
    fig.suptitle(f"{r.dataset} | {what} | {r.classifier} | seed {r.seed}", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


ORIGINAL_LABEL = "original (no expansion)"


def _accuracies(t: TrainingResult) -> str:
    text = f"test acc: final {t.test_acc_final:.2f}%, at best val epoch {t.test_acc_best_val:.2f}%"
    if t.test_acc_best_test is not None:
        text += f", best test epoch {t.test_acc_best_test:.2f}% (as the paper selects; optimistic)"
    return text


def summary_line(r: RunRecord) -> str:
    data = " (generated only)" if r.generated_only else ""
    what = ORIGINAL_LABEL if r.train_data == "original" else f"{r.method} x{r.ratio}{data}"
    line = f"[{r.dataset} | {what} | {r.classifier} | seed {r.seed}] {_accuracies(r.training)}"
    if r.original is not None:
        o = r.original
        line += (
            f"\n[{r.dataset} | {ORIGINAL_LABEL} | {r.classifier} | seed {r.seed}] {_accuracies(o)}"
            f"\nexpanded - original: {r.training.test_acc_final - o.test_acc_final:+.2f} points (final epoch)"
        )
    return line


def compare_original(value: bool | str) -> bool:
    """``train.compare_original``: true/false, or ``auto`` = only in a single run (in a
    multirun, ``method=original`` is a job of its own and training it again in every job is waste)."""
    if value == "auto":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN)
    return bool(value)


def _hydra_run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
