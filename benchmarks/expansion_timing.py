"""The timing loop shared by the generation benchmarks: one untimed warm-up call whose FLOPs are
counted, then ``repeats`` timed passes over the same expand calls, synchronised on CUDA."""

from __future__ import annotations

import time
from typing import Any

import torch

from benchmarks.flops import count_flops, describe, gpu_peak_tflops, utilisation
from expansion.seeding import image_seeds


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seed_calls(mode: str, images: torch.Tensor, labels: torch.Tensor, k: int) -> list[tuple]:
    """The expand calls of one repeat, (images, labels, seeds): every seed with its k image seeds in
    one call (``batched``) or one call per seed (the per-seed loop of the official scripts)."""
    n = images.shape[0]
    seeds = image_seeds(0, range(n), k)
    if mode == "batched":
        return [(images, labels, seeds)]
    return [(images[b : b + 1], labels[b : b + 1], seeds[b : b + 1]) for b in range(n)]


def time_expand_calls(
    expander,
    calls: list[tuple],
    device: torch.device,
    repeats: int,
    kept_images: int,
    peak_override: float | None = None,
    count: bool = True,
) -> dict[str, Any]:
    """Time ``repeats`` passes of ``expander.expand(*call)`` over ``calls``; the figures of a result row.

    ``kept_images``: the images a repeat delivers (images/s counts these); every generated image's work
    counts for the achieved FLOP rate (a loop that generates more than it keeps is charged for it).
    ``count=False`` skips the warm-up call and the FLOP count."""
    flops_per_image = None
    if count:  # warm-up (casts the weights, allocator, kernels): not timed; its FLOPs are counted
        warm, flops = count_flops(lambda: expander.expand(*calls[0]))
        flops_per_image = flops / (warm.images.shape[0] * warm.images.shape[1])
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, generated = [], 0
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        for call in calls:
            out = expander.expand(*call)
            generated += out.images.shape[0] * out.images.shape[1]
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = sum(times)
    images = repeats * kept_images
    peak, _ = gpu_peak_tflops(device, peak_override)
    return {
        "seeds_per_call": list(calls[0][2].shape),
        "calls_per_repeat": len(calls),
        "repeats": repeats,
        "images": images,
        "images_generated": generated,
        "seconds": seconds,
        "seconds_per_repeat": times,
        "images_per_s": images / seconds,
        "peak_gpu_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "output_shape": list(out.images.shape[2:]),
        "flops_per_image": flops_per_image,
        **utilisation(flops_per_image, generated / seconds, peak),
    }


def result_line(label: str, row: dict[str, Any]) -> str:
    """One printed line for a result row of :func:`time_expand_calls` (plus ``mode`` and ``dtype``)."""
    shape = "x".join(map(str, row["seeds_per_call"]))
    peak = f", peak GPU {row['peak_gpu_gib']:.2f} GiB" if row["peak_gpu_gib"] is not None else ""
    extra = f" ({row['images_generated']} generated)" if row["images_generated"] != row["images"] else ""
    group = f", group_size {row['group_size']}" if "group_size" in row else ""
    return (
        f"  {label:<10} {row['mode']:<8} {row['dtype']:<8} seeds [B,k]={shape:<5} x {row['calls_per_repeat']} "
        f"call(s){group}: {row['images_per_s']:.4f} img/s ({row['images']} images{extra} in "
        f"{row['seconds']:.2f} s{peak}){describe(row)}"
    )
