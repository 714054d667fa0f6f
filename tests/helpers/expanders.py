"""Expanders for tests: deterministic, cheap, and (SlowShift) slow enough to be killed mid-run."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from expansion.base import Expander, ExpansionOutput
from expansion.seeding import per_image_rand
from expansion.settings import speed_only


@dataclass(frozen=True)
class NoiseShiftSettings:
    amplitude: float = 20.0
    delay: float = speed_only(0.0)  # seconds of sleep per batch: slow enough to be killed


class NoiseShift(Expander):
    """Adds per-image seeded uniform noise of amplitude ``amplitude`` (0-255 scale)."""

    name = "noise_shift"
    settings_class = NoiseShiftSettings

    def expand(self, images, labels, seeds):
        if self.settings.delay:
            time.sleep(self.settings.delay)
        _, c, h, w = images.shape
        noise = per_image_rand(seeds, (c, h, w), device=images.device) * 2 - 1
        out = images[:, None].float() + self.settings.amplitude * noise
        return ExpansionOutput(out.round().clamp(0, 255).to(torch.uint8), {"noise_mean": noise.mean(dim=(2, 3, 4))})
