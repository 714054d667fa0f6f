"""Tiny, randomly initialised Stable Diffusion v1 components for offline tests.

Same classes and wiring as SD v1 (AutoencoderKL, UNet2DConditionModel with cross
attention, CLIPTextModel + CLIPTokenizer, DDIM scheduler with the SD v1 settings),
but a few thousand parameters: the VAE downsamples by 2 (use 16 or 32 px images ->
8 or 16 px latents), the text encoder has width 32 and the tokenizer knows only
single characters (so prompts are character-tokenised; ``model_max_length`` is
77 as in SD so whole class prompts such as "Ultrasound image of malignant breast"
fit). Everything is deterministic (seeded inside) and built in well under a second.

``build_tiny_sd(tmp_dir)`` returns the components; ``save_tiny_sd(tmp_dir)`` writes
them in StableDiffusionPipeline's folder layout (``model_index.json`` + ``vae/``,
``unet/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``), so that e.g.
``AutoencoderKL.from_pretrained(path, subfolder="vae")`` and
``StableDiffusionPipeline.from_pretrained(path)`` work offline.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

TINY_MODEL_MAX_LENGTH = 77
TINY_CROSS_ATTENTION_DIM = 32
TINY_VAE_SCALE_FACTOR = 2  # pixels per latent pixel

SD_V1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)


def _write_tokenizer_files(tmp_dir: Path) -> tuple[Path, Path]:
    """A character-level CLIP BPE vocabulary: vocab.json + merges.txt (header only)."""
    tmp_dir.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(chars) + [c + "</w>" for c in chars]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    vocab_file = tmp_dir / "vocab.json"
    merges_file = tmp_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab), encoding="utf-8")
    merges_file.write_text("#version: 0.2\n", encoding="utf-8")
    return vocab_file, merges_file


def build_tiny_tokenizer(tmp_dir: Path):
    from transformers import CLIPTokenizer

    tok_dir = Path(tmp_dir) / "tiny_tokenizer_src"
    _write_tokenizer_files(tok_dir)
    # from_pretrained on a folder with vocab.json + merges.txt works for both the
    # slow (transformers 4) and the tokenizers-backed (transformers 5) CLIPTokenizer.
    return CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=TINY_MODEL_MAX_LENGTH)


def build_tiny_sd(tmp_dir: Path, seed: int = 0) -> dict:
    """{"vae", "unet", "text_encoder", "tokenizer", "scheduler"}: tiny SD v1 components (eval mode)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = build_tiny_tokenizer(Path(tmp_dir))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=TINY_CROSS_ATTENTION_DIM,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                vocab_size=len(tokenizer),
                max_position_embeddings=TINY_MODEL_MAX_LENGTH,
                projection_dim=32,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    for m in (vae, unet, text_encoder):
        m.eval().requires_grad_(False)
    scheduler = DDIMScheduler(**SD_V1_SCHEDULER)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_tiny_sd(tmp_dir: Path, seed: int = 0) -> Path:
    """Write the tiny components as a StableDiffusionPipeline folder; returns its path (tmp_dir/"tiny_sd")."""
    from diffusers import StableDiffusionPipeline

    tmp_dir = Path(tmp_dir)
    parts = build_tiny_sd(tmp_dir, seed=seed)
    pipe = StableDiffusionPipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=parts["unet"],
        scheduler=parts["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = tmp_dir / "tiny_sd"
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


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
