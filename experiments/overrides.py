"""Command-line overrides checked before Hydra runs anything: a misspelt config option (``method=cutot``) or
setting (``method.ratoi=2``) is one line with the closest names and the right fix, where Hydra lists every
option, or advises ``+method.ratoi=2``, which adds a setting nothing reads. Only hydra and omegaconf are
imported, so the answer comes in about a second."""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable, Sequence
from typing import Any

from experiments import CONFIG_DIR

#: command-line flags that pick another config than conf/config.yaml (then nothing is checked here)
OTHER_CONFIG_FLAGS = ("-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir")
#: at most this many combinations of swept config options are composed to check the settings
MAX_COMBINATIONS = 16


def group_options(group: str) -> list[str]:
    """The options of a config group (``conf/<group>/*.yaml``), sorted; empty for a folder that is not one."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def did_you_mean(word: str, choices: Iterable[str], *, listed: int = 12) -> str:
    """``did you mean x?`` (the closest choices), else the choices themselves (up to ``listed``)."""
    choices = sorted(set(choices))
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    shown = ", ".join(choices[:listed]) + (f", ... ({len(choices)} in all)" if len(choices) > listed else "")
    return f"the choices: {shown}"


def check_overrides(args: Sequence[str]) -> str | None:
    """One line naming the first override of ``args`` (run.py's command line) that names an option or a
    setting the configs do not have, with the closest names; None when there is none (or when another
    config than conf/config.yaml is picked, or the overrides do not parse: Hydra then says why)."""
    if any(a.split("=")[0] in OTHER_CONFIG_FLAGS for a in args):
        return None
    from hydra.core.override_parser.overrides_parser import OverridesParser

    texts = [a for a in args if "=" in a and not a.startswith("-")]
    try:
        overrides = OverridesParser.create().parse_overrides(texts)
    except Exception:  # Hydra's own message is the right one
        return None
    groups: dict[str, list[str]] = {}
    settings = []
    for override in overrides:
        key = override.key_or_group
        if key.startswith("hydra") or override.package or override.is_delete():
            continue
        values = _values(override)
        if "." not in key and group_options(key):
            for value in values:
                if value is not None and value not in group_options(key):
                    return f"{key}={value}: no such {key}; {did_you_mean(value, group_options(key))} (`make list` lists them)"
            groups[key] = values
        elif not (override.is_add() or override.is_force_add()):
            settings.append(key)
    if not settings:
        return None
    return _check_settings(groups, settings)


def _values(override: Any) -> list[Any]:
    if override.is_sweep_override():
        try:
            return [str(v) for v in override.sweep_string_iterator()]
        except Exception:  # a range or interval sweep: its values are numbers, not options
            return []
    value = override.value()
    return [None if value is None else str(value)]


def _check_settings(groups: dict[str, list[str]], keys: list[str]) -> str | None:
    """Each setting of ``keys`` looked up in the config of every combination of the chosen options."""
    from experiments.config import compose

    names = list(groups)
    combinations = list(itertools.islice(itertools.product(*(groups[n] for n in names)), MAX_COMBINATIONS))
    for combination in combinations or [()]:
        chosen = [f"{n}={v}" if v is not None else f"{n}=null" for n, v in zip(names, combination)]
        try:
            cfg = compose(chosen)
        except Exception:  # e.g. an experiment that needs more overrides: Hydra says what is wrong
            return None
        for key in keys:
            if len(_known_prefix(cfg, key)) < len(key.split(".")):
                return _unknown_setting(cfg, key)
    return None


def _known_prefix(cfg: Any, key: str) -> list[str]:
    """The leading parts of the dotted ``key`` that ``cfg`` has (a ``???`` value counts: it is a setting)."""
    from omegaconf import DictConfig

    node, known = cfg, []
    for part in key.split("."):
        child = node._get_node(part) if isinstance(node, DictConfig) else None
        if child is None:
            break
        node, known = child, [*known, part]
    return known


def _unknown_setting(cfg: Any, key: str) -> str:
    """``train.epoch: train has no setting 'epoch'; did you mean epochs? (train.epochs=...)``."""
    from omegaconf import DictConfig

    parts = key.split(".")
    known = _known_prefix(cfg, key)
    node = cfg.get(known[0]) if known else cfg
    for part in known[1:]:
        node = node._get_node(part)
    missing = parts[len(known)]
    siblings = [str(s) for s in node if not str(s).startswith("_")] if isinstance(node, DictConfig) else []
    if known:
        group = cfg.get(known[0])
        option = group.get("name") if isinstance(group, DictConfig) else None
        where = f"{'.'.join(known)}" + (f" ({known[0]}={option})" if option else "") + f" has no setting {missing!r}"
    else:
        where = f"there is no top-level setting {missing!r}"
    hint = did_you_mean(missing, siblings)
    close = difflib.get_close_matches(missing, siblings, n=1, cutoff=0.6)
    fix = f" ({'.'.join([*known, close[0], *parts[len(known) + 1 :]])}=...)" if close else ""
    return f"{key}: {where}; {hint}{fix}; a leading + would add a setting that nothing reads"
