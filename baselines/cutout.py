"""Cutout (DeVries & Taylor 2017, arXiv 1708.04552) as an offline expansion method."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expansion.base import Expander, ExpansionError, ExpansionOutput
from expansion.seeding import per_image_rand

from ._common import check_fill, check_inputs, uniform_int


@dataclass(frozen=True)
class CutoutSettings:
    """size: hole side as a fraction of the image side (GIF paper: 0.5); fill: the hole's value."""

    size: float = 0.5
    fill: int = 0

    def __post_init__(self) -> None:
        if not math.isfinite(self.size) or self.size < 0:
            raise ExpansionError(f"cutout: size must be a fraction >= 0 of the image side, got {self.size!r}")
        check_fill("cutout", self.fill)


class Cutout(Expander):
    """One square hole per image, filled with ``fill`` (paper: 0).

    Setting implemented (DeVries & Taylor 2017, official code): the hole centre
    ``(cy, cx)`` is drawn uniformly over all pixel positions, so the hole may
    extend past the border, where it is clipped; the side is
    ``s = round(size * min(H, W))`` (round half up; GIF paper setting
    ``size = 0.5``). The hole covers rows ``[cy - s // 2, cy - s // 2 + s)`` and
    the matching columns, so it is exactly ``s x s`` when fully inside (the
    official code uses ``cy +- s // 2``, one pixel short for odd ``s``).
    The hole is the same for every channel.

    Randomness: the two centre coordinates of output image ``(b, j)`` come from
    ``seeds[b, j]`` alone; the masking is one vectorised op over ``[B*k, H, W]``.

    Manifest fields: ``cutout_cy``, ``cutout_cx`` (hole centre, pixels) and
    ``cutout_size`` (side ``s`` in pixels before clipping).
    """

    name = "cutout"
    settings_class = CutoutSettings

    def hole_side(self, height: int, width: int) -> int:
        return math.floor(self.settings.size * min(height, width) + 0.5)

    @torch.no_grad()
    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        B, k = check_inputs(self.name, images, seeds)
        _, C, H, W = images.shape
        device = images.device
        s = self.hole_side(H, W)

        u = per_image_rand(seeds, (2,), device=device)  # [B, k, 2]
        cy = uniform_int(u[..., 0], H)  # [B, k]
        cx = uniform_int(u[..., 1], W)

        y0 = (cy - s // 2).reshape(-1, 1, 1)  # [N,1,1]
        x0 = (cx - s // 2).reshape(-1, 1, 1)
        ys = torch.arange(H, device=device).view(1, H, 1)
        xs = torch.arange(W, device=device).view(1, 1, W)
        hole = (ys >= y0) & (ys < y0 + s) & (xs >= x0) & (xs < x0 + s)  # [N, H, W]

        out = images.unsqueeze(1).expand(B, k, C, H, W).reshape(B * k, C, H, W)
        fill = torch.tensor(self.settings.fill, dtype=torch.uint8, device=device)
        out = torch.where(hole.unsqueeze(1), fill, out).reshape(B, k, C, H, W)

        fields = {
            "cutout_cy": cy.cpu(),
            "cutout_cx": cx.cpu(),
            "cutout_size": torch.full((B, k), s, dtype=torch.int64),
        }
        return ExpansionOutput(images=out, fields=fields)
