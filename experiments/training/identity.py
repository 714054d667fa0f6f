"""A job's three identities, from one rule.

* the **store key**: the dataset's identity, the method's settings and the expansion seed
  (:func:`store_key`; the store is shared by every job that expands the same way);
* the **training signature**: the training images (dataset identity and store key), the classifier and
  training settings and the seed (:func:`training_signature`; a checkpoint resumes only its own training);
* the **config hash**: the whole resolved job configuration (:func:`config_hash`; a sweep skips a job whose
  hash and data fingerprint are finished).

The rule: a setting enters every identity its value can change, unless it is *speed-only* (it changes
speed or memory, never a number), which enters none. Speed-only settings are marked on their settings
field with :func:`expansion.settings.speed_only` (the engine's ``method.batch_size`` and
``method.num_workers`` on :class:`experiments.training.settings.GenerationSettings`), and the top-level
keys that say where and how a job runs are :data:`RUN_ONLY_KEYS`. ``paths`` enter the config hash by name
only, so the same job on another machine has the same hash."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

from expansion.files import content_key
from expansion.settings import is_speed_only, signature_of

#: top-level config keys that say where and how a job runs, not what it computes
RUN_ONLY_KEYS = (
    "paths",
    "progress_bar",
    "progress_every_s",
    "preflight",
    "store_lock_timeout",
    "store_verify",
    "logger",
    "skip_done",
)
#: settings added after config hashes were published, left out of the config hash at their settings class's
#: default (the job it names is the job from before the setting existed), so earlier sweeps' jobs keep their hash
HASHED_WHEN_SET = {"train": ("online_augment", "synthetic")}
#: method config keys the framework reads (the rest builds the method's settings class); ``tiny``: the
#: contract suite's cheap settings of the method (tests/test_contract.py), no part of any job
FRAMEWORK_METHOD_KEYS = ("name", "paper_name", "batch_size", "num_workers", "trainer", "tiny")


def store_key(dataset_identity: Mapping[str, Any], method_signature: Mapping[str, Any], seed: int) -> str:
    """The key of the store an expansion writes (``expansion.store.store_key``: the method's signature is
    its settings less the speed-only ones)."""
    from expansion.store import store_key as key_of

    return key_of(dataset_identity, method_signature, seed)[0]


def training_signature(
    *,
    dataset_identity: Mapping[str, Any],
    store_key: str | None,
    include_original: bool,
    classifier: Any,
    train: Any,
    seed: int,
    extra_real: int = 0,
) -> str:
    """One classifier training of a job: the training images (the dataset identity and the store key,
    which names the method's settings and the expansion seed), the classifier and training settings less
    the speed-only ones, and the seed. ``extra_real``: the extra real images of a real-arm point, keyed
    only when there are some (earlier checkpoints keep their signature)."""
    extra = {"extra_real": int(extra_real)} if extra_real else {}
    return content_key(
        {
            **extra,
            "dataset": dict(dataset_identity),
            "expansion_store": store_key,
            "include_original": include_original,
            "classifier": signature_of(classifier),
            "train": signature_of(train),
            "seed": int(seed),
        }
    )


def section_settings(section: str, method_target: str | None = None) -> list[type]:
    """The settings classes whose fields a config section holds (their speed-only fields leave the hash)."""
    from experiments.training.settings import ClassifierSettings, GenerationSettings, TrainSettings

    if section == "train":
        return [TrainSettings]
    if section == "classifier":
        return [ClassifierSettings]
    if section == "method":
        classes: list[type] = [GenerationSettings]
        if method_target:
            from hydra.utils import get_class

            classes.append(get_class(method_target).settings_class)
        return classes
    return []


def _defaults(section: str, names: tuple[str, ...]) -> dict[str, Any]:
    """The defaults of ``names`` in the section's settings classes, as a config writes them (nested settings
    as mappings)."""
    out = {}
    for settings_class in section_settings(section) if names else []:
        for f in dataclasses.fields(settings_class):
            if f.name in names:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                out[f.name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
    return out


def without_speed_only(mapping: dict[str, Any], settings_class: type) -> dict[str, Any]:
    """``mapping`` (a config section of ``settings_class``) less its speed-only fields, nested settings too."""
    hints = typing.get_type_hints(settings_class)
    out = dict(mapping)
    for f in dataclasses.fields(settings_class):
        if f.name not in out:
            continue
        if is_speed_only(f):
            out.pop(f.name)
            continue
        nested = _settings_type(hints.get(f.name))
        if nested is not None and isinstance(out[f.name], dict):
            out[f.name] = without_speed_only(out[f.name], nested)
    return out


def _settings_type(hint: Any) -> type | None:
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        options = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return options[0] if len(options) == 1 else None
    return hint if dataclasses.is_dataclass(hint) else None


def config_identity(container: dict[str, Any]) -> dict[str, Any]:
    """What of a resolved job configuration (without ``hydra``) the config hash covers."""
    out = {k: v for k, v in container.items() if k not in RUN_ONLY_KEYS and k != "hydra"}
    for section in ("train", "classifier", "method"):
        value = out.get(section)
        if not isinstance(value, dict):
            continue
        if section == "method":
            value = {k: v for k, v in value.items() if k != "tiny"}
        unset = _defaults(section, HASHED_WHEN_SET.get(section, ()))
        value = {k: v for k, v in value.items() if k not in unset or v != unset[k]}
        for settings_class in section_settings(section, value.get("_target_") if section == "method" else None):
            value = without_speed_only(value, settings_class)
        out[section] = value
    return out


def _identity_container(cfg: Any, seed: Any = None) -> dict[str, Any]:
    """:func:`config_identity` of ``cfg``; ``seed``: a stand-in for the top-level seed before resolving."""
    from omegaconf import OmegaConf

    keys = [k for k in cfg if k != "hydra"]
    copy = OmegaConf.masked_copy(cfg, keys)
    if "paths" in copy:
        for name in list(copy.paths):
            copy.paths[name] = f"<paths.{name}>"
    if seed is not None:
        copy.seed = seed
    return config_identity(OmegaConf.to_container(copy, resolve=True))


def config_hash(cfg: Any) -> str:
    """A job's identity: the content key of :func:`config_identity` of its resolved configuration;
    ``paths`` enter by name only (``<paths.shared_data>/mnist``)."""
    return content_key(_identity_container(cfg))


#: what the seed is replaced with in :func:`experiment_settings` (so ``expansion_seed: ${seed}`` reads
#: "follows the seed", and a fixed expansion seed keeps its value)
SEED_STAND_IN = "<seed>"


def experiment_settings(cfg: Any) -> dict[str, Any]:
    """The experiment a job belongs to: its config identity less the seed, flattened to dotted keys
    (``train.epochs``). Jobs with equal experiment settings (and data) differ only in the seed: one
    results row. A setting that follows the seed (``expansion_seed: ${seed}``) reads ``<seed>``."""
    identity = _identity_container(cfg, seed=SEED_STAND_IN)
    identity.pop("seed", None)
    return flatten(identity)


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one mapping of dotted keys (lists and scalars are leaves)."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out
