"""Silent label problems are refused before any work, in one line: a class absent from the training
split (a test label the training set never has, a declared class without images), a training set of
one distinct label whatever dataset.class_names says, and labels outside the declared classes."""

from __future__ import annotations

import numpy as np
import pytest

from experiments.data.datasets import DatasetError, build_dataset
from tests.conftest import compose


def _npz(path, train_labels, test_labels, val_labels=None):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 255, (len(train_labels), 8, 8), dtype=np.uint8),
        "train_labels": np.asarray(train_labels),
        "test_images": rng.integers(0, 255, (len(test_labels), 8, 8), dtype=np.uint8),
        "test_labels": np.asarray(test_labels),
    }
    if val_labels is not None:
        arrays["val_images"] = rng.integers(0, 255, (len(val_labels), 8, 8), dtype=np.uint8)
        arrays["val_labels"] = np.asarray(val_labels)
    np.savez(path, **arrays)
    return path


def _load(path, *overrides):
    return build_dataset(compose(["dataset=npz", f"dataset.path={path}", "dataset.image_size=8", *overrides]).dataset)


TRAIN = np.repeat(np.arange(3), 10)


def test_a_test_label_the_training_split_never_has_is_refused(tmp_path):
    """Classes inferred from the union of the splits: label 12 in test only makes 13 classes, 10 of them
    without a training image (it trained and reported 0.00 % before)."""
    path = _npz(tmp_path / "odd.npz", TRAIN, [0, 1, 2, 12])
    with pytest.raises(
        DatasetError,
        match=r"^dataset 'odd': the training split has no image of 10 of its 13 classes \(3, 4, 5, 6, 7, \.\.\.\)",
    ):
        _load(path)


def test_a_declared_class_without_training_images_is_refused(tmp_path):
    path = _npz(tmp_path / "three.npz", TRAIN, [0, 1, 2])
    with pytest.raises(DatasetError, match=r"no image of 1 of its 4 classes \(d\)"):
        _load(path, "dataset.class_names=[a,b,c,d]")


def test_one_distinct_training_label_is_refused_whatever_class_names_says(tmp_path):
    path = _npz(tmp_path / "zeros.npz", np.zeros(20, dtype=np.int64), [0, 0, 1])
    with pytest.raises(DatasetError, match=r"no image of 1 of its 2 classes \(b\).*one seen class makes every"):
        _load(path, "dataset.class_names=[a,b]")


def test_a_label_outside_the_declared_classes_is_refused(tmp_path):
    path = _npz(tmp_path / "val.npz", TRAIN, [0, 1, 2], val_labels=[0, 1, 5])
    with pytest.raises(DatasetError, match=r"val_labels span \[0, 5\] but the dataset has 3 classes"):
        _load(path, "dataset.class_names=[a,b,c]")


def test_classes_without_training_images_can_be_accepted_explicitly(tmp_path):
    path = _npz(tmp_path / "three.npz", TRAIN, [0, 1, 2])
    data = _load(path, "dataset.class_names=[a,b,c,d]", "dataset.allow_classes_without_training_images=true")
    assert data.num_classes == 4


def test_a_sound_set_loads(tmp_path):
    data = _load(_npz(tmp_path / "ok.npz", TRAIN, [0, 1, 2, 2]))
    assert data.num_classes == 3 and sorted(set(data.train.labels.tolist())) == [0, 1, 2]


@pytest.mark.integration
def test_a_one_line_error_from_run_py_before_any_work(tmp_path):
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    path = _npz(tmp_path / "odd.npz", TRAIN, [0, 1, 2, 12])
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "dataset=npz",
            f"dataset.path={path}",
            "preflight=only",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "the training split has no image of 10 of its 13 classes" in proc.stderr
