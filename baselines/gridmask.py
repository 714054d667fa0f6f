"""GridMask (Chen et al. 2020, arXiv 2001.04086) as an offline expansion method."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from expansion.base import Expander, ExpansionError, ExpansionOutput
from expansion.seeding import per_image_rand

from ._common import check_fill, check_inputs, uniform_int


@dataclass(frozen=True)
class GridMaskSettings:
    """d_min, d_max: the unit size d ~ U[d_min, d_max] x min(H, W) (integer pixels >= 2); keep_ratio: r,
    the kept band l = ceil(r d); max_rotation: the grid's angle ~ U[0, max_rotation] degrees; fill: dropped value."""

    d_min: float = 0.4
    d_max: float = 1.0
    keep_ratio: float = 0.6
    max_rotation: float = 0.0
    fill: int = 0

    def __post_init__(self) -> None:
        if not (0 < self.d_min <= self.d_max):
            raise ExpansionError(
                f"gridmask: need 0 < d_min <= d_max (fractions of the image side), got {self.d_min}, {self.d_max}"
            )
        if not 0 < self.keep_ratio <= 1:
            raise ExpansionError(f"gridmask: keep_ratio must be in (0, 1], got {self.keep_ratio}")
        if self.max_rotation < 0:
            raise ExpansionError(f"gridmask: max_rotation must be >= 0 degrees, got {self.max_rotation}")
        check_fill("gridmask", self.fill)


class GridMask(Expander):
    r"""Drop a regular grid of squares (Chen et al. 2020), our own tensor implementation.

    Setting implemented: the official code's ``mode=1`` (the variant used in the
    paper's experiments), where a unit of side ``d`` keeps a band of length
    ``l`` along each axis and drops the remaining ``(d - l) x (d - l)`` square.
    Per output image, from its own seed:

    * unit size ``d`` -- an integer drawn uniformly from
      ``[max(2, ceil(d_min * S)), max(that, floor(d_max * S))]``, ``S = min(H, W)``
      (the paper's ``d ~ U[d1, d2]`` with ``d1, d2`` given as fractions of the side);
    * kept band length ``l = ceil(keep_ratio * d)`` (the paper's ``r``; computed as
      ``ceil(r * d - 1e-9)`` so that e.g. 0.6 * 5 gives 3, not 4);
    * offsets ``dy, dx`` -- integers uniform in ``[0, d)``;
    * angle ``theta`` uniform in ``[0, max_rotation]`` degrees (0 = no rotation).

    With the image centre ``(c_y, c_x) = ((H - 1) / 2, (W - 1) / 2)`` the grid is
    rotated by rotating the pixel coordinates (the image itself is not resampled):

    .. math::

        u &= c_y + (y - c_y)\cos\theta + (x - c_x)\sin\theta \\
        v &= c_x - (y - c_y)\sin\theta + (x - c_x)\cos\theta \\
        \mathrm{keep}(y, x) &= \big[(u - d_y) \bmod d < l\big] \;\lor\; \big[(v - d_x) \bmod d < l\big]

    A pixel is kept (unchanged) if it lies in the band of its row OR of its
    column; every other pixel is set to ``fill`` in all channels. For
    ``theta = 0`` the expected dropped fraction over the offsets is exactly
    ``E_d[((d - l) / d)^2]`` ~= ``(1 - r)^2``, i.e. the kept fraction is
    ``1 - (1 - r)^2`` (0.84 for the default r = 0.6).

    Everything after the few per-image draws is one broadcast over
    ``[B*k, H, W]`` (coordinates ``[H, W]``, parameters ``[N, 1, 1]``).

    Manifest fields: ``grid_d``, ``grid_dx``, ``grid_dy`` (pixels) and
    ``grid_angle`` (degrees).
    """

    name = "gridmask"
    settings_class = GridMaskSettings

    def unit_range(self, height: int, width: int) -> tuple[int, int]:
        """Inclusive integer range of the unit size ``d`` for an ``H x W`` image."""
        side = min(height, width)
        lo = max(2, math.ceil(self.settings.d_min * side - 1e-9))
        hi = max(lo, math.floor(self.settings.d_max * side + 1e-9))
        return lo, hi

    def band(self, d: torch.Tensor) -> torch.Tensor:
        """Kept band length ``l = ceil(keep_ratio * d)`` (int64, same shape as ``d``)."""
        return torch.ceil(d.double() * self.settings.keep_ratio - 1e-9).long().clamp(1)

    def masks(self, seeds: torch.Tensor, height: int, width: int, device: torch.device | str = "cpu"):
        """Keep-masks ``[N, H, W]`` (bool, N = seeds.numel()) and their parameters ``[N]``."""
        lo, hi = self.unit_range(height, width)
        u = per_image_rand(seeds.reshape(-1), (4,))  # [N, 4], drawn on the CPU
        d = lo + uniform_int(u[:, 0], hi - lo + 1)
        dy = uniform_int(u[:, 1], d)
        dx = uniform_int(u[:, 2], d)
        angle = u[:, 3].double() * self.settings.max_rotation
        band = self.band(d)
        params = {"d": d, "dx": dx, "dy": dy, "angle": angle}

        d_, l_ = d.to(device).view(-1, 1, 1), band.to(device).view(-1, 1, 1)
        dy_, dx_ = dy.to(device).view(-1, 1, 1), dx.to(device).view(-1, 1, 1)
        if self.settings.max_rotation == 0:
            # Exact integer path: rows and columns are separable.
            ys = torch.arange(height, device=device).view(1, height, 1)
            xs = torch.arange(width, device=device).view(1, 1, width)
            keep = (torch.remainder(ys - dy_, d_) < l_) | (torch.remainder(xs - dx_, d_) < l_)
        else:
            theta = torch.deg2rad(angle)
            cos = torch.cos(theta).float().to(device).view(-1, 1, 1)
            sin = torch.sin(theta).float().to(device).view(-1, 1, 1)
            cy, cx = (height - 1) / 2.0, (width - 1) / 2.0
            ys = (torch.arange(height, device=device, dtype=torch.float32) - cy).view(1, height, 1)
            xs = (torch.arange(width, device=device, dtype=torch.float32) - cx).view(1, 1, width)
            uu = cy + ys * cos + xs * sin  # [N, H, W]
            vv = cx - ys * sin + xs * cos
            d_f, l_f = d_.float(), l_.float()
            keep = (torch.remainder(uu - dy_.float(), d_f) < l_f) | (torch.remainder(vv - dx_.float(), d_f) < l_f)
        return keep, params

    @torch.no_grad()
    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        B, k = check_inputs(self.name, images, seeds)
        _, C, H, W = images.shape
        keep, p = self.masks(seeds, H, W, device=images.device)  # [N, H, W]

        out = images.unsqueeze(1).expand(B, k, C, H, W).reshape(B * k, C, H, W)
        fill = torch.tensor(self.settings.fill, dtype=torch.uint8, device=images.device)
        out = torch.where(keep.unsqueeze(1), out, fill).reshape(B, k, C, H, W)

        fields = {
            "grid_d": p["d"].view(B, k),
            "grid_dx": p["dx"].view(B, k),
            "grid_dy": p["dy"].view(B, k),
            "grid_angle": p["angle"].view(B, k),
        }
        return ExpansionOutput(images=out, fields=fields)
