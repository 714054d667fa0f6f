"""Image arrays in MedMNIST's ``.npz`` format: ``{train,val,test}_images`` (uint8 ``N x H x W`` or
``N x H x W x C``) and ``{split}_labels`` (integers, ``N`` or ``N x 1``). Two loaders read it: ``npz``
(any such file by path) and ``medmnist`` (a known MedMNIST flag: class names from the medmnist
package, which also downloads the file)."""

from __future__ import annotations

import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dataset_paths import PATH_HINTS
from . import RawSplits, register_loader
from .core import DatasetError, TensorImageSet, missing_dataset

SPLITS = ("train", "val", "test")


def read_npz(path: Path, what: str, how_to_get: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file (no pickled objects); a missing or unreadable file is one line."""
    if not path.is_file():
        raise missing_dataset(what, path, how_to_get)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"{path} is not a readable .npz file ({exc}); {how_to_get}") from exc


def image_tensor(array: np.ndarray, path: Path, key: str) -> torch.Tensor:
    """``N x H x W`` (grayscale) or ``N x H x W x C`` (C = 1 or 3) uint8 -> ``[N, C, H, W]``."""
    if array.dtype != np.uint8:
        raise DatasetError(
            f"{path}: {key} has dtype {array.dtype}, but images must be uint8 (0..255); convert them, e.g. "
            "np.clip(x * 255, 0, 255).round().astype(np.uint8) for floats in [0, 1]"
        )
    if array.ndim == 3:
        array = array[..., None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3) or 0 in array.shape[1:3]:
        raise DatasetError(
            f"{path}: {key} has shape {array.shape}; expected N x H x W (grayscale) or N x H x W x C with C = 1 or 3"
        )
    if len(array) == 0:
        raise DatasetError(f"{path}: {key} holds no images")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()


def label_vector(array: np.ndarray, path: Path, key: str, n_images: int) -> np.ndarray:
    """Integer labels ``N`` or ``N x 1`` -> int64 ``N``; multi-label ``N x K`` is refused."""
    if not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{path}: {key} has dtype {array.dtype}; labels must be integers (class indices)")
    if array.ndim == 2 and array.shape[1] != 1:
        raise DatasetError(
            f"{path}: {key} has shape {array.shape}: {array.shape[1]} labels per image (multi-label); "
            "only single-label sets are supported"
        )
    if array.ndim not in (1, 2):
        raise DatasetError(f"{path}: {key} has shape {array.shape}; expected N or N x 1 class indices")
    labels = array.reshape(-1).astype(np.int64)
    if len(labels) != n_images:
        images_key = key.replace("_labels", "_images")
        raise DatasetError(f"{path}: {images_key} holds {n_images} images but {key} {len(labels)} labels")
    if len(labels) and labels.min() < 0:
        raise DatasetError(f"{path}: {key} holds the negative label {labels.min()}; labels are 0 .. classes - 1")
    return labels


def splits_from_arrays(
    arrays: Mapping[str, np.ndarray],
    path: Path,
    class_names: Sequence[str] | None,
    image_size: int | None,
) -> tuple[list[str], dict[str, TensorImageSet]]:
    """Check and convert a MedMNIST-format mapping: ``train`` and ``test`` are required, ``val`` is
    optional (both its keys or neither). Without ``class_names`` the classes are numbered ``0 ..
    max label``. Every image tensor keeps the file's channels (1 or 3)."""
    present = [s for s in SPLITS if f"{s}_images" in arrays or f"{s}_labels" in arrays]
    for split in ("train", "test", *(["val"] if "val" in present else [])):
        for kind in ("images", "labels"):
            if f"{split}_{kind}" not in arrays:
                raise DatasetError(
                    f"{path}: the key {split}_{kind} is missing (it has {sorted(arrays)}); a MedMNIST-format npz "
                    "holds train_images, train_labels, test_images, test_labels and optionally val_images, val_labels"
                )
    images = {s: image_tensor(arrays[f"{s}_images"], path, f"{s}_images") for s in present}
    labels = {s: label_vector(arrays[f"{s}_labels"], path, f"{s}_labels", len(images[s])) for s in present}
    channels = {s: int(t.shape[1]) for s, t in images.items()}
    if len(set(channels.values())) > 1:
        raise DatasetError(f"{path}: the splits have different channel counts {channels}; convert them to one")
    if class_names is None:
        class_names = [str(i) for i in range(int(max(y.max() for y in labels.values())) + 1)]
    for split, y in labels.items():
        if y.max() >= len(class_names):
            raise DatasetError(
                f"{path}: {split}_labels span [{y.min()}, {y.max()}] but the dataset has {len(class_names)} classes "
                "(set dataset.class_names to the full list)"
            )
    sets = {s: TensorImageSet(images[s], labels[s], image_size=image_size) for s in present}
    return [str(c) for c in class_names], sets


@register_loader("npz")
def load_npz(cfg: Mapping[str, Any]) -> RawSplits:
    """Any MedMNIST-format ``.npz`` by ``path`` (official val split when it has one, else carved);
    class names from ``class_names`` or numbered."""
    if cfg.get("path") is None:
        raise DatasetError("dataset.path must be set to the .npz file (e.g. dataset.path=/data/retina.npz)")
    path = Path(str(cfg["path"])).expanduser()
    how = PATH_HINTS["npz"]
    names = cfg.get("class_names")
    if names is not None and (isinstance(names, str) or len(set(map(str, names))) != len(names)):
        raise DatasetError(f"dataset.class_names must be a list of distinct names, got {names!r}")
    class_names, sets = splits_from_arrays(read_npz(path, str(cfg["name"]), how), path, names, cfg.get("image_size"))
    return RawSplits(class_names, sets["train"], sets["test"], sets.get("val"), source={"npz": path.name})


@register_loader("medmnist")
def load_medmnist(cfg: Mapping[str, Any]) -> RawSplits:
    """A MedMNIST 2D dataset (official train/val/test): ``flag`` is the MedMNIST name (breastmnist,
    retinamnist, ...), ``size`` the MedMNIST+ resolution (28 default; 64/128/224 files are named
    ``<flag>_<size>.npz``); class names from the medmnist package, which downloads with ``download``."""
    import medmnist

    flag = str(cfg.get("flag", cfg["name"])).lower()
    if flag not in medmnist.INFO:
        raise DatasetError(
            f"unknown MedMNIST flag {flag!r}; known: {sorted(medmnist.INFO)}. For another file in MedMNIST's "
            "format use dataset=npz dataset.path=FILE"
        )
    info = medmnist.INFO[flag]
    if info["task"].startswith("multi-label"):
        raise DatasetError(f"{flag} is multi-label ({info['task']}); only single-label MedMNIST sets are supported")
    size = int(cfg.get("size", 28))
    root = Path(str(cfg["root"])).expanduser()
    path = root / (f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz")
    if not path.is_file() and cfg.get("download", False):
        root.mkdir(parents=True, exist_ok=True)
        getattr(medmnist, info["python_class"])(
            split="train", root=str(root), download=True, **({"size": size} if size != 28 else {})
        )
    how = (
        f"Set dataset.download=true to fetch it (from {info.get('url', 'zenodo.org/records/10519652')}), "
        f"or point dataset.root at a folder holding {path.name}."
    )
    class_names = [info["label"][str(i)] for i in range(len(info["label"]))]
    _, sets = splits_from_arrays(read_npz(path, str(cfg["name"]), how), path, class_names, cfg.get("image_size"))
    if "val" not in sets:
        raise DatasetError(f"{path}: val_images/val_labels are missing; an official MedMNIST file has them")
    return RawSplits(class_names, sets["train"], sets["test"], sets["val"], source={"flag": flag, "size": size})
