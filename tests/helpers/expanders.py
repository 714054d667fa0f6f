"""Expanders for tests: deterministic, cheap, and (SlowShift) slow enough to be killed mid-run."""

from __future__ import annotations

import time

import torch

from expansion.base import Expander, ExpansionOutput
from expansion.seeding import per_image_rand


class NoiseShift(Expander):
    """Adds per-image seeded uniform noise of amplitude ``amplitude`` (0-255 scale)."""

    name = "noise_shift"

    def __init__(self, ratio: int, amplitude: float = 20.0, delay: float = 0.0, batch_size: int = 8):
        super().__init__(ratio, amplitude=amplitude, delay=delay, batch_size=batch_size)
        self.amplitude = amplitude
        self.delay = delay

    def signature(self):
        sig = super().signature()
        sig.pop("delay")  # speed only
        return sig

    def expand(self, images, labels, seeds):
        if self.delay:
            time.sleep(self.delay)
        b, c, h, w = images.shape
        noise = per_image_rand(seeds, (c, h, w), device=images.device) * 2 - 1
        out = images[:, None].float() + self.amplitude * noise
        return ExpansionOutput(out.round().clamp(0, 255).to(torch.uint8),
                               {"noise_mean": noise.mean(dim=(2, 3, 4))})
