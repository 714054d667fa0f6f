"""Offline dataset loaders on real data: digits, BreastMNIST (medmnist package),
MNIST IDX files, the CIFAR-10 subset as an ImageFolder; split rules and errors."""

from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from experiments.data.datasets import DatasetError, DatasetNotFoundError, build_dataset
from tests.conftest import compose


def _cfg(**kw):
    return OmegaConf.create(kw)


def test_digits_splits_are_deterministic_and_disjoint():
    cfg = compose(["dataset=digits"]).dataset
    a, b = build_dataset(cfg), build_dataset(cfg)
    assert a.class_names == [str(i) for i in range(10)]
    assert a.sizes() == b.sizes() and a.sizes()["train"] == 200
    assert np.array_equal(a.train.labels, b.train.labels)
    assert a.identity == b.identity
    assert np.bincount(a.train.labels).tolist() == [20] * 10
    image, _ = a.train[0]
    assert image.dtype == torch.uint8 and image.shape == (1, 8, 8) and image.max() > 200
    # the few-shot choice depends on the split seed; val does not depend on the few-shot size
    other = build_dataset(OmegaConf.merge(cfg, {"split_seed": 1}))
    assert other.identity["train_fingerprint"] != a.identity["train_fingerprint"]
    more = build_dataset(OmegaConf.merge(cfg, {"train_per_class": 40}))
    assert more.val.fingerprint() == a.val.fingerprint()
    assert more.identity["train_fingerprint"] != a.identity["train_fingerprint"]


def test_breastmnist_through_medmnist_package(shared_data):
    cfg = compose(["dataset=breastmnist"]).dataset
    data = build_dataset(cfg)
    assert data.sizes() == {"train": 546, "val": 78, "test": 156}  # official splits
    assert data.class_names == ["malignant", "normal, benign"]
    assert data.channels == 1 and not data.val_is_carved
    image, label = data.test[0]
    assert image.shape == (1, 28, 28) and label in (0, 1)
    raw = np.load(shared_data / "medmnist" / "breastmnist.npz")
    assert np.array_equal(data.train.to_tensor()[:, 0].numpy(), raw["train_images"])
    assert np.array_equal(data.train.labels, raw["train_labels"][:, 0])


def test_breastmnist_few_shot_and_too_many_per_class(shared_data):
    cfg = compose(["dataset=breastmnist", "dataset.train_per_class=30"]).dataset
    data = build_dataset(cfg)
    assert np.bincount(data.train.labels).tolist() == [30, 30]
    with pytest.raises(DatasetError, match=r"train_per_class=1000 but class 0 \('malignant'\) has only 147"):
        build_dataset(OmegaConf.merge(cfg, {"train_per_class": 1000}))


def test_missing_medmnist_file_names_file_and_fix(tmp_path):
    cfg = compose(["dataset=pathmnist", f"dataset.root={tmp_path}"]).dataset
    with pytest.raises(DatasetNotFoundError) as err:
        build_dataset(cfg)
    msg = str(err.value)
    assert str(tmp_path / "pathmnist.npz") in msg and "dataset.download=true" in msg and "zenodo" in msg


def test_class_count_mismatch_is_an_error(shared_data):
    cfg = compose(["dataset=breastmnist", "dataset.num_classes=3"]).dataset
    with pytest.raises(DatasetError, match="num_classes=3 but the data has 2 classes"):
        build_dataset(cfg)


def test_mnist_idx_files_split_from_test(shared_data):
    cfg = compose(["dataset=mnist"]).dataset
    data = build_dataset(cfg)
    assert data.num_classes == 10 and data.channels == 1
    assert np.bincount(data.train.labels).tolist() == [10] * 10
    assert data.sizes()["test"] == 5000  # half of the 10,000 t10k images, stratified
    assert data.val_is_carved
    image, _ = data.test[3]
    assert image.shape == (1, 28, 28)
    # the same seeded split every time, test disjoint from the train pool by construction
    assert build_dataset(cfg).identity == data.identity


def test_mnist_without_train_files_needs_the_split_option(shared_data, tmp_path):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(shared_data / "mnist" / name, tmp_path / name)
    cfg = compose(["dataset=mnist", f"dataset.root={tmp_path}", "dataset.split_test_into_train=false"]).dataset
    with pytest.raises(DatasetNotFoundError, match="train-images-idx3-ubyte.gz.*split_test_into_train=true"):
        build_dataset(cfg)


def test_mnist_truncated_idx_file(shared_data, tmp_path):
    with gzip.open(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz") as fh:
        raw = fh.read()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])
    shutil.copy(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz", tmp_path)
    cfg = compose(["dataset=mnist", f"dataset.root={tmp_path}"]).dataset
    with pytest.raises(DatasetError, match="truncated"):
        build_dataset(cfg)


def test_cifar10_subset_as_imagefolder(shared_data):
    cfg = compose(["dataset=cifar10_subset"]).dataset
    data = build_dataset(cfg)
    assert data.class_names[:3] == ["airplane", "automobile", "bird"] and data.num_classes == 10
    assert data.sizes() == {"train": 4500, "val": 500, "test": 1000}  # val carved 10% per class
    image, _ = data.train[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
    few = build_dataset(OmegaConf.merge(cfg, {"train_per_class": 5}))
    assert len(few.train) == 50 and few.train.to_tensor().shape == (50, 3, 32, 32)


def _tiny_folder(root, classes=("a", "b"), n=3, size=(10, 12), mode="RGB"):
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new(mode, size, color=(i * 40) if mode == "L" else (i * 40, 0, 0)).save(
                    root / split / c / f"{i}.png"
                )


def test_imagefolder_unreadable_image_is_named(tmp_path):
    _tiny_folder(tmp_path)
    bad = tmp_path / "train" / "b" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    data = build_dataset(_cfg(name="x", loader="imagefolder", path=str(tmp_path), image_size=8, val_fraction=0.3))
    with pytest.raises(DatasetError, match="unreadable image .*broken.jpg"):
        data.train.to_tensor(), data.val.to_tensor()


def test_imagefolder_mixed_modes_and_sizes_become_uniform(tmp_path):
    _tiny_folder(tmp_path)
    Image.new("L", (30, 7), 128).save(tmp_path / "train" / "a" / "gray.png")
    Image.new("RGBA", (5, 5), (1, 2, 3, 4)).save(tmp_path / "train" / "b" / "alpha.png")
    data = build_dataset(_cfg(name="x", loader="imagefolder", path=str(tmp_path), image_size=8, val_fraction=0.3))
    assert data.train.to_tensor().shape[1:] == (3, 8, 8)


def test_imagefolder_empty_class_folder_and_missing_test(tmp_path):
    _tiny_folder(tmp_path)
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(DatasetError, match="class folder .*empty holds no images"):
        build_dataset(_cfg(name="x", loader="imagefolder", path=str(tmp_path), image_size=8))
    with pytest.raises(DatasetNotFoundError, match="train"):
        build_dataset(_cfg(name="x", loader="imagefolder", path=str(tmp_path / "nope"), image_size=8))


def test_imagefolder_test_class_not_in_train(tmp_path):
    _tiny_folder(tmp_path)
    (tmp_path / "test" / "zebra").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "test" / "zebra" / "z.png")
    with pytest.raises(DatasetError, match="not in the train split: \\['zebra'\\]"):
        build_dataset(_cfg(name="x", loader="imagefolder", path=str(tmp_path), image_size=8))


def test_unknown_loader():
    with pytest.raises(DatasetError, match="unknown dataset loader 'nope'"):
        build_dataset(_cfg(name="nope"))


def test_extra_real_and_unused_pool_are_disjoint_from_train_val_test(shared_data):
    cfg = compose(["dataset=breastmnist", "dataset.train_per_class=20", "dataset.extra_real_per_class=30"]).dataset
    data = build_dataset(cfg)
    assert np.bincount(data.train.labels).tolist() == [20, 20]
    assert np.bincount(data.extra_train.labels).tolist() == [30, 30]
    assert len(data.unused_train) == 546 - 100 and data.sizes()["extra_real"] == 60

    # the three parts of the official train split are disjoint and cover it
    def root_indices(split):  # subsets of subsets index their own base
        idx = split.indices
        while hasattr(split.base, "indices"):
            split = split.base
            idx = split.indices[idx]
        return set(idx.tolist())

    parts = [root_indices(s) for s in (data.train, data.extra_train, data.unused_train)]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert len(parts[0] | parts[1] | parts[2]) == 546
    # the expansion's identity (its store key) does not depend on the extra real images
    base = build_dataset(OmegaConf.merge(cfg, {"extra_real_per_class": None}))
    assert base.identity == data.identity and base.extra_train is None
    assert np.array_equal(base.train.labels, data.train.labels)
    with pytest.raises(DatasetError, match="extra_real_per_class=500 but class 0"):
        build_dataset(OmegaConf.merge(cfg, {"extra_real_per_class": 500}))
    with pytest.raises(DatasetError, match="needs a few-shot train_per_class"):
        build_dataset(OmegaConf.merge(cfg, {"train_per_class": None}))
    assert (
        build_dataset(OmegaConf.merge(cfg, {"train_per_class": None, "extra_real_per_class": None})).unused_train
        is None
    )
