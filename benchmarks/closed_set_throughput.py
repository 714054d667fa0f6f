"""Closed-set diffusion throughput: sampling images/s, FLOPs and MFU at the real UNet size, random weights.

Speed does not depend on weight values, so the class-conditional ``UNet2DModel`` of
:mod:`expansion.closed_set_diffusion` is built from its preset (default ``ddpm_cifar10``: DDPM's
CIFAR-10 network, 35.7 M parameters at 32 px) with random weights and handed to the expander
as if fitted: nothing is trained or downloaded. The same network is timed in one run in two modes:

* per-seed: one seed's k samples per ``expand`` call (one denoising loop of k images), float32
  (``mixed_precision=no``), the plain loop;
* batched: ``--seeds-per-pass`` seeds x k samples in one loop, ``mixed_precision=bf16`` (bf16
  autocast on CUDA; no effect on a CPU).

The generator's fit (the DDPM objective, AdamW, EMA: :func:`~expansion.closed_set_diffusion.train_diffusion`)
is timed too: ``--fit-steps`` steps at ``--fit-batch`` after one untimed step whose FLOPs are counted.

Usage (from the repository root)::

    python benchmarks/closed_set_throughput.py                   # CUDA: 50 DDIM steps, k=5, 64 seeds/pass
    OMP_NUM_THREADS=1 python benchmarks/closed_set_throughput.py --device cpu   # 5 steps, k=2, 2 seeds

``--unet tiny`` times the CPU setting of ``closed_set_diffusion_cpu`` instead.
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
from expansion.architectures import n_params
from expansion.base import ExpansionContext
from expansion.closed_set_diffusion import (
    UNET_PRESETS,
    ClosedSetDiffusion,
    FitSettings,
    ScheduleSpec,
    build_unet,
    model_resolution,
    train_diffusion,
    unet_spec,
)


def make_expander(unet, context: ExpansionContext, args: argparse.Namespace, mode: str) -> ClosedSetDiffusion:
    exp = ClosedSetDiffusion(
        ratio=args.ratio,
        unet=args.unet,
        resolution=args.resolution,
        sampler=args.sampler,
        num_inference_steps=args.steps,
        mixed_precision="no" if mode == "per_seed" else "bf16",
    )
    exp.context = context  # prepare() + fit() would train the generator: set the context and the network instead
    exp.unet = unet
    return exp


def measure(
    mode: str, unet, images: torch.Tensor, labels: torch.Tensor, context: ExpansionContext, args: argparse.Namespace
) -> dict[str, Any]:
    exp = make_expander(unet, context, args, mode)
    calls = common.seed_calls(mode, images, labels, args.ratio)
    timing = common.time_expand_calls(
        exp, calls, images.device, args.repeats, images.shape[0] * args.ratio, args.peak_tflops
    )
    autocast = images.device.type == "cuda" and exp.settings.mixed_precision == "bf16"
    return {"mode": mode, "dtype": "bfloat16 autocast" if autocast else "float32", **timing}


def measure_fit(
    unet, images: torch.Tensor, labels: torch.Tensor, device: torch.device, args: argparse.Namespace
) -> dict[str, Any]:
    """Seconds and FLOPs per training step of the generator (one untimed, counted step first)."""
    with tempfile.TemporaryDirectory() as tmp:

        def fit(steps: int) -> dict[str, Any]:
            # one step of warm-up means no warm-up of the learning rate: steps are all alike
            settings = FitSettings(steps=steps, batch_size=args.fit_batch, warmup_steps=0, checkpoint_every=10**9)
            return train_diffusion(
                unet,
                schedule,
                images,
                labels,
                settings,
                checkpoint_path=Path(tmp) / "fit.safetensors",
                device=device,
                mixed_precision="bf16",
            )

        schedule = ScheduleSpec()  # the config's default (DDPM linear, epsilon)
        _, flops = common.count_flops(lambda: fit(1))
        common.sync(device)
        result = fit(args.fit_steps)
        common.sync(device)
    seconds_per_step = result["seconds"] / args.fit_steps
    peak, _ = common.gpu_peak_tflops(device, args.peak_tflops)
    return {
        "batch_size": args.fit_batch,
        "steps": args.fit_steps,
        "seconds_per_step": seconds_per_step,
        "train_images_per_s": args.fit_batch / seconds_per_step,
        "flops_per_step": flops,
        "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
        **common.utilisation(flops, 1 / seconds_per_step, peak),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = common.generation_parser(__doc__, seeds_per_pass=(64, 2), per_seed="the per-seed mode")
    p.add_argument("--unet", default="ddpm_cifar10", choices=sorted(UNET_PRESETS), help="UNet preset")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="model side in px (default: the seeds' side "
        "rounded up to the UNet's downsampling, as the method's resolution: null)",
    )
    p.add_argument("--sampler", default="ddim", choices=["ddim", "dpm_solver"])
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default 50 on cuda, 5 on cpu)")
    common.add_run_arguments(p)
    p.add_argument("--fit-steps", type=int, default=None, help="timed training steps (default 20 on cuda, 2 on cpu)")
    p.add_argument(
        "--fit-batch", type=int, default=None, help="training batch (default 128 = the config's on cuda, 16 on cpu)"
    )
    args = common.parse_for_device(
        p, argv, steps=(50, 5), seeds_per_pass=(64, 2), fit_steps=(20, 2), fit_batch=(128, 16)
    )
    args.tiny = False  # write_report's field: the network is always the named preset
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    images, labels, context = common.load_seeds(args.data.expanduser(), args.dataset, args.seeds_per_pass)
    spec = unet_spec(args.unet)
    resolution = model_resolution(spec, int(images.shape[-1]), args.resolution)
    start = time.perf_counter()
    unet = build_unet(
        spec,
        channels=int(images.shape[1]),
        resolution=resolution,
        num_classes=len(context.class_names),
        null_class=False,
        seed=0,
    )
    build_s = time.perf_counter() - start
    params = {"unet": n_params(unet)}
    unet.to(device).eval().requires_grad_(False)
    images, labels = images.to(device), labels.to(device)
    print(f"Closed-set diffusion throughput ({args.unet} UNet, random weights)")
    print(f"  machine: {common.machine(device)}")
    print(f"  parameters: unet {params['unet'] / 1e6:.2f}M; built in {build_s:.1f} s")
    print(
        f"  seeds: {args.dataset} {tuple(images.shape)} -> {resolution} px, {len(context.class_names)} classes, "
        f"{args.sampler} {args.steps} steps, no guidance, k={args.ratio}, {args.seeds_per_pass} seeds, "
        f"{args.repeats} timed repeat(s), warm-up excluded"
    )
    results = []
    for mode in ("per_seed", "batched"):
        results.append(measure(mode, unet, images, labels, context, args))
        print(common.result_line("closed_set", results[-1]), flush=True)
    speedup = results[1]["images_per_s"] / results[0]["images_per_s"]
    print(f"  closed_set: batched / per-seed = {speedup:.2f}x")
    fit_images, fit_labels, _ = common.load_seeds(args.data.expanduser(), args.dataset, args.fit_batch)
    fit = measure_fit(unet, fit_images, fit_labels, device, args)
    mfu = f", MFU {100 * fit['mfu']:.2f} %" if fit["mfu"] is not None else ""
    print(
        f"  fit ({fit['dtype']}): batch {fit['batch_size']}, {fit['seconds_per_step']:.3f} s/step = "
        f"{fit['train_images_per_s']:.1f} training images/s, {fit['flops_per_step'] / 1e9:.1f} GFLOP/step, "
        f"{fit['achieved_tflops'] * 1e3:.2f} GFLOP/s{mfu}"
    )
    return common.write_report(
        args, device, params, build_s, results, speedup, benchmark="closed_set_diffusion", extra={"fit": fit}
    )


if __name__ == "__main__":
    main()
