"""The priors' architectures with random weights, at two sizes: ``real`` (the released models' configs, for the
benchmarks: their FLOPs and speed are the real ones) and ``tiny`` (a few thousand parameters, for the tests:
the same classes and wiring, built in well under a second). One builder per prior serves both, so a test and
a benchmark run the same code on different sizes. Nothing here downloads anything.

* Stable Diffusion v1 (:func:`build_sd`, :func:`save_sd`: AutoencoderKL, a cross-attention UNet, a CLIP text
  encoder and tokenizer, the DDIM scheduler with SD v1's settings). The tiny VAE downsamples by 2 and its
  tokenizer knows single characters (``model_max_length`` 77 as in SD); the real tokenizer is CLIP's BPE,
  written offline from the vocabulary open_clip ships.
* stable unCLIP (:func:`build_stable_unclip`: stabilityai/stable-diffusion-2-1-unclip-small's architecture).
* MAE (:func:`build_mae`: facebook/vit-mae-large).
* the CLIP guide (:func:`build_clip_guide`: open_clip ViT-B/32; tiny: a registered 16-d model saved as a local
  weights file, :func:`save_tiny_clip`, so the real loading path runs offline).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

SIZES = ("tiny", "real")
SD_V1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
_TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
)
#: the tiny ViT trunk of stable unCLIP's image encoder and of the MAE
_TINY_VIT = dict(
    hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
)
_TINY_TEXT = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, projection_dim=32)
_REAL_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
#: each size's configs: SD v1 (unet, vae, text), stable unCLIP (unclip_*), MAE, the CLIP guide's open_clip arch
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "tiny": {
        "sd_unet": _TINY_UNET,
        "sd_vae": dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        ),
        "sd_text": _TINY_TEXT,
        "unclip_unet": {**_TINY_UNET, "class_embed_type": "projection", "projection_class_embeddings_input_dim": 32},
        "unclip_text": _TINY_TEXT,
        "unclip_vision": {**_TINY_VIT, "projection_dim": 16},
        "unclip_scheduler": SD_V1_SCHEDULER,
        "mae": dict(
            **_TINY_VIT,
            decoder_hidden_size=32,
            decoder_num_hidden_layers=1,
            decoder_num_attention_heads=4,
            decoder_intermediate_size=37,
        ),
    },
    "real": {
        "sd_unet": _REAL_UNET,  # runwayml/stable-diffusion-v1-5
        "sd_vae": dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            layers_per_block=2,
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32,
            sample_size=512,
            scaling_factor=0.18215,
        ),
        "sd_text": dict(  # CLIP ViT-L/14's text tower
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
            projection_dim=768,
        ),
        "unclip_unet": {  # stabilityai/stable-diffusion-2-1-unclip-small unet/config.json
            **_REAL_UNET,
            "sample_size": 96,
            "cross_attention_dim": 1024,
            "attention_head_dim": (5, 10, 20, 20),
            "use_linear_projection": True,
            "class_embed_type": "projection",
            "projection_class_embeddings_input_dim": 1536,
        },
        "unclip_text": dict(  # OpenCLIP ViT-H/14's text tower as SD 2.x's CLIPTextModel
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=23,
            num_attention_heads=16,
            hidden_act="gelu",
            projection_dim=512,
            pad_token_id=0,
        ),
        "unclip_vision": dict(  # CLIP ViT-L/14's vision tower + projection (the unclip-small image encoder)
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=768,
            hidden_act="quick_gelu",
        ),
        "unclip_scheduler": {**SD_V1_SCHEDULER, "prediction_type": "v_prediction"},
        "mae": dict(  # facebook/vit-mae-large's config.json
            image_size=224,
            patch_size=16,
            num_channels=3,
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            intermediate_size=4096,
            decoder_hidden_size=512,
            decoder_num_hidden_layers=8,
            decoder_num_attention_heads=16,
            decoder_intermediate_size=2048,
            hidden_act="gelu",
            layer_norm_eps=1e-12,
            qkv_bias=True,
        ),
        "guide_arch": "ViT-B-32",
    },
}
#: parameter counts of the released models (the real size's sanity check)
RELEASED_PARAMS = {
    "sd_unet": 859_520_964,
    "sd_vae": 83_653_863,
    "sd_text": 123_060_480,
    "mae": 329_541_888,
    "guide": 151_277_313,
}
TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def _config(size: str) -> dict[str, Any]:
    if size not in ARCHITECTURES:
        raise ValueError(f"size must be one of {SIZES}, got {size!r}")
    return ARCHITECTURES[size]


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def clip_tokenizer(size: str, tmp_dir: Path | str):
    """A CLIPTokenizer (``model_max_length`` 77): character-level (tiny), or CLIP's BPE (49408 tokens,
    48894 merges) written offline from the vocabulary open_clip ships (real)."""
    from transformers import CLIPTokenizer

    _config(size)
    folder = Path(tmp_dir) / f"{size}_clip_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    if size == "tiny":
        chars = string.ascii_lowercase + string.digits + string.punctuation
        tokens = ["<|startoftext|>", "<|endoftext|>", *chars, *(c + "</w>" for c in chars)]
        vocab = {tok: i for i, tok in enumerate(tokens)}
        merges = []
    else:
        from open_clip.tokenizer import SimpleTokenizer

        simple = SimpleTokenizer()
        # open_clip names the special tokens <start_of_text>/<end_of_text>; OpenAI's (and SD's) vocab.json
        # calls the same ids 49406/49407 <|startoftext|>/<|endoftext|>, the names CLIPTokenizer expects
        rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
        vocab = {rename.get(tok, tok): i for tok, i in simple.encoder.items()}
        merges = [" ".join(pair) for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("\n".join(["#version: 0.2", *merges]) + "\n", encoding="utf-8")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=77)
    if len(tokenizer) != len(vocab):
        raise RuntimeError(f"the CLIP tokenizer has {len(tokenizer)} tokens, its vocabulary {len(vocab)}")
    return tokenizer


def clip_text_encoder(config: dict[str, Any], tokenizer, with_projection: bool = False):
    """A CLIP text tower of ``config`` sized to ``tokenizer`` (with its projection head when asked)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    ids["pad_token_id"] = tokenizer.pad_token_id
    text_config = CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, **{**ids, **config})
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(text_config)


def build_sd(size: str, tmp_dir: Path | str, seed: int = 0, unet_in_channels: int = 4) -> dict[str, Any]:
    """``{"vae", "unet", "text_encoder", "tokenizer", "scheduler"}`` of SD v1 (eval mode, no gradients);
    ``unet_in_channels`` 8 is InstructPix2Pix's UNet (timbrooks/instruct-pix2pix: SD v1.5 with 4 more inputs)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    config = _config(size)
    tokenizer = clip_tokenizer(size, tmp_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config["sd_vae"])
        unet = UNet2DConditionModel(**{**config["sd_unet"], "in_channels": unet_in_channels})
        text_encoder = clip_text_encoder(config["sd_text"], tokenizer)
    for module in (vae, unet, text_encoder):
        module.eval().requires_grad_(False)
    scheduler = DDIMScheduler(**SD_V1_SCHEDULER)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder, "tokenizer": tokenizer, "scheduler": scheduler}


def save_sd(size: str, tmp_dir: Path | str, seed: int = 0, unet_in_channels: int = 4) -> Path:
    """:func:`build_sd` written as a StableDiffusionPipeline folder (``<tmp_dir>/<size>_sd``, InstructPix2Pix's:
    ``<size>_ip2p``), so that the real loading path (``from_pretrained``) runs offline."""
    from diffusers import StableDiffusionPipeline

    parts = build_sd(size, tmp_dir, seed, unet_in_channels)
    pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    out = Path(tmp_dir) / (f"{size}_sd" if unet_in_channels == 4 else f"{size}_ip2p")
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def build_stable_unclip(size: str, tmp_dir: Path | str, seed: int = 0):
    """A StableUnCLIPImg2ImgPipeline: the UNet takes [noised image embedding, noise-level embedding] as
    projection class labels; a CLIPVisionModelWithProjection and its processor encode the seeds."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableUnCLIPImg2ImgPipeline,
        UNet2DConditionModel,
    )
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = _config(size)
    tokenizer = clip_tokenizer(size, tmp_dir)
    vision = config["unclip_vision"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**config["sd_vae"])
        text_encoder = clip_text_encoder(config["unclip_text"], tokenizer)
        unet = UNet2DConditionModel(**config["unclip_unet"])
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**vision))
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=vision["projection_dim"])
    return StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=vision["image_size"], size=vision["image_size"]),
        image_encoder=image_encoder,
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        unet=unet,
        scheduler=DDIMScheduler(**config["unclip_scheduler"]),
        vae=vae,
    )


def save_stable_unclip(size: str, tmp_dir: Path | str, seed: int = 0) -> Path:
    out = Path(tmp_dir) / f"{size}_stable_unclip"
    build_stable_unclip(size, tmp_dir, seed).save_pretrained(str(out), safe_serialization=True)
    return out


def build_mae(size: str, seed: int = 0, norm_pix_loss: bool = False):
    """transformers' ViTMAEForPreTraining."""
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTMAEForPreTraining(ViTMAEConfig(**_config(size)["mae"], norm_pix_loss=norm_pix_loss))


def save_tiny_clip(tmp_dir: Path | str, seed: int = 0, name: str = "tiny-test-clip") -> dict[str, str]:
    """A tiny open_clip model registered under its own architecture name and saved as a local weights file;
    returns the guide spec ``{kind, arch, pretrained, model_config}`` that loads it."""
    import open_clip
    from safetensors.torch import save_file

    folder = Path(tmp_dir)
    folder.mkdir(parents=True, exist_ok=True)
    config_path = folder / f"{name}.json"
    config_path.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(str(config_path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(name, pretrained=None)
    weights = folder / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"kind": "clip", "arch": name, "pretrained": str(weights), "model_config": str(config_path)}


def build_clip_guide(size: str, class_names: list[str], tmp_dir: Path | str, seed: int = 0):
    """The zero-shot CLIP guide: the tiny model through the real loading path, or open_clip ViT-B/32 with
    random weights."""
    from expansion.gif.guides import ClipGuide, build_guide

    if size == "tiny":
        return build_guide(save_tiny_clip(Path(tmp_dir) / "clip", seed), class_names)
    import open_clip

    arch = _config(size)["guide_arch"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    return ClipGuide(model, open_clip.get_tokenizer(arch), class_names)
