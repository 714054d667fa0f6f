"""Loaders that need no torchvision dataset class: scikit-learn digits (the
offline default), MNIST IDX files and a generic image folder (split or flat)."""

from __future__ import annotations

import gzip
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..dataset_paths import PATH_HINTS
from . import RawSplits, register_loader
from .core import (
    DatasetError,
    FileImageSet,
    TensorImageSet,
    missing_dataset,
    stratified_holdout,
)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


@register_loader("digits")
def load_digits(cfg: Mapping[str, Any]) -> RawSplits:
    """scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), values 0..16
    scaled to 0..255; a seeded stratified ``test_fraction`` becomes the test split."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = torch.from_numpy(np.round(data.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = data.target.astype(np.int64)
    train_idx, test_idx = stratified_holdout(
        labels, float(cfg.get("test_fraction", 0.5)), int(cfg.get("split_seed", 0)) + 7
    )
    size = cfg.get("image_size")
    full = TensorImageSet(images, labels, image_size=size)
    return RawSplits(
        class_names=[str(i) for i in range(10)],
        train=full.subset(train_idx),
        test=full.subset(test_idx),
        source={"test_fraction": cfg.get("test_fraction", 0.5)},
    )


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (LeCun's MNIST format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"unreadable IDX file {path}: {exc}") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DatasetError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">u4", count=ndim, offset=4).astype(np.int64)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DatasetError(f"{path} is truncated: {data.size} values for shape {tuple(dims)}")
    return data.reshape(tuple(dims))


def _find_idx(root: Path, stem: str) -> Path | None:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


@register_loader("mnist")
def load_mnist(cfg: Mapping[str, Any]) -> RawSplits:
    """MNIST from its IDX files in ``root`` (or ``root/MNIST/raw``, torchvision's layout).

    With ``split_test_into_train: true`` only the 10,000 test images are used and a
    seeded stratified ``test_holdout_fraction`` of them is the test split, the rest
    the train split (the offline copy in shared/data holds only t10k)."""
    root = Path(str(cfg["root"])).expanduser()
    download = bool(cfg.get("download", False))
    if download:
        from torchvision.datasets import MNIST

        for train in (True, False):
            MNIST(str(root), train=train, download=True)
    how = (
        "Set dataset.download=true to fetch MNIST with torchvision, or put the IDX files "
        "(from https://ossci-datasets.s3.amazonaws.com/mnist/) in dataset.root."
    )
    test_images, test_labels = _find_idx(root, "t10k-images-idx3-ubyte"), _find_idx(root, "t10k-labels-idx1-ubyte")
    if test_images is None or test_labels is None:
        raise missing_dataset(cfg["name"], root / "t10k-images-idx3-ubyte.gz", how)
    x_test, y_test = _read_idx(test_images), _read_idx(test_labels).astype(np.int64)
    size = cfg.get("image_size")
    classes = [str(i) for i in range(10)]
    if cfg.get("split_test_into_train", False):
        full = TensorImageSet(torch.from_numpy(x_test.copy())[:, None], y_test, image_size=size)
        train_idx, test_idx = stratified_holdout(
            y_test, float(cfg.get("test_holdout_fraction", 0.5)), int(cfg.get("split_seed", 0)) + 11
        )
        return RawSplits(
            classes,
            full.subset(train_idx),
            full.subset(test_idx),
            source={"split_test_into_train": True, "test_holdout_fraction": cfg.get("test_holdout_fraction", 0.5)},
        )
    train_images, train_labels = _find_idx(root, "train-images-idx3-ubyte"), _find_idx(root, "train-labels-idx1-ubyte")
    if train_images is None or train_labels is None:
        raise missing_dataset(
            cfg["name"],
            root / "train-images-idx3-ubyte.gz",
            how + " Or set dataset.split_test_into_train=true to split the test images.",
        )
    x_train, y_train = _read_idx(train_images), _read_idx(train_labels).astype(np.int64)
    return RawSplits(
        classes,
        TensorImageSet(torch.from_numpy(x_train.copy())[:, None], y_train, image_size=size),
        TensorImageSet(torch.from_numpy(x_test.copy())[:, None], y_test, image_size=size),
        source={"split_test_into_train": False},
    )


def scan_class_folders(
    split_dir: Path, class_names: list[str] | None = None
) -> tuple[list[str], list[Path], list[int]]:
    """List ``split_dir/<class>/<image>``; fails on an empty class folder.
    Hidden files are ignored; files with non-image extensions are ignored."""
    if not split_dir.is_dir():
        raise DatasetError(f"expected a folder of class folders at {split_dir}")
    found = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = found
    else:
        unknown = sorted(set(found) - set(class_names))
        if unknown:
            raise DatasetError(f"{split_dir} has class folders not in the train split: {unknown}")
    if not class_names:
        raise DatasetError(f"{split_dir} holds no class folders")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        folder = split_dir / name
        files = (
            sorted(
                p
                for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if folder.is_dir()
            else []
        )
        if not files and folder.is_dir():
            raise DatasetError(f"class folder {folder} holds no images")
        paths.extend(files)
        labels.extend([label] * len(files))
    return class_names, paths, labels


@register_loader("imagefolder")
def load_imagefolder(cfg: Mapping[str, Any]) -> RawSplits:
    """An image folder: ``path/{train,test}[,val]/<class>/<image>`` (its own splits; without ``val/`` a
    val split is carved from train), or flat ``path/<class>/<image>`` (or ``path/train/<class>/`` with
    no ``test/``), whose seeded stratified ``test_fraction`` per class becomes the test split. Class
    names are the class folders' names, sorted."""
    root = Path(str(cfg["path"])).expanduser()
    if not root.is_dir():
        raise missing_dataset(cfg["name"], root, PATH_HINTS["imagefolder"])
    channels = int(cfg.get("channels", 3))
    size = cfg.get("image_size")
    if (root / "test").is_dir() and not (root / "train").is_dir():
        raise missing_dataset(
            cfg["name"], root / "train", "A folder with test/<class>/ needs train/<class>/ beside it."
        )
    if (root / "train").is_dir() and (root / "test").is_dir():
        class_names, paths, labels = scan_class_folders(root / "train")
        splits = {"train": FileImageSet(paths, labels, channels=channels, image_size=size)}
        for split in ("val", "test"):
            if (root / split).is_dir():
                _, p, y = scan_class_folders(root / split, class_names)
                splits[split] = FileImageSet(p, y, channels=channels, image_size=size)
        source = {"layout": "imagefolder"}
        return RawSplits(class_names, splits["train"], splits["test"], splits.get("val"), source=source)
    # flat: every image of a class in one folder; the test split is drawn here
    folder = root / "train" if (root / "train").is_dir() else root
    class_names, paths, labels = scan_class_folders(folder)
    fraction = cfg.get("test_fraction")
    if fraction is None or isinstance(fraction, bool) or not 0.0 < float(fraction) < 1.0:
        raise DatasetError(
            f"{root} has no test/ folder, so dataset.test_fraction (of each class) must be in (0, 1), got {fraction!r}"
        )
    full = FileImageSet(paths, labels, channels=channels, image_size=size)
    small = [c for c, n in zip(class_names, np.bincount(full.labels, minlength=len(class_names))) if n < 3]
    if small:
        raise DatasetError(
            f"{folder}: class folders {small[:5]} hold fewer than 3 images; a flat folder needs at least 3 per class "
            "(train, val and test each get one)"
        )
    train_idx, test_idx = stratified_holdout(full.labels, float(fraction), int(cfg.get("split_seed", 0)) + 13)
    source = {"layout": "flat", "test_fraction": float(fraction), "test_split_seed": int(cfg.get("split_seed", 0)) + 13}
    return RawSplits(class_names, full.subset(train_idx), full.subset(test_idx), source=source)
