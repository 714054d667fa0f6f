"""RandAugment (Cubuk et al. 2020, arXiv 1909.13719) as an offline expansion method."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from expansion.base import Expander, ExpansionError, ExpansionOutput

from ._common import check_inputs


@dataclass(frozen=True)
class RandAugmentSettings:
    """num_ops ops per image at magnitude ``magnitude`` of ``num_magnitude_bins`` (torchvision's defaults)."""

    num_ops: int = 2
    magnitude: int = 9
    num_magnitude_bins: int = 31

    def __post_init__(self) -> None:
        if self.num_ops < 0:
            raise ExpansionError(f"randaugment: num_ops must be >= 0, got {self.num_ops}")
        if self.num_magnitude_bins < 2 or not 0 <= self.magnitude < self.num_magnitude_bins:
            raise ExpansionError(
                "randaugment: need 0 <= magnitude < num_magnitude_bins (>= 2), got "
                f"{self.magnitude}, {self.num_magnitude_bins}"
            )


@contextmanager
def _single_thread(active: bool):
    """Run tiny per-image CPU ops on one intra-op thread (restored afterwards).

    Waking the intra-op thread pool for each 32 x 32 op costs far more than the
    op itself (measured 20 ms vs 0.1 ms per image on a busy 2-core machine); the
    output does not depend on the thread count.
    """
    if not active:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _RecordingRandAugment(v2.RandAugment):
    """torchvision's RandAugment that also records the ops it applied.

    Recording hooks a private method; if torchvision renames it, nothing is
    recorded and the expander simply emits no op field.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.applied: list[str] = []

    def _apply_image_or_video_transform(self, image, transform_id, magnitude, *args, **kwargs):
        self.applied.append(f"{transform_id}:{magnitude:.4g}")
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, *args, **kwargs)


class RandAugment(Expander):
    """``torchvision.transforms.v2.RandAugment`` applied offline, ``ratio`` copies per seed.

    Setting implemented (GIF paper baseline): ``num_ops = 2`` ops per image at
    ``magnitude = 9`` of ``num_magnitude_bins = 31`` (torchvision defaults),
    nearest interpolation, fill 0, on uint8 tensors with 1 or 3 channels.

    v2 transforms draw from torch's global RNG, so each output image ``(b, j)``
    is produced inside ``torch.random.fork_rng(devices=[])`` after
    ``torch.manual_seed(seeds[b, j])``: the result depends on that seed alone
    and the caller's RNG state is left untouched. RandAugment picks its ops per
    call, so the loop is per image (the library op is inherently per-image).

    Manifest field: ``randaugment_ops`` -- the applied ops as
    ``"Name:magnitude|Name:magnitude"`` (signed magnitude, torchvision units).
    """

    name = "randaugment"
    settings_class = RandAugmentSettings

    def __init__(self, ratio: int, **settings: Any) -> None:
        super().__init__(ratio, **settings)
        s = self.settings
        self.transform = _RecordingRandAugment(
            num_ops=s.num_ops, magnitude=s.magnitude, num_magnitude_bins=s.num_magnitude_bins
        )

    @torch.no_grad()
    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        B, k = check_inputs(self.name, images, seeds)
        if images.shape[1] not in (1, 3):
            raise ExpansionError(f"randaugment: expected 1 or 3 channels, got {images.shape[1]}")
        flat_seeds = seeds.reshape(-1).tolist()
        outs: list[torch.Tensor] = []
        ops: list[str] = []
        with torch.random.fork_rng(devices=[]), _single_thread(images.device.type == "cpu"):
            for i, seed in enumerate(flat_seeds):
                torch.manual_seed(int(seed))
                self.transform.applied = []
                outs.append(self.transform(images[i // k]))
                ops.append("|".join(self.transform.applied))
        out = torch.stack(outs).reshape(B, k, *images.shape[1:]) if outs else images.new_empty(B, k, *images.shape[1:])
        fields: dict[str, Any] = {}
        if self.transform.num_ops == 0 or all(ops):
            fields["randaugment_ops"] = ops
        return ExpansionOutput(images=out.contiguous(), fields=fields)
