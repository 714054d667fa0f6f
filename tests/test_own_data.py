"""A newcomer's own data, on real files: a MedMNIST-format npz under another name (the BreastMNIST
file copied) through ``dataset=npz``, and a flat ``<class>/*.jpg`` folder built from the CIFAR-10
subset through ``dataset=imagefolder``; the defaults they get, and every bad input as one line."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from experiments.data.datasets import DatasetError, DatasetNotFoundError, build_dataset
from experiments.record import read_record
from experiments.training.pipeline import run
from tests.conftest import compose, job_config

FAST = ["train.epochs=1", "quality.enabled=false", "logger=none", "train.compare_original=false"]


def _job(overrides):
    return job_config(overrides + FAST)


# -- dataset=npz ------------------------------------------------------------------------------------------


@pytest.fixture
def breast(shared_data) -> dict[str, np.ndarray]:
    return dict(np.load(shared_data / "medmnist" / "breastmnist.npz"))


def _npz(tmp_path: Path, arrays: dict[str, np.ndarray], name: str = "my_scans.npz") -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _npz_data(path: Path, *extra: str):
    return build_dataset(compose(["dataset=npz", f"dataset.path={path}", *extra]).dataset)


def test_any_medmnist_format_npz_by_path(tmp_path, breast):
    path = _npz(tmp_path, breast)
    cfg = compose(["dataset=npz", f"dataset.path={path}"])
    assert cfg.dataset.name == "my_scans"  # named after the file, never after another dataset
    assert cfg.dataset.prompt_prefix is None and cfg.dataset.image_size == 28
    data = build_dataset(cfg.dataset)
    assert data.sizes() == {"train": 546, "val": 78, "test": 156} and not data.val_is_carved  # the file's val split
    assert data.class_names == ["0", "1"] and data.channels == 1
    assert np.array_equal(data.train.to_tensor()[:, 0].numpy(), breast["train_images"])
    assert np.array_equal(data.test.labels, breast["test_labels"][:, 0])
    assert data.identity["source"] == {"npz": "my_scans.npz"}
    # the same arrays read through the medmnist package give the same training fingerprint
    medmnist = build_dataset(compose(["dataset=breastmnist"]).dataset)
    assert data.identity["train_fingerprint"] == medmnist.identity["train_fingerprint"]
    named = _npz_data(path, "dataset.class_names=[malignant,benign]")
    assert named.class_names == ["malignant", "benign"]


def test_npz_rgb_without_val_any_size(tmp_path, breast):
    rgb = {k: v for k, v in breast.items() if not k.startswith("val")}
    for split in ("train", "test"):
        gray = breast[f"{split}_images"]
        rgb[f"{split}_images"] = np.repeat(gray[..., None], 3, axis=-1)[:, :20, :24]  # N x 20 x 24 x 3
        rgb[f"{split}_labels"] = breast[f"{split}_labels"][:, 0]  # flat labels
    data = _npz_data(_npz(tmp_path, rgb))
    assert data.val_is_carved and data.channels == 3
    assert data.sizes()["val"] + data.sizes()["train"] == 546
    assert data.train.to_tensor().shape[1:] == (3, 28, 28)  # resized to image_size


def test_npz_end_to_end_names_the_run_after_the_file(tmp_path, breast):
    path = _npz(tmp_path, breast)
    metrics = run(
        _job(["dataset=npz", f"dataset.path={path}", "dataset.train_per_class=10", "method=cutout", "method.ratio=1"]),
        tmp_path / "run",
    )
    assert metrics.dataset == "my_scans" and metrics.num_classes == 2
    assert metrics.dataset_source == {"npz": "my_scans.npz"}
    assert read_record(tmp_path / "run")[0].expansion.num_images == 20


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda a: a.pop("test_labels"), r"my_scans.npz: the key test_labels is missing"),
        (lambda a: a.pop("val_labels"), r"the key val_labels is missing"),
        (
            lambda a: a.update(train_labels=a["train_labels"][:-6]),
            r"train_images holds 546 images but train_labels 540 labels",
        ),
        (
            lambda a: a.update(train_images=a["train_images"].astype(np.float32) / 255),
            r"train_images has dtype float32, but images must be uint8",
        ),
        (
            lambda a: a.update(test_labels=a["test_labels"].astype(np.float64)),
            r"test_labels has dtype float64; labels must be integers",
        ),
        (
            lambda a: a.update(val_labels=np.repeat(a["val_labels"], 3, axis=1)),
            r"val_labels has shape \(78, 3\): 3 labels per image \(multi-label\)",
        ),
        (
            lambda a: a.update(test_labels=a["test_labels"].astype(np.int64) - 1),
            r"test_labels holds the negative label -1",
        ),
        (lambda a: a.update(test_images=a["test_images"][:, :, :, None, None]), r"test_images has shape"),
        (
            lambda a: a.update(test_images=np.repeat(a["test_images"][..., None], 3, axis=-1)),
            r"the splits have different channel counts",
        ),
    ],
    ids=[
        "missing-key",
        "val-half-present",
        "count-mismatch",
        "float-images",
        "float-labels",
        "multi-label",
        "negative",
        "bad-shape",
        "channels-differ",
    ],
)
def test_npz_bad_input_is_one_line_naming_the_key(tmp_path, breast, change, message):
    change(breast)
    with pytest.raises(DatasetError, match=message) as err:
        _npz_data(_npz(tmp_path, breast))
    assert "\n" not in str(err.value)


def test_npz_labels_beyond_the_named_classes(tmp_path, breast):
    breast["train_labels"][5, 0] = 7
    with pytest.raises(DatasetError, match=r"train_labels span \[0, 7\] but the dataset has 2 classes"):
        _npz_data(_npz(tmp_path, breast), "dataset.class_names=[a,b]")
    with pytest.raises(DatasetError, match=r"config says num_classes=2 but the data has 8 classes"):
        _npz_data(_npz(tmp_path, breast), "dataset.num_classes=2")


def test_npz_missing_unreadable_or_unset(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"expected .*nope.npz but it is missing. Point dataset.path"):
        _npz_data(tmp_path / "nope.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip archive")
    with pytest.raises(DatasetError, match=r"junk.npz is not a readable .npz file"):
        _npz_data(tmp_path / "junk.npz")
    with pytest.raises(DatasetError, match=r"^dataset.path must be set"):
        build_dataset(compose(["dataset=npz"]).dataset)


def test_an_unknown_medmnist_flag_points_at_the_npz_route():
    with pytest.raises(DatasetError, match=r"unknown MedMNIST flag 'retinamnist2'.*dataset=npz dataset.path=FILE"):
        build_dataset(compose(["dataset=breastmnist", "dataset.flag=retinamnist2"]).dataset)


@pytest.mark.parametrize(
    "flag,classes,first",
    [
        ("retinamnist", 5, "0"),
        ("dermamnist", 7, "actinic keratoses and intraepithelial carcinoma"),
        ("octmnist", 4, "choroidal neovascularization"),
        ("pneumoniamnist", 2, "normal"),
        ("tissuemnist", 8, "Collecting Duct, Connecting Tubule"),
        ("organamnist", 11, "bladder"),
        ("organcmnist", 11, "bladder"),
    ],
)
def test_the_other_medmnist_sets_load_through_medmnist(tmp_path, breast, flag, classes, first):
    """Each config names its flag, class count and modality; the file (here a stand-in with the
    right class count) is read through the medmnist route with the package's class names."""
    cfg = compose([f"dataset={flag}", f"dataset.root={tmp_path}"]).dataset
    assert cfg.flag == flag and cfg.num_classes == classes and cfg.prompt_prefix.endswith("image of")
    for split in ("train", "val", "test"):
        breast[f"{split}_labels"] = (np.arange(len(breast[f"{split}_images"])) % classes)[:, None].astype(np.uint8)
    _npz(tmp_path, breast, f"{flag}.npz")
    data = build_dataset(cfg)
    assert data.num_classes == classes and data.class_names[0] == first
    assert data.identity["source"] == {"flag": flag, "size": 28}


# -- dataset=imagefolder, flat ----------------------------------------------------------------------------


def _flat_folder(shared_data: Path, root: Path, per_class: int = 30, under: str = "") -> Path:
    """``root/<class>/*.jpg`` from the CIFAR-10 subset's first ``per_class`` train images of each class."""
    for class_dir in sorted((shared_data / "cifar10_subset" / "train").iterdir()):
        target = root / under / class_dir.name
        target.mkdir(parents=True)
        for image in sorted(class_dir.iterdir())[:per_class]:
            shutil.copy(image, target / image.name)
    return root


def _folder_data(root: Path, *extra: str):
    return build_dataset(compose(["dataset=imagefolder", f"dataset.path={root}", *extra]).dataset)


def test_a_flat_folder_gets_a_seeded_stratified_test_split(shared_data, tmp_path):
    root = _flat_folder(shared_data, tmp_path / "textures")
    cfg = compose(["dataset=imagefolder", f"dataset.path={root}"]).dataset
    assert cfg.name == "textures" and cfg.image_size == 32 and cfg.test_fraction == 0.2
    data = build_dataset(cfg)
    assert data.class_names[:2] == ["airplane", "automobile"] and data.num_classes == 10
    assert np.bincount(data.test.labels).tolist() == [6] * 10  # 20 % of each class
    assert data.sizes() == {"train": 220, "val": 20, "test": 60}
    assert data.identity["source"] == {"layout": "flat", "test_fraction": 0.2, "test_split_seed": 13}
    test_files = {p.name + p.parent.name for p in data.test.source_files()}
    train_files = {p.name + p.parent.name for p in data.train.source_files() + data.val.source_files()}
    assert not test_files & train_files and len(test_files | train_files) == 300
    again = _folder_data(root)
    assert again.test.source_files() == data.test.source_files()  # seeded
    other = _folder_data(root, "dataset.split_seed=1")
    assert other.test.source_files() != data.test.source_files()
    more = _folder_data(root, "dataset.test_fraction=0.3")
    assert len(more.test) == 90 and more.identity != data.identity  # part of the store key


def test_train_without_test_is_split_like_a_flat_folder(shared_data, tmp_path):
    root = _flat_folder(shared_data, tmp_path / "set", per_class=10, under="train")
    data = _folder_data(root)
    assert data.identity["source"]["layout"] == "flat" and len(data.test) == 20


def test_a_flat_folder_end_to_end_records_its_split(shared_data, tmp_path):
    root = _flat_folder(shared_data, tmp_path / "textures", per_class=10)
    metrics = run(
        _job(["dataset=imagefolder", f"dataset.path={root}", "method=cutout", "method.ratio=1"]), tmp_path / "run"
    )
    assert metrics.dataset == "textures"
    assert metrics.dataset_source == {"layout": "flat", "test_fraction": 0.2, "test_split_seed": 13}
    assert metrics.sizes == {"train": 70, "val": 10, "test": 20}


def test_flat_folder_bad_input(shared_data, tmp_path):
    root = _flat_folder(shared_data, tmp_path / "textures", per_class=5)
    for bad in ("0", "1.5", "null"):
        with pytest.raises(DatasetError, match=r"has no test/ folder, so dataset.test_fraction .* must be in \(0, 1\)"):
            _folder_data(root, f"dataset.test_fraction={bad}")
    for image in sorted((root / "cat").iterdir())[2:]:
        image.unlink()
    with pytest.raises(DatasetError, match=r"class folders \['cat'\] hold fewer than 3 images"):
        _folder_data(root)
    with pytest.raises(DatasetNotFoundError, match=r"expected .*nowhere but it is missing"):
        _folder_data(tmp_path / "nowhere")
    only_test = tmp_path / "only_test"
    (only_test / "test" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match=r"only_test/train but it is missing"):
        _folder_data(only_test)
