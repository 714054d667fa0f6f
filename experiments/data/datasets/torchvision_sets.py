"""Loaders for the GIF paper's natural-image benchmarks, read in torchvision's
on-disk layouts: Caltech101, Stanford Cars, Flowers102, DTD, Oxford-IIIT Pets,
CIFAR-10 and the CIFAR-100 subset.

Every loader first checks the files it needs itself, so a missing dataset is a
:class:`DatasetNotFoundError` naming the expected path and the fix (never a
torchvision stack trace or a network hang). Only ``download: true`` touches the
network, through the torchvision class's own download.

File-based sets come back as :class:`FileImageSet` (decoded on access, always 3
channels: Caltech's grayscale JPEGs are converted); the CIFAR pickles come back
as in-memory :class:`TensorImageSet`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import RawSplits, register_loader
from .core import (
    DatasetError,
    FileImageSet,
    TensorImageSet,
    missing_dataset,
    per_class_choice,
)
from .simple import scan_class_folders

# The 102 Oxford flower category names, index i = official label i + 1 (imagelabels.mat); the
# usual public list (also recent torchvision's Flowers102.classes) without the stray "?" it has
# on "pink-yellow dahlia" (label 60).
FLOWERS102_CLASSES: list[str] = [
    "pink primrose",
    "hard-leaved pocket orchid",
    "canterbury bells",
    "sweet pea",
    "english marigold",
    "tiger lily",
    "moon orchid",
    "bird of paradise",
    "monkshood",
    "globe thistle",
    "snapdragon",
    "colt's foot",
    "king protea",
    "spear thistle",
    "yellow iris",
    "globe-flower",
    "purple coneflower",
    "peruvian lily",
    "balloon flower",
    "giant white arum lily",
    "fire lily",
    "pincushion flower",
    "fritillary",
    "red ginger",
    "grape hyacinth",
    "corn poppy",
    "prince of wales feathers",
    "stemless gentian",
    "artichoke",
    "sweet william",
    "carnation",
    "garden phlox",
    "love in the mist",
    "mexican aster",
    "alpine sea holly",
    "ruby-lipped cattleya",
    "cape flower",
    "great masterwort",
    "siam tulip",
    "lenten rose",
    "barbeton daisy",
    "daffodil",
    "sword lily",
    "poinsettia",
    "bolero deep blue",
    "wallflower",
    "marigold",
    "buttercup",
    "oxeye daisy",
    "common dandelion",
    "petunia",
    "wild pansy",
    "primula",
    "sunflower",
    "pelargonium",
    "bishop of llandaff",
    "gaura",
    "geranium",
    "orange dahlia",
    "pink-yellow dahlia",
    "cautleya spicata",
    "japanese anemone",
    "black-eyed susan",
    "silverbush",
    "californian poppy",
    "osteospermum",
    "spring crocus",
    "bearded iris",
    "windflower",
    "tree poppy",
    "gazania",
    "azalea",
    "water lily",
    "rose",
    "thorn apple",
    "morning glory",
    "passion flower",
    "lotus",
    "toad lily",
    "anthurium",
    "frangipani",
    "clematis",
    "hibiscus",
    "columbine",
    "desert-rose",
    "tree mallow",
    "magnolia",
    "cyclamen",
    "watercress",
    "canna lily",
    "hippeastrum",
    "bee balm",
    "ball moss",
    "foxglove",
    "bougainvillea",
    "camellia",
    "mallow",
    "mexican petunia",
    "bromelia",
    "blanket flower",
    "trumpet creeper",
    "blackberry lily",
]
assert len(FLOWERS102_CLASSES) == 102 and len(set(FLOWERS102_CLASSES)) == 102

CALTECH_BACKGROUND = "BACKGROUND_Google"


# --------------------------------------------------------------------------- helpers


def _name(cfg: Mapping[str, Any], default: str) -> str:
    return str(cfg.get("name", default))


def _root(cfg: Mapping[str, Any], name: str) -> Path:
    root = cfg.get("root")
    if root is None:
        raise DatasetError(f"dataset {name!r}: set dataset.root to the folder that holds (or will hold) the data")
    return Path(str(root)).expanduser()


def _download(cfg: Mapping[str, Any]) -> bool:
    return bool(cfg.get("download", False))


def _seed(cfg: Mapping[str, Any]) -> int:
    return int(cfg.get("split_seed", 0))


def _missing(paths: Sequence[Path]) -> list[Path]:
    return [p for p in paths if not p.exists()]


def _torchvision_call(name: str, what: str, fn: Callable[[], Any], how: str) -> Any:
    """Run a torchvision constructor/download; any failure becomes a DatasetError
    naming the dataset, what was being done and the fix."""
    try:
        return fn()
    except DatasetError:
        raise
    except ImportError as exc:
        raise DatasetError(f"dataset {name!r}: {what} needs a missing package ({exc}); install it") from exc
    except Exception as exc:  # torchvision raises RuntimeError/ValueError/OSError/URLError/...
        raise DatasetError(f"dataset {name!r}: {what} failed ({type(exc).__name__}: {exc}). {how}") from exc


def _ensure_files(
    name: str, required: Sequence[Path], how: str, *, download: bool, fetch: Callable[[], Any] | None
) -> None:
    """Fail with the expected path(s) and the fix unless every required path exists;
    with ``download`` and a ``fetch`` callable, fetch first (only when something is missing)."""
    missing = _missing(required)
    if missing and download and fetch is not None:
        _torchvision_call(name, "downloading with torchvision", fetch, how)
        missing = _missing(required)
    if missing:
        expected = missing[0] if len(missing) == 1 else ", ".join(str(p) for p in missing)
        raise missing_dataset(name, expected, how)


def _private(obj: Any, attr: str, name: str) -> Any:
    """A torchvision private attribute we rely on (no public (path, label) list exists)."""
    try:
        return getattr(obj, attr)
    except AttributeError:
        import torchvision

        raise DatasetError(
            f"dataset {name!r}: torchvision {torchvision.__version__} {type(obj).__name__} has no attribute "
            f"{attr!r}, which this loader reads to get the (image path, label) lists; torchvision changed its "
            f"internals. Use a torchvision version where it exists or update experiments/data/datasets/torchvision_sets.py."
        ) from None


def _file_set(paths: Sequence[Any], labels: Sequence[int], cfg: Mapping[str, Any]) -> FileImageSet:
    return FileImageSet(
        [Path(str(p)) for p in paths], np.asarray(labels, dtype=np.int64), channels=3, image_size=cfg.get("image_size")
    )


def _check_same_classes(name: str, split: str, classes: Sequence[str], reference: Sequence[str]) -> None:
    if list(classes) != list(reference):
        raise DatasetError(
            f"dataset {name!r}: the {split} split lists classes {list(classes)[:5]}... ({len(classes)}) that differ "
            f"from the train split's ({len(reference)}); the annotation files look inconsistent"
        )


def _labels_by_name(
    name: str, split: str, labels: Sequence[int], split_classes: Sequence[str], reference: Sequence[str]
) -> list[int]:
    """Labels indexing ``split_classes`` (a split's own class list) re-indexed into ``reference``."""
    index = {c: i for i, c in enumerate(reference)}
    unknown = sorted(set(split_classes) - set(index))
    if unknown:
        raise DatasetError(f"dataset {name!r}: the {split} split has classes not in the train split: {unknown[:5]}")
    return [index[split_classes[int(y)]] for y in labels]


# --------------------------------------------------------------------------- Caltech101


@register_loader("caltech101")
def load_caltech101(cfg: Mapping[str, Any]) -> RawSplits:
    """``root/caltech101/101_ObjectCategories/<class>/*.jpg`` (torchvision's layout), all
    folders as classes including ``BACKGROUND_Google`` (102 classes, as the GIF paper;
    ``include_background: false`` drops it). No official split: a seeded choice
    (``split_seed``) of ``train_per_class_official`` (default 30) images per class is
    train, the rest test."""
    name = _name(cfg, "caltech101")
    root = _root(cfg, name)
    folder = root / "caltech101" / "101_ObjectCategories"
    how = (
        f"Set dataset.download=true to fetch it with torchvision, or download caltech-101.zip from "
        f"https://data.caltech.edu/records/mzrjq-6wc02 and unpack its 101_ObjectCategories.tar.gz into "
        f"{root / 'caltech101'} (giving 101_ObjectCategories/<class>/image_XXXX.jpg)."
    )

    def fetch() -> Any:
        from torchvision.datasets import Caltech101

        return Caltech101(str(root), download=True)

    _ensure_files(name, [folder], how, download=_download(cfg), fetch=fetch)
    class_names, paths, labels_list = scan_class_folders(folder)
    labels = np.asarray(labels_list, dtype=np.int64)
    include_background = bool(cfg.get("include_background", True))
    if not include_background and CALTECH_BACKGROUND in class_names:
        bg = class_names.index(CALTECH_BACKGROUND)
        keep = np.flatnonzero(labels != bg)
        paths = [paths[i] for i in keep]
        labels = labels[keep]
        labels = labels - (labels > bg)
        class_names = [c for c in class_names if c != CALTECH_BACKGROUND]
    n = int(cfg.get("train_per_class_official", 30))
    seed = _seed(cfg)
    train_idx, test_idx = per_class_choice(labels, n, seed, class_names, what="train_per_class_official")
    train = _file_set([paths[i] for i in train_idx], labels[train_idx], cfg)
    test = _file_set([paths[i] for i in test_idx], labels[test_idx], cfg)
    return RawSplits(
        class_names,
        train,
        test,
        None,
        source={
            "split": "per_class_choice",
            "train_per_class_official": n,
            "split_seed": seed,
            "include_background": include_background,
        },
    )


# --------------------------------------------------------------------------- Stanford Cars


@register_loader("cars")
def load_cars(cfg: Mapping[str, Any]) -> RawSplits:
    """Stanford Cars, official train / test (8,144 / 8,041, 196 classes) in torchvision's
    ``root/stanford_cars`` layout; the images are decoded by FileImageSet from the
    (path, label) list torchvision reads out of the annotation .mat files."""
    name = _name(cfg, "cars")
    root = _root(cfg, name)
    base = root / "stanford_cars"
    required = [
        base / "devkit" / "cars_meta.mat",
        base / "devkit" / "cars_train_annos.mat",
        base / "cars_train",
        base / "cars_test_annos_withlabels.mat",
        base / "cars_test",
    ]
    how = (
        f"Stanford Cars cannot be downloaded automatically (its original URL is dead, so dataset.download=true "
        f"does not help). Put torchvision's layout under {base}: devkit/cars_meta.mat, devkit/cars_train_annos.mat, "
        f"cars_train/*.jpg, cars_test/*.jpg and cars_test_annos_withlabels.mat. The images are on Kaggle "
        f"(https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset; flatten cars_train/cars_train), the "
        f"devkit and the labelled test annotations are linked from https://github.com/pytorch/vision/issues/7545."
    )
    _ensure_files(name, required, how, download=False, fetch=None)
    from torchvision.datasets import StanfordCars

    splits = {}
    classes: list[str] = []
    for split in ("train", "test"):
        ds = _torchvision_call(
            name,
            f"reading the {split} annotations",
            lambda split=split: StanfordCars(str(root), split=split, download=False),
            how,
        )
        samples = _private(ds, "_samples", name)
        if split == "train":
            classes = [str(c) for c in ds.classes]
        else:
            _check_same_classes(name, split, [str(c) for c in ds.classes], classes)
        splits[split] = _file_set([p for p, _ in samples], [int(y) for _, y in samples], cfg)
    return RawSplits(classes, splits["train"], splits["test"], None, source={"split": "official"})


# --------------------------------------------------------------------------- Flowers102


@register_loader("flowers102")
def load_flowers102(cfg: Mapping[str, Any]) -> RawSplits:
    """Oxford Flowers102, torchvision's official train / val / test (1,020 / 1,020 / 6,149)
    from ``root/flowers-102/{jpg/, imagelabels.mat, setid.mat}``."""
    name = _name(cfg, "flowers102")
    root = _root(cfg, name)
    base = root / "flowers-102"
    required = [base / "jpg", base / "imagelabels.mat", base / "setid.mat"]
    how = (
        f"Set dataset.download=true to fetch it with torchvision, or download 102flowers.tgz, imagelabels.mat "
        f"and setid.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ into {base} (unpacking the "
        f"tgz gives jpg/)."
    )
    from torchvision.datasets import Flowers102

    _ensure_files(
        name, required, how, download=_download(cfg), fetch=lambda: Flowers102(str(root), split="train", download=True)
    )
    splits = {}
    for split in ("train", "val", "test"):
        ds = _torchvision_call(
            name,
            f"reading the {split} split",
            lambda split=split: Flowers102(str(root), split=split, download=False),
            how + " (torchvision also checks the .mat files' md5: a corrupt file fails here.)",
        )
        splits[split] = _file_set(_private(ds, "_image_files", name), _private(ds, "_labels", name), cfg)
    return RawSplits(
        list(FLOWERS102_CLASSES), splits["train"], splits["test"], splits["val"], source={"split": "official"}
    )


# --------------------------------------------------------------------------- DTD


@register_loader("dtd")
def load_dtd(cfg: Mapping[str, Any]) -> RawSplits:
    """Describable Textures, official train / val / test of ``partition`` (1..10, default 1;
    1,880 images each) from ``root/dtd/dtd/{images,labels}``."""
    name = _name(cfg, "dtd")
    root = _root(cfg, name)
    partition = int(cfg.get("partition", 1))
    if not 1 <= partition <= 10:
        raise DatasetError(f"dataset {name!r}: partition must be in 1..10, got {partition}")
    data = root / "dtd" / "dtd"
    required = [data / "images"] + [data / "labels" / f"{s}{partition}.txt" for s in ("train", "val", "test")]
    how = (
        f"Set dataset.download=true to fetch it with torchvision, or unpack "
        f"https://www.robots.ox.ac.uk/~vgg/data/dtd/download/dtd-r1.0.1.tar.gz into {root / 'dtd'} "
        f"(giving dtd/images and dtd/labels)."
    )
    from torchvision.datasets import DTD

    _ensure_files(
        name,
        required,
        how,
        download=_download(cfg),
        fetch=lambda: DTD(str(root), split="train", partition=partition, download=True),
    )
    splits = {}
    classes: list[str] = []
    for split in ("train", "val", "test"):
        ds = _torchvision_call(
            name,
            f"reading the {split}{partition} split",
            lambda split=split: DTD(str(root), split=split, partition=partition, download=False),
            how,
        )
        # torchvision indexes each split's labels into that split's own sorted class list
        split_classes = [str(c) for c in ds.classes]
        if split == "train":
            classes = split_classes
        labels = _labels_by_name(name, split, _private(ds, "_labels", name), split_classes, classes)
        splits[split] = _file_set(_private(ds, "_image_files", name), labels, cfg)
    return RawSplits(
        classes, splits["train"], splits["test"], splits["val"], source={"split": "official", "partition": partition}
    )


# --------------------------------------------------------------------------- Oxford-IIIT Pets


@register_loader("pets")
def load_pets(cfg: Mapping[str, Any]) -> RawSplits:
    """Oxford-IIIT Pets, official trainval (as train, 3,680) / test (3,669), 37 breeds,
    from ``root/oxford-iiit-pet/{images,annotations}``. No official val: build_dataset
    carves one from trainval."""
    name = _name(cfg, "pets")
    root = _root(cfg, name)
    base = root / "oxford-iiit-pet"
    required = [base / "images", base / "annotations" / "trainval.txt", base / "annotations" / "test.txt"]
    how = (
        f"Set dataset.download=true to fetch it with torchvision, or unpack images.tar.gz and "
        f"annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ into {base}."
    )
    from torchvision.datasets import OxfordIIITPet

    _ensure_files(
        name,
        required,
        how,
        download=_download(cfg),
        fetch=lambda: OxfordIIITPet(str(root), split="trainval", download=True),
    )
    splits = {}
    classes: list[str] = []
    for split in ("trainval", "test"):
        ds = _torchvision_call(
            name,
            f"reading the {split} split",
            lambda split=split: OxfordIIITPet(str(root), split=split, download=False),
            how,
        )
        # labels are the annotation files' global breed ids (1..37, minus 1); classes are
        # derived from the split's own rows, so compare the test split's as a subset
        labels = [int(y) for y in _private(ds, "_labels", name)]
        if split == "trainval":
            classes = [str(c) for c in ds.classes]
        elif not set(map(str, ds.classes)) <= set(classes) or (labels and max(labels) >= len(classes)):
            raise DatasetError(
                f"dataset {name!r}: the test split has breeds or labels not in trainval; "
                f"the annotation files under {base / 'annotations'} look inconsistent"
            )
        splits[split] = _file_set(_private(ds, "_images", name), labels, cfg)
    return RawSplits(
        classes, splits["trainval"], splits["test"], None, source={"split": "official", "train": "trainval"}
    )


# --------------------------------------------------------------------------- CIFAR


_CIFAR = {
    # loader -> (torchvision class name, folder, files, url)
    "cifar10": (
        "CIFAR10",
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"],
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    "cifar100": (
        "CIFAR100",
        "cifar-100-python",
        ["train", "test", "meta"],
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    ),
}


def _load_cifar(
    cfg: Mapping[str, Any], name: str, which: str
) -> tuple[list[str], torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
    """Official CIFAR train and test as uint8 ``[N, 3, 32, 32]`` tensors and labels."""
    import torchvision.datasets as tvd

    cls_name, folder, files, url = _CIFAR[which]
    cls = getattr(tvd, cls_name)
    root = _root(cfg, name)
    base = root / folder
    how = (
        f"Set dataset.download=true to fetch it with torchvision, or unpack {url} into {root} "
        f"(giving {folder}/{', '.join(files)})."
    )
    _ensure_files(
        name,
        [base / f for f in files],
        how,
        download=_download(cfg),
        fetch=lambda: cls(str(root), train=True, download=True),
    )
    out: list[Any] = []
    classes: list[str] = []
    for train in (True, False):
        ds = _torchvision_call(
            name,
            f"reading the {'train' if train else 'test'} pickles",
            lambda train=train: cls(str(root), train=train, download=False),
            f"The files under {base} failed torchvision's md5 check or could not be read: delete {base} and set "
            f"dataset.download=true (or unpack {url} again).",
        )
        data = np.asarray(ds.data, dtype=np.uint8)
        if data.ndim != 4 or data.shape[-1] != 3:
            raise DatasetError(f"dataset {name!r}: expected CIFAR images [N, 32, 32, 3], got {data.shape}")
        out.append(torch.from_numpy(data).permute(0, 3, 1, 2).contiguous())
        out.append(np.asarray(ds.targets, dtype=np.int64))
        classes = [str(c) for c in ds.classes]
    return classes, out[0], out[1], out[2], out[3]


@register_loader("cifar10")
def load_cifar10(cfg: Mapping[str, Any]) -> RawSplits:
    """CIFAR-10, full official train (50,000) / test (10,000) from torchvision's python
    pickles in ``root/cifar-10-batches-py``; no official val (build_dataset carves one)."""
    name = _name(cfg, "cifar10")
    classes, x_train, y_train, x_test, y_test = _load_cifar(cfg, name, "cifar10")
    size = cfg.get("image_size")
    return RawSplits(
        classes,
        TensorImageSet(x_train, y_train, image_size=size),
        TensorImageSet(x_test, y_test, image_size=size),
        None,
        source={"split": "official"},
    )


@register_loader("cifar100_subset")
def load_cifar100_subset(cfg: Mapping[str, Any]) -> RawSplits:
    """CIFAR-100 subset (GIF paper): a seeded choice (``split_seed``) of
    ``subset_per_class`` (default 100) images per class from the official train split
    (10,000 images), the full official test split (10,000); pickles in
    ``root/cifar-100-python``. No official val (build_dataset carves one from the subset)."""
    name = _name(cfg, "cifar100_subset")
    classes, x_train, y_train, x_test, y_test = _load_cifar(cfg, name, "cifar100")
    n = int(cfg.get("subset_per_class", 100))
    seed = _seed(cfg)
    chosen, _ = per_class_choice(y_train, n, seed, classes, what="subset_per_class")
    size = cfg.get("image_size")
    train = TensorImageSet(x_train[torch.from_numpy(chosen)].contiguous(), y_train[chosen], image_size=size)
    return RawSplits(
        classes,
        train,
        TensorImageSet(x_test, y_test, image_size=size),
        None,
        source={"split": "per_class_choice", "subset_per_class": n, "split_seed": seed},
    )
