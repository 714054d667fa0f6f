"""Entry point: ``python run.py [overrides]`` runs one experiment, ``-m`` sweeps.

Examples:
    python run.py                                     # offline default (digits, CPU)
    python run.py -m dataset=digits method=original,cutout,gridmask,randaugment
    python run.py -m experiment=table2_medical trainer=gpu
    python run.py method=gif_sd dataset=flowers102 method.fidelity=official --cfg job   # the resolved settings
"""

import logging
import sys

import hydra
from omegaconf import DictConfig

import experiments.config  # noqa: F401  (registers the ${project_root:} resolver)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from expansion.base import ExpansionError
    from experiments.data.datasets import DatasetError
    from experiments.jobs import clear_failure, one_line, record_failure, remove_if_bookkeeping_only
    from experiments.training import preflight
    from experiments.training.checkpoints import CheckpointError
    from experiments.training.pipeline import run
    from experiments.training.preemption import preemptible

    # Lightning attaches its own console handler on import; Hydra's root handler already prints
    # (and files) its records, so drop Lightning's to avoid every line twice
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).handlers.clear()

    hydra_cfg = HydraConfig.get()
    job_dir = hydra_cfg.runtime.output_dir
    log_file = f"{hydra_cfg.job.name}.log"
    if hydra_cfg.mode == RunMode.RUN and preflight.mode(cfg) == "only":  # a sweep's jobs are checked before they start
        report = preflight.check_jobs([cfg], ["this job"])
        remove_if_bookkeeping_only(job_dir, log_file)  # a check leaves no run folder
        preflight.finish(report, "only")
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from experiments.sweeps import config_hash, find_done, recorded_hash

        identity = config_hash(cfg)
        done = find_done(hydra_cfg.sweep.dir, identity) if cfg.get("skip_done", True) else None
        if done is not None:  # an interrupted or extended sweep run again: finished jobs are not redone
            logging.getLogger("run").info("job %s: done before, skipped (%s)", hydra_cfg.job.num, done)
            remove_if_bookkeeping_only(job_dir, log_file)
            return
        if recorded_hash(job_dir) not in (None, identity):
            # a sweep run again into its folder with other job numbers: never train into another job's folder
            logging.getLogger("run").error(
                "job %s: %s holds another configuration's results; name job folders by their config "
                "(hydra.sweep.subdir=..._${config_hash:}) or use a new hydra.sweep.dir",
                hydra_cfg.job.num,
                job_dir,
            )
            return
    clear_failure(job_dir)
    # SIGTERM/SIGUSR1/SIGUSR2 (preemption, time limit): checkpoint, then exit 75 (EXIT_PREEMPTED) for requeue;
    # an error on the way out (submitit refusing a requeue after max_num_timeout) fails the job like any other
    try:
        with preemptible():
            run(cfg)
    except Exception as exc:
        # a user-facing failure (bad setting, missing data): one clear line, no stack trace
        user_error = isinstance(exc, DatasetError | ExpansionError | CheckpointError)
        record_failure(job_dir, exc, user_error=user_error, overrides=list(hydra_cfg.overrides.task))
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # the sweep goes on with its other jobs; its results list this one and it exits non-zero
            logging.getLogger("run").error(
                "job %s failed: %s", hydra_cfg.job.num, one_line(exc), exc_info=None if user_error else exc
            )
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


def resolve_printed_config(argv: list[str]) -> None:
    """``--cfg job|hydra|all`` prints the config with every interpolation resolved (Hydra's
    ``--resolve``): the per-dataset paper settings and the fidelity quirks as the run will see them."""
    if any(a in ("--cfg", "-c") or a.startswith("--cfg=") for a in argv) and "--resolve" not in argv:
        argv.append("--resolve")


if __name__ == "__main__":
    resolve_printed_config(sys.argv)
    main()
