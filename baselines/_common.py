"""Small helpers shared by the baselines."""

from __future__ import annotations

import torch

from expansion.base import ExpansionError


def check_inputs(name: str, images: torch.Tensor, seeds: torch.Tensor) -> tuple[int, int]:
    """Validate ``images`` uint8 [B,C,H,W] and ``seeds`` [B,k]; return (B, k)."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ExpansionError(f"{name}: expected uint8 images [B, C, H, W], got {images.dtype} {tuple(images.shape)}")
    if seeds.ndim != 2 or seeds.shape[0] != images.shape[0]:
        raise ExpansionError(f"{name}: expected seeds [B, k] with B={images.shape[0]}, got {tuple(seeds.shape)}")
    return int(seeds.shape[0]), int(seeds.shape[1])


def check_fill(name: str, fill: int) -> int:
    fill_int = int(fill)
    if fill_int != fill or not 0 <= fill_int <= 255:
        raise ExpansionError(f"{name}: fill must be an integer in [0, 255] (uint8), got {fill!r}")
    return fill_int


def uniform_int(u: torch.Tensor, n: torch.Tensor | int) -> torch.Tensor:
    """Map uniforms ``u`` in [0, 1) to integers uniform in ``[0, n)`` (int64).

    Done in float64 so that ``u * n`` never rounds up to ``n``; clamped anyway.
    """
    n_t = torch.as_tensor(n, dtype=torch.float64, device=u.device)
    out = torch.floor(u.double() * n_t).long()
    return torch.minimum(out, n_t.long() - 1).clamp_min(0)
