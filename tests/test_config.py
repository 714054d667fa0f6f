"""Every config file composes; experiment grids name only existing options; launchers resolve."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from experiments.config import CONFIG_DIR, method_classes, method_defaults_text
from experiments.training.job import build_expander
from tests.conftest import PROJECT_ROOT, compose

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir())
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONFIG_DIR / g).glob("*.yaml"))]


def test_every_group_has_options():
    assert {"dataset", "method", "classifier", "trainer", "logger", "launcher", "paths", "experiment"} <= set(GROUPS)


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes_and_resolves(group, option):
    overrides = [f"{group}={option}"]
    path = {"imagefolder": "/data/my_set", "npz": "/data/my_scans.npz"}.get(option) if group == "dataset" else None
    if path:
        overrides.append(f"dataset.path={path}")
    cfg = compose(overrides)
    # resolve everything a job uses (the hydra node needs a running app for ${hydra:...})
    job = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)
    assert job["dataset"]["name"] and job["method"]["name"] and job["classifier"]["arch"]
    if group == "method":
        expander = build_expander(cfg.method)
        assert (expander is None) == (option in ("original", "imported"))
    if group == "dataset":
        assert job["dataset"]["name"] == ({"imagefolder": "my_set", "npz": "my_scans"}.get(option) or option)
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
    from experiments.analysis.aggregate import load_paper_numbers

    paper = load_paper_numbers()
    grids = {e: _sweep_params(e)[1] for e in ("table1_natural", "table2_medical", "table3_architectures", "efficiency")}
    assert set(grids["table1_natural"]["dataset"].split(",")) == set(paper["natural"]["values"]["original"])
    assert set(grids["table2_medical"]["dataset"].split(",")) == set(paper["medical"]["values"]["original"])
    assert set(grids["table3_architectures"]["classifier"].split(",")) == set(
        paper["architectures"]["values"]["original"]
    )
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


@pytest.mark.parametrize(
    "dataset,expected",
    [
        ("cars", (50.0, 0.9, 0.8, 5)),
        ("pets", (50.0, 0.7, 0.8, 10)),
        ("flowers102", (8.0, 0.5, 0.8, 5)),
        ("caltech101", (5.0, 0.9, 4.0, 5)),
        ("organsmnist", (5.0, 0.4, 0.5, 5)),
        ("digits", (50.0, 0.9, 0.8, 5)),
    ],
)
def test_gif_sd_takes_the_paper_settings_of_each_dataset(dataset, expected):
    m = compose([f"dataset={dataset}", "method=gif_sd"]).method
    assert (m.guidance_scale, m.strength, m.radius, m.ratio) == expected
    assert compose([f"dataset={dataset}", "method=gif_sd", "method.strength=0.3"]).method.strength == 0.3
    medical = dataset.endswith("mnist")
    assert (compose([f"dataset={dataset}", "method=gif_sd"]).method.dreambooth is not None) == medical


def test_gif_tables_include_gif_sd_and_its_ablation():
    for experiment in ("table1_natural", "table2_medical"):
        methods = _sweep_params(experiment)[1]["method"].split(",")
        assert {"gif_sd", "sd_img2img", "original"} <= set(methods)


def test_tables_include_the_gif_variants_of_the_paper():
    grids = {
        e: _sweep_params(e)[1]["method"].split(",")
        for e in ("table1_natural", "table2_medical", "table3_architectures", "efficiency")
    }
    assert {"gif_mae", "gif_unclip"} <= set(grids["table1_natural"]) and {"gif_mae", "gif_unclip"} <= set(
        grids["table2_medical"]
    )
    assert "gif_unclip" in grids["table3_architectures"] and {"gif_mae", "gif_unclip"} <= set(grids["efficiency"])
    assert compose(["method=gif_unclip"]).method.paper_name == "gif_dalle"


@pytest.mark.parametrize("name,cls", sorted(method_classes().items()))
def test_the_generated_method_defaults_are_the_settings_classes_defaults(name, cls):
    """conf/method/defaults/<name>.yaml is generated from the settings class (``make configs``): a default
    changed in the class and not regenerated fails here, naming the file."""
    path = CONFIG_DIR / "method" / "defaults" / f"{name}.yaml"
    assert path.is_file() and path.read_text() == method_defaults_text(cls), f"{path} is stale: run `make configs`"


def test_importing_the_settings_and_config_modules_imports_no_torch_and_changes_nothing():
    """Light imports: run.py --help, make list and every subprocess a test spawns pay only for what they use."""
    code = (
        "import sys\n"
        "from omegaconf import OmegaConf\n"
        "path = list(sys.path)\n"
        "import experiments.config, experiments.catalog, experiments.training.identity, experiments.record\n"
        "import experiments.jobs, experiments.sweeps, expansion.settings, expansion.files\n"
        "import experiments.training.settings\n"
        "heavy = [m for m in ('torch', 'torchvision', 'diffusers', 'lightning', 'open_clip') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert sys.path == path, 'sys.path changed'\n"
        "assert not OmegaConf.has_resolver('fidelity_pick'), 'a resolver was registered on import'\n"
        "experiments.config.setup()\n"
        "assert OmegaConf.has_resolver('fidelity_pick') and experiments.config.PLUGIN_ROOT in sys.path\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_grids_sweeper_is_found_by_hydras_plugin_scan_after_setup():
    """The sweeper subclasses Hydra's BasicSweeper (hydra-core is pinned to 1.3.x in pyproject.toml): the
    scan must find it, and the methods it overrides must still be the ones BasicSweeper calls."""
    import inspect

    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.plugins import Plugins
    from hydra.plugins.sweeper import Sweeper

    names = {f"{c.__module__}.{c.__name__}" for c in Plugins.instance().discover(Sweeper)}
    assert "hydra_plugins.grids_sweeper.GridsSweeper" in names
    assert list(inspect.signature(BasicSweeper.split_arguments).parameters) == ["overrides", "max_batch_size"]
    assert "split_arguments" in inspect.getsource(BasicSweeper.sweep)
    assert list(inspect.signature(BasicSweeper.__init__).parameters) == ["self", "max_batch_size", "params"]
