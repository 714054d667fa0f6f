"""The quality step of a run: how good is an expanded set? Feature spaces (:mod:`.extractors`), the registered
metrics and their maths (:mod:`.metrics`), the seeds-beside-expansions picture (:mod:`.grid`); this module
holds the step's settings and its entry point (:func:`evaluate_expansion`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expansion.weights import Weights

from . import extractors, metrics
from .extractors import EXTRACTORS, QualityError, build_extractor, extract
from .grid import save_expansion_grid
from .metrics import Column, Metric, QualityInputs, quality_columns, quality_metrics, register_metric

__all__ = [
    "EXTRACTORS",
    "Column",
    "Metric",
    "QualityError",
    "QualityInputs",
    "QualitySettings",
    "build_extractor",
    "evaluate_expansion",
    "extract",
    "extractor_weights",
    "extractors",
    "metrics",
    "quality_columns",
    "quality_metrics",
    "quality_settings",
    "register_metric",
    "save_expansion_grid",
]


def extractor_weights(settings: QualitySettings) -> list[Weights]:
    """The pretrained weights the quality step loads (``clip``: open_clip's; ``classifier``: none, the
    probe is trained here; ``inception``: torch-fidelity fetches its own file, not checked beforehand)."""
    if settings.extractor != "clip":
        return []
    from expansion.gif.guides import clip_weights

    return [clip_weights(settings.clip_arch, settings.clip_pretrained, "quality.clip_pretrained")]


@dataclass(frozen=True)
class QualitySettings:
    """The quality step of a run (values: the ``quality:`` section of conf/config.yaml): ``extractor``
    (classifier = the probe, offline; inception; clip with ``clip_arch``/``clip_pretrained``), the
    seeded subsample ``max_images``, the probe's ``epochs`` and ``probe_size``, the near-duplicate
    ``dup_factor``, ``kid_subsets``, and ``grid_seeds`` rows of expansion_grid.png."""

    enabled: bool
    extractor: str
    max_images: int
    epochs: int
    probe_size: int
    dup_factor: float
    kid_subsets: int
    clip_arch: str
    clip_pretrained: str
    grid_seeds: int

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise QualityError(f"quality.extractor must be one of {EXTRACTORS}, got {self.extractor!r}")
        if min(self.epochs, self.probe_size, self.kid_subsets, self.grid_seeds) < 1 or self.max_images < 0:
            raise QualityError("quality: need epochs, probe_size, kid_subsets and grid_seeds >= 1 and max_images >= 0")

    def options(self) -> dict[str, Any]:
        """``quality_metrics`` keyword arguments."""
        return {
            "extractor": self.extractor,
            "max_images": self.max_images,
            "epochs": self.epochs,
            "probe_size": self.probe_size,
            "dup_factor": self.dup_factor,
            "kid_subsets": self.kid_subsets,
            "clip_arch": self.clip_arch,
            "clip_pretrained": self.clip_pretrained,
        }


def quality_settings(section: Any) -> QualitySettings:
    """:class:`QualitySettings` from a ``quality:`` config section (a run's saved config included)."""
    from omegaconf import DictConfig, OmegaConf

    from expansion.settings import from_mapping

    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    return from_mapping(QualitySettings, values, "quality")


def evaluate_expansion(
    settings: QualitySettings,
    data,
    expanded_set,
    expanded_images: torch.Tensor,
    run_dir: Path | str,
    *,
    seed: int,
    device: str,
    title: str,
    progress: bool = False,
    cache_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Quality metrics of one run's expansion + ``<run_dir>/expansion_grid.png`` (the pipeline's step);
    ``cache_dir`` keeps the probe for later runs on the same training set."""
    start = time.perf_counter()
    original = data.train.to_tensor()
    labels = np.asarray(data.train.labels)
    metrics = quality_metrics(
        original,
        labels,
        expanded_images,
        expanded_set.labels,
        data.num_classes,
        class_names=data.class_names,
        seed=seed,
        device=device,
        progress=progress,
        cache_dir=cache_dir,
        **settings.options(),
    )
    grid = save_expansion_grid(
        Path(run_dir) / "expansion_grid.png",
        original,
        labels,
        expanded_images,
        [r["parent"] for r in expanded_set.rows],
        [r["copy"] for r in expanded_set.rows],
        rows=settings.grid_seeds,
        class_names=data.class_names,
        title=title,
    )
    metrics["grid"] = grid.name
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics
