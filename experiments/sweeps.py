"""Sweeps as a union of grids: the override lists of every job a multirun launches.

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

A job's identity is :func:`experiments.training.identity.config_hash` with the fingerprint of its data
(:func:`experiments.training.job.data_fingerprint_of`); a sweep job whose identity is already done under the
sweep folder is skipped (``skip_done``, :func:`experiments.jobs.find_done`), so re-running an interrupted
sweep finishes where it stopped.
"""

from __future__ import annotations

import itertools
import logging
from collections import OrderedDict

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf

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
