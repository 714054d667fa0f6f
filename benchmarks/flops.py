"""FLOPs of a call (``torch.utils.flop_counter``) and model FLOP utilisation (MFU) against a GPU's peak.

FLOPs are what ``FlopCounterMode`` counts for the call: matrix multiplications, convolutions
and attention (forward and backward), 2 FLOPs per multiply-add; element-wise work is not
counted, as usual for MFU. MFU = counted FLOPs per second / the GPU's dense bf16/fp16
tensor-core peak, whatever dtype a mode runs in (so an fp32 loop shows how far it is from
what the chip can do). A CPU has no such peak here: its figures are achieved GFLOP/s only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils import flop_counter

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
