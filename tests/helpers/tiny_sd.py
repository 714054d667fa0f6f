"""GIF-SD over the tiny priors of expansion/architectures.py, prepared as the tests use it."""

from __future__ import annotations

from pathlib import Path

#: the class names the tiny GIF-SD expanders are prepared with (BreastMNIST's)
BREAST_CLASSES = ["malignant", "normal, benign"]


def tiny_gif_sd(sd_path: Path, clip_spec: dict, **settings):
    """GIF-SD over the tiny SD (``save_tiny_sd``) and tiny CLIP guide (``save_tiny_clip``) at 16 px,
    4 DDIM steps, k=3, prepared for BreastMNIST; ``settings`` override any of these."""
    from expansion.base import ExpansionContext
    from expansion.gif.sd import GifSD

    params = dict(
        ratio=3,
        model_id=str(sd_path),
        guide=clip_spec,
        guidance_scale=5.0,
        strength=0.9,
        radius=0.1,
        num_inference_steps=4,
        resolution=16,
        output_size=None,
    )
    exp = GifSD(**{**params, **settings})
    exp.prepare(ExpansionContext("breastmnist", BREAST_CLASSES, channels=1, prompt_prefix="Ultrasound image of"))
    return exp
