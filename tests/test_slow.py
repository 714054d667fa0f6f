"""Slow CPU tests (`make test-slow`): real-data training runs that take minutes."""

from __future__ import annotations

import pytest

from experiments.training.pipeline import run
from tests.conftest import job_config

pytestmark = pytest.mark.slow


def _cfg(overrides):
    return job_config(overrides)


def test_breastmnist_small_cnn_beats_the_majority_class(tmp_path, shared_data):
    """30 epochs on the real BreastMNIST train split: test accuracy clearly above always
    predicting 'normal, benign' (114 of 156 test images = 73.1%)."""
    metrics = run(_cfg(["dataset=breastmnist", "method=original", "train.epochs=30"]), tmp_path)
    assert metrics.training.test_acc_final > 76.0 and metrics.training.test_acc_best_val > 76.0


def test_mnist_few_shot_with_cutout_expansion_learns(tmp_path, shared_data):
    metrics = run(
        _cfg(
            ["dataset=mnist", "method=cutout", "train.epochs=20", "train.batch_size=32", "train.compare_original=true"]
        ),
        tmp_path,
    )
    assert metrics.training.test_acc_final > 60.0 and metrics.original.test_acc_final > 40.0


@pytest.mark.parametrize("name", ["sd_txt2img", "real_guidance", "diffusemix", "distdiff"])
def test_the_field_methods_rehearse_at_real_sd_sizes(name):
    """One image at SD v1.x sizes (random weights, one denoising step) through each field method: the shapes and
    dtypes a GPU run will see (benchmarks/rehearse.py; `make rehearse` for all methods with figures)."""
    from benchmarks.rehearse import rehearse_one

    result = rehearse_one(name, 1)
    assert result["unet_calls"] >= 1 and result["peak_rss_gib"] < 20
