"""The Koopman-style linear operator of Expansive Synthesis (arXiv 2406.17238, step 3) and its
optimal-transport-regularised fit (step 5).

The paper frames expansion as moving in a latent space where the data's (non-linear) structure
is captured by a LINEAR operator. Here the "dynamics" is the walk along each class's expander
graph: the Koopman operator ``K`` (acting on flattened latent features ``y``, dimension m) is the
best linear one-step model of that walk, ``K y_i ~ y_j`` for every directed edge ``i -> j`` within
a class -- dynamic mode decomposition with the graph's edges as snapshot pairs. A new latent is
made by linear operations only: an interpolation along an edge followed by a fraction ``tau`` of
one Koopman step,

    y_mix = (1 - t) y_i + t y_j,        y_new = y_mix + tau (K y_mix - y_mix).

Fit (:func:`fit_koopman`, Adam on ``K = I + Delta``; ``Delta`` full, or ``U V^T`` of rank r):

    L(K) = w_dyn * D(K) / D(I)  +  w_ot * T(K) / T(I)  +  w_id * |Delta|_F^2 / m

    D(K) = mean_edges |K y_i - y_j|^2 / m                          (Koopman / DMD fit of the walk)
    T(K) = mean_classes OT({y_new of class c}, {y of class c})     (the OT regulariser)

with fresh random edge mixes (t ~ U(mix_range)) and fresh OT projections every step. Each term
is divided by its value at ``K = I`` so that the weights are scale-free ratios. Why the OT term
matters: interpolations shrink a class's spread towards its inside (a mix of two points is
never outside their segment), so the mixes alone are a narrower distribution than the class;
the OT term asks the Koopman step to give that spread back. The dynamics term alone would do
the opposite (one step of the walk averages neighbours), hence its small default weight; the
ridge keeps ``K`` near the identity where the data say nothing (m can exceed the number of
samples).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..base import ExpansionError
from ..progress import ProgressLog
from .transport import ot_distance

log = logging.getLogger(__name__)


class KoopmanOperator(nn.Module):
    """``K = I + Delta`` on ``[N, m]`` row vectors; ``Delta`` full (``rank=None``) or ``U V^T``."""

    def __init__(self, dim: int, rank: int | None = None):
        super().__init__()
        self.dim, self.rank = int(dim), rank
        if rank is None:
            self.delta = nn.Parameter(torch.zeros(dim, dim))
        else:
            if not 1 <= int(rank) <= dim:
                raise ExpansionError(f"Koopman rank must be in [1, {dim}] or null (full), got {rank}")
            self.u = nn.Parameter(torch.zeros(dim, int(rank)))
            self.v = nn.Parameter(torch.randn(dim, int(rank), generator=torch.Generator().manual_seed(0)) / dim**0.5)

    def delta_matrix(self) -> torch.Tensor:
        return self.delta if self.rank is None else self.u @ self.v.T

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + y @ self.delta_matrix().T

    def step(self, y: torch.Tensor, tau: float) -> torch.Tensor:
        """``y + tau (K y - y)``: a fraction ``tau`` of one step along the linear dynamics."""
        return y + tau * (y @ self.delta_matrix().T)


@dataclass
class KoopmanFit:
    """The fitted operator and what the fit measured (written to the fit report)."""

    operator: KoopmanOperator
    losses: list[float] = field(default_factory=list)
    ot_identity: float = 0.0  # mean per-class OT of the expanded latents with K = I (no Koopman step)
    ot_fitted: float = 0.0  # the same with the fitted K (same mixes)
    dynamics_identity: float = 0.0  # edge loss of K = I
    dynamics_fitted: float = 0.0


def edge_index(neighbours: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Directed edges ``(src, dst)`` of the (global-index) neighbour lists."""
    src = [i for i, nbrs in enumerate(neighbours) for _ in nbrs]
    dst = [j for nbrs in neighbours for j in nbrs]
    return torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)


def random_mixes(
    features: torch.Tensor, neighbours: list[list[int]], mix_range: tuple[float, float], generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """One edge mix per sample: a random neighbour j of i and ``t ~ U(mix_range)``; returns
    ``(y_mix [N, m], j [N])``."""
    n = len(neighbours)
    degree = torch.tensor([len(nb) for nb in neighbours])
    pick = (torch.rand(n, generator=generator) * degree).long().clamp_max(degree - 1)
    j = torch.tensor([neighbours[i][int(pick[i])] for i in range(n)], dtype=torch.long)
    lo, hi = mix_range
    t = lo + (hi - lo) * torch.rand(n, 1, generator=generator)
    return (1 - t) * features + t * features[j], j


def fit_koopman(
    features: torch.Tensor,
    labels: torch.Tensor,
    neighbours: list[list[int]],
    *,
    rank: int | None = 16,
    steps: int = 200,
    lr: float = 1e-3,
    tau: float = 0.5,
    mix_range: tuple[float, float] = (0.1, 0.5),
    dynamics_weight: float = 0.1,
    ot_weight: float = 1.0,
    identity_weight: float = 0.1,
    ot_kind: str = "sliced",
    ot_blur: float = 0.05,
    seed: int = 0,
) -> KoopmanFit:
    """Fit ``K`` on flattened features ``[N, m]`` (module doc). Deterministic given ``seed``."""
    features = features.detach().float()
    n, m = features.shape
    if len(neighbours) != n or len(labels) != n:
        raise ExpansionError("fit_koopman: features, labels and neighbour lists must have one entry per sample")
    classes = [torch.nonzero(labels == c).flatten() for c in torch.unique(labels)]
    src, dst = edge_index(neighbours)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        operator = KoopmanOperator(m, rank)
    opt = torch.optim.Adam(operator.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)

    def class_ot(y_new: torch.Tensor, ot_seed: int) -> torch.Tensor:
        return torch.stack(
            [
                ot_distance(y_new[idx], features[idx], ot_kind, blur=ot_blur, seed=ot_seed + c)
                for c, idx in enumerate(classes)
            ]
        ).mean()

    def dynamics(op: KoopmanOperator) -> torch.Tensor:
        return (op(features[src]) - features[dst]).pow(2).sum(1).mean() / m

    fit = KoopmanFit(operator)
    check_mix, _ = random_mixes(features, neighbours, mix_range, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        fit.ot_identity = float(class_ot(check_mix, seed))
        fit.dynamics_identity = float(dynamics(KoopmanOperator(m, None)))
    ot_scale = max(fit.ot_identity, 1e-12)
    dyn_scale = max(fit.dynamics_identity, 1e-12)
    progress = ProgressLog("Koopman operator fit", steps, "steps", log)
    for step in range(steps):
        y_mix, _ = random_mixes(features, neighbours, mix_range, g)
        loss = identity_weight * operator.delta_matrix().pow(2).sum() / m
        if dynamics_weight:
            loss = loss + dynamics_weight * dynamics(operator) / dyn_scale
        if ot_weight:
            loss = loss + ot_weight * class_ot(operator.step(y_mix, tau), seed + 7919 * (step + 1)) / ot_scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fit.losses.append(float(loss.detach()))
        progress.update(step + 1, f"loss {fit.losses[-1]:.4f}")
    with torch.no_grad():
        fit.ot_fitted = float(class_ot(operator.step(check_mix, tau), seed))
        fit.dynamics_fitted = float(dynamics(operator))
    operator.requires_grad_(False)
    return fit
