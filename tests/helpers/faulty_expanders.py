"""Expanders that fail on purpose, for the fault and bad-input tests: a generator that emits
NaN/inf, a guide whose gradient is not finite, a job that receives a signal mid-expansion.
Each behaves like a sound expander for the parents before ``first_bad_parent``."""

from __future__ import annotations

import os

import torch

from expansion.base import Expander, ExpansionOutput, to_uint8
from expansion.guidance import GuidanceSettings, criteria, guided_perturbation, sample_groups
from expansion.seeding import per_image_rand


def _noisy(images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """float ``[B, k, C, H, W]`` in 0..255: each seed image plus its own seeded noise."""
    noise = per_image_rand(seeds, images.shape[1:], device=images.device) * 40 - 20
    return images[:, None].float() + noise


class NonFiniteGenerator(Expander):
    """From its batch ``first_bad_batch`` (0-based) on, the generator's pixels are ``value`` (nan or inf)."""

    name = "non_finite_generator"

    def __init__(self, ratio: int, first_bad_batch: int = 0, value: float = float("nan")):
        super().__init__(ratio)  # the fault is not a setting of the sound output
        self.first_bad_batch, self.value, self.calls = first_bad_batch, value, 0

    def expand(self, images, labels, seeds):
        out = _noisy(images, seeds)
        if self.calls >= self.first_bad_batch:
            out[:, :, :, :2, :2] = self.value  # a few diverged pixels are enough
        self.calls += 1
        return ExpansionOutput(to_uint8(out, value_range=(0, 255)))


class NonFiniteGuide(Expander):
    """GIF's guided perturbation (expansion.guidance) with a guide whose logits become inf
    from batch ``first_bad_batch`` on, so the guidance gradient is not finite."""

    name = "non_finite_guide"
    needs_grad = True

    def __init__(self, ratio: int, first_bad_batch: int = 0):
        super().__init__(ratio)
        self.first_bad_batch, self.calls = first_bad_batch, 0
        self.guidance = GuidanceSettings(n_steps=1, step_size=0.1)

    def expand(self, images, labels, seeds):
        b, k = seeds.shape
        broken = self.calls >= self.first_bad_batch
        self.calls += 1
        z0 = _noisy(images, seeds).flatten(0, 1) / 255.0
        groups = sample_groups(b, k, None)
        e = per_image_rand(seeds, (z0.shape[1], 1, 1)).flatten(0, 1) * 0.1
        bias = torch.zeros_like(e)

        def score(z):
            mean = z.mean(dim=(1, 2, 3))
            logits = torch.stack([mean, -mean], dim=1) * (float("inf") if broken else 1.0)
            probs = logits.softmax(-1)
            return criteria(probs.detach(), probs, z.flatten(1), groups, self.guidance)

        result = guided_perturbation(z0, e, bias, score, self.guidance, radius=0.5)
        return ExpansionOutput(to_uint8(result.latents.reshape(b, k, *z0.shape[1:]).clamp(0, 1)))


class SignalAtBatch(Expander):
    """Sends ``signum`` to its own process while expanding batch ``batch`` (0-based), then
    finishes that batch normally: what a preemption notice in the middle of generation looks like."""

    name = "signal_at_batch"

    def __init__(self, ratio: int, batch: int = 1, signum: int = 10):
        super().__init__(ratio)
        self.batch, self.signum, self.calls = batch, signum, 0

    def expand(self, images, labels, seeds):
        if self.calls == self.batch:
            os.kill(os.getpid(), self.signum)
        self.calls += 1
        return ExpansionOutput(to_uint8(_noisy(images, seeds), value_range=(0, 255)))
