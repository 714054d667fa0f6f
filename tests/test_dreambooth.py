"""DreamBooth fine-tuning (expansion/gif/dreambooth.py) on tiny SD components and real BreastMNIST images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from expansion.architectures import build_sd, save_sd
from expansion.gif.dreambooth import (
    DreamBoothSettings,
    dreambooth_finetune,
    finetuned_available,
    generate_class_images,
    load_finetuned,
    preprocess,
    save_finetuned,
)

PROMPTS = {0: "Ultrasound image of malignant breast", 1: "Ultrasound image of benign breast"}
FAST = dict(lr=1e-3, resolution=16, batch_size=2)  # tiny models need a big lr


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def breast(shared_data):
    """4 malignant + 4 benign BreastMNIST train images (uint8 [8, 1, 28, 28]) and their class prompts."""
    d = np.load(shared_data / "medmnist" / "breastmnist.npz")
    x, y = d["train_images"], d["train_labels"][:, 0]
    idx = np.concatenate([np.flatnonzero(y == 0)[:4], np.flatnonzero(y == 1)[:4]])
    images = torch.from_numpy(x[idx])[:, None]
    prompts = [PROMPTS[int(y[i])] for i in idx]
    return images, prompts


@pytest.fixture
def sd(tmp_path):
    from diffusers import DDPMScheduler

    parts = build_sd("tiny", tmp_path)
    parts["noise_scheduler"] = DDPMScheduler.from_config(parts["scheduler"].config)  # as the script
    return parts


def _finetune(sd, images, prompts, settings, **kw):
    return dreambooth_finetune(
        sd["unet"],
        sd["text_encoder"],
        sd["vae"],
        sd["tokenizer"],
        sd["noise_scheduler"],
        images,
        prompts,
        settings,
        **kw,
    )


def _snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(module, snapshot) -> bool:
    return all(torch.equal(v, snapshot[k]) for k, v in module.state_dict().items())


def test_defaults_are_gif_official():
    s = DreamBoothSettings()
    assert (s.steps, s.lr, s.batch_size, s.train_text_encoder, s.resolution, s.seed) == (
        400,
        2e-6,
        2,
        True,
        512,
        2023,
    )
    assert not s.prior_preservation and s.prior_loss_weight == 1.0 and s.max_grad_norm == 1.0


def test_finetune_learns_and_trains_only_unet_and_text_encoder(sd, breast):
    images, prompts = breast
    unet0, te0, vae0 = _snapshot(sd["unet"]), _snapshot(sd["text_encoder"]), _snapshot(sd["vae"])
    out = _finetune(sd, images, prompts, DreamBoothSettings(steps=40, **FAST))

    losses = out["losses"]
    assert out["steps"] == 40 and len(losses) == 40 and out["seconds"] > 0
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert not _same(sd["unet"], unet0)
    assert not _same(sd["text_encoder"], te0)
    assert _same(sd["vae"], vae0)
    for m in (sd["unet"], sd["text_encoder"], sd["vae"]):
        assert not m.training
        assert not any(p.requires_grad for p in m.parameters())


def test_frozen_text_encoder_unchanged(sd, breast):
    images, prompts = breast
    unet0, te0 = _snapshot(sd["unet"]), _snapshot(sd["text_encoder"])
    out = _finetune(sd, images, prompts, DreamBoothSettings(steps=3, train_text_encoder=False, **FAST))
    assert out["steps"] == 3
    assert _same(sd["text_encoder"], te0)
    assert not _same(sd["unet"], unet0)


def test_v_prediction_target(tmp_path, breast):
    from diffusers import DDPMScheduler

    sd = build_sd("tiny", tmp_path)
    sd["noise_scheduler"] = DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction")
    out = _finetune(sd, *breast, DreamBoothSettings(steps=2, **FAST))
    assert out["steps"] == 2 and all(math.isfinite(v) for v in out["losses"])


def test_same_seed_same_weights(tmp_path, breast):
    images, prompts = breast
    runs = []
    for seed in (7, 7, 8):
        sd = build_sd("tiny", tmp_path)
        from diffusers import DDPMScheduler

        sd["noise_scheduler"] = DDPMScheduler.from_config(sd["scheduler"].config)
        out = _finetune(sd, images, prompts, DreamBoothSettings(steps=4, seed=seed, **FAST))
        runs.append((out["losses"], _snapshot(sd["unet"]), _snapshot(sd["text_encoder"])))
    (l1, u1, t1), (l2, u2, t2), (l3, u3, _) = runs
    assert l1 == l2
    assert all(torch.equal(u1[k], u2[k]) for k in u1)
    assert all(torch.equal(t1[k], t2[k]) for k in t1)
    assert l1 != l3
    assert not all(torch.equal(u1[k], u3[k]) for k in u1)


def test_steps_zero_is_a_no_op(sd, breast):
    unet0 = _snapshot(sd["unet"])
    out = _finetune(sd, *breast, DreamBoothSettings(steps=0, **FAST))
    assert out["steps"] == 0 and out["losses"] == []
    assert _same(sd["unet"], unet0)
    assert not any(p.requires_grad for p in sd["unet"].parameters())


def test_prior_preservation_needs_class_images(sd, breast):
    with pytest.raises(ValueError, match="no class images"):
        _finetune(sd, *breast, DreamBoothSettings(steps=1, prior_preservation=True, **FAST))


def test_prior_preservation_with_generated_class_images(sd, breast):
    images, prompts = breast
    class_images = generate_class_images(
        sd["unet"],
        sd["text_encoder"],
        sd["vae"],
        sd["tokenizer"],
        sd["scheduler"],
        PROMPTS[0],
        3,
        resolution=16,
        seed=1,
        batch_size=2,
        num_inference_steps=2,
    )
    assert class_images.dtype == torch.uint8 and class_images.shape == (3, 3, 16, 16)
    w = 0.5
    out = _finetune(
        sd,
        images,
        prompts,
        DreamBoothSettings(steps=3, prior_preservation=True, prior_loss_weight=w, num_class_images=3, **FAST),
        class_images=class_images,
        class_prompts=[PROMPTS[0]] * 3,
    )
    assert out["steps"] == 3
    for total, inst, prior in zip(out["losses"], out["instance_losses"], out["prior_losses"]):
        assert total == pytest.approx(inst + w * prior, rel=1e-5)


def test_save_load_round_trip(sd, breast, tmp_path):
    _finetune(sd, *breast, DreamBoothSettings(steps=2, **FAST))
    out_dir = tmp_path / "ft" / "breastmnist"
    assert not finetuned_available(out_dir)
    with pytest.raises(FileNotFoundError):
        load_finetuned(out_dir)
    save_finetuned(sd["unet"], sd["text_encoder"], out_dir)
    save_finetuned(sd["unet"], sd["text_encoder"], out_dir)  # overwriting works too
    assert finetuned_available(out_dir)
    assert sorted(p.name for p in out_dir.iterdir()) == ["DONE", "text_encoder", "unet"]  # no temp left

    unet, te = load_finetuned(out_dir)
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert _same(unet, _snapshot(sd["unet"])) and _same(te, _snapshot(sd["text_encoder"]))
    ids = sd["tokenizer"](
        [PROMPTS[1]],
        padding="max_length",
        max_length=sd["tokenizer"].model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor([500])
    with torch.no_grad():
        h0, h1 = sd["text_encoder"](ids)[0], te(ids)[0]
        # same weights (compared bitwise above); CPU kernels may differ in the last ulp between module instances
        torch.testing.assert_close(h0, h1, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(
            sd["unet"](lat, t, encoder_hidden_states=h0).sample,
            unet(lat, t, encoder_hidden_states=h1).sample,
            rtol=1e-5,
            atol=1e-6,
        )

    unet16, _ = load_finetuned(out_dir, dtype=torch.float16)
    assert next(unet16.parameters()).dtype == torch.float16

    save_finetuned(sd["unet"], None, out_dir)  # frozen text encoder: only the unet is kept
    assert load_finetuned(out_dir)[1] is None


def test_preprocess_gray_resize_and_range():
    gray = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    gray[:, :, :, 14:] = 255
    x = preprocess(gray, 16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == 1.0
    assert torch.equal(x[:, 0], x[:, 1])
    wide = torch.zeros(1, 3, 20, 40, dtype=torch.uint8)
    wide[..., :6] = 255  # left edge white: cropped away by the centre crop
    assert preprocess(wide, 16).max() < -0.999


@pytest.mark.parametrize(
    "case",
    ["prompt_count", "empty", "float_images", "channels", "class_without_prior", "mixed_precision", "prompt_str"],
)
def test_bad_inputs_raise(sd, breast, case):
    images, prompts = breast
    s = DreamBoothSettings(steps=1, **FAST)
    kw = {}
    if case == "prompt_count":
        prompts = prompts[:-1]
    elif case == "empty":
        images, prompts = images[:0], []
    elif case == "float_images":
        images = images.float()
    elif case == "channels":
        images = images.expand(-1, 2, -1, -1)
    elif case == "class_without_prior":
        kw = dict(class_images=images, class_prompts=prompts)
    elif case == "mixed_precision":
        kw = dict(mixed_precision="fp8")
    elif case == "prompt_str":
        prompts = PROMPTS[0]
    with pytest.raises(ValueError):
        _finetune(sd, images, prompts, s, **kw)


@pytest.mark.parametrize("field", [dict(steps=-1), dict(batch_size=0), dict(resolution=20), dict(lr=0.0)])
def test_bad_settings_raise(field):
    with pytest.raises(ValueError):
        DreamBoothSettings(**field)


def test_half_precision_weights_rejected(sd, breast):
    sd["unet"].half()
    with pytest.raises(ValueError, match="float32"):
        _finetune(sd, *breast, DreamBoothSettings(steps=1, **FAST))


def test_tiny_sd_folder_loads_with_from_pretrained(tmp_path):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = save_sd("tiny", tmp_path)
    assert (path / "model_index.json").is_file()
    ref = build_sd("tiny", tmp_path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder")
    tok = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer")
    sched = DDIMScheduler.from_pretrained(path, subfolder="scheduler")
    assert sched.config.beta_schedule == "scaled_linear" and sched.config.steps_offset == 1
    assert tok(PROMPTS[0]).input_ids == ref["tokenizer"](PROMPTS[0]).input_ids
    for a, b in ((vae, ref["vae"]), (unet, ref["unet"]), (te, ref["text_encoder"])):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sb)


def test_gradient_checkpointing_runs_and_is_switched_off(sd, breast):
    out = _finetune(sd, *breast, DreamBoothSettings(steps=2, gradient_checkpointing=True, **FAST))
    assert out["steps"] == 2 and all(math.isfinite(v) for v in out["losses"])
    assert not sd["unet"].is_gradient_checkpointing
    te = sd["text_encoder"]
    flag = "is_activation_checkpointing" if hasattr(te, "is_activation_checkpointing") else "is_gradient_checkpointing"
    assert not getattr(te, flag)  # transformers 5 renamed the flag


def test_mixed_precision_is_ignored_on_cpu(tmp_path, breast):
    from diffusers import DDPMScheduler

    losses = []
    for mp in (None, "fp16"):
        sd = build_sd("tiny", tmp_path)
        sd["noise_scheduler"] = DDPMScheduler.from_config(sd["scheduler"].config)
        losses.append(_finetune(sd, *breast, DreamBoothSettings(steps=2, **FAST), mixed_precision=mp)["losses"])
    assert losses[0] == losses[1]
