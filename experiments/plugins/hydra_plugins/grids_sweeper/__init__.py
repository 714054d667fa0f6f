"""The ``grids`` sweeper (``override /hydra/sweeper: grids``): Hydra's basic sweeper over a union of
grids, :func:`experiments.sweeps.job_overrides`. Hydra takes sweepers from the ``hydra_plugins``
namespace only: pyproject.toml installs this folder as ``hydra_plugins.grids_sweeper`` (importable in every
process, a SLURM job's included, before any of our code runs)."""

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional  # noqa: UP035  (OmegaConf reads these at runtime)

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore

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
        self._arguments = list(arguments)  # the command line's overrides, for split_arguments
        return super().sweep(arguments)

    def split_arguments(self, overrides: Any, max_batch_size: int | None) -> list[list[list[str]]]:
        """The basic sweeper's job list (it calls this with params + command line parsed), as grids."""
        jobs = job_overrides(self.params, self.grids, self._arguments, self.hydra_context.config_loader)
        batch = max_batch_size or len(jobs)
        return [jobs[i : i + batch] for i in range(0, len(jobs), batch)]


ConfigStore.instance().store(group="hydra/sweeper", name="grids", node=GridsSweeperConf, provider="experiments")
