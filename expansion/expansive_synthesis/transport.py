"""Optimal-transport distances between point clouds (Expansive Synthesis, step 5), on POT.

``ot_distance(x, y, kind)`` for ``x [n, m]`` and ``y [n', m]`` with uniform weights and the
squared Euclidean cost divided by the dimension ``m`` (so scales do not grow with m):

* ``sinkhorn`` (default): the debiased Sinkhorn divergence
  ``S(x, y) = W_e(x, y) - W_e(x, x) / 2 - W_e(y, y) / 2`` (Genevay et al. 2018), with
  ``W_e`` the entropic OT cost (``ot.sinkhorn2``) at ``reg = blur * mean cost``. Unlike
  ``W_e`` itself it is 0 for identical sets, positive otherwise, and smooth.
* ``emd``: the exact squared 2-Wasserstein distance (``ot.emd2``, network simplex).
* ``sliced``: the sliced 2-Wasserstein distance, squared (``ot.sliced_wasserstein_distance``
  over ``n_projections`` random unit directions drawn from ``seed``; a projection onto a unit
  direction already has the scale of one coordinate, so it is not divided by ``m``).

All three accept torch tensors and are differentiable in ``x`` and ``y`` (POT's torch backend).
"""

from __future__ import annotations

import torch

from ..errors import ExpansionError

KINDS = ("sinkhorn", "emd", "sliced")


def _uniform(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((n,), 1.0 / n, dtype=like.dtype, device=like.device)


def _cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # the exact (not matrix-product) distance, so that a point's cost to itself is exactly 0
    return torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").pow(2) / x.shape[1]


def _pot():
    """POT, imported when a distance is computed (not when the method is configured)."""
    import ot

    return ot


def _entropic(x: torch.Tensor, y: torch.Tensor, reg: float, iterations: int) -> torch.Tensor:
    cost = _cost(x, y)
    return _pot().sinkhorn2(
        _uniform(len(x), x), _uniform(len(y), y), cost, reg, method="sinkhorn_log", numItermax=iterations, stopThr=1e-7
    )


def ot_distance(
    x: torch.Tensor,
    y: torch.Tensor,
    kind: str = "sinkhorn",
    *,
    blur: float = 0.05,
    iterations: int = 200,
    n_projections: int = 128,
    seed: int = 0,
) -> torch.Tensor:
    """OT distance between the empirical distributions of the rows of ``x`` and ``y`` (module doc)."""
    if kind not in KINDS:
        raise ExpansionError(f"optimal transport kind must be one of {KINDS}, got {kind!r}")
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1] or not len(x) or not len(y):
        raise ExpansionError(
            f"ot_distance expects non-empty [n, m] and [n', m] point sets, got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    x, y = x.float(), y.float()
    if kind == "emd":
        return _pot().emd2(_uniform(len(x), x), _uniform(len(y), y), _cost(x, y))
    if kind == "sliced":
        return _pot().sliced_wasserstein_distance(x, y, n_projections=n_projections, p=2, seed=seed).pow(2)
    # one regularisation for the three terms, from the cross cost (not differentiated through)
    reg = float(blur * _cost(x, y).mean().detach().clamp_min(1e-12))
    return (
        _entropic(x, y, reg, iterations)
        - 0.5 * _entropic(x, x, reg, iterations)
        - 0.5 * _entropic(y, y, reg, iterations)
    )
