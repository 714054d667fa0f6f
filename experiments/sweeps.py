"""Sweeps as a union of grids, and the identity of a job (the hash of its resolved config).

``hydra/sweeper: grids`` (the package ``hydra_plugins.grids_sweeper``, installed from experiments/plugins:
Hydra takes sweepers from the ``hydra_plugins`` namespace only) extends Hydra's basic sweeper: ``hydra.sweeper.params`` is
crossed with each entry of ``hydra.sweeper.grids`` (itself a ``params`` mapping), the command line's
overrides win over both, and a job that two grids both make runs once. So a sweep that is not one
cartesian product (a real arm at a few sizes, methods at a few ratios) is one command::

    hydra:
      sweeper:
        params: {seed: "0,1,2"}
        grids:
          - {exchange: "real_0,real_1"}
          - {method: "cutout,gridmask", method.ratio: "1,2"}

A job's identity is :func:`experiments.identity.config_hash` with the fingerprint of its data (:func:`data_fingerprint_of`):
the hash of its resolved config less what does not change its
results (where files live, progress bars, pre-flight, loggers, speed-only training settings), as dora
does. Every ``metrics.json`` records it; a sweep job whose hash is already done under the sweep
folder is skipped (``skip_done``), so re-running an interrupted sweep finishes where it stopped.
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

from experiments.record import RunRecord, iter_record_folders, read_finished

log = logging.getLogger(__name__)


def job_overrides(
    params: dict[str, str] | None, grids: list[dict[str, str]] | None, arguments: list[str], config_loader
) -> list[list[str]]:
    """Every job's override list: ``params`` x each grid (or ``params`` alone without grids), the command
    line's ``arguments`` last (they win); duplicates (the same overrides in any order) once, first kept."""
    parser = OverridesParser.create(config_loader=config_loader)
    base = [f"{k}={v}" for k, v in (params or {}).items()]
    jobs, seen = [], set()
    for grid in grids or [{}]:
        grid_args = [f"{k}={v}" for k, v in grid.items()]
        choices: OrderedDict[str, list[str]] = OrderedDict()
        for override in parser.parse_overrides(base + grid_args + list(arguments)):
            key = override.get_key_element()
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    raise HydraException(f"the grids sweeper sweeps lists only, not {override.input_line}")
                choices[key] = [f"{key}={v}" for v in override.sweep_string_iterator()]
            else:
                choices[key] = [f"{key}={override.get_value_element_as_str()}"]
        for job in itertools.product(*choices.values()):
            identity = frozenset(job)
            if identity not in seen:
                seen.add(identity)
                jobs.append(list(job))
    return jobs


def sweep_overrides(config: DictConfig, config_loader) -> list[list[str]]:
    """The override lists of every job a multirun with this (hydra) config launches, whichever sweeper."""
    sweeper = config.hydra.sweeper
    grids = OmegaConf.to_container(sweeper.grids) if "grids" in sweeper else None
    params = OmegaConf.to_container(sweeper.params) if sweeper.get("params") else None
    arguments = list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))
    return job_overrides(params, grids, arguments, config_loader)


def data_fingerprint_of(cfg: DictConfig) -> Callable[[], str]:
    """The fingerprint of the data a job trains and is tested on (every split's content; see
    ``DatasetSplits.fingerprint``), computed on the first call only: a job's identity is its config hash
    and this (a relabelled dataset is another job)."""

    @functools.cache
    def fingerprint() -> str:
        from experiments.data.datasets import build_dataset
        from experiments.training.pipeline import configure_data_reading

        configure_data_reading(cfg)
        return build_dataset(cfg.dataset).fingerprint()

    return fingerprint


def finished_record(
    job_dir: Path | str, identity: str, data_fingerprint: Callable[[], str]
) -> tuple[RunRecord | None, str | None]:
    """``(record, None)`` when ``job_dir`` holds this job's finished record (same config hash and data),
    ``(record, what differs)`` when it holds another job's, ``(None, None)`` when it holds none (a cut
    or damaged metrics.json is no record: the job runs again)."""
    record, _ = read_finished(job_dir)
    if record is None:
        return None, None
    if record.config_hash != identity:
        return (
            record,
            f"holds another configuration's results (config hash {record.config_hash}, this job's {identity})",
        )
    if record.data_fingerprint != data_fingerprint():
        return record, (
            f"holds results for other data (data fingerprint {record.data_fingerprint}, the data now "
            f"{data_fingerprint()}: the dataset's files or labels changed)"
        )
    return record, None


def find_done(sweep_dir: Path | str, identity: str, data_fingerprint: Callable[[], str]) -> Path | None:
    """A ``metrics.json`` under ``sweep_dir`` of a finished job with this config hash and data
    (a cut or damaged record is not a finished job)."""
    for folder in iter_record_folders(sweep_dir):
        record, problem = finished_record(folder, identity, data_fingerprint)
        if record is not None and problem is None:
            return record.path
    return None
