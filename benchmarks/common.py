"""What the timing scripts share: where the seed images come from, the machine's name, the options every
generation benchmark takes and its JSON report, the timing loop (one untimed warm-up call whose FLOPs are
counted, then ``repeats`` timed passes over the same expand calls, synchronised on CUDA), and FLOPs and model
FLOP utilisation (MFU).

FLOPs are what ``torch.utils.flop_counter.FlopCounterMode`` counts for the call: matrix multiplications,
convolutions and attention (forward and backward), 2 FLOPs per multiply-add; element-wise work is not counted,
as usual for MFU. MFU = counted FLOPs per second / the GPU's dense bf16/fp16 tensor-core peak, whatever dtype a
mode runs in (so an fp32 loop shows how far it is from what the chip can do). A CPU has no such peak here: its
figures are achieved GFLOP/s only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils import flop_counter

from expansion.base import ExpansionContext
from expansion.seeding import image_seeds

ROOT = Path(__file__).resolve().parents[1]

DATASETS = {
    # name: (context kwargs, where the seeds are under --data)
    "cifar10": {"channels": 3, "prompt_prefix": None},
    "breastmnist": {
        "channels": 1,
        "prompt_prefix": "Ultrasound image of",
        "class_names": ["malignant", "normal, benign"],
    },
}


# -- seed images ---------------------------------------------------------------------------------
def load_seeds(data_root: Path, dataset: str, n: int) -> tuple[torch.Tensor, torch.Tensor, ExpansionContext]:
    """``n`` real training images (uint8 [n, C, H, W]), their labels, and the dataset context."""
    spec = DATASETS[dataset]
    if dataset == "cifar10":
        from PIL import Image

        folder = data_root / "cifar10_subset" / "train"
        if not folder.is_dir():
            raise SystemExit(f"CIFAR-10 subset not found at {folder}; pass --data (the shared data folder)")
        class_names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        files = {c: sorted((folder / c).glob("*.jpg")) for c in class_names}
        images, labels = [], []
        for i in range(n):  # round-robin over the classes
            c = i % len(class_names)
            with Image.open(files[class_names[c]][i // len(class_names)]) as im:
                images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
            labels.append(c)
        x, y = torch.stack(images), torch.tensor(labels, dtype=torch.long)
    else:
        path = data_root / "medmnist" / "breastmnist.npz"
        if not path.is_file():
            raise SystemExit(f"BreastMNIST not found at {path}; pass --data (the shared data folder)")
        data = np.load(path)
        idx = np.arange(n) % len(data["train_images"])
        x = torch.from_numpy(data["train_images"][idx])[:, None]
        y = torch.from_numpy(data["train_labels"][idx, 0].astype(np.int64))
        class_names = spec["class_names"]
    context = ExpansionContext(
        dataset_name=dataset,
        class_names=list(class_names),
        channels=spec["channels"],
        image_size=int(x.shape[-1]),
        prompt_prefix=spec["prompt_prefix"],
    )
    return x, y, context


# -- measurement ---------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name += f", {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} CPUs"
    return f"{name}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")


def generation_parser(doc: str, *, seeds_per_pass: tuple[int, int], per_seed: str) -> argparse.ArgumentParser:
    """A generation benchmark's parser with ``--device`` and the batch it times: ``--seeds-per-pass`` (its
    defaults on cuda and on cpu; ``per_seed``: the mode that goes through as many seeds one at a time) and
    ``--ratio``."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    cuda, cpu = seeds_per_pass
    help_text = f"seeds per batched call (default {cuda} on cuda, {cpu} on cpu); also the seeds {per_seed} goes through"
    p.add_argument("--seeds-per-pass", type=int, default=None, help=help_text)
    p.add_argument("--ratio", type=int, default=None, help="k images per seed (default 5 on cuda, 2 on cpu)")
    return p


def parse_for_device(p: argparse.ArgumentParser, argv: list[str] | None, **defaults: Any) -> argparse.Namespace:
    """``p``'s arguments; each one left at None takes its default for the chosen device (``defaults``: name ->
    ``(on cuda, on cpu)``; ``ratio`` and ``repeats`` 5/2 and 2/1 unless given); every defaulted count must be >= 1."""
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    defaults = {"ratio": (5, 2), "repeats": (2, 1), **defaults}
    for key, (cuda, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cuda if on_cuda else cpu)
    too_small = [key for key in defaults if isinstance(getattr(args, key), int) and getattr(args, key) < 1]
    if too_small:
        raise SystemExit(", ".join(f"--{key.replace('_', '-')}" for key in too_small) + " must be >= 1")
    return args


def print_header(
    title: str,
    what: str,
    device: torch.device,
    params: dict[str, int],
    build_seconds: float,
    expected: dict[str, int] | None = None,
) -> None:
    """The first lines of a generation benchmark's table: what was built, on which machine, its parameter
    counts (beside the released models' where ``expected`` gives them) and how long building took."""
    print(f"{title} throughput ({what})")
    print(f"  machine: {machine(device)}")
    counts = [
        f"{k} {v / 1e6:.1f}M" + (f" (expected {expected[k] / 1e6:.1f}M)" if expected and k in expected else "")
        for k, v in params.items()
    ]
    print(f"  parameters: {', '.join(counts)}; built in {build_seconds:.1f} s")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options every generation benchmark shares: repeats, where the seeds come from, the GPU
    peak for MFU and the JSON report."""
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (default 2 on cuda, 1 on cpu)")
    p.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), help="where the seed images come from")
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")),
        help="the shared data folder (cifar10_subset/, medmnist/)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak for MFU (default: looked up by device name, benchmarks/common.py)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")


def write_report(
    args, device, params, build_s: float, results: list, speedup, benchmark: str, extra: dict | None = None
) -> dict:
    """The figures of one benchmark run as a dict, also written to ``--json`` when given."""
    peak, peak_source = gpu_peak_tflops(device, getattr(args, "peak_tflops", None))
    report = {
        "benchmark": benchmark,
        "machine": machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d"),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "parameters": params,
        "build_seconds": build_s,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "results": results,
        "speedup": speedup,
        **(extra or {}),
    }
    print(f"  MFU against: {peak_source}" + (f" = {peak:.1f} TFLOP/s" if peak else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"  written to {args.json}")
    return report


# -- the timing loop ---------------------------------------------------------------------------------
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


# -- FLOPs and MFU -----------------------------------------------------------------------------------
#: dense (no sparsity) bf16/fp16 tensor-core peak in TFLOP/s by device-name fragment, most specific first
#: (NVIDIA data sheets; SXM parts unless named)
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200", 989.4),  # also GH200
    ("H100", 989.4),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("V100", 125.0),  # fp16 (no bf16)
    ("T4", 65.0),  # fp16 (no bf16)
)


def _register_cpu_attention() -> None:
    """The CPU flash-attention kernels have no FLOP formula in torch (they would count 0):
    count them as the CUDA ones (4 b h s_q s_k d forward, 2.5x that backward)."""
    aten = torch.ops.aten
    cpu_ops = {
        aten._scaled_dot_product_flash_attention_for_cpu: flop_counter.sdpa_flop,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: flop_counter.sdpa_backward_flop,
    }
    for op, formula in cpu_ops.items():
        if op not in flop_counter.flop_registry:
            flop_counter.register_flop_formula(op, get_raw=True)(formula)  # formula is already shape-wrapped


_register_cpu_attention()


def count_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """``fn()``'s result and the FLOPs it ran (not for timing: counting slows every op down)."""
    with flop_counter.FlopCounterMode(display=False) as counter:
        result = fn()
    return result, int(counter.get_total_flops())


def gpu_peak_tflops(device: torch.device, override: float | None = None) -> tuple[float | None, str]:
    """The peak MFU is measured against, and where it comes from; (None, why) when there is none."""
    if override is not None:
        return float(override), "--peak-tflops"
    if device.type != "cuda":
        return None, "no GPU peak for a CPU: MFU needs a GPU (or --peak-tflops)"
    name = torch.cuda.get_device_name(device)
    for fragment, peak in GPU_PEAK_TFLOPS:
        if fragment in name:
            return peak, f"{fragment} dense bf16/fp16 peak (data sheet)"
    return None, f"unknown GPU {name!r}: pass --peak-tflops for MFU"


def utilisation(flops_per_image: int | None, images_per_s: float, peak_tflops: float | None) -> dict[str, Any]:
    """Achieved TFLOP/s and MFU (None without a FLOP count or a peak)."""
    if flops_per_image is None:
        return {"achieved_tflops": None, "mfu": None}
    achieved = flops_per_image * images_per_s / 1e12
    return {"achieved_tflops": achieved, "mfu": achieved / peak_tflops if peak_tflops else None}


def describe(row: dict[str, Any]) -> str:
    """``"x GFLOP/img, y TFLOP/s, MFU z %"`` for a result row (empty without a FLOP count)."""
    if row.get("flops_per_image") is None:
        return ""
    text = f", {row['flops_per_image'] / 1e9:.1f} GFLOP/img, {row['achieved_tflops'] * 1e3:.2f} GFLOP/s"
    return text + (f", MFU {100 * row['mfu']:.2f} %" if row.get("mfu") is not None else "")
