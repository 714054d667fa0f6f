"""GIF's guided imagination, written once for every prior (arXiv 2211.13976, Sec. 4).

Given the latent codes ``z0`` of a seed's k samples (any prior: the denoised SD
latent, a CLIP image embedding, MAE tokens, an autoencoder code), a ``decode``
function to images and a :class:`~expansion.guides.Guide` (zero-shot CLIP or a
probe classifier), GIF

1. perturbs channel-wise: ``z' = z0 * (1 + e) + b`` with ``e ~ U(0, 1)`` and
   ``b ~ N(0, 1)``, one value per channel (shape ``[N, C, 1, ...]``);
2. scores the decoded samples of each seed with three criteria
   (weights ``w`` all 1 in the official code):

   * entropy increase ``w_ent * mean_i (H(p'_i) - H(p))``
     ("class-maintained information boosting");
   * prediction consistency ``w_con * mean_i p'_i[j]``, ``j = argmax p`` the
     guide's prediction on the seed (not the label);
   * diversity ``w_div * mean_i KL(softmax(f_i) || softmax(mean_i f_i))`` over
     the embeddings ``f_i`` of the seed's samples;

3. takes ``n_steps`` signed-gradient ascent steps of size ``step_size`` on
   ``(e, b)`` (official: one step of 0.1);
4. projects ``z0 * (1 + e) + b`` onto the L-infinity ball of radius ``c``
   around ``z0`` and decodes.

As in the official code the score is taken on the unprojected perturbation and
the projection is applied to the final code. Two settings (set by ``method.fidelity``) choose
between the paper's criteria and the official code's
(``GIF_SD/*/dataset_expansion_stable_diffusion_CLIP_batch_optimization.py``, e.g. Caltech l.573-579):

* ``consistency``: ``every_sample`` (the paper) or ``first_of_group``: the official
  ``gather(p' [B, K], 1, j.unsqueeze(1))`` with a ``[1, 1]`` index gives the term, at the weight of
  the whole pass, to the first image of each pass only;
* ``diversity``: ``kl_sample_to_mean`` = ``KL(softmax(f_i) || softmax(mean f))`` as the paper
  writes it, or ``kl_mean_to_sample``: the official ``KLDivLoss(log_softmax(f_i),
  log_softmax(mean f), log_target=True)`` = ``mean_i KL(softmax(mean f) || softmax(f_i))`` (both
  depend on every sample; they agree to second order and the term is < 1 % of the gradient).

docs/fidelity.md lists every departure, with the official file and line.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .errors import ExpansionError
from .settings import check_ranges, fidelity_quirk

EPS = 1e-12
CONSISTENCY_FORMS = ("every_sample", "first_of_group")
DIVERSITY_FORMS = ("kl_sample_to_mean", "kl_mean_to_sample")


@dataclass(frozen=True)
class GuidanceSettings:
    """The ascent on (e, b): ``n_steps`` signed-gradient steps of ``step_size`` on the weighted
    criteria (official: one step of 0.1, all weights 1); ``consistency`` and ``diversity`` say
    which form of those two criteria (the module doc). The radius belongs to the prior's
    latent (``GifSettings.radius``) and is given to :func:`guided_perturbation`."""

    n_steps: int = 1
    step_size: float = 0.1
    entropy_weight: float = 1.0
    consistency_weight: float = 1.0
    diversity_weight: float = 1.0
    consistency: str = fidelity_quirk("every_sample", "first_of_group")
    diversity: str = fidelity_quirk("kl_sample_to_mean", "kl_mean_to_sample")

    def __post_init__(self) -> None:
        if self.n_steps < 0 or self.step_size < 0:
            raise ExpansionError(f"guidance.n_steps and guidance.step_size must be >= 0: {self}")
        check_ranges(
            self,
            [
                (self.consistency in CONSISTENCY_FORMS, "consistency", f"one of {CONSISTENCY_FORMS}"),
                (self.diversity in DIVERSITY_FORMS, "diversity", f"one of {DIVERSITY_FORMS}"),
            ],
        )


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of ``probs``."""
    return -(probs * torch.log(probs.clamp_min(EPS))).sum(-1)


@dataclass
class CriteriaTerms:
    """Per-sample terms ``[N]`` of the three criteria, their weighted sum, and the group
    (one seed's samples scored together) of each sample."""

    entropy_gain: torch.Tensor
    consistency: torch.Tensor
    diversity: torch.Tensor
    score: torch.Tensor
    groups: torch.Tensor

    def total(self) -> torch.Tensor:
        """Sum over groups of each group's mean score: every group's (e, b) receive the
        gradient of their own group's score only."""
        return group_mean(self.score, self.groups).sum()


def group_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Mean of ``values [N, ...]`` within each group id of ``groups [N]`` (ids 0..G-1)."""
    n_groups = int(groups.max()) + 1
    sums = torch.zeros((n_groups, *values.shape[1:]), dtype=values.dtype, device=values.device)
    sums = sums.index_add(0, groups, values)
    counts = torch.bincount(groups, minlength=n_groups).clamp_min(1).to(values.dtype)
    return sums / counts.view(-1, *([1] * (values.ndim - 1)))


def first_of_group(groups: torch.Tensor) -> torch.Tensor:
    """``[N]`` bool: the first row of each group (lowest index)."""
    rows = torch.arange(groups.shape[0], device=groups.device)
    n_groups = int(groups.max()) + 1
    first = torch.full((n_groups,), groups.shape[0], device=groups.device).scatter_reduce(0, groups, rows, "amin")
    return rows == first[groups]


def group_sizes(groups: torch.Tensor) -> torch.Tensor:
    """``[N]``: the size of each row's group."""
    return torch.bincount(groups)[groups]


def criteria(
    seed_probs: torch.Tensor,
    sample_probs: torch.Tensor,
    sample_embeddings: torch.Tensor,
    groups: torch.Tensor,
    settings: GuidanceSettings,
) -> CriteriaTerms:
    """The three GIF criteria per sample.

    seed_probs ``[N, K]``: the guide's probabilities on each sample's seed image;
    sample_probs ``[N, K]`` and sample_embeddings ``[N, D]`` on the decoded samples;
    groups ``[N]``: samples scored together (a seed's k samples, or the official code's
    passes of two) share a group id, numbered 0..G-1.
    """
    if not (
        seed_probs.shape == sample_probs.shape
        and sample_probs.ndim == 2
        and sample_embeddings.shape[0] == sample_probs.shape[0] == groups.shape[0]
    ):
        raise ExpansionError("criteria expects seed_probs and sample_probs [N,K], embeddings [N,D], groups [N]")
    entropy_gain = entropy(sample_probs) - entropy(seed_probs)
    top1 = seed_probs.argmax(dim=-1, keepdim=True)  # the guide's own prediction on the seed
    consistency = torch.gather(sample_probs, 1, top1)[:, 0]
    if settings.consistency == "first_of_group":  # the official [1, 1] gather: the pass's first image, whole weight
        consistency = consistency * first_of_group(groups).to(consistency) * group_sizes(groups).to(consistency)
    log_q = torch.log_softmax(sample_embeddings, dim=-1)
    log_mean = torch.log_softmax(group_mean(sample_embeddings, groups)[groups], dim=-1)
    if settings.diversity == "kl_sample_to_mean":
        diversity = (log_q.exp() * (log_q - log_mean)).sum(-1)  # KL(softmax(f_i) || softmax(mean f))
    else:
        diversity = (log_mean.exp() * (log_mean - log_q)).sum(-1)  # KL(softmax(mean f) || softmax(f_i))
    score = (
        settings.entropy_weight * entropy_gain
        + settings.consistency_weight * consistency
        + settings.diversity_weight * diversity
    )
    return CriteriaTerms(entropy_gain, consistency, diversity, score, groups)


def sample_groups(batch: int, ratio: int, group_size: int | None) -> torch.Tensor:
    """Group ids for ``batch`` seeds x ``ratio`` copies (seed-major): each seed's copies in
    consecutive groups of ``group_size`` (None = all k copies of a seed in one group)."""
    size = ratio if not group_size else int(group_size)
    per_seed = (ratio + size - 1) // size
    copy_group = torch.arange(ratio) // size
    return (torch.arange(batch)[:, None] * per_seed + copy_group[None, :]).reshape(-1)


def perturb(z0: torch.Tensor, e: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Channel-wise perturbation ``z0 * (1 + e) + b``."""
    return z0 * (1 + e) + b


def project_linf(z: torch.Tensor, center: torch.Tensor, radius: float) -> torch.Tensor:
    """Projection onto ``{z : ||z - center||_inf <= radius}``."""
    return center + (z - center).clamp(-radius, radius)


def channel_shape(z0: torch.Tensor) -> tuple[int, ...]:
    """Shape of one sample's (e, b): one value per channel, broadcast over the rest."""
    return (z0.shape[1],) + (1,) * (z0.ndim - 2)


@dataclass
class GuidedResult:
    latents: torch.Tensor  # projected final codes [N, ...]
    score_before: torch.Tensor  # per-sample score at the initial perturbation [N]
    e: torch.Tensor
    b: torch.Tensor


def guided_perturbation(
    z0: torch.Tensor,
    e: torch.Tensor,
    b: torch.Tensor,
    score_fn: Callable[[torch.Tensor], CriteriaTerms],
    settings: GuidanceSettings,
    radius: torch.Tensor | float,
) -> GuidedResult:
    """Signed-gradient ascent on ``(e, b)`` then projection (steps 1-4 of the module doc).

    z0 ``[N, C, ...]``, e and b shaped like ``[N, *channel_shape(z0)]``; ``score_fn(z)``
    decodes ``z`` and returns the criteria of its samples. Each group's perturbations
    only receive the gradient of that group's own score, so the result does not depend
    on the other seeds in the batch. ``radius``: the L-inf radius, a number or a tensor
    broadcasting against ``z0`` (e.g. one value per sample, for priors whose scale varies).
    """
    z0 = z0.detach()
    e, b = e.detach().clone(), b.detach().clone()
    score_before = None
    for _ in range(settings.n_steps):
        e.requires_grad_(True)
        b.requires_grad_(True)
        with torch.enable_grad():
            terms = score_fn(perturb(z0, e, b))
            if score_before is None:
                score_before = terms.score.detach().reshape(-1)
            grad_e, grad_b = torch.autograd.grad(terms.total(), [e, b])
        if not (torch.isfinite(grad_e).all() and torch.isfinite(grad_b).all()):
            raise ExpansionError("guidance gradient is not finite (NaN/inf from the decoder or the guide)")
        with torch.no_grad():
            e = e + settings.step_size * grad_e.sign()
            b = b + settings.step_size * grad_b.sign()
    if score_before is None:  # n_steps = 0: random perturbation, no guidance (the unguided ablation)
        with torch.no_grad():
            score_before = score_fn(perturb(z0, e, b)).score.reshape(-1)
    latents = project_linf(
        perturb(z0, e.detach(), b.detach()), z0, radius.to(z0) if torch.is_tensor(radius) else float(radius)
    )
    return GuidedResult(latents, score_before.detach(), e.detach(), b.detach())
