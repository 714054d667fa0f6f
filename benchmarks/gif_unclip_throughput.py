"""GIF-unCLIP throughput: images per second at the real stable-unCLIP size, random weights.

Speed does not depend on weight values, so a ``StableUnCLIPImg2ImgPipeline`` is built in code
at the stabilityai/stable-diffusion-2-1-unclip-small sizes (SD 2.1 UNet: 320/640/1280/1280
blocks, linear-projection attention with 5/10/20/20-dim heads, 1024-wide cross attention,
``class_embed_type: projection`` over 2 x 768 = [noised CLIP image embedding, noise-level
embedding]; OpenCLIP ViT-H text encoder (1024 wide, 23 layers); CLIP ViT-L/14 image encoder
with a 768-d projection; SD VAE; DDIM v-prediction) with random weights, and the guide is
open_clip's ViT-B/32 with random weights: nothing is downloaded. Timed in two modes:

* per-seed: one seed per ``expand`` call (seeds ``[1, k]``);
* batched: ``--seeds-per-pass`` seeds x k images in one call.

Scoring path: ``--score-path cheap`` (default; ``--score-steps`` sampler steps with gradients)
or ``faithful``. ``--resolution`` (default 768, the model's native size) and ``--steps`` (final
decode, default 20) make CPU runs feasible at smaller settings.

Usage (from the repository root)::

    python benchmarks/gif_unclip_throughput.py                    # CUDA: k=5, 8 seeds/pass
    OMP_NUM_THREADS=1 python benchmarks/gif_unclip_throughput.py --device cpu --resolution 128 --steps 2

``--tiny`` swaps in the tiny test pipeline and CLIP (script check only; figures say nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks import common
from expansion.architectures import build_clip_guide, build_stable_unclip, n_params
from expansion.base import ExpansionContext
from expansion.gif.guides import ClipGuide
from expansion.gif.unclip import GifUnCLIP


def make_expander(pipe, guide: ClipGuide, context: ExpansionContext, args: argparse.Namespace) -> GifUnCLIP:
    exp = GifUnCLIP(
        ratio=args.ratio,
        backend="stable_unclip",
        model_id="unused (random weights)",
        radius=args.radius,
        score_path=args.score_path,
        score_steps=args.score_steps,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance_scale,
        resolution=args.resolution,
        output_size=None,
        dtype=args.dtype,
    )
    exp.context = context
    exp.set_components(pipe)
    exp.use_guide(guide)
    return exp


def measure(
    mode: str,
    pipe,
    guide: ClipGuide,
    images: torch.Tensor,
    labels: torch.Tensor,
    context: ExpansionContext,
    args: argparse.Namespace,
) -> dict[str, Any]:
    calls = common.seed_calls(mode, images, labels, args.ratio)
    exp = make_expander(pipe, guide, context, args)
    # without a warm-up no FLOPs are counted either
    timing = common.time_expand_calls(
        exp, calls, images.device, args.repeats, images.shape[0] * args.ratio, args.peak_tflops, count=args.warmup
    )
    return {"mode": mode, "dtype": str(exp.model_dtype).replace("torch.", ""), **timing}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.generation_parser(__doc__, seeds_per_pass=(8, 2), per_seed="the per-seed mode")
    p.add_argument("--radius", type=float, default=0.5, help="L-inf radius in embedding-std units")
    p.add_argument("--score-path", default="cheap", choices=["cheap", "faithful"])
    p.add_argument("--score-steps", type=int, default=2)
    p.add_argument("--steps", type=int, default=20, help="final decode sampler steps")
    p.add_argument("--guidance-scale", type=float, default=10.0)
    p.add_argument("--resolution", type=int, default=None, help="px (default: the UNet's native 768; tiny 16)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    common.add_run_arguments(p)
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed warm-up call")
    p.add_argument("--tiny", action="store_true", help="tiny test pipeline and CLIP (script check only)")
    return common.parse_for_device(p, argv, seeds_per_pass=(8, 2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    images, labels, context = common.load_seeds(args.data.expanduser(), args.dataset, args.seeds_per_pass)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        size = "tiny" if args.tiny else "real"
        pipe, guide = build_stable_unclip(size, tmp), build_clip_guide(size, context.class_names, tmp)
    build_s = time.perf_counter() - start
    params = {n: n_params(getattr(pipe, n)) for n in ("unet", "vae", "text_encoder", "image_encoder")}
    params["guide"] = n_params(guide.model)
    for n in ("unet", "vae", "text_encoder", "image_encoder"):
        getattr(pipe, n).to(device)
    guide.to(device)
    images, labels = images.to(device), labels.to(device)
    res = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    what = (
        "TINY test pipeline + CLIP: figures say nothing about speed"
        if args.tiny
        else "real SD 2.1 unCLIP-small + CLIP ViT-B/32 guide sizes, random weights"
    )
    common.print_header("GIF-unCLIP", what, device, params, build_s)
    print(
        f"  seeds: {args.dataset} {tuple(images.shape)} -> {res} px, k={args.ratio}, {args.seeds_per_pass} seeds, "
        f"score path {args.score_path} ({args.score_steps if args.score_path == 'cheap' else args.steps} steps), "
        f"final decode {args.steps} steps, cfg {args.guidance_scale}, {args.repeats} timed repeat(s), "
        f"warm-up {'excluded' if args.warmup else 'skipped'}"
    )
    results = []
    for mode in ("per_seed", "batched"):
        results.append(measure(mode, pipe, guide, images, labels, context, args))
        print(common.result_line("gif_unclip", results[-1]), flush=True)
    speedup = results[1]["images_per_s"] / results[0]["images_per_s"]
    print(f"  gif_unclip: batched / per-seed = {speedup:.2f}x")
    return common.write_report(args, device, params, build_s, results, speedup, benchmark="gif_unclip")


if __name__ == "__main__":
    main()
