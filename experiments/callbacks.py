"""The sweep's Hydra callbacks (conf/config.yaml ``hydra.callbacks``). Hydra builds them when any run starts,
a single one too, so this module imports nothing heavy: the work's modules load only when a sweep starts or
ends (a single run's bad setting is then reported before torch is imported)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


class PreflightOnMultirunStart(Callback):
    """Checks every job of a sweep before the first one runs (:mod:`experiments.training.preflight`)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.training import preflight

        preflight_mode = preflight.mode(config)
        if preflight_mode == "off":
            return
        configs, labels = preflight.sweep_job_configs(config)
        preflight.finish(preflight.check_jobs(configs, labels), preflight_mode, Path(config.hydra.sweep.dir))


class AggregateOnMultirunEnd(Callback):
    """Writes the sweep's results when it ends (:mod:`experiments.analysis.aggregate`); a sweep with failed
    jobs then exits with status 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from experiments.analysis import aggregate

        # Hydra turns a callback's exception into a warning: a failed aggregation exits here, non-zero
        try:
            _, md_path = aggregate.aggregate(config.hydra.sweep.dir)
        except FileNotFoundError as exc:
            print(f"aggregate: {exc}")
            return
        except Exception as exc:
            print(f"error: the sweep's results could not be aggregated: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        print(f"results: {md_path}\n" + md_path.read_text())
        failures = aggregate.sweep_failures(config.hydra.sweep.dir)
        if failures:
            print(f"{len(failures)} job(s) of the sweep failed (listed in {md_path})", file=sys.stderr)
            raise SystemExit(1)
