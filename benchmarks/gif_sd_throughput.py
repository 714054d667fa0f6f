"""GIF-SD throughput: images per second at the real architecture sizes, random weights.

Speed does not depend on weight values, so the Stable Diffusion v1.5 components
(UNet ~860M, VAE ~84M, ViT-L/14 text encoder ~123M parameters, CLIP BPE
tokenizer, DDIM scheduler) and the CLIP ViT-B/32 guide (~151M) are built from
their configs in code, with random weights: nothing is downloaded. The same
components are timed in one run in two modes:

* official-style: float32, one seed per call, criteria over passes of two
  (``group_size=2``), each seed's k images as ceil(k/2) ``expand`` calls of two
  copies (seeds ``[1, 2]``) -- the shape of the official GIF loop;
* batched: ``--seeds-per-pass`` seeds x k images in one ``expand`` call,
  ``--dtype`` (auto: float16 UNet/text encoder on CUDA, float32 on CPU), each
  seed's k samples scored together (``group_size=None``).

Usage (from the repository root)::

    python benchmarks/gif_sd_throughput.py                      # CUDA: 512 px, 50 DDIM steps, k=5, 8 seeds/pass
    OMP_NUM_THREADS=1 python benchmarks/gif_sd_throughput.py --device cpu --resolution 64 --steps 2 \\
        --ratio 2 --seeds-per-pass 2 --repeats 1                 # the smallest meaningful CPU run
    python benchmarks/gif_sd_throughput.py --method both --json gif_sd_throughput.json

``--tiny`` swaps in the tiny test components (expansion/architectures.py) to check the
script end to end in seconds; its figures say nothing about real speed.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import (
    add_run_arguments,
    generation_parser,
    load_seeds,
    parse_for_device,
    print_header,
    result_line,
    time_expand_calls,
    write_report,
)
from expansion.architectures import RELEASED_PARAMS, build_clip_guide, build_sd, n_params
from expansion.base import ExpansionContext
from expansion.gif.guides import ClipGuide
from expansion.gif.sd import GifSD
from expansion.seeding import image_seeds

#: the released models' parameter counts, by component (the real size's sanity check)
EXPECTED_PARAMS = {
    "unet": RELEASED_PARAMS["sd_unet"],
    "vae": RELEASED_PARAMS["sd_vae"],
    "text_encoder": RELEASED_PARAMS["sd_text"],
    "guide": RELEASED_PARAMS["guide"],
}


def make_expander(
    method: str,
    mode: str,
    comps: dict[str, Any],
    guide: ClipGuide | None,
    context: ExpansionContext,
    args: argparse.Namespace,
) -> GifSD:
    official = mode == "official"
    unguided = {"guided": False, "radius": 0.0} if method == "sd_img2img" else {"radius": args.radius}
    exp = GifSD(
        ratio=args.ratio,
        model_id="unused (random weights)",
        guidance_scale=args.guidance_scale,
        strength=args.strength,
        num_inference_steps=args.steps,
        resolution=args.resolution,
        output_size=None,
        dtype="float32" if official else args.dtype,
        group_size=2 if official else None,
        **unguided,
    )
    exp.context = context  # prepare() would load weights from model_id: set the context and components instead
    exp.set_components(comps)  # also resets the cached dtypes
    if exp.settings.guided:
        exp.use_guide(guide)
    return exp


def calls_for(mode: str, images: torch.Tensor, labels: torch.Tensor, k: int) -> list[tuple]:
    """The expand calls of one repeat: (images, labels, seeds)."""
    n = images.shape[0]
    if mode == "batched":
        return [(images, labels, image_seeds(0, range(n), k))]
    passes = math.ceil(k / 2)
    calls = []
    for b in range(n):
        seeds = image_seeds(0, [b], 2 * passes)
        calls += [(images[b : b + 1], labels[b : b + 1], seeds[:, 2 * j : 2 * j + 2]) for j in range(passes)]
    return calls


def measure(
    method: str,
    mode: str,
    comps: dict[str, Any],
    guide: ClipGuide | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    context: ExpansionContext,
    args: argparse.Namespace,
) -> dict[str, Any]:
    exp = make_expander(method, mode, comps, guide, context, args)
    calls = calls_for(mode, images, labels, args.ratio)
    # k kept per seed (official: ceil(k/2) passes of 2, so an odd k generates one more than it keeps)
    timing = time_expand_calls(exp, calls, images.device, args.repeats, images.shape[0] * args.ratio, args.peak_tflops)
    return {
        "method": method,
        "mode": mode,
        "dtype": str(exp.unet_dtype).replace("torch.", ""),
        "group_size": exp.settings.group_size,
        **timing,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = generation_parser(__doc__, seeds_per_pass=(8, 2), per_seed="the official loop")
    p.add_argument("--resolution", type=int, default=None, help="img2img resolution (default 512 on cuda, 64 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="DDIM inference steps (default 50 on cuda, 2 on cpu)")
    p.add_argument("--strength", type=float, default=0.9)
    p.add_argument("--guidance-scale", type=float, default=50.0, help="classifier-free guidance (1 = no CFG)")
    p.add_argument("--radius", type=float, default=0.8)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="batched mode's UNet/text-encoder dtype (auto: float16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="UNet and VAE in channels_last memory format (both modes)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (both modes; compiled in warm-up)")
    add_run_arguments(p)
    p.add_argument("--method", default="gif_sd", choices=["gif_sd", "sd_img2img", "both"])
    p.add_argument("--tiny", action="store_true", help="tiny test components (script check only; default 16 px)")
    args = parse_for_device(p, argv, steps=(50, 2), seeds_per_pass=(8, 2))
    if args.resolution is None:  # 512 on cuda; on cpu 64, or 16 for the tiny components
        args.resolution = 512 if torch.device(args.device).type == "cuda" else 16 if args.tiny else 64
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # one "kept in float32" warning per dtype cast otherwise
    device = torch.device(args.device)
    methods = ["gif_sd", "sd_img2img"] if args.method == "both" else [args.method]
    images, labels, context = load_seeds(args.data.expanduser(), args.dataset, args.seeds_per_pass)

    start = time.perf_counter()
    size = "tiny" if args.tiny else "real"
    with tempfile.TemporaryDirectory() as tmp:
        comps, guide = build_sd(size, tmp), build_clip_guide(size, context.class_names, tmp)
    build_s = time.perf_counter() - start
    params = {key: n_params(comps[key]) for key in ("unet", "vae", "text_encoder")}
    params["guide"] = n_params(guide.model)
    for key in ("unet", "vae", "text_encoder"):
        comps[key].to(device)
    if args.channels_last:
        for key in ("unet", "vae"):
            comps[key].to(memory_format=torch.channels_last)
    if args.compile:
        comps["unet"].compile()
    attention = sorted({type(p).__name__ for p in comps["unet"].attn_processors.values()})
    guide.to(device)
    images, labels = images.to(device), labels.to(device)

    what = (
        "TINY test components: figures say nothing about speed"
        if args.tiny
        else "real SD v1.5 + CLIP ViT-B/32 sizes, random weights"
    )
    print_header("GIF-SD", what, device, params, build_s, None if args.tiny else EXPECTED_PARAMS)
    print(f"  UNet attention: {', '.join(attention)}; channels_last {args.channels_last}; torch.compile {args.compile}")
    print(
        f"  seeds: {args.dataset} {tuple(images.shape)} uint8 -> {args.resolution} px, {args.steps} DDIM steps x "
        f"strength {args.strength} = {min(int(args.steps * args.strength), args.steps)} denoising step(s), "
        f"CFG {args.guidance_scale}, k={args.ratio}, {args.seeds_per_pass} seeds, {args.repeats} timed repeat(s), "
        "warm-up excluded"
    )

    results, speedups = [], {}
    for method in methods:
        rows = {}
        for mode in ("official", "batched"):
            rows[mode] = measure(method, mode, comps, guide, images, labels, context, args)
            print(result_line(method, rows[mode]), flush=True)
            results.append(rows[mode])
        speedups[method] = rows["batched"]["images_per_s"] / rows["official"]["images_per_s"]
        print(f"  {method}: batched / official = {speedups[method]:.2f}x")

    return write_report(
        args, device, params, build_s, results, speedups, benchmark="gif_sd", extra={"unet_attention": attention}
    )


if __name__ == "__main__":
    main()
