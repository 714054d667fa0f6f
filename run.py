"""Entry point: ``python run.py [overrides]`` runs one experiment, ``-m`` sweeps.

Examples:
    python run.py                                     # offline default (digits, CPU)
    python run.py -m dataset=digits method=original,cutout,gridmask,randaugment
    python run.py -m experiment=table2_medical trainer=gpu
    python run.py method=gif_sd dataset=flowers102 method.fidelity=official --cfg job   # the resolved settings
"""

import contextlib
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from experiments.config import setup

setup()  # the resolvers and the grids sweeper, before Hydra composes (in a SLURM job too: it imports this module)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    job_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = f"{hydra_cfg.job.name}.log"
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if not multirun:  # the settings that need no torch, checked before it is imported (a sweep's: pre-flight)
        _check_light_settings(cfg, job_dir)

    from experiments.jobs import RunFolderBusy, own_run_folder, remove_if_bookkeeping_only
    from experiments.training import preflight

    if not multirun and preflight.mode(cfg) == "only":  # a sweep's jobs are checked before they start
        report = preflight.check_jobs([cfg], ["this job"])
        with contextlib.suppress(RunFolderBusy), own_run_folder(job_dir, wait=False):
            remove_if_bookkeeping_only(job_dir, log_file)  # a check leaves no run folder
        preflight.finish(report, "only")
    # the folder is this job's before anything is read or written in it: a second job in a live folder
    # is refused (a sweep's job waits for it, then finds its work done); Hydra writes nothing there itself
    # (hydra.output_subdir is null: the owner writes .hydra/)
    with contextlib.ExitStack() as owned:
        try:
            owned.enter_context(
                own_run_folder(job_dir, wait=multirun, on_wait=lambda who: _waiting(hydra_cfg, job_dir, who))
            )
        except RunFolderBusy as exc:
            _detach_file_logs()  # not a line into the owner's log
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        _run_owned(cfg, hydra_cfg, job_dir, log_file, multirun)


def _check_light_settings(cfg: DictConfig, job_dir: Path) -> None:
    """A bad training, classifier or thread setting, or a dataset.path that is not there: one line, exit 2,
    and no run folder (Hydra made it empty)."""
    from expansion.errors import ExpansionError
    from experiments.data.dataset_paths import missing_path
    from experiments.training.settings import core_settings

    try:
        core_settings(cfg)
        problem = missing_path(cfg.dataset)
    except ExpansionError as exc:
        problem = str(exc)
    if problem:
        _detach_file_logs()  # a run refused before any work leaves no folder and no log
        with contextlib.suppress(OSError):
            job_dir.rmdir()  # only when empty
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def _run_owned(cfg: DictConfig, hydra_cfg, job_dir: Path, log_file: str, multirun: bool) -> None:
    from expansion.base import ExpansionError
    from experiments.data.datasets import DatasetError
    from experiments.jobs import (
        clear_failure,
        find_done,
        finished_record,
        one_line,
        own_run_folder,
        record_failure,
        remove_if_bookkeeping_only,
        save_job_config,
    )
    from experiments.training.checkpoints import CheckpointError
    from experiments.training.identity import config_hash
    from experiments.training.job import data_fingerprint_of
    from experiments.training.pipeline import run, summary_line
    from experiments.training.preemption import preemptible

    # Lightning attaches its own console handler on import (just above); Hydra's root handler already
    # prints (and files) its records, so drop Lightning's to avoid every line twice
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).handlers.clear()
    log = logging.getLogger("run")
    identity = config_hash(cfg)
    fingerprint = data_fingerprint_of(cfg)  # computed once, only where a finished record must be compared
    if multirun and cfg.get("skip_done", True):
        done = find_done(hydra_cfg.sweep.dir, identity, fingerprint)
        if done is not None:  # an interrupted or extended sweep run again: finished jobs are not redone
            log.info("job %s: done before, skipped (%s)", hydra_cfg.job.num, done)
            clear_failure(job_dir)  # a failure filed here earlier is history now
            remove_if_bookkeeping_only(job_dir, log_file)
            return
    record, problem = finished_record(job_dir, identity, fingerprint)
    if record is not None and problem is None:  # this very job finished here: never rewritten (its log neither)
        _detach_file_logs()
        log.info("%s holds this job's finished results; nothing to do (a new run needs a new folder)", job_dir)
        print(summary_line(record))
        return
    if problem is not None:  # another configuration's (or another dataset's) finished folder: not touched
        _detach_file_logs()
        message = f"{job_dir} {problem}; {NEW_FOLDER_HINT}"
        if not multirun:
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        log.error("job %s refused: %s", hydra_cfg.job.num, message)
        refused = Path(hydra_cfg.sweep.dir) / "refused" / f"{hydra_cfg.job.num}_{identity}"
        with own_run_folder(refused, wait=True):
            record_failure(refused, ExpansionError(message), user_error=True, overrides=list(hydra_cfg.overrides.task))
        return
    clear_failure(job_dir)
    save_job_config(job_dir, cfg)
    # SIGTERM/SIGUSR1/SIGUSR2 (preemption, time limit): checkpoint, then exit 75 (EXIT_PREEMPTED) for requeue;
    # an error on the way out (submitit refusing a requeue after max_num_timeout) fails the job like any other
    try:
        with preemptible():
            run(cfg, job_dir)
    except Exception as exc:
        # a user-facing failure (bad setting, missing data): one clear line, no stack trace
        user_error = isinstance(exc, DatasetError | ExpansionError | CheckpointError)
        record_failure(job_dir, exc, user_error=user_error, overrides=list(hydra_cfg.overrides.task))
        if multirun:
            # the sweep goes on with its other jobs; its results list this one and it exits non-zero
            log.error("job %s failed: %s", hydra_cfg.job.num, one_line(exc), exc_info=None if user_error else exc)
            return
        if not user_error:
            raise
        # printed once (on stderr) and filed in the job's log; a run that failed before any work leaves no folder
        record = logging.LogRecord("run", logging.ERROR, __file__, 0, "%s", (exc,), None)
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.FileHandler):
                handler.handle(record)
        print(f"error: {exc}", file=sys.stderr)
        remove_if_bookkeeping_only(job_dir, log_file)
        sys.exit(2)


NEW_FOLDER_HINT = (
    "give this job its own folder (hydra.run.dir=..., or hydra.sweep.dir=... / "
    "hydra.sweep.subdir=..._${config_hash:} for a sweep)"
)


def _waiting(hydra_cfg, job_dir: Path, holder: str) -> None:
    """Said on the console only (the folder's log belongs to its owner)."""
    handlers = _detach_file_logs()
    logging.getLogger("run").info(
        "job %s: %s is in use by %s; waiting for it to finish", hydra_cfg.job.num, job_dir, holder
    )
    for handler in handlers:
        logging.getLogger().addHandler(handler)


def _detach_file_logs() -> list[logging.Handler]:
    """Remove (and return) the root logger's file handlers: Hydra opens the job's log before the job
    knows whether the folder is its own."""
    root = logging.getLogger()
    handlers = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
    for handler in handlers:
        root.removeHandler(handler)
    return handlers


def resolve_printed_config(argv: list[str]) -> None:
    """``--cfg job|hydra|all`` prints the config with every interpolation resolved (Hydra's
    ``--resolve``): the per-dataset paper settings and the fidelity quirks as the run will see them."""
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv) and "--resolve" not in argv:
        argv.append("--resolve")


def check_command_line(argv: list[str]) -> None:
    """A misspelt option or setting: one line with the closest names, exit 2 (before Hydra's own message)."""
    from experiments.overrides import check_overrides

    problem = check_overrides(argv[1:])
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line(sys.argv)
    resolve_printed_config(sys.argv)
    main()
