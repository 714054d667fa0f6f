"""Hydra/OmegaConf set-up shared by run.py, the tests and the scripts: the resolvers, and every
method's settings defaults registered for the method configs to compose."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """``${project_root:}``: the checkout's root, wherever the job runs from.
    ``${mul:a,b}``: the product a * b, rounded to an int (e.g. extra real images = 2 x n_base).
    ``${path_stem:p}``: the last component of a path without its suffix (a dataset named after its file).
    ``${fidelity_pick:f,a,b}``: ``a`` when ``f`` is paper, ``b`` when official (a GIF quirk's value).
    ``${label_numbers:n}``: ["1", ..., "n"] (the official Flowers script's folder numbers as class names).
    ``${gpus_per_job:accelerator,devices}``: the GPUs a SLURM job asks for: none for a CPU trainer, else
    ``devices`` (1 for ``-1``, all of a node: set hydra.launcher.gpus_per_node with trainer=ddp).
    ``${config_hash:}``: the job's identity (experiments.identity.config_hash), e.g. in hydra.sweep.subdir."""
    from expansion.settings import fidelity_pick

    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _int_product)
    if not OmegaConf.has_resolver("path_stem"):
        OmegaConf.register_new_resolver("path_stem", lambda path: Path(str(path).rstrip("/")).stem or str(path))
    if not OmegaConf.has_resolver("fidelity_pick"):
        OmegaConf.register_new_resolver("fidelity_pick", fidelity_pick)
    if not OmegaConf.has_resolver("gpus_per_job"):
        OmegaConf.register_new_resolver("gpus_per_job", _gpus_per_job)
    if not OmegaConf.has_resolver("config_hash"):
        OmegaConf.register_new_resolver("config_hash", _config_hash)
    if not OmegaConf.has_resolver("label_numbers"):
        OmegaConf.register_new_resolver(
            "label_numbers", lambda n: OmegaConf.create([str(i) for i in range(1, int(n) + 1)])
        )


def _config_hash(*, _root_) -> str:
    from experiments.identity import config_hash

    return config_hash(_root_)


def _gpus_per_job(accelerator, devices) -> int | None:
    if str(accelerator) not in ("gpu", "cuda"):
        return None
    return int(devices) if isinstance(devices, int) and devices > 0 else 1


def _int_product(a, b) -> int:
    if a is None or b is None:
        raise ValueError(f"${{mul:a,b}} needs two numbers, got {a!r} and {b!r} (e.g. set dataset.train_per_class)")
    return round(float(a) * float(b))


def method_configs(config_dir: Path = CONFIG_DIR) -> dict[str, dict]:
    """Every method config, as written (not composed): ``{name: mapping}`` (the method registry)."""
    return {
        path.stem: yaml.safe_load(path.read_text()) or {} for path in sorted((config_dir / "method").glob("*.yaml"))
    }


def method_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    """The registered expansion methods: every method config but those that expand nothing
    (``_target_: null``, i.e. ``original``)."""
    return [name for name, raw in method_configs(config_dir).items() if raw.get("_target_", "") is not None]


def method_targets(config_dir: Path = CONFIG_DIR) -> dict[str, str]:
    """``{config name: _target_}`` of the method configs that name their class themselves."""
    return {name: str(raw["_target_"]) for name, raw in method_configs(config_dir).items() if raw.get("_target_")}


def register_method_defaults(config_dir: Path = CONFIG_DIR) -> None:
    """``method/defaults/<method name>``: the defaults of the method's settings class, as a config
    node. A method config composes it (``- /method/defaults/gif_sd@_here_``) and adds only its values,
    so the settings class stays the one place its defaults live."""
    from hydra.core.config_store import ConfigStore
    from hydra.utils import get_class

    from expansion.settings import config_node

    store = ConfigStore.instance()
    for target in sorted(set(method_targets(config_dir).values())):
        cls = get_class(target)
        store.store(group="method/defaults", name=cls.name, node=config_node(cls.settings_class))


register_resolvers()
register_method_defaults()

#: our hydra_plugins folder (the grids sweeper). The install makes ``hydra_plugins.grids_sweeper`` importable
#: in any process (a SLURM job unpickles Hydra's plugin registry before our code runs), but an editable
#: install maps it outside the folders that Hydra's plugin scan walks; on the path, the scan finds it
PLUGIN_ROOT = str(PROJECT_ROOT / "experiments" / "plugins")
if PLUGIN_ROOT not in sys.path:
    sys.path.append(PLUGIN_ROOT)
