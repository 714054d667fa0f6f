"""What "the same result" means when a float computation runs with another batch size,
thread count or CPU, stated once for every test that compares such results.

Per-image seeds make every random draw identical whatever the batch size (tests compare
those exactly). The float work around them is not bitwise reproducible: BLAS and oneDNN
block a batch of 1 and a batch of 4 differently, and split sums over threads, so float32
results may differ in their last bits (measured on a 2-core Intel Xeon, tiny GIF-SD,
batch 6 vs 1 x 6: scores differ by at most 8.3e-7 with one and with two threads, about
7 float32 ulps at 1.1).
"""

from __future__ import annotations

import math

import torch

#: float32 accumulation over O(1) terms (the GIF criteria sum entropies, probabilities and KLs of
#: size <= log K): 1e-5 is ~80 float32 ulps at 1, over 10x the differences measured
FLOAT32_ABS = 1e-5
#: the manifest stores floats to 6 significant digits (expansion.engine._round_float): two values
#: a few ulps apart may round to neighbours, one unit of the 6th digit apart (<= 1e-5 of the value)
MANIFEST_REL = 1e-5


def scores_close(a: float, b: float, *, stored: bool = False) -> bool:
    """``a`` and ``b`` agree to float32 accumulation of O(1) terms, plus, when ``stored`` (read
    back from a manifest), one unit of the 6th significant digit."""
    tolerance = FLOAT32_ABS + (MANIFEST_REL * max(abs(a), abs(b)) if stored else 0.0)
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= tolerance


def all_scores_close(a: list[float], b: list[float], *, stored: bool = False) -> bool:
    return len(a) == len(b) and all(scores_close(x, y, stored=stored) for x, y in zip(a, b))


def same_up_to_float_rounding(a: torch.Tensor, b: torch.Tensor, max_fraction: float = 0.01) -> bool:
    """uint8 images that agree up to float rounding: a float difference of ~1e-6 can move a pixel
    across a grey-level boundary, so a rare pixel may differ by one level; nothing else may differ."""
    if a.shape != b.shape:
        return False
    diff = (a.int() - b.int()).abs()
    return int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= max_fraction
