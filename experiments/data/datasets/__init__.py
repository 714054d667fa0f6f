"""Datasets: a registry of loaders and one :func:`build_dataset` that applies the
framework's deterministic split rules (official splits where they exist, a
seeded stratified val split carved from train otherwise, an optional seeded
few-shot ``train_per_class``).

A loader is ``fn(cfg) -> RawSplits`` in any module of this package, registered with
:func:`register_loader`; ``conf/dataset/<name>.yaml`` names it as ``loader``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .core import (
    DatasetError,
    DatasetNotFoundError,
    DatasetSplits,
    FileImageSet,
    ImageSet,
    TensorImageSet,
    per_class_choice,
    stratified_holdout,
)

__all__ = [
    "LOADERS",
    "DatasetError",
    "DatasetNotFoundError",
    "DatasetSplits",
    "FileImageSet",
    "ImageSet",
    "RawSplits",
    "TensorImageSet",
    "build_dataset",
    "register_loader",
]


@dataclass
class RawSplits:
    """What a loader returns: the dataset's own splits (``val`` None when it has none)."""

    class_names: list[str]
    train: ImageSet
    test: ImageSet
    val: ImageSet | None = None
    #: extra facts that identify the source (e.g. official split id), for the store key
    source: dict[str, Any] | None = None


Loader = Callable[[Mapping[str, Any]], RawSplits]
LOADERS: dict[str, Loader] = {}


def register_loader(name: str) -> Callable[[Loader], Loader]:
    def deco(fn: Loader) -> Loader:
        LOADERS[name] = fn
        return fn

    return deco


def _ensure_registered() -> None:
    """Import every module of this package, so the loaders they register are known (a loader in a
    new file is found without a list to edit); loaders import optional dependencies when they run."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def loaders() -> dict[str, Loader]:
    """Every registered loader by name."""
    _ensure_registered()
    return dict(LOADERS)


def _checked_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The dataset config as a plain mapping; a mandatory value left unset or a bad size is one line."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    if isinstance(cfg, DictConfig):
        try:
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        except MissingMandatoryValue as exc:
            key = str(exc.full_key or exc.key).removeprefix("dataset.")
            raise DatasetError(f"dataset.{key} must be set (e.g. dataset.{key}=/data/my_set)") from None
    cfg = dict(cfg)
    for key in ("image_size", "train_per_class", "extra_real_per_class"):
        value, least = cfg.get(key), 0 if key == "extra_real_per_class" else 1  # 0 extra: the real arm's origin
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise DatasetError(f"dataset.{key} must be an integer >= {least} or null, got {value!r}")
    return cfg


def build_dataset(cfg: Mapping[str, Any]) -> DatasetSplits:
    """Load a dataset from its config and apply the split rules.

    Order (so that val never depends on the few-shot size): official splits ->
    carve val from train when there is none (``val_fraction``, seeded by
    ``split_seed``) -> few-shot ``train_per_class`` from what remains ->
    ``extra_real_per_class`` more real images per class from the rest (seen by the
    classifier only, never by an expansion: the exchange-rate experiment's n_real_plus).
    Whatever training images are still left are ``unused_train`` (e.g. an autoencoder's
    pretraining pool); val and test are never part of it.
    """
    _ensure_registered()
    cfg = _checked_config(cfg)
    loader_name = cfg.get("loader", cfg["name"])
    if loader_name not in LOADERS:
        raise DatasetError(f"unknown dataset loader {loader_name!r}; known: {sorted(LOADERS)}")
    raw = LOADERS[loader_name](cfg)
    class_names = [str(c) for c in raw.class_names]
    if len(class_names) < 2:
        raise DatasetError(
            f"dataset {cfg['name']!r} has {len(class_names)} class ({class_names}): a classifier "
            "needs at least 2 (every prediction would be right)"
        )
    expected = cfg.get("num_classes")
    if expected is not None and int(expected) != len(class_names):
        raise DatasetError(
            f"dataset {cfg['name']!r}: config says num_classes={expected} but the data has "
            f"{len(class_names)} classes ({class_names[:5]}...)"
        )
    split_seed = int(cfg.get("split_seed", 0))
    train, val, carved = raw.train, raw.val, False
    if val is None:
        keep, held = stratified_holdout(train.labels, float(cfg.get("val_fraction", 0.1)), split_seed)
        train, val, carved = train.subset(keep), train.subset(held), True
    n_per_class = cfg.get("train_per_class")
    pool = None  # training images the few-shot choice left out
    if n_per_class is not None:
        chosen, rest = per_class_choice(train.labels, int(n_per_class), split_seed + 1, class_names)
        train, pool = train.subset(chosen), train.subset(rest)
    extra = None
    n_extra = cfg.get("extra_real_per_class")
    if n_extra:
        if pool is None:
            raise DatasetError(
                f"dataset {cfg['name']!r}: extra_real_per_class={n_extra} needs a few-shot train_per_class "
                "(the extra real images come from the training images it leaves out)"
            )
        extra_idx, rest = per_class_choice(
            pool.labels, int(n_extra), split_seed + 2, class_names, what="extra_real_per_class"
        )
        extra, pool = pool.subset(extra_idx), pool.subset(rest)
    if len(train) == 0:
        raise DatasetError(f"dataset {cfg['name']!r}: the training split is empty")
    identity = {
        "name": cfg["name"],
        "class_names": class_names,
        "image_size": cfg.get("image_size"),
        "train_per_class": n_per_class,
        "split_seed": split_seed,
        "val_fraction": cfg.get("val_fraction") if carved else None,
        "source": raw.source or {},
        "train_fingerprint": train.fingerprint(),
    }
    splits = DatasetSplits(
        name=str(cfg["name"]),
        class_names=class_names,
        train=train,
        val=val,
        test=raw.test,
        channels=train.channels,
        image_size=cfg.get("image_size"),
        identity=identity,
        val_is_carved=carved,
        extra_train=extra,
        unused_train=pool if pool is not None and len(pool) else None,
    )
    splits.check_labels(allow_absent_classes=bool(cfg.get("allow_classes_without_training_images", False)))
    return splits
