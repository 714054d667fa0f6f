"""Hydra/OmegaConf set-up shared by run.py, the tests and the scripts: the resolvers and the sweeper
(:func:`setup`, called explicitly), the method registry (the method configs), and the method defaults that
the configs compose, generated from the settings classes (:func:`write_method_defaults`)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from experiments import CONFIG_DIR, PROJECT_ROOT


def register_resolvers() -> None:
    """``${project_root:}``: the checkout's root, wherever the job runs from.
    ``${mul:a,b}``: the product a * b, rounded to an int (e.g. extra real images = 2 x n_base).
    ``${path_stem:p}``: the last component of a path without its suffix (a dataset named after its file).
    ``${fidelity_pick:f,a,b}``: ``a`` when ``f`` is paper, ``b`` when official (a GIF quirk's value).
    ``${label_numbers:n}``: ["1", ..., "n"] (the official Flowers script's folder numbers as class names).
    ``${gpus_per_job:accelerator,devices}``: the GPUs a SLURM job asks for: none for a CPU trainer, else
    ``devices`` (1 for ``-1``, all of a node: set hydra.launcher.gpus_per_node with trainer=ddp).
    ``${preset:key,default}``: the dataset preset's value of a method setting (experiments.presets).
    ``${config_hash:}``: the job's identity (experiments.training.identity.config_hash), ``${config_hash:10}`` its
    first 10 characters, e.g. in hydra.sweep.subdir."""
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
    if not OmegaConf.has_resolver("preset"):
        from experiments.presets import preset_resolver

        OmegaConf.register_new_resolver("preset", preset_resolver)
    if not OmegaConf.has_resolver("config_hash"):
        OmegaConf.register_new_resolver("config_hash", _config_hash)
    if not OmegaConf.has_resolver("label_numbers"):
        OmegaConf.register_new_resolver(
            "label_numbers", lambda n: OmegaConf.create([str(i) for i in range(1, int(n) + 1)])
        )


def _config_hash(length: int | None = None, *, _root_) -> str:
    from experiments.training.identity import config_hash

    return config_hash(_root_)[: int(length) if length else None]


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


METHOD_DEFAULTS_DIR = CONFIG_DIR / "method" / "defaults"
GENERATED_HEADER = (
    "# Generated from {where} by `make configs` (experiments.config.write_method_defaults): the defaults of the\n"
    "# method's settings class, the one place they live. Do not edit; a test fails when this file differs.\n"
)


def method_target(name: str, config_dir: Path = CONFIG_DIR) -> str | None:
    """The class a method config builds: its own ``_target_``, else the one of the method config its
    ``defaults`` extend (``sd_img2img`` extends ``gif_sd``); None for ``original``."""
    raw = method_configs(config_dir)[name]
    if "_target_" in raw:
        return raw["_target_"]
    for entry in raw.get("defaults", []):
        if isinstance(entry, str) and entry != "_self_" and not entry.startswith("/"):
            return method_target(entry, config_dir)
    return None


def method_defaults_node(cls: type, config_dir: Path = CONFIG_DIR) -> dict:
    """The defaults of ``cls.settings_class`` as a config node (:func:`expansion.settings.config_node`: every
    quirk a ``${fidelity_pick:...}``), every key a dataset preset of a method built on ``cls`` sets
    wrapped in ``${preset:<key>,<default>}`` (:mod:`experiments.presets`)."""
    from expansion.settings import config_node, yaml_literal
    from experiments.presets import preset_paths

    node = config_node(cls.settings_class)
    targets = {name: method_target(name, config_dir) for name in method_configs(config_dir)}
    methods = [name for name, target in targets.items() if target and target.endswith(f".{cls.__name__}")]
    for method in methods:
        for path in preset_paths(method):
            # wrap where the defaults stop being a mapping: a leaf, or a nested setting whose default is
            # null (dreambooth: the preset gives it whole)
            parts = path.split(".")
            parent, depth = node, 1
            while depth < len(parts) and isinstance(parent.get(parts[depth - 1]), dict):
                parent, depth = parent[parts[depth - 1]], depth + 1
            key, wrapped = parts[depth - 1], ".".join(parts[:depth])
            if key not in parent or str(parent[key]).startswith("${preset:"):
                continue  # not a settings field (e.g. ratio: the method config's own) or wrapped already
            parent[key] = f"${{preset:{wrapped},{yaml_literal(parent[key])}}}"
    return node


def method_defaults_text(cls: type) -> str:
    """The YAML of ``method/defaults/<cls.name>``: :func:`method_defaults_node`. A method config composes it
    (``- /method/defaults/gif_sd@_here_``) and adds only its own values."""
    settings = cls.settings_class
    where = f"{settings.__module__}.{settings.__qualname__} and experiments.presets"
    body = yaml.safe_dump(method_defaults_node(cls), sort_keys=False, default_flow_style=False, width=110)
    return GENERATED_HEADER.format(where=where) + body


@functools.cache
def method_classes(config_dir: Path = CONFIG_DIR) -> dict[str, type]:
    """``{class name attribute: class}`` of every method config's ``_target_`` (imports them all)."""
    from hydra.utils import get_class

    classes = [get_class(target) for target in sorted(set(method_targets(config_dir).values()))]
    return {cls.name: cls for cls in classes}


def write_method_defaults(config_dir: Path = CONFIG_DIR) -> list[Path]:
    """(Re)write ``conf/method/defaults/*.yaml`` from the settings classes; returns the files written."""
    folder = config_dir / "method" / "defaults"
    folder.mkdir(exist_ok=True)
    written = []
    for name, cls in method_classes(config_dir).items():
        path = folder / f"{name}.yaml"
        path.write_text(method_defaults_text(cls))
        written.append(path)
    return written


#: our hydra_plugins folder (the grids sweeper). The install makes ``hydra_plugins.grids_sweeper`` importable
#: by name in any process (a SLURM job unpickles Hydra's plugin registry before our code runs), but an editable
#: install maps it outside the folders that Hydra's plugin scan walks: :func:`setup` puts it on the path
PLUGIN_ROOT = str(PROJECT_ROOT / "experiments" / "plugins")


def setup() -> None:
    """What composing and running a job needs, done once and explicitly (run.py, the tests, the scripts that
    compose configs): the resolvers, and the grids sweeper where Hydra's plugin scan finds it. Importing
    this module changes nothing."""
    register_resolvers()
    if PLUGIN_ROOT not in sys.path:
        sys.path.append(PLUGIN_ROOT)


def compose(overrides: list[str] | None = None, *, with_hydra: bool = False, config_name: str = "config"):
    """The project's config for ``overrides``, composed as run.py would (without running it); without the
    ``hydra`` node unless ``with_hydra`` (a job's config as run.py hands it to the pipeline)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    setup()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name=config_name, overrides=list(overrides or []), return_hydra_config=with_hydra)
    return cfg if with_hydra else OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


if __name__ == "__main__":
    for written in write_method_defaults():
        print(f"wrote {written.relative_to(PROJECT_ROOT)}")
