"""The torchvision-layout loaders (Caltech101, Cars, Flowers102, DTD, Pets, CIFAR-10,
CIFAR-100 subset) on tiny FAKE on-disk copies: no real data and no network here.

Checked: a missing dataset is a quick DatasetNotFoundError naming the expected path and
the fix; the split rules (seeded per-class choices, official splits) on fake layouts;
the reading of torchvision's (path, label) lists against the installed torchvision.
"""

from __future__ import annotations

import hashlib
import pickle
import socket
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from experiments.data.datasets import LOADERS, DatasetError, DatasetNotFoundError, build_dataset
from experiments.data.datasets.torchvision_sets import FLOWERS102_CLASSES

CONF = Path(__file__).resolve().parents[1] / "conf" / "dataset"


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test loudly."""

    def boom(*args, **kwargs):
        raise AssertionError("a dataset loader tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", boom)
    monkeypatch.setattr(socket, "create_connection", boom)


def _cfg(name: str, root: Path, **extra):
    cfg = {
        "name": name,
        "loader": name,
        "root": str(root),
        "download": False,
        "image_size": 16,
        "split_seed": 0,
        "val_fraction": 0.1,
        "train_per_class": None,
        "num_classes": None,
    }
    cfg.update(extra)
    return OmegaConf.create(cfg)


def _jpeg(path: Path, value: int, mode: str = "RGB", size: tuple[int, int] = (10, 8)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, (3 * value) % 256)
    Image.new(mode, size, color).save(path, format="JPEG")


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _paths(split) -> list[str]:
    """File names of a FileImageSet or a subset of one, in order."""
    base = getattr(split, "base", split)
    idx = getattr(split, "indices", np.arange(len(base.paths)))
    return [f"{base.paths[i].parent.name}/{base.paths[i].name}" for i in idx]


# --------------------------------------------------------------------------- missing data


MISSING = {
    # loader: (expected path fragment, fix fragments)
    "caltech101": ("caltech101/101_ObjectCategories", ["dataset.download=true", "data.caltech.edu"]),
    "cars": (
        "stanford_cars",
        ["cars_train_annos.mat", "cars_test_annos_withlabels.mat", "kaggle.com", "does not help"],
    ),
    "flowers102": ("flowers-102", ["dataset.download=true", "robots.ox.ac.uk/~vgg/data/flowers/102"]),
    "dtd": ("dtd/dtd", ["dataset.download=true", "dtd-r1.0.1.tar.gz"]),
    "pets": ("oxford-iiit-pet", ["dataset.download=true", "robots.ox.ac.uk/~vgg/data/pets"]),
    "cifar10": ("cifar-10-batches-py", ["dataset.download=true", "cifar-10-python.tar.gz"]),
    "cifar100_subset": ("cifar-100-python", ["dataset.download=true", "cifar-100-python.tar.gz"]),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_root_names_path_and_fix(name, tmp_path):
    fragment, fixes = MISSING[name]
    with pytest.raises(DatasetNotFoundError) as info:
        build_dataset(_cfg(name, tmp_path / "nothing_here"))
    msg = str(info.value)
    assert str(tmp_path / "nothing_here") in msg and fragment in msg, msg
    for fix in fixes:
        assert fix.lower() in msg.lower(), (fix, msg)
    assert not (tmp_path / "nothing_here").exists()  # nothing created on a failed load


def test_cars_download_flag_still_explains(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="kaggle"):
        build_dataset(_cfg("cars", tmp_path, download=True))


@pytest.mark.parametrize("name", sorted(MISSING))
def test_yaml_configs(name, tmp_path):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    expected = {
        "caltech101": (102, "caltech", 0.01, 256),
        "cars": (196, "fine_grained", 0.01, 256),
        "flowers102": (102, "fine_grained", 0.1, 256),
        "dtd": (47, "dtd", 0.01, 256),
        "pets": (37, "fine_grained", 0.01, 256),
        "cifar10": (10, "cifar", 0.1, 32),
        "cifar100_subset": (100, "cifar", 0.1, 32),
    }[name]
    assert cfg.name == name and cfg.loader == name and name in LOADERS
    assert (cfg.num_classes, cfg.recipe.augment, cfg.recipe.lr, cfg.image_size) == expected
    assert cfg.download is False and cfg.split_seed == 0 and cfg.train_per_class is None
    # the real config (a DictConfig) with root moved to an empty folder: the same clear error
    cfg.root = str(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=MISSING[name][0]):
        build_dataset(cfg)


# --------------------------------------------------------------------------- Caltech101


def _fake_caltech(root: Path, n: int = 6) -> None:
    folder = root / "caltech101" / "101_ObjectCategories"
    for c, (cls, mode) in enumerate([("BACKGROUND_Google", "RGB"), ("Faces", "L"), ("accordion", "RGB")]):
        for i in range(n):
            _jpeg(folder / cls / f"image_{i + 1:04d}.jpg", 40 * c + 5 * i, mode)


def test_caltech101_split(tmp_path):
    _fake_caltech(tmp_path)
    cfg = _cfg("caltech101", tmp_path, train_per_class_official=2, num_classes=3)
    raw = LOADERS["caltech101"](cfg)
    assert raw.class_names == ["BACKGROUND_Google", "Faces", "accordion"]  # background kept, sorted
    assert raw.val is None
    assert np.bincount(raw.train.labels, minlength=3).tolist() == [2, 2, 2]
    assert np.bincount(raw.test.labels, minlength=3).tolist() == [4, 4, 4]
    assert not set(_paths(raw.train)) & set(_paths(raw.test))

    # build_dataset carves val out of the 2/class train split
    ds = build_dataset(cfg)
    assert ds.num_classes == 3 and ds.val_is_carved
    assert (np.bincount(ds.train.labels, minlength=3) + np.bincount(ds.val.labels, minlength=3)).tolist() == [2, 2, 2]
    assert len(ds.test) == 12
    # grayscale Caltech JPEGs come out with 3 channels, at image_size
    for split in (ds.train, ds.val, ds.test):
        for i in range(len(split)):
            image, _ = split[i]
            assert tuple(image.shape) == (3, 16, 16)

    # deterministic for a seed, different for another seed
    again = LOADERS["caltech101"](cfg)
    assert _paths(again.train) == _paths(raw.train)
    assert build_dataset(cfg).identity == ds.identity
    other = LOADERS["caltech101"](_cfg("caltech101", tmp_path, train_per_class_official=2, split_seed=1))
    assert _paths(other.train) != _paths(raw.train)
    assert build_dataset(_cfg("caltech101", tmp_path, train_per_class_official=2, split_seed=1)).identity != ds.identity

    no_bg = LOADERS["caltech101"](_cfg("caltech101", tmp_path, train_per_class_official=2, include_background=False))
    assert no_bg.class_names == ["Faces", "accordion"]
    assert sorted(set(no_bg.train.labels.tolist())) == [0, 1]

    with pytest.raises(DatasetError, match="train_per_class_official=7"):
        LOADERS["caltech101"](_cfg("caltech101", tmp_path, train_per_class_official=7))


# --------------------------------------------------------------------------- CIFAR


def _fake_cifar(
    root: Path, which: str, n_classes: int, train_per_class: int, test_per_class: int, monkeypatch=None
) -> None:
    """torchvision's CIFAR python layout with tiny random contents. torchvision checks the
    md5 of every file against the real ones; with ``monkeypatch`` the class's file lists are
    patched to the fake files' md5 so its integrity check runs and passes."""
    import torchvision.datasets as tvd

    rng = np.random.default_rng(0)
    cifar100 = which == "cifar100"
    folder = root / ("cifar-100-python" if cifar100 else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    label_key = "fine_labels" if cifar100 else "labels"

    def batch(per_class: int) -> dict:
        labels = np.repeat(np.arange(n_classes), per_class)
        labels = labels[rng.permutation(len(labels))]
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        return {"data": data, label_key: labels.tolist()}

    def dump(name: str, obj) -> None:
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh)

    names = [f"class_{i}" for i in range(n_classes)]
    if cifar100:
        dump("train", batch(train_per_class))
        dump("test", batch(test_per_class))
        dump("meta", {"fine_label_names": names, "coarse_label_names": ["x"]})
        train_files, test_files, meta = ["train"], ["test"], "meta"
    else:
        train_files = [f"data_batch_{i}" for i in range(1, 6)]
        for f in train_files:
            dump(f, batch(train_per_class))
        dump("test_batch", batch(test_per_class))
        dump("batches.meta", {"label_names": names})
        test_files, meta = ["test_batch"], "batches.meta"
    if monkeypatch is not None:
        cls = tvd.CIFAR100 if cifar100 else tvd.CIFAR10
        monkeypatch.setattr(cls, "train_list", [[f, _md5(folder / f)] for f in train_files])
        monkeypatch.setattr(cls, "test_list", [[f, _md5(folder / f)] for f in test_files])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(folder / meta)})


def test_cifar100_subset_split(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, "cifar100", n_classes=5, train_per_class=8, test_per_class=3, monkeypatch=monkeypatch)
    cfg = _cfg("cifar100_subset", tmp_path, subset_per_class=4, num_classes=5, image_size=32)
    raw = LOADERS["cifar100_subset"](cfg)
    assert raw.class_names == [f"class_{i}" for i in range(5)]
    assert np.bincount(raw.train.labels).tolist() == [4] * 5
    assert np.bincount(raw.test.labels).tolist() == [3] * 5  # full test split
    assert tuple(raw.train.images.shape) == (20, 3, 32, 32)
    assert raw.train.fingerprint() == LOADERS["cifar100_subset"](cfg).train.fingerprint()
    other = LOADERS["cifar100_subset"](_cfg("cifar100_subset", tmp_path, subset_per_class=4, split_seed=3))
    assert other.train.fingerprint() != raw.train.fingerprint()

    ds = build_dataset(cfg)
    assert ds.val_is_carved and ds.sizes() == {"train": 15, "val": 5, "test": 15}
    image, _ = ds.train[0]
    assert tuple(image.shape) == (3, 32, 32) and ds.channels == 3


def test_cifar10_full_split(tmp_path, monkeypatch):
    _fake_cifar(tmp_path, "cifar10", n_classes=10, train_per_class=1, test_per_class=2, monkeypatch=monkeypatch)
    raw = LOADERS["cifar10"](_cfg("cifar10", tmp_path, num_classes=10))
    assert len(raw.class_names) == 10
    assert len(raw.train) == 50 and len(raw.test) == 20  # 5 batches x 10 / one test batch
    assert np.bincount(raw.train.labels).tolist() == [5] * 10
    image, _ = raw.train[0]
    assert tuple(image.shape) == (3, 16, 16)  # image_size=16 resizes


def test_cifar_corrupt_files_are_a_clear_error(tmp_path):
    # no md5 patch: the fake files fail torchvision's integrity check
    _fake_cifar(tmp_path, "cifar10", n_classes=10, train_per_class=1, test_per_class=1)
    with pytest.raises(DatasetError, match="md5") as info:
        build_dataset(_cfg("cifar10", tmp_path))
    assert not isinstance(info.value, DatasetNotFoundError)


# --------------------------------------------------------------------------- Flowers102


def test_flowers102_names():
    assert len(FLOWERS102_CLASSES) == 102 and len(set(FLOWERS102_CLASSES)) == 102
    assert FLOWERS102_CLASSES[0] == "pink primrose" and FLOWERS102_CLASSES[1] == "hard-leaved pocket orchid"
    assert FLOWERS102_CLASSES[-2:] == ["trumpet creeper", "blackberry lily"]
    from torchvision.datasets import Flowers102

    theirs = getattr(Flowers102, "classes", None)
    if theirs is not None:  # recent torchvision ships the same list (with a stray "?")
        assert [c.rstrip("?") for c in theirs] == FLOWERS102_CLASSES


def test_flowers102_official_splits(tmp_path, monkeypatch):
    from scipy.io import savemat
    from torchvision.datasets import Flowers102

    base = tmp_path / "flowers-102"
    labels = np.array([1, 1, 2, 2, 3, 3, 102, 102, 1, 2])  # image_00001.. -> label (1-based)
    for i in range(len(labels)):
        _jpeg(base / "jpg" / f"image_{i + 1:05d}.jpg", 20 * i)
    savemat(base / "imagelabels.mat", {"labels": labels[None]})
    savemat(
        base / "setid.mat",
        {"trnid": np.array([[1, 3, 5]]), "valid": np.array([[2, 4, 7]]), "tstid": np.array([[6, 8, 9, 10]])},
    )
    # torchvision checks the .mat files' md5 against the real ones: point it at the fakes'
    monkeypatch.setattr(
        Flowers102,
        "_file_dict",
        {
            **Flowers102._file_dict,
            "label": ("imagelabels.mat", _md5(base / "imagelabels.mat")),
            "setid": ("setid.mat", _md5(base / "setid.mat")),
        },
    )
    # a fixture of 10 images: 99 of the 102 classes have no training image, accepted explicitly
    ds = build_dataset(_cfg("flowers102", tmp_path, num_classes=102, allow_classes_without_training_images=True))
    assert not ds.val_is_carved and ds.sizes() == {"train": 3, "val": 3, "test": 4}
    assert ds.class_names == FLOWERS102_CLASSES
    assert ds.train.labels.tolist() == [0, 1, 2]
    assert ds.val.labels.tolist() == [0, 1, 101]
    assert ds.test.labels.tolist() == [2, 101, 0, 1]
    assert _paths(ds.test)[0] == "jpg/image_00006.jpg"
    assert tuple(ds.test[0][0].shape) == (3, 16, 16)


# --------------------------------------------------------------------------- DTD


def test_dtd_official_splits(tmp_path):
    data = tmp_path / "dtd" / "dtd"
    classes = ["banded", "blotchy", "zigzagged"]
    lines = {s: [] for s in ("train", "val", "test")}
    k = 0
    for cls in classes:
        for split, count in (("train", 2), ("val", 1), ("test", 3)):
            for _ in range(count):
                k += 1
                _jpeg(data / "images" / cls / f"{cls}_{k:04d}.jpg", k * 7)
                lines[split].append(f"{cls}/{cls}_{k:04d}.jpg")
    (data / "labels").mkdir(parents=True)
    for partition in (1, 2):
        for split, entries in lines.items():
            if partition == 2:  # reversed order; val2 lacks "banded" (labels must still map by name)
                entries = [e for e in entries[::-1] if not (split == "val" and e.startswith("banded/"))]
            (data / "labels" / f"{split}{partition}.txt").write_text("\n".join(entries) + "\n")
    ds = build_dataset(_cfg("dtd", tmp_path, num_classes=3))
    assert ds.class_names == classes and not ds.val_is_carved
    assert ds.sizes() == {"train": 6, "val": 3, "test": 9}
    assert np.bincount(ds.test.labels).tolist() == [3, 3, 3]
    assert ds.identity["source"] == {"split": "official", "partition": 1}
    ds2 = build_dataset(_cfg("dtd", tmp_path, partition=2))
    assert ds2.identity["source"]["partition"] == 2 and ds2.class_names == classes
    assert ds2.val.labels.tolist() == [2, 1]  # zigzagged, blotchy
    assert [p.split("/")[0] for p in _paths(ds2.val)] == ["zigzagged", "blotchy"]
    with pytest.raises(DatasetNotFoundError, match="train3.txt"):
        build_dataset(_cfg("dtd", tmp_path, partition=3))
    with pytest.raises(DatasetError, match="partition"):
        build_dataset(_cfg("dtd", tmp_path, partition=11))


# --------------------------------------------------------------------------- Pets


def test_pets_trainval_test_and_carved_val(tmp_path):
    base = tmp_path / "oxford-iiit-pet"
    breeds = [("Abyssinian", 1, 1), ("american_bulldog", 2, 2), ("Bengal", 3, 1)]
    rows = {"trainval": [], "test": []}
    for b, (breed, label, species) in enumerate(breeds):
        for i in range(1, 8):
            image_id = f"{breed}_{i}"
            _jpeg(base / "images" / f"{image_id}.jpg", 30 * b + i)
            rows["trainval" if i <= 5 else "test"].append(f"{image_id} {label} {species} 1")
    (base / "annotations").mkdir(parents=True)
    for split, r in rows.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(r) + "\n")
    ds = build_dataset(_cfg("pets", tmp_path, num_classes=3))
    assert ds.class_names == ["Abyssinian", "American Bulldog", "Bengal"]
    assert ds.val_is_carved
    assert len(ds.train) + len(ds.val) == 15 and len(ds.test) == 6
    assert np.bincount(ds.val.labels).tolist() == [1, 1, 1]  # round(0.1 * 5) -> at least 1 per class
    assert ds.identity["source"] == {"split": "official", "train": "trainval"}
    assert tuple(ds.train[0][0].shape) == (3, 16, 16)


# --------------------------------------------------------------------------- Stanford Cars


def test_cars_official_splits(tmp_path):
    from scipy.io import savemat

    base = tmp_path / "stanford_cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi R8 Coupe 2012"]

    def annos(folder: str, classes: list[int]) -> np.ndarray:
        rec = np.zeros(len(classes), dtype=[("fname", object), ("class", object)])
        for i, c in enumerate(classes):
            fname = f"{i + 1:05d}.jpg"
            _jpeg(base / folder / fname, 10 * i + c)
            rec[i] = (fname, np.uint8(c))
        return rec

    (base / "devkit").mkdir(parents=True)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": np.array([names], dtype=object)})
    savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annos("cars_train", [1, 2, 3, 1, 2, 3])[None]})
    savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annos("cars_test", [3, 2, 1, 1])[None]})

    ds = build_dataset(_cfg("cars", tmp_path, num_classes=3))
    assert ds.class_names == names
    assert ds.val_is_carved and len(ds.train) + len(ds.val) == 6
    assert ds.test.labels.tolist() == [2, 1, 0, 0]  # 1-based .mat classes -> 0-based
    assert _paths(ds.test) == [f"cars_test/{i:05d}.jpg" for i in range(1, 5)]
    assert tuple(ds.test[0][0].shape) == (3, 16, 16)


def test_caltech101_download_flag_uses_torchvision(tmp_path, monkeypatch):
    """download=true calls torchvision's Caltech101(root, download=True) (faked here: it
    writes the layout), then reads the folder; a failed download is a DatasetError with
    the manual fix."""
    import torchvision.datasets as tvd

    calls = []

    def fake_caltech(root, download=False, **kwargs):
        calls.append((root, download))
        _fake_caltech(Path(root))

    monkeypatch.setattr(tvd, "Caltech101", fake_caltech)
    raw = LOADERS["caltech101"](_cfg("caltech101", tmp_path, download=True, train_per_class_official=2))
    assert calls == [(str(tmp_path), True)] and len(raw.class_names) == 3
    LOADERS["caltech101"](_cfg("caltech101", tmp_path, download=True, train_per_class_official=2))
    assert len(calls) == 1  # present: no second download

    def failing(root, download=False, **kwargs):
        raise OSError("connection refused")

    monkeypatch.setattr(tvd, "Caltech101", failing)
    with pytest.raises(DatasetError, match="connection refused.*data.caltech.edu"):
        LOADERS["caltech101"](_cfg("caltech101", tmp_path / "empty", download=True))


def test_missing_private_attribute_is_explained(tmp_path, monkeypatch):
    """If torchvision renames the private (path, label) lists, the error says so."""
    import torchvision.datasets as tvd

    class NoPrivates:
        def __init__(self, root, split="trainval", download=False, **kwargs):
            self.classes = ["A"]

    monkeypatch.setattr(tvd, "OxfordIIITPet", NoPrivates)
    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    for split in ("trainval", "test"):
        (base / "annotations" / f"{split}.txt").write_text("")
    with pytest.raises(DatasetError, match="_labels.*torchvision changed"):
        LOADERS["pets"](_cfg("pets", tmp_path))
