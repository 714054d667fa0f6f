"""GIF-unCLIP (open GIF-DALLE) with a tiny stable-unCLIP pipeline and a tiny open_clip built in code."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from expansion.architectures import save_stable_unclip, save_tiny_clip
from expansion.base import ExpansionContext, ExpansionError
from expansion.gif.unclip import GifUnCLIP, load_unclip
from expansion.seeding import image_seeds
from expansion.store import ExpansionStore
from tests.helpers.benchmarks import tiny_modes
from tests.helpers.gif_checks import run_tiny_job
from tests.helpers.tiny_priors import save_tiny_karlo
from tests.helpers.tolerances import all_scores_close, same_up_to_float_rounding

CLASSES = ["malignant", "normal, benign"]
FIELDS = {
    "backend",
    "score_path",
    "radius",
    "radius_abs",
    "score_before",
    "score_after",
    "guide_class",
    "guide_confidence",
}


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def unclip_dir(tmp_path_factory):
    return save_stable_unclip("tiny", tmp_path_factory.mktemp("tiny_unclip"))


@pytest.fixture(scope="module")
def seeds_batch(shared_data):
    data = np.load(shared_data / "medmnist" / "breastmnist.npz")
    images = torch.from_numpy(data["train_images"][:4])[:, None]
    labels = torch.from_numpy(data["train_labels"][:4, 0].astype(np.int64))
    return images, labels


def _expander(clip_spec, unclip_dir, **kw):
    from expansion.gif.guides import build_guide

    params = dict(
        ratio=3,
        backend="stable_unclip",
        model_id=str(unclip_dir),
        guide=clip_spec,
        num_inference_steps=4,
        guidance_scale=3.0,
    )
    params.update(kw)
    exp = GifUnCLIP(**params)
    exp.context = ExpansionContext("breastmnist", CLASSES, channels=1, prompt_prefix="Ultrasound image of")
    exp.set_components(load_unclip("stable_unclip", str(unclip_dir)))
    exp.use_guide(build_guide(clip_spec, CLASSES))
    return exp


@pytest.mark.parametrize("score_path", ["cheap", "faithful"])
def test_expand_shapes_fields_and_per_image_seed_determinism(clip_spec, unclip_dir, seeds_batch, score_path):
    exp = _expander(clip_spec, unclip_dir, score_path=score_path)
    images, labels = seeds_batch[0][:3], seeds_batch[1][:3]
    seeds = image_seeds(3, range(3), 3)
    full = exp.expand(images, labels, seeds)
    full.validate(3, 3)
    assert full.images.shape == (3, 3, 1, 16, 16) and full.images.dtype == torch.uint8
    rows = full.field_rows()
    assert set(rows[0]) == FIELDS
    assert all(
        r["backend"] == "stable_unclip" and r["score_path"] == score_path and r["radius"] == 0.5 and r["radius_abs"] > 0
        for r in rows
    )
    assert all(0 <= r["guide_confidence"] <= 1 and r["guide_class"] in (0, 1) for r in rows)
    parts = [exp.expand(images[:1], labels[:1], seeds[:1]), exp.expand(images[1:], labels[1:], seeds[1:])]
    # batch of 3 vs 1 + 2: images up to float rounding, scores to float32 precision (tests/helpers/tolerances.py)
    assert same_up_to_float_rounding(full.images, torch.cat([p.images for p in parts]))
    assert all_scores_close(full.fields["score_after"], parts[0].fields["score_after"] + parts[1].fields["score_after"])
    other = exp.expand(images, labels, image_seeds(4, range(3), 3))
    assert not torch.equal(full.images, other.images)
    assert not torch.equal(full.images[0, 0], full.images[0, 1])  # a seed's k copies differ


def test_karlo_loads_by_component_and_expands(clip_spec, seeds_batch, tmp_path):
    """load_unclip("karlo") on a tiny Karlo saved component by component (the hub repo's layout), then
    expand real BreastMNIST seeds through the full decoder + super-resolution."""
    from expansion.gif.guides import build_guide

    karlo_dir = save_tiny_karlo(tmp_path)
    pipe = load_unclip("karlo", str(karlo_dir))
    assert type(pipe.text_proj).__name__ == "UnCLIPTextProjModel" and pipe.decoder.config.sample_size == 16
    exp = GifUnCLIP(
        ratio=2,
        backend="karlo",
        model_id=str(karlo_dir),
        guide=clip_spec,
        num_inference_steps=3,
        super_res_num_inference_steps=2,
        guidance_scale=3.0,
    )
    exp.context = ExpansionContext("breastmnist", CLASSES, channels=1, prompt_prefix="Ultrasound image of")
    exp.set_components(pipe)
    exp.use_guide(build_guide(clip_spec, CLASSES))
    images, labels = seeds_batch[0][:3], seeds_batch[1][:3]
    seeds = image_seeds(2, range(3), 2)
    full = exp.expand(images, labels, seeds)
    full.validate(3, 2)
    assert full.images.shape == (3, 2, 1, 32, 32) and full.images.dtype == torch.uint8
    rows = full.field_rows()
    assert set(rows[0]) == FIELDS
    assert all(
        r["backend"] == "karlo" and r["score_path"] == "cheap" and r["radius"] == 0.5 and r["radius_abs"] > 0
        for r in rows
    )
    parts = [exp.expand(images[:1], labels[:1], seeds[:1]), exp.expand(images[1:], labels[1:], seeds[1:])]
    assert same_up_to_float_rounding(full.images, torch.cat([p.images for p in parts]))  # batch 3 vs 1 + 2
    assert not torch.equal(full.images[0, 0], full.images[0, 1])


def test_signature_and_settings(clip_spec, unclip_dir):
    exp = GifUnCLIP(ratio=2, backend="stable_unclip", output_size=24)
    sig = exp.signature()
    assert sig["model_id"] == "stabilityai/stable-diffusion-2-1-unclip-small" and sig["score_path"] == "cheap"
    assert sig["score_steps"] == 2 and sig["num_inference_steps"] == 20 and "guidance_chunk" not in sig
    assert GifUnCLIP(ratio=2).settings.backend == "stable_unclip"  # the default, as in conf/method/gif_unclip.yaml
    karlo = GifUnCLIP(ratio=2, backend="karlo")
    assert karlo.settings.model_id == "kakaobrain/karlo-v1-alpha-image-variations"
    assert karlo.settings.super_res_num_inference_steps == 7
    assert GifUnCLIP(ratio=2, score_path="faithful").signature()["score_steps"] is None
    assert GifUnCLIP(ratio=2).signature()["score_path"] == "cheap"  # the default scoring path
    with pytest.raises(ExpansionError, match="backend must be one of"):
        GifUnCLIP(ratio=2, backend="dalle2")
    with pytest.raises(ExpansionError, match="score_path must be one of"):
        GifUnCLIP(ratio=2, score_path="fast")
    with pytest.raises(ExpansionError, match="needs a UnCLIPImageVariationPipeline"):
        GifUnCLIP(ratio=2, backend="karlo").set_components(load_unclip("stable_unclip", str(unclip_dir)))


def test_output_size_and_rgb(clip_spec, unclip_dir, seeds_batch):
    exp = _expander(clip_spec, unclip_dir, ratio=1, output_size=24, num_inference_steps=2)
    exp.context = ExpansionContext("x", CLASSES, channels=3)
    out = exp.expand(seeds_batch[0][:2], seeds_batch[1][:2], image_seeds(0, range(2), 1))
    assert out.images.shape == (2, 1, 3, 24, 24)


def test_guidance_raises_the_score_of_the_same_inputs(clip_spec, unclip_dir, seeds_batch):
    """score_after (projected, fully decoded) vs score_before (random perturbation, scoring path) on the
    same seeds; faithful path so that both are measured on the same decoder."""
    exp = _expander(
        clip_spec, unclip_dir, radius=100.0, score_path="faithful", num_inference_steps=2, guidance={"step_size": 0.05}
    )
    images, labels = seeds_batch
    out = exp.expand(images, labels, image_seeds(11, range(4), 3))
    before = torch.tensor(out.fields["score_before"]).reshape(4, 3).mean(1)
    after = torch.tensor(out.fields["score_after"]).reshape(4, 3).mean(1)
    assert (after > before).float().mean() >= 0.75, (before, after)
    assert after.mean() > before.mean()


def test_radius_is_relative_to_the_embedding_std(clip_spec, unclip_dir, seeds_batch):
    images, labels = seeds_batch
    seeds = image_seeds(5, range(4), 2)
    exp = _expander(clip_spec, unclip_dir, ratio=2, radius=0.25, num_inference_steps=1)
    z0 = exp.embed(images)
    rows = exp.expand(images, labels, seeds).fields["radius_abs"]
    assert rows == pytest.approx((0.25 * z0.std(dim=1)).repeat_interleave(2).tolist(), rel=1e-5)


def test_missing_weights_and_folders_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ExpansionError, match="unCLIP folder .*nope does not exist"):
        load_unclip("stable_unclip", str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ExpansionError, match="'stabilityai/stable-diffusion-2-1-unclip-small'.*not available.*huggingface-cli download"
    ):
        load_unclip("stable_unclip")
    with pytest.raises(ExpansionError, match="unCLIP folder .*nope does not exist.*subfolders decoder, text_proj"):
        load_unclip("karlo", str(tmp_path / "nope"))
    exp = GifUnCLIP(ratio=2, backend="karlo")  # the constructor never loads weights; prepare() does
    with pytest.raises(
        ExpansionError,
        match="kakaobrain/karlo-v1-alpha-image-variations.*huggingface-cli download"
        ".*UnCLIPImageVariationPipeline.save_pretrained",
    ):
        exp.prepare(ExpansionContext("breastmnist", CLASSES, channels=1))


@pytest.mark.integration
def test_run_py_gif_unclip_end_to_end(clip_spec, unclip_dir, tmp_path):
    metrics = run_tiny_job(
        tmp_path,
        "gif_unclip",
        clip_spec,
        "method.backend=stable_unclip",
        f"method.model_id={unclip_dir}",
        "method.num_inference_steps=2",
        "method.guidance_scale=3.0",
    )
    assert metrics.method == "gif_unclip" and metrics.expansion.num_images == 2 * 6
    store = ExpansionStore(Path(metrics.expansion.store), "", {})
    rows = store.read_rows()
    assert len(rows) == 12 and set(rows[0]) >= FIELDS
    assert {r["parent"] for r in rows} == set(range(6))
    assert rows[0]["backend"] == "stable_unclip" and rows[0]["score_path"] == "cheap" and rows[0]["radius"] == 0.5
    assert all((store.images_dir / r["file"]).is_file() for r in rows)


@pytest.mark.integration
def test_benchmark_script_runs_on_the_tiny_model(shared_data, tmp_path, capsys):
    from benchmarks import gif_unclip_throughput as bench

    rows = tiny_modes(bench, shared_data, tmp_path, capsys, "--ratio", "2")
    assert rows["per_seed"]["calls_per_repeat"] == 2 and rows["batched"]["calls_per_repeat"] == 1
