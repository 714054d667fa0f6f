"""Every config file composes; experiment grids name only existing options; launchers resolve."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from experiments.config import CONFIG_DIR
from experiments.pipeline import build_expander
from tests.conftest import compose

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {"dataset", "method", "classifier", "trainer", "logger", "launcher", "paths", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes_and_resolves(group, option):
    overrides = [f"{group}={option}"]
    if group == "dataset" and option == "imagefolder":
        overrides.append("dataset.path=/data/example")
    cfg = compose(overrides)
    # resolve everything a job uses (the hydra node needs a running app for ${hydra:...})
    job = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    assert job["dataset"]["name"] and job["method"]["name"] and job["classifier"]["arch"]
    if group == "method":
        expander = build_expander(cfg.method)
        assert (expander is None) == (option == "original")
    if group == "dataset":
        assert job["dataset"]["name"] == option
        assert job["dataset"]["recipe"]["augment"]
        assert isinstance(job["train"]["lr"], float)
    if group == "logger" and job["logger"]["_target_"]:
        get_class(job["logger"]["_target_"])
    if group == "launcher":
        get_class(cfg.hydra.launcher._target_)


def _sweep_params(experiment):
    cfg = compose([f"experiment={experiment}"])
    return cfg, dict(cfg.hydra.sweeper.params)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_experiment_grids_name_existing_options(experiment):
    cfg, params = _sweep_params(experiment)
    assert params, f"{experiment} has no sweep grid"
    for key, values in params.items():
        if key in GROUPS:
            for value in str(values).split(","):
                assert (CONFIG_DIR / key / f"{value}.yaml").is_file(), f"{experiment}: {key}={value} does not exist"
    assert cfg.table


def test_paper_tables_cover_every_dataset_and_classifier():
    from experiments.aggregate import load_paper_numbers

    paper = load_paper_numbers()
    grids = {e: _sweep_params(e)[1] for e in ("table1_natural", "table2_medical", "table3_architectures", "efficiency")}
    assert set(grids["table1_natural"]["dataset"].split(",")) == set(paper["natural"]["values"]["original"])
    assert set(grids["table2_medical"]["dataset"].split(",")) == set(paper["medical"]["values"]["original"])
    assert set(grids["table3_architectures"]["classifier"].split(",")) == set(paper["architectures"]["values"]["original"])
    ratios = {int(r) for r in grids["efficiency"]["method.ratio"].split(",")}
    assert {int(k.split("@")[1]) for k in paper["efficiency"]["values"]} <= ratios
    assert compose(["experiment=table3_architectures"]).dataset.name == "cars"


def test_slurm_launcher_parameters():
    cfg = compose(["launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.timeout_min=60"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.partition == "gpu" and launcher.timeout_min == 60
    assert launcher.gpus_per_node == 1 and launcher.tasks_per_node == 1
    assert launcher.max_num_timeout >= 1
    assert cfg.trainer.accelerator == "gpu"


def test_unknown_option_lists_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="cutout"):
        compose(["method=nope"])
