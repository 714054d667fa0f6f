"""Weights & Biases for a sweep (``logger=wandb``): one W&B run per job, grouped by sweep.

* group: the sweep (``<table or adhoc>-<sweep folder>``, e.g. ``table2_medical-2025-05-01_12-00-00``);
  a single run is grouped by its table. ``logger.group=...`` names the group explicitly.
* job_type: ``expand`` for a job with an expansion method (it logs the expansion, then trains on
  it), ``train`` for ``method=original``; ``logger.job_type=...`` overrides it.
* tags: dataset, method, classifier (and the table).
* logged: the job config, Lightning's per-epoch metrics, the expansion and quality figures, the
  expansion grid (seed images and their expansions), a table of manifest rows with their images,
  and the final test accuracies.

``WANDB_MODE=offline`` logs to ``<run_dir>/wandb`` without network (``wandb sync`` uploads
later); ``WANDB_MODE=disabled`` logs nothing. The API key is read by wandb from
``WANDB_API_KEY`` or ``~/.netrc`` (``wandb login``); no config field holds it. Every job
finishes its run, failed or not, so the next job of a multirun never appends to it.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from experiments.record import RunRecord

#: logger config keys for this module, not for WandbLogger
FRAMEWORK_KEYS = ("table_rows",)


def is_wandb_config(logger_cfg: Any) -> bool:
    return bool(logger_cfg) and str(logger_cfg.get("_target_") or "").endswith("WandbLogger")


def sweep_group(cfg: DictConfig) -> str:
    """The W&B group of this job: its sweep, or its table for a single run."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    table = str(cfg.get("table") or "adhoc")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        parts = Path(str(HydraConfig.get().sweep.dir)).parts[-2:]
        return f"{table}-{'_'.join(parts)}"
    return table


def make_wandb_logger(cfg: DictConfig, run_dir: Path) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    kwargs = {
        k: v
        for k, v in OmegaConf.to_container(cfg.logger, resolve=True).items()
        if k not in ("_target_", *FRAMEWORK_KEYS)
    }
    kwargs["group"] = kwargs.get("group") or sweep_group(cfg)
    kwargs["job_type"] = kwargs.get("job_type") or ("train" if cfg.method.get("_target_") is None else "expand")
    kwargs["tags"] = [str(t) for t in (kwargs.get("tags") or []) if t is not None]
    logger = WandbLogger(save_dir=str(run_dir), **kwargs)
    job_config = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    logger.log_hyperparams({"job": job_config})
    return logger


def log_expansion(
    logger: Any, cfg: DictConfig, facts: dict[str, Any], data: Any, expanded: Any, expanded_images: Any, run_dir: Path
) -> None:
    """Expansion and quality figures, the expansion grid (seed images, then their expansions; drawn
    here when the quality step is off), and a table of manifest rows with their images."""
    import wandb

    from experiments.quality import save_expansion_grid

    quality = facts.get("quality") or {}
    figures = {f"expansion/{k}": v for k, v in dataclasses.asdict(facts["expansion"]).items() if _is_number(v)}
    figures.update({f"quality/{k}": v for k, v in quality.items() if _is_number(v)})
    logger.experiment.summary.update(figures)
    grid = run_dir / str(quality.get("grid", "expansion_grid.png"))
    if not grid.is_file():
        grid = save_expansion_grid(
            grid,
            data.train.to_tensor(),
            data.train.labels,
            expanded_images,
            [r["parent"] for r in expanded.rows],
            [r["copy"] for r in expanded.rows],
            rows=int((cfg.get("quality") or {}).get("grid_seeds", 8)),
            class_names=data.class_names,
        )
    logger.log_image(
        "expansion/grid",
        [str(grid)],
        caption=[f"{cfg.dataset.name} | {cfg.method.name}: each seed image, then its expansions"],
    )
    # an evenly spaced selection of at most logger.table_rows rows; 63-bit seeds as text (a float column rounds them)
    rows = expanded.rows
    limit = int(cfg.logger.get("table_rows", 64))
    picked = np.unique(np.linspace(0, len(rows) - 1, num=min(limit, len(rows))).round().astype(int)) if rows else []
    fields = sorted({k for i in picked for k in rows[i]} - {"file", "parent", "copy", "label", "seed"})
    table = [
        [
            wandb.Image(str(expanded.root / "images" / rows[i]["file"])),
            rows[i]["parent"],
            rows[i]["copy"],
            rows[i]["label"],
            data.class_names[rows[i]["label"]],
            str(rows[i]["seed"]),
            *[rows[i].get(f) for f in fields],
        ]
        for i in picked
    ]
    logger.log_table(
        "expansion/manifest", columns=["image", "parent", "copy", "label", "class", "seed", *fields], data=table
    )


def log_results(logger: Any, record: RunRecord) -> None:
    """The job's final accuracies into the run summary."""
    t = record.training
    values = {
        "test_acc_final": t.test_acc_final,
        "test_acc_best_val": t.test_acc_best_val,
        "test_acc_best_test": t.test_acc_best_test,
        "best_val_acc": t.best_val_acc,
        "best_val_epoch": t.best_val_epoch,
        "train_seconds": t.train_seconds,
        "total_seconds": record.total_seconds,
    }
    logger.experiment.summary.update({f"result/{k}": v for k, v in values.items() if _is_number(v)})


def finish_run(exit_code: int) -> None:
    """Finish the process's W&B run if one is open (a non-zero code marks it failed)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and wandb.run is not None:
        wandb.finish(exit_code=exit_code)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)
