"""GIF-MAE throughput: images per second at the real ViT-MAE-Large size, random weights.

Speed does not depend on weight values, so ``ViTMAEForPreTraining`` is built in code
from the facebook/vit-mae-large configuration (ViT-L/16 encoder: 1024 hidden, 24
layers, 16 heads, MLP 4096; decoder: 512 hidden, 8 layers, 16 heads, MLP 2048;
224 px, patch 16 -> 197 x 1024 tokens; 329.5M parameters) with random weights,
and the guide is open_clip's ViT-B/32 (151.3M) with random weights: nothing is
downloaded. The same components are timed in one run in two modes:

* per-seed: one seed per ``expand`` call (seeds ``[1, k]``), k images per call;
* batched: ``--seeds-per-pass`` seeds x k images in one ``expand`` call.

Both modes use ``--dtype`` (auto: bfloat16 MAE on CUDA GPUs that support it,
float16 otherwise, float32 on CPU; the guide and the criteria stay float32) and score
each seed's k samples together, so their ratio isolates batching.

Usage (from the repository root)::

    python benchmarks/gif_mae_throughput.py                       # CUDA: k=5, 16 seeds/pass, 2 repeats
    OMP_NUM_THREADS=1 python benchmarks/gif_mae_throughput.py --device cpu --ratio 2 --seeds-per-pass 2
    python benchmarks/gif_mae_throughput.py --json gif_mae_throughput.json --mask-ratio 0.75

``--tiny`` swaps in the tiny test MAE and CLIP to check the script end to end in
seconds; its figures say nothing about real speed.
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
from expansion.architectures import RELEASED_PARAMS, build_clip_guide, build_mae, n_params
from expansion.base import ExpansionContext
from expansion.gif.guides import ClipGuide
from expansion.gif.mae import GifMAE

#: parameter counts of the released models, for the sanity check printed with the figures
EXPECTED_PARAMS = {"mae": RELEASED_PARAMS["mae"], "guide": RELEASED_PARAMS["guide"]}


def make_expander(model, guide: ClipGuide, context: ExpansionContext, args: argparse.Namespace) -> GifMAE:
    exp = GifMAE(
        ratio=args.ratio,
        model_id="unused (random weights)",
        mask_ratio=args.mask_ratio,
        radius=args.radius,
        output_size=None,
        dtype=args.dtype,
    )
    exp.context = context  # prepare() would load weights from model_id: set the context and components instead
    exp.set_components(model)
    exp.use_guide(guide)
    return exp


def measure(
    mode: str,
    model,
    guide: ClipGuide,
    images: torch.Tensor,
    labels: torch.Tensor,
    context: ExpansionContext,
    args: argparse.Namespace,
) -> dict[str, Any]:
    calls = common.seed_calls(mode, images, labels, args.ratio)
    exp = make_expander(model, guide, context, args)
    timing = common.time_expand_calls(
        exp, calls, images.device, args.repeats, images.shape[0] * args.ratio, args.peak_tflops
    )
    return {"mode": mode, "dtype": str(exp.model_dtype).replace("torch.", ""), **timing}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.generation_parser(__doc__, seeds_per_pass=(16, 2), per_seed="the per-seed mode")
    p.add_argument("--mask-ratio", type=float, default=0.0, help="MAE masking ratio at expansion time")
    p.add_argument("--radius", type=float, default=0.8, help="L-inf radius in token-std units")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="MAE dtype (auto: bfloat16/float16 on cuda, float32 on cpu)",
    )
    common.add_run_arguments(p)
    p.add_argument("--tiny", action="store_true", help="tiny test MAE and CLIP (script check only)")
    return common.parse_for_device(p, argv, seeds_per_pass=(16, 2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    images, labels, context = common.load_seeds(args.data.expanduser(), args.dataset, args.seeds_per_pass)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        size = "tiny" if args.tiny else "real"
        model, guide = build_mae(size), build_clip_guide(size, context.class_names, tmp)
    build_s = time.perf_counter() - start
    params = {"mae": n_params(model), "guide": n_params(guide.model)}
    model.to(device)
    guide.to(device)
    images, labels = images.to(device), labels.to(device)

    cfg = model.config
    tokens = 1 + (cfg.image_size // cfg.patch_size) ** 2
    what = (
        "TINY test MAE + CLIP: figures say nothing about speed"
        if args.tiny
        else "real ViT-MAE-Large + CLIP ViT-B/32 sizes, random weights"
    )
    common.print_header("GIF-MAE", what, device, params, build_s, None if args.tiny else EXPECTED_PARAMS)
    print(
        f"  seeds: {args.dataset} {tuple(images.shape)} uint8 -> {cfg.image_size} px, {tokens} x {cfg.hidden_size} "
        f"tokens, mask ratio {args.mask_ratio}, k={args.ratio}, {args.seeds_per_pass} seeds, {args.repeats} timed "
        "repeat(s), warm-up excluded"
    )

    results = []
    for mode in ("per_seed", "batched"):
        results.append(measure(mode, model, guide, images, labels, context, args))
        print(common.result_line("gif_mae", results[-1]), flush=True)
    speedup = results[1]["images_per_s"] / results[0]["images_per_s"]
    print(f"  gif_mae: batched / per-seed = {speedup:.2f}x")

    return common.write_report(args, device, params, build_s, results, speedup, benchmark="gif_mae")


if __name__ == "__main__":
    main()
