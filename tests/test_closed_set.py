"""Closed-set class-conditional diffusion (expansion/closed_set_diffusion.py): tiny UNets trained on
real images from ../shared/data, per-image-seed sampling, labels through the store, cached and
resumable fits (a real process killed with SIGKILL), and the end-to-end run on the offline data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import expansion.closed_set_diffusion as csd
from expansion.base import ExpansionContext, ExpansionError
from expansion.engine import expand_dataset, fit_expander
from experiments.data.datasets import DatasetNotFoundError
from experiments.training.pipeline import run
from tests.conftest import job_config
from tests.helpers.closed_set_fit_job import TINY_UNET, breast_few_shot, tiny_expander
from tests.helpers.tolerances import same_up_to_float_rounding

HELPERS = Path(__file__).resolve().parent / "helpers"
TINY = csd.UNetSpec(**TINY_UNET)
SCHEDULE = csd.ScheduleSpec()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cifar(shared_data):
    """8 airplanes and 8 automobiles of the CIFAR-10 subset: uint8 [16, 3, 32, 32] and labels 0/1."""
    images, labels = [], []
    for label, name in enumerate(("airplane", "automobile")):
        for path in sorted((shared_data / "cifar10_subset" / "train" / name).glob("*.jpg"))[:8]:
            images.append(np.asarray(Image.open(path).convert("RGB")))
            labels.append(label)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


@pytest.fixture(scope="module")
def breast(shared_data):
    return breast_few_shot(str(shared_data))


def _context(data):
    return ExpansionContext(
        dataset_name=data.name, class_names=data.class_names, channels=data.channels, image_size=data.image_size
    )


def _tiny_unet(channels=3, num_classes=2, null_class=False, seed=0):
    torch.manual_seed(seed)
    return csd.build_unet(TINY, channels=channels, resolution=16, num_classes=num_classes, null_class=null_class)


def test_tiny_model_learns_on_real_images(cifar, tmp_path):
    images, labels = cifar
    unet = _tiny_unet()
    settings = csd.FitSettings(steps=30, batch_size=8, lr=2e-3, warmup_steps=0, checkpoint_every=1000)
    result = csd.train_diffusion(unet, SCHEDULE, images, labels, settings, checkpoint_path=tmp_path / "ckpt")
    losses = result["losses"]
    assert len(losses) == 30 and result["resumed_from_step"] == 0
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:5]), (np.mean(losses[:5]), np.mean(losses[-10:]))
    assert not (tmp_path / "ckpt").exists()  # checkpoint_every > steps: nothing written
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())


def test_training_is_reproducible_and_seeded(cifar, tmp_path):
    images, labels = cifar
    settings = csd.FitSettings(steps=4, batch_size=4, lr=1e-3, warmup_steps=2, checkpoint_every=1000)
    runs = []
    for seed in (0, 0, 1):
        unet = _tiny_unet()
        s = csd.FitSettings(**{**settings.__dict__, "seed": seed})
        runs.append(csd.train_diffusion(unet, SCHEDULE, images, labels, s, checkpoint_path=tmp_path / "c")["losses"])
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_batches_cover_every_image_once_per_epoch():
    seen = torch.cat([csd.batch_indices(step, 3, 7, seed=5) for step in range(7)])  # 21 = 3 epochs of 7
    for epoch in range(3):
        assert sorted(seen[epoch * 7 : (epoch + 1) * 7].tolist()) == list(range(7))
    assert torch.equal(csd.batch_indices(4, 3, 7, seed=5), seen[12:15])  # any step without replay


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver"])
def test_sampling_is_deterministic_per_image_seed(sampler):
    unet = _tiny_unet().eval()

    def sample(labels, seeds):
        with torch.no_grad():
            x = csd.sample_images(
                unet,
                csd.sampling_scheduler(SCHEDULE, sampler),
                torch.tensor(labels),
                torch.tensor(seeds),
                num_inference_steps=4,
            )
        return ((x + 1) * 127.5).round().to(torch.uint8)

    together = sample([0, 1, 0], [11, 12, 13])
    assert together.shape == (3, 3, 16, 16)
    assert torch.equal(sample([0, 1, 0], [11, 12, 13]), together)
    alone = sample([0], [13])
    reordered = sample([1, 0], [12, 11])
    assert same_up_to_float_rounding(alone[0], together[2])
    assert same_up_to_float_rounding(reordered[0], together[1])
    assert same_up_to_float_rounding(reordered[1], together[0])
    assert not same_up_to_float_rounding(together[0], together[2])  # another seed, another image
    other_class = sample([1], [13])
    assert not same_up_to_float_rounding(other_class[0], together[2])  # the label conditions the sample


def test_samples_of_class_c_are_requested_with_label_c_and_stored_with_it(breast, tmp_path, monkeypatch):
    requested: dict[int, int] = {}
    calls: list[tuple[list[int], list[list[int]]]] = []  # (requested labels, labels the UNet saw per step)
    real_sample = csd.sample_images

    def recording_sample(unet, scheduler, class_labels, seeds, **kwargs):
        requested.update(zip(seeds.tolist(), class_labels.tolist()))
        calls.append((class_labels.tolist(), []))
        hook = unet.register_forward_pre_hook(
            lambda module, args, kw: calls[-1][1].append(kw["class_labels"].tolist()), with_kwargs=True
        )
        try:
            return real_sample(unet, scheduler, class_labels, seeds, **kwargs)
        finally:
            hook.remove()

    monkeypatch.setattr(csd, "sample_images", recording_sample)
    expander = tiny_expander(steps=3)
    result = expand_dataset(
        expander,
        breast.train,
        breast.identity,
        context=_context(breast),
        store_dir=tmp_path / "stores",
        fit_dir=tmp_path / "fits",
        seed=3,
        batch_size=3,
    )
    rows = [json.loads(line) for line in (result.store.root / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * len(breast.train) == len(requested) == result.generated_images
    for row in rows:
        assert row["label"] == int(breast.train.labels[row["parent"]]) == requested[row["seed"]]
        assert (row["sampler"], row["sampling_steps"], row["guidance_scale"]) == ("ddim", 2, 1.0)
    # one denoising loop per batch of seeds; the UNet saw the requested class of every image in each of its steps
    assert len(calls) == -(-len(breast.train) // 3) and all(seen == [wanted] * 2 for wanted, seen in calls)
    assert set(result.expanded.labels.tolist()) == {0, 1}
    image = Image.open(next((result.store.root / "images").glob("*.png")))
    assert image.size == (28, 28) and image.mode == "L"  # back at the dataset's size and channels


def test_fit_is_cached_by_key_and_shared_by_ratios(breast, tmp_path, monkeypatch):
    first = tiny_expander(steps=2)
    first.prepare(_context(breast))
    fit_expander(first, breast.train, breast.identity, tmp_path)
    (artifact,) = list(tmp_path.iterdir())
    assert (artifact / "model" / csd.DONE_MARKER).is_file() and not (artifact / csd.CHECKPOINT_NAME).exists()
    assert first.fit_info["steps"] == 2 and first.fit_info["train_images"] == len(breast.train)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached fit was trained again")

    monkeypatch.setattr(csd, "train_diffusion", no_training)
    other_ratio = csd.ClosedSetDiffusion(
        5, **{**asdict(first.settings), "sampler": "dpm_solver", "num_inference_steps": 3}
    )
    other_ratio.prepare(_context(breast))
    fit_expander(other_ratio, breast.train, breast.identity, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [artifact.name]
    for a, b in zip(first.unet.state_dict().values(), other_ratio.unet.state_dict().values()):
        assert torch.equal(a, b)
    assert other_ratio.signature() != first.signature()  # but another store
    longer = tiny_expander(steps=3)
    assert longer.fit_signature() != first.fit_signature()


def test_checkpoint_of_other_settings_is_refused(cifar, tmp_path):
    images, labels = cifar
    settings = csd.FitSettings(steps=3, batch_size=4, lr=1e-3, warmup_steps=0, checkpoint_every=1)
    csd.train_diffusion(
        _tiny_unet(), SCHEDULE, images, labels, settings, checkpoint_path=tmp_path / "c", fit_key={"run": "a"}
    )
    assert (tmp_path / "c").is_file()
    with pytest.raises(ExpansionError, match="other settings"):
        csd.train_diffusion(
            _tiny_unet(), SCHEDULE, images, labels, settings, checkpoint_path=tmp_path / "c", fit_key={"run": "b"}
        )


def _fit_job(shared, cache, delay, steps):
    return subprocess.Popen(
        [sys.executable, str(HELPERS / "closed_set_fit_job.py"), str(shared), str(cache), str(delay), str(steps)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _checkpoint_step(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return int(fh.metadata()["step"])


@pytest.mark.integration
def test_killed_fit_resumes_from_its_checkpoint(shared_data, breast, tmp_path):
    """SIGKILL a real fitting process after its first checkpoint; the next fit of the same key (here
    in this process) resumes there, reaches the same step count and bit-identical EMA weights as an
    uninterrupted fit."""
    steps = 10
    cache = tmp_path / "killed"
    job = _fit_job(shared_data, cache, 0.25, steps)
    deadline, checkpoint = time.time() + 120, None
    while time.time() < deadline and checkpoint is None and job.poll() is None:
        found = list((cache / "fits").glob(f"*/{csd.CHECKPOINT_NAME}")) if (cache / "fits").exists() else []
        checkpoint = found[0] if found else None
        time.sleep(0.05)
    assert checkpoint is not None, f"no checkpoint before the job ended: {job.communicate()[1][-2000:]}"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    artifact = checkpoint.parent
    assert not (artifact / "model" / csd.DONE_MARKER).exists()
    step_at_kill = _checkpoint_step(checkpoint)
    assert 2 <= step_at_kill < steps and step_at_kill % 2 == 0

    resumed = tiny_expander(steps)
    resumed.prepare(_context(breast))
    fit_expander(resumed, breast.train, breast.identity, cache / "fits")
    assert [p.name for p in (cache / "fits").iterdir()] == [artifact.name]  # the same key
    assert resumed.fit_info["resumed_from_step"] == step_at_kill and resumed.fit_info["steps"] == steps
    assert not checkpoint.exists()

    reference = tiny_expander(steps)  # the same fit, never interrupted
    reference.prepare(_context(breast))
    fit_expander(reference, breast.train, breast.identity, tmp_path / "reference")
    assert reference.fit_info["resumed_from_step"] == 0
    weights = resumed.unet.state_dict()
    for name, value in reference.unet.state_dict().items():
        assert torch.equal(value, weights[name]), name


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"sampler": "euler"}, "sampler must be one of"),
        ({"guidance_scale": 3.0}, "needs a model trained with fit.label_dropout"),
        ({"fit": {"stepz": 3}}, r"fit: unknown setting\(s\) \['stepz'\]"),
        ({"unet": "huge"}, "unknown unet preset 'huge'"),
        ({"unet": {**TINY_UNET, "norm_num_groups": 5}}, "must divide every block_out_channels"),
        ({"unet": "ddpm_cifar10", "resolution": 28}, "not divisible by 8"),
        ({"schedule": {"prediction_type": "x0"}}, "prediction_type must be one of"),
        ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
        ({"ratio": 0}, "ratio must be an integer >= 1"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, pattern):
    with pytest.raises(ExpansionError, match=pattern):
        csd.ClosedSetDiffusion(**{"ratio": 2, **kwargs})


def test_model_resolution_rounds_up_to_the_unet_downsampling():
    assert csd.model_resolution(csd.unet_spec("ddpm_cifar10"), 28, None) == 32
    assert csd.model_resolution(csd.unet_spec("tiny"), 28, None) == 28
    assert csd.model_resolution(csd.unet_spec("tiny"), 28, 32) == 32


def test_classifier_free_guidance_uses_the_null_class(cifar, tmp_path):
    images, labels = cifar
    unet = _tiny_unet(null_class=True)
    settings = csd.FitSettings(steps=2, batch_size=8, lr=1e-3, warmup_steps=0, label_dropout=0.5, checkpoint_every=1000)
    csd.train_diffusion(unet, SCHEDULE, images, labels, settings, checkpoint_path=tmp_path / "c", null_class=2)
    seen = []
    unet.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["class_labels"].clone()), with_kwargs=True)
    with torch.no_grad():
        csd.sample_images(
            unet,
            csd.sampling_scheduler(SCHEDULE, "ddim"),
            torch.tensor([0, 1]),
            torch.tensor([1, 2]),
            num_inference_steps=2,
            guidance_scale=2.0,
            null_class=2,
        )
    assert seen[0].tolist() == [2, 2, 0, 1]  # unconditional and conditional halves in one pass


def _cfg(overrides):
    return job_config(overrides)


@pytest.mark.integration
def test_run_on_the_offline_cifar10_subset_end_to_end(shared_data, tmp_path):
    """The README's tiny CPU setting, shrunk further (2 images per class, 2 fit steps, 1 epoch)."""
    metrics = run(
        _cfg(
            [
                "dataset=cifar10_subset",
                "dataset.train_per_class=2",
                "method=closed_set_diffusion_cpu",
                "method.ratio=1",
                "method.fit.steps=2",
                "method.num_inference_steps=2",
                "train.epochs=1",
                "train.compare_original=false",
                "quality.enabled=false",
                "logger=none",
            ]
        ),
        tmp_path / "run",
    )
    assert metrics.method == "closed_set_diffusion" and metrics.ratio == 1
    assert metrics.expansion.num_images == 20 and metrics.training.num_train_images == 40
    assert 0 <= metrics.training.test_acc_final <= 100


def test_full_cifar10_without_its_files_is_the_clear_missing_data_error(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "no-data"))
    with pytest.raises(DatasetNotFoundError, match="cifar-10"):
        run(_cfg(["dataset=cifar10", "method=closed_set_diffusion"]), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()
