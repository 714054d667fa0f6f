"""GIF-SD and the sd_img2img ablation with a tiny SD and a tiny open_clip built in code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from expansion.base import ExpansionContext, ExpansionError
from expansion.gif.sd import GifSD, load_sd_components
from expansion.seeding import image_seeds
from expansion.store import ExpansionStore
from experiments.record import read_record
from tests.conftest import PROJECT_ROOT
from tests.helpers.gif_checks import assert_guidance_raises_the_score
from tests.helpers.tiny_sd import tiny_gif_sd
from tests.helpers.tolerances import same_up_to_float_rounding, scores_close

CLASSES = ["malignant", "normal, benign"]
#: sd_img2img as configured (conf/method/sd_img2img.yaml): GIF-SD unguided, no perturbation
IMG2IMG = {"guided": False, "radius": 0.0}


def _expander(tiny_sd_models, **kw):
    return tiny_gif_sd(*tiny_sd_models, **kw)


def test_gif_sd_produces_k_images_with_full_manifest_fields(tiny_sd_models, breast_seeds):
    exp = _expander(tiny_sd_models)
    images, labels = breast_seeds
    out = exp.expand(images, labels, image_seeds(7, range(4), 3))
    out.validate(4, 3)
    assert out.images.shape == (4, 3, 1, 16, 16)
    rows = out.field_rows()
    assert set(rows[0]) == {
        "prompt",
        "strength",
        "guidance_scale",
        "radius",
        "score_before",
        "score_after",
        "guide_class",
        "guide_confidence",
    }
    assert all(r["prompt"].startswith("Ultrasound image of") for r in rows)
    assert rows[0]["prompt"].endswith(CLASSES[int(labels[0])])
    assert all(0 <= r["guide_confidence"] <= 1 and r["guide_class"] in (0, 1) for r in rows)


def test_prompts_are_random_per_image_seed_and_fixed_without_randomisation(tiny_sd_models):
    exp = _expander(tiny_sd_models)
    exp.context = ExpansionContext("cars", ["audi a4", "bmw m3"], channels=3)
    seeds = image_seeds(0, range(20), 5)
    prompts = exp.prompts(torch.zeros(20, dtype=torch.long), seeds)
    assert len(set(prompts)) > 10 and all(p.endswith("audi a4") for p in prompts)
    assert exp.prompts(torch.zeros(20, dtype=torch.long), seeds) == prompts
    domains = {" ".join(p.split()[:2]) for p in prompts}
    assert domains <= {"an image", "a real-world", "a cartoon", "an oil", "a sketch"}
    fixed = _expander(tiny_sd_models, prompt_randomization=False)
    fixed.context = exp.context
    assert set(fixed.prompts(torch.zeros(3, dtype=torch.long), seeds[:3])) == {"an image of audi a4"}


def test_output_depends_only_on_per_image_seeds(tiny_sd_models, breast_seeds):
    exp = _expander(tiny_sd_models)
    images, labels = breast_seeds[0][:3], breast_seeds[1][:3]
    seeds = image_seeds(3, range(3), 3)
    full = exp.expand(images, labels, seeds)
    parts = [exp.expand(images[:1], labels[:1], seeds[:1]), exp.expand(images[1:], labels[1:], seeds[1:])]
    assert same_up_to_float_rounding(full.images, torch.cat([h.images for h in parts]))  # batch 3 vs 1 + 2
    other = exp.expand(images, labels, image_seeds(4, range(3), 3))
    assert not torch.equal(full.images, other.images)


def test_guidance_raises_the_score_of_the_same_inputs(tiny_sd_models, breast_seeds):
    """score_after (projected, decoded) vs score_before (random perturbation) on the same seeds."""
    exp = _expander(tiny_sd_models, radius=100.0, guidance={"step_size": 0.05})
    assert_guidance_raises_the_score(exp, *breast_seeds)


def test_unguided_ablation_needs_no_guide_and_differs_from_gif(tiny_sd_models, breast_seeds):
    images, labels = breast_seeds
    seeds = image_seeds(3, range(4), 3)
    sd = _expander(tiny_sd_models, **IMG2IMG)
    assert sd.guide is None and not sd.needs_grad
    plain = sd.expand(images, labels, seeds)
    assert set(plain.field_rows()[0]) == {"prompt", "strength", "guidance_scale", "radius"}
    assert all(r["radius"] == 0.0 for r in plain.field_rows())
    gif = _expander(tiny_sd_models).expand(images, labels, seeds)
    assert not torch.equal(plain.images, gif.images)
    assert sd.signature() != _expander(tiny_sd_models).signature()
    # radius 0: the decoded img2img latent itself, whatever the perturbation draws
    with torch.no_grad():
        z0 = sd.encode(images, labels, seeds).z0
        assert torch.equal(plain.images, sd.stored_images(sd.decode(z0, {}, final=True), 4, 3))


def test_official_loop_settings_are_reachable(tiny_sd_models, breast_seeds):
    exp = _expander(tiny_sd_models, group_size=2, dtype="float32")
    images, labels = breast_seeds
    out = exp.expand(images[:1], labels[:1], image_seeds(1, [0], 3))
    assert out.images.shape == (1, 3, 1, 16, 16)
    assert exp.signature()["group_size"] == 2


def test_bad_settings_and_missing_weights_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ExpansionError, match="method gif_sd: strength must be in"):
        GifSD(ratio=2, strength=1.5)
    with pytest.raises(ExpansionError, match=r"method gif_sd: unknown setting\(s\) \['strenght'\]"):
        GifSD(ratio=2, strenght=0.5)
    with pytest.raises(ExpansionError, match="method gif_sd.guidance_scale must be float"):
        GifSD(ratio=2, guidance_scale="high")
    with pytest.raises(ExpansionError, match="folder .*nope does not exist"):
        load_sd_components(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ExpansionError, match="'CompVis/stable-diffusion-v1-4' are not available.*huggingface-cli download"
    ):
        load_sd_components("CompVis/stable-diffusion-v1-4")


def test_missing_clip_weights_are_clear(monkeypatch):
    from expansion.gif.guides import build_guide

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        ExpansionError, match="could not load the CLIP guide open_clip 'ViT-B-32'.*local open_clip weights"
    ):
        build_guide({"kind": "clip", "arch": "ViT-B-32", "pretrained": "openai"}, ["a", "b"])


def _run(args, tmp_path):
    env = {**os.environ, "PROGRESS_BAR": "false", "HF_HUB_OFFLINE": "1", "EXPANSION_CACHE": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )


@pytest.mark.integration
def test_run_py_gif_sd_end_to_end_and_batch_size_independent(tiny_sd_models, tmp_path):
    sd_path, clip = tiny_sd_models
    common = [
        "dataset=breastmnist",
        "dataset.train_per_class=3",
        "method=gif_sd",
        f"method.model_id={sd_path}",
        f"method.guide.arch={clip['arch']}",
        f"method.guide.pretrained={clip['pretrained']}",
        f"method.guide.model_config={clip['model_config']}",
        "method.resolution=16",
        "method.output_size=16",
        "method.num_inference_steps=3",
        "method.ratio=2",
        "method.dreambooth=null",
        "train.epochs=1",
        "logger=none",
        "train.compare_original=false",
    ]
    stores = []
    for batch in (1, 4):
        proc = _run(
            common + [f"method.batch_size={batch}", f"hydra.run.dir={tmp_path}/run{batch}"], tmp_path / f"b{batch}"
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        metrics = read_record(tmp_path / f"run{batch}")[0]
        assert metrics.method == "gif_sd" and metrics.expansion.num_images == 2 * 6
        stores.append(ExpansionStore(Path(metrics.expansion.store), "", {}))
    rows = stores[0].read_rows()
    assert len(rows) == 12 and {"prompt", "radius", "score_before", "score_after", "guide_class"} <= set(rows[0])
    assert rows[0]["radius"] == 0.1 and rows[0]["guidance_scale"] == 5.0  # BreastMNIST's paper settings
    # whatever the batch size: the draws (seeds, prompts) exactly; the images up to float rounding (CPU
    # kernels may sum a batch of 1 and of 4 in another order); the scores to float32 precision, as stored
    # in the manifest (6 significant digits: tests/helpers/tolerances.py)
    other = stores[1].read_rows()
    for a, b in zip(rows, other):
        assert (a["parent"], a["copy"], a["seed"], a["prompt"]) == (b["parent"], b["copy"], b["seed"], b["prompt"])
        pixels = [
            torch.from_numpy(np.array(Image.open(s.images_dir / r["file"])))
            for s, r in ((stores[0], a), (stores[1], b))
        ]
        assert same_up_to_float_rounding(*pixels), (pixels[0].int() - pixels[1].int()).abs().max()
        for key in ("score_before", "score_after"):
            assert scores_close(a[key], b[key], stored=True), (key, a[key], b[key])


def test_dreambooth_fit_is_cached_and_shared_with_the_ablation(tiny_sd_models, breast_seeds, tmp_path, monkeypatch):
    from expansion.engine import expand_dataset
    from expansion.gif import dreambooth
    from experiments.data.datasets import TensorImageSet

    images, labels = breast_seeds
    train = TensorImageSet(images, labels.numpy())
    identity = {"name": "breastmnist", "class_names": CLASSES, "train_fingerprint": train.fingerprint()}
    context = ExpansionContext("breastmnist", CLASSES, channels=1, prompt_prefix="Ultrasound image of")
    db = {"steps": 3, "lr": 1e-3, "batch_size": 2, "resolution": 16, "instance_prompt": "{prefix} {class} breast"}
    calls = []
    real = dreambooth.dreambooth_finetune
    monkeypatch.setattr(dreambooth, "dreambooth_finetune", lambda *a, **k: calls.append(a[6]) or real(*a, **k))

    def run(ratio, **unguided):
        sd_path, clip = tiny_sd_models
        kw = dict(
            ratio=ratio,
            model_id=str(sd_path),
            guide=clip,
            guidance_scale=5.0,
            num_inference_steps=2,
            resolution=16,
            dreambooth=db,
            **unguided,
        )
        return expand_dataset(
            GifSD(**kw),
            train,
            identity,
            context=context,
            store_dir=tmp_path / "stores",
            fit_dir=tmp_path / "fits",
            seed=0,
            batch_size=4,
        )

    first = run(2)
    assert len(calls) == 1
    assert set(calls[0]) <= {"Ultrasound image of malignant breast", "Ultrasound image of normal, benign breast"}
    saved = list((tmp_path / "fits").glob("*/dreambooth/DONE"))
    assert len(saved) == 1
    run(2, **IMG2IMG)  # same fit signature: reuses the fine-tuned weights, no second fine-tune
    run(3)
    assert len(calls) == 1
    assert first.expanded.rows[0]["prompt"].startswith("Ultrasound image of")
