"""The ``grids`` sweeper (``override /hydra/sweeper: grids``): Hydra's basic sweeper over a union of
grids, :func:`experiments.sweeps.job_overrides`. Hydra takes sweepers from the ``hydra_plugins``
namespace only: pyproject.toml installs this folder as ``hydra_plugins.grids_sweeper`` (importable in every
process, a SLURM job's included, before any of our code runs)."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional  # noqa: UP035  (OmegaConf reads these at runtime)

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from experiments.sweeps import job_overrides


@dataclass
class GridsSweeperConf:
    _target_: str = "hydra_plugins.grids_sweeper.GridsSweeper"
    max_batch_size: Optional[int] = None  # noqa: UP045
    params: Optional[Dict[str, str]] = None  # noqa: UP006, UP045
    grids: List[Dict[str, str]] = field(default_factory=list)  # noqa: UP006


class GridsSweeper(BasicSweeper):
    """Hydra's basic sweeper over a union of grids (:func:`job_overrides`)."""

    def __init__(self, max_batch_size: int | None, params: dict[str, str] | None = None, grids=None) -> None:
        super().__init__(max_batch_size, params)
        self.grids = [dict(g) for g in grids or []]

    def sweep(self, arguments: list[str]) -> Any:
        jobs = job_overrides(self.params, self.grids, arguments, self.hydra_context.config_loader)
        batch = self.max_batch_size or len(jobs)
        self.overrides = [jobs[i : i + batch] for i in range(0, len(jobs), batch)]
        # the basic sweeper's loop, over these batches
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        returns, start = [], 0
        while not self.is_done():
            batch_jobs = self.get_job_batch()
            self.validate_batch_is_legal(batch_jobs)
            results = self.launcher.launch(batch_jobs, initial_job_idx=start)
            for r in results:
                _ = r.return_value
            start += len(batch_jobs)
            returns.append(results)
        return returns


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="experiments")
