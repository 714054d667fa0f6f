"""Pre-flight: before any work, check every job of a run or a sweep for what it needs (its settings, its
dataset's files, the pretrained weights of its method and quality extractor, a GPU when the trainer
asks for one) and list every missing piece at once, each with its fix and the jobs it stops.

The top-level key ``preflight`` says what is done with the list: ``check`` (the default) prints it and
runs the jobs anyway (a job that misses something fails at its start and the sweep's results list it),
``only`` checks and exits (0: nothing missing, 2 otherwise), ``off`` checks nothing beforehand.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from expansion.base import ExpansionError
from expansion.files import atomic_write_text
from expansion.weights import Weights, missing
from experiments.data.datasets import DatasetError, DatasetNotFoundError, build_dataset

log = logging.getLogger(__name__)

MODES = ("check", "only", "off")
#: the exit status of ``preflight=only`` when something is missing (as for any user error)
EXIT_MISSING = 2


class PreflightError(ExpansionError):
    """A job misses pieces it needs; the message lists every one with its fix."""


def mode(cfg: DictConfig) -> str:
    value = str(cfg.get("preflight", "check"))
    if value not in MODES:
        raise ExpansionError(f"preflight must be one of {MODES}, got {value!r}")
    return value


@dataclass
class Report:
    """Missing pieces, each once, with the jobs it concerns (in job order)."""

    jobs: list[str] = field(default_factory=list)
    problems: dict[str, list[int]] = field(default_factory=dict)

    def add(self, job: int, problem: str) -> None:
        jobs = self.problems.setdefault(problem, [])
        if job not in jobs:
            jobs.append(job)

    @property
    def ok(self) -> bool:
        return not self.problems

    def which(self, jobs: list[int]) -> str:
        """The jobs a problem stops: each with its overrides when few, else as numbered ranges."""
        if len(jobs) == len(self.jobs):
            return "every job"
        if len(jobs) <= 3:
            return ", ".join(f"#{j} {self.jobs[j]}" for j in jobs)
        ranges, start = [], jobs[0]
        for prev, j in zip(jobs, [*jobs[1:], None]):
            if j != prev + 1:
                ranges.append(f"#{start}" if start == prev else f"#{start}-{prev}")
                start = j
        return f"{len(jobs)} of {len(self.jobs)} jobs: {', '.join(ranges)}; the first is {self.jobs[jobs[0]]}"

    def render(self) -> str:
        n = len(self.jobs)
        if self.ok:
            return f"preflight: {n} job{'s' if n != 1 else ''} checked, nothing missing"
        stopped = len({j for jobs in self.problems.values() for j in jobs})
        pieces = f"{len(self.problems)} missing piece{'s' if len(self.problems) != 1 else ''}"
        who = "the job misses something" if n == 1 else f"{stopped} of {n} jobs miss something"
        lines = [f"preflight: {who} ({pieces}):"]
        for problem, jobs in self.problems.items():
            lines.append(f"  - {problem}")
            if n > 1:
                lines.append(f"    (stops {self.which(jobs)})")
        return "\n".join(lines)


def method_weights(cfg: DictConfig, job: Any | None) -> list[Weights]:
    """The pretrained weights a job loads: its expander's and its quality extractor's (from ``job`` when
    it could be built, else from whatever part of ``cfg`` still can be)."""
    from experiments.quality import extractor_weights, quality_settings
    from experiments.training.job import build_expander

    try:
        expander = job.expander if job is not None else build_expander(cfg.method)
        quality = job.quality if job is not None else quality_settings(cfg.quality)
    except (ExpansionError, DatasetError, ValueError):
        return []  # the bad setting itself is what is reported
    if expander is None:
        return []
    return [*expander.pretrained_weights(), *(extractor_weights(quality) if quality.enabled else [])]


def load_data(cfg: DictConfig) -> tuple[Any, str | None]:
    """``(dataset, None)``, or ``(None, one line)`` when the dataset cannot be loaded (files missing or
    malformed, split impossible); a dataset set to download its files is not missing."""
    from experiments.training.job import configure_data_reading

    configure_data_reading(cfg)
    dataset = cfg.dataset
    downloads = bool(dataset.get("download", False))
    if downloads:
        dataset = OmegaConf.merge(dataset, {"download": False})
    try:
        return build_dataset(dataset), None
    except DatasetNotFoundError as exc:
        return None, None if downloads else str(exc)
    except (DatasetError, ExpansionError, ValueError) as exc:
        return None, str(exc)


def check_data(cfg: DictConfig) -> str | None:
    """One line when the dataset cannot be loaded (see :func:`load_data`)."""
    return load_data(cfg)[1]


def image_problems(data: Any) -> list[str]:
    """Every image file of the train, val, test and extra real splits that reading would refuse,
    from its header alone (unreadable, or over the decompression-bomb limit): all at once, not one per
    run."""
    from experiments.data.datasets.core import MAX_IMAGES_NAMED, check_image_header

    problems, seen = [], set()
    for split in (data.train, data.val, data.test, data.extra_train):
        for path in (split.source_files() if split is not None else None) or []:
            if path not in seen:
                seen.add(path)
                if problem := check_image_header(path):
                    problems.append(problem)
    if len(problems) > MAX_IMAGES_NAMED:
        more = len(problems) - MAX_IMAGES_NAMED
        problems = [*problems[:MAX_IMAGES_NAMED], f"... and {more} more unreadable or oversized images"]
    return problems


def check_job_data(job: Any, data: Any, *, share_present: bool) -> list[str]:
    """What the run itself checks once its dataset is loaded, checked here already: whether the
    expansion fits in memory and on disk, and a shared set's integrity and source (``method=imported``,
    when ``share_present``)."""
    from experiments.training.job import check_resources

    problems = []
    try:
        check_resources(data, job)
    except (ExpansionError, DatasetError) as exc:
        problems.append(str(exc).splitlines()[0])
    if job.imported is not None and share_present:
        from experiments.data.sharing import check_share

        try:
            check_share(job.imported, data)
        except (ExpansionError, DatasetError, OSError) as exc:
            problems.append(str(exc).splitlines()[0])
    return problems


def check_jobs(configs: Sequence[DictConfig], labels: Sequence[str]) -> Report:
    """Check every job (``labels``: how the report names them, e.g. their overrides). Each distinct
    dataset is loaded once, each distinct weight looked up once."""
    from experiments.training.job import Job

    report = Report(jobs=list(labels))
    data_seen: dict[str, tuple[Any, list[str]]] = {}
    weights_seen: dict[Weights, str | None] = {}
    for index, cfg in enumerate(configs):
        try:
            job = Job.from_config(cfg)
        except (ExpansionError, DatasetError, ValueError) as exc:
            report.add(index, str(exc).splitlines()[0])
            job = None
        share_missing = None
        if job is not None and job.imported is not None:
            from experiments.data.sharing import missing_import

            if share_missing := missing_import(job.imported):
                report.add(index, share_missing)
        try:
            key = json.dumps(OmegaConf.to_container(cfg.dataset, resolve=True), sort_keys=True, default=str)
        except Exception as exc:  # an unset mandatory value, a bad interpolation
            report.add(index, f"dataset: {exc}".splitlines()[0])
        else:
            if key not in data_seen:
                data, problem = load_data(cfg)
                data_seen[key] = (data, [problem] if problem else image_problems(data) if data is not None else [])
            data, problems = data_seen[key]
            for problem in problems:
                report.add(index, problem)
            if not problems and job is not None and data is not None:
                for problem in check_job_data(job, data, share_present=share_missing is None):
                    report.add(index, problem)
        for weights in method_weights(cfg, job):
            if weights not in weights_seen:
                weights_seen[weights] = missing(weights)
            if weights_seen[weights]:
                report.add(index, weights_seen[weights])
    return report


def check_weights(job: Any) -> None:
    """A job's own check before its work: every missing weight at once (with the dataset's problem, if
    it has one too), as one :class:`PreflightError`."""
    problems = [p for p in (missing(w) for w in dict.fromkeys(method_weights(job.cfg, job))) if p]
    if problems:
        data_problem = check_data(job.cfg)
        report = Report(jobs=["this job"], problems={p: [0] for p in [*problems, data_problem] if p})
        raise PreflightError(report.render())


def sweep_job_configs(config: DictConfig) -> tuple[list[DictConfig], list[str]]:
    """The composed config and the overrides of every job a multirun launches (the sweeper's
    expansion of the sweep's parameters, grids and command-line overrides)."""
    from hydra.core.global_hydra import GlobalHydra

    from experiments.sweeps import sweep_overrides

    loader = GlobalHydra.instance().config_loader()
    jobs = sweep_overrides(config, loader)
    configs = []
    for job in jobs:
        composed = loader.load_sweep_config(config, list(job))
        configs.append(OmegaConf.masked_copy(composed, [k for k in composed if k != "hydra"]))
    labels = [" ".join(o for o in job if not o.startswith("preflight=")) for job in jobs]
    return configs, labels


def finish(report: Report, preflight_mode: str, where: Path | None = None) -> None:
    """Print the report (and save it as ``preflight.txt`` in ``where``); ``only`` exits here."""
    text = report.render()
    print(text, file=sys.stderr if not report.ok else sys.stdout)
    if where is not None and preflight_mode != "only":  # only: no folder is made
        where.mkdir(parents=True, exist_ok=True)
        atomic_write_text(where / "preflight.txt", text + "\n")
    if preflight_mode == "only":
        raise SystemExit(0 if report.ok else EXIT_MISSING)
