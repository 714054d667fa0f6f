"""Tests that need a CUDA device (``make test-gpu``; part of ``make benchmark-gpu-quick``).

``GPU_TESTS_DEVICE=cpu`` runs the same tests on the CPU (the smoke run of the quick GPU command
does, so that the tests themselves are checked on a machine without a GPU)."""

from __future__ import annotations

import os

import pytest
import torch
from omegaconf import OmegaConf

from expansion.gif.sd import GifSD
from expansion.seeding import image_seeds
from tests.conftest import compose
from tests.helpers.tiny_sd import tiny_gif_sd
from tests.helpers.tolerances import same_up_to_float_rounding

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("GPU_TESTS_DEVICE", "cuda"))


@pytest.fixture(autouse=True)
def _device():
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (GPU_TESTS_DEVICE=cpu runs these tests on the CPU)")
    # float32 on the GPU as on the CPU: no TF32 in convolutions and matrix products
    conv, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, matmul


def _gif_sd(tiny_sd_models, device: torch.device, **settings) -> GifSD:
    exp = tiny_gif_sd(*tiny_sd_models, **{"dtype": "float32", **settings})
    exp._place(device)
    return exp


def test_img2img_on_the_device_in_float32_is_the_cpu_result(tiny_sd_models, breast_seeds):
    images, labels = breast_seeds
    seeds = image_seeds(5, range(4), 3)
    unguided = {"guided": False, "radius": 0.0}
    on_cpu = _gif_sd(tiny_sd_models, torch.device("cpu"), **unguided).expand(images, labels, seeds)
    on_device = _gif_sd(tiny_sd_models, DEVICE, **unguided).expand(images.to(DEVICE), labels.to(DEVICE), seeds)
    assert same_up_to_float_rounding(on_cpu.images, on_device.images.cpu())


def test_guided_expansion_in_half_precision_on_the_device(tiny_sd_models, breast_seeds):
    """The batched GPU setting (half-precision UNet, float32 guide): k images per seed, finite scores,
    and guidance raises the class score as in float32 on the CPU."""
    images, labels = breast_seeds
    half = "bfloat16" if DEVICE.type == "cuda" else "float32"
    exp = _gif_sd(tiny_sd_models, DEVICE, dtype=half, radius=100.0, guidance={"step_size": 0.05})
    out = exp.expand(images.to(DEVICE), labels.to(DEVICE), image_seeds(11, range(4), 3))
    out.validate(4, 3)
    before = torch.tensor(out.fields["score_before"]).reshape(4, 3).mean(1)
    after = torch.tensor(out.fields["score_after"]).reshape(4, 3).mean(1)
    assert torch.isfinite(before).all() and torch.isfinite(after).all()
    assert after.mean() > before.mean(), (before, after)


def test_a_job_trains_on_the_device_with_bf16_autocast(tmp_path):
    from experiments.training.pipeline import run

    trainer = "trainer=gpu" if DEVICE.type == "cuda" else "trainer=cpu"
    cfg = compose(
        ["dataset=digits", "method=cutout", "method.ratio=1", "train.epochs=2", trainer, "progress_bar=false"]
    )
    metrics = run(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), tmp_path / "run")
    assert 0 <= metrics.training.test_acc_final <= 100 and metrics.training.images_per_second > 0
    assert metrics.environment["device"] == DEVICE.type
