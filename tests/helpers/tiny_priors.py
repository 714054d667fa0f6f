"""A tiny Karlo (UnCLIPImageVariationPipeline) for offline tests; the other tiny priors are
expansion/architectures.py's."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_karlo(tmp_dir: Path, seed: int = 0) -> Path:
    """A tiny Karlo (UnCLIPImageVariationPipeline) of random components, each saved with save_pretrained into
    its own subfolder (the layout of kakaobrain/karlo-v1-alpha-image-variations): 16 px pixel-space decoder
    (learned-range variance, image embedding as extra context tokens + additive time embedding), 32 px
    super-resolution UNets, 32 px CLIP vision encoder, tiny CLIP text encoder (all width 32)."""
    from diffusers import UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    from expansion.architectures import ARCHITECTURES, clip_text_encoder, clip_tokenizer
    from expansion.gif.unclip import _text_proj_class

    out = Path(tmp_dir) / "tiny_karlo"
    tok = clip_tokenizer("tiny", Path(tmp_dir) / "karlo_tok")
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
            "text_encoder": clip_text_encoder(ARCHITECTURES["tiny"]["sd_text"], tok, with_projection=True),
            "image_encoder": CLIPVisionModelWithProjection(
                CLIPVisionConfig(**{**ARCHITECTURES["tiny"]["unclip_vision"], "projection_dim": d})
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
