"""Tiny, randomly initialised GIF priors for offline tests: an MAE (transformers ViTMAEForPreTraining),
a stable-unCLIP pipeline and a Karlo pipeline, with the classes and wiring of the real ones."""

from __future__ import annotations

from pathlib import Path

import torch

EMBED_DIM = 16


def tiny_mae(norm_pix_loss: bool = False, seed: int = 0):
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    config = ViTMAEConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        decoder_hidden_size=32,
        decoder_num_hidden_layers=1,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=37,
        norm_pix_loss=norm_pix_loss,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ViTMAEForPreTraining(config)


def tiny_stable_unclip(tmp_dir: Path, seed: int = 0):
    """A StableUnCLIPImg2ImgPipeline of tiny random components: the tiny SD of tests/helpers/tiny_sd.py
    with a UNet taking [noised image embedding, noise-level embedding] (2 x 16) as projection class
    labels, a tiny CLIPVisionModelWithProjection (32 px, projection 16) and its processor."""
    from diffusers import DDIMScheduler, DDPMScheduler, StableUnCLIPImg2ImgPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from tests.helpers.tiny_sd import SD_V1_SCHEDULER, TINY_CROSS_ATTENTION_DIM, build_tiny_sd

    parts = build_tiny_sd(Path(tmp_dir), seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
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
            class_embed_type="projection",
            projection_class_embeddings_input_dim=2 * EMBED_DIM,
        )
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=EMBED_DIM,
            )
        )
        normalizer = StableUnCLIPImageNormalizer(embedding_dim=EMBED_DIM)
    pipe = StableUnCLIPImg2ImgPipeline(
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        image_encoder=encoder,
        image_normalizer=normalizer,
        image_noising_scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
        tokenizer=parts["tokenizer"],
        text_encoder=parts["text_encoder"],
        unet=unet,
        scheduler=DDIMScheduler(**SD_V1_SCHEDULER),
        vae=parts["vae"],
    )
    return pipe


def save_tiny_stable_unclip(tmp_dir: Path, seed: int = 0) -> Path:
    out = Path(tmp_dir) / "tiny_stable_unclip"
    tiny_stable_unclip(tmp_dir, seed).save_pretrained(str(out), safe_serialization=True)
    return out


def save_tiny_karlo(tmp_dir: Path, seed: int = 0) -> Path:
    """A tiny Karlo (UnCLIPImageVariationPipeline) of random components, each saved with save_pretrained into
    its own subfolder (the layout of kakaobrain/karlo-v1-alpha-image-variations): 16 px pixel-space decoder
    (learned-range variance, image embedding as extra context tokens + additive time embedding), 32 px
    super-resolution UNets, 32 px CLIP vision encoder, tiny CLIP text encoder (all width 32)."""
    from diffusers import UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from expansion.gif.unclip import _text_proj_class
    from tests.helpers.tiny_sd import build_tiny_tokenizer

    out = Path(tmp_dir) / "tiny_karlo"
    tok = build_tiny_tokenizer(Path(tmp_dir) / "karlo_tok")
    d = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sr = dict(
            sample_size=32,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
            resnet_time_scale_shift="scale_shift",
            in_channels=6,
            out_channels=3,
            norm_num_groups=8,
        )
        parts = {
            "text_encoder": CLIPTextModelWithProjection(
                CLIPTextConfig(
                    hidden_size=d,
                    intermediate_size=37,
                    num_attention_heads=4,
                    num_hidden_layers=2,
                    vocab_size=len(tok),
                    max_position_embeddings=77,
                    projection_dim=d,
                    bos_token_id=tok.bos_token_id,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            ),
            "image_encoder": CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=d,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    image_size=32,
                    patch_size=8,
                    projection_dim=d,
                )
            ),
            "text_proj": _text_proj_class()(clip_embeddings_dim=d, time_embed_dim=d * 4, cross_attention_dim=d),
            "decoder": UNet2DConditionModel(
                sample_size=16,
                in_channels=3,
                out_channels=6,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                mid_block_type="UNetMidBlock2DSimpleCrossAttn",
                cross_attention_dim=d,
                attention_head_dim=4,
                resnet_time_scale_shift="scale_shift",
                class_embed_type="identity",
                norm_num_groups=8,
            ),
            "super_res_first": UNet2DModel(**sr),
            "super_res_last": UNet2DModel(**sr),
        }
    parts.update(
        tokenizer=tok,
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
        decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"),
    )
    for name, part in parts.items():
        part.save_pretrained(str(out / name))
    return out
