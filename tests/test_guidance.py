"""GIF's guidance core: hand-computed criteria, projection, perturbation and the ascent step."""

from __future__ import annotations

import math

import pytest
import torch

from expansion.base import ExpansionError
from expansion.guidance import (
    GuidanceSettings,
    criteria,
    entropy,
    group_mean,
    guided_perturbation,
    perturb,
    project_linf,
    sample_groups,
)
from expansion.probe import Probe, SmallConvNet


def H(p):
    return -sum(x * math.log(x) for x in p)


def test_entropy_by_hand():
    assert entropy(torch.tensor([[0.5, 0.5], [1.0, 0.0]])).tolist() == pytest.approx([math.log(2), 0.0], abs=1e-6)


def test_each_criterion_against_hand_computed_values():
    seed = torch.tensor([[0.9, 0.1], [0.9, 0.1]])
    samples = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    terms = criteria(seed, samples, emb, torch.tensor([0, 0]), GuidanceSettings())
    assert terms.entropy_gain.tolist() == pytest.approx(
        [H([0.5, 0.5]) - H([0.9, 0.1]), H([0.8, 0.2]) - H([0.9, 0.1])], abs=1e-6
    )
    # consistency uses the seed's own top-1 (class 0), not a label
    assert terms.consistency.tolist() == pytest.approx([0.5, 0.8])
    q = [math.e / (math.e + 1), 1 / (math.e + 1)]  # softmax([1, 0]); the mean embedding [.5, .5] -> uniform
    kl = q[0] * math.log(q[0] / 0.5) + q[1] * math.log(q[1] / 0.5)
    assert terms.diversity.tolist() == pytest.approx([kl, kl], abs=1e-6)
    expected = ((H([0.5, 0.5]) - H([0.9, 0.1]) + 0.5 + kl) + (H([0.8, 0.2]) - H([0.9, 0.1]) + 0.8 + kl)) / 2
    assert terms.total().item() == pytest.approx(expected, abs=1e-6)


def test_weights_scale_each_criterion():
    seed = torch.tensor([[0.9, 0.1]] * 2)
    samples = torch.tensor([[0.5, 0.5], [0.8, 0.2]])
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    base = criteria(seed, samples, emb, torch.tensor([0, 0]), GuidanceSettings())
    only_con = criteria(
        seed,
        samples,
        emb,
        torch.tensor([0, 0]),
        GuidanceSettings(entropy_weight=0, consistency_weight=2, diversity_weight=0),
    )
    assert only_con.score.tolist() == pytest.approx((2 * base.consistency).tolist())


def test_diversity_is_zero_for_identical_samples_and_groups_are_separate():
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 5.0], [3.0, 0.0]])
    probs = torch.full((4, 3), 1 / 3)
    terms = criteria(probs, probs, emb, torch.tensor([0, 0, 1, 1]), GuidanceSettings())
    assert terms.diversity[:2].abs().max() < 1e-6 and (terms.diversity[2:] > 0.1).all()
    # a sample's score does not depend on another group's samples
    other = criteria(probs, probs, torch.cat([emb[:2], emb[2:] * 3]), torch.tensor([0, 0, 1, 1]), GuidanceSettings())
    assert torch.equal(other.score[:2], terms.score[:2])


def test_group_mean_and_sample_groups():
    assert sample_groups(2, 5, None).tolist() == [0] * 5 + [1] * 5
    assert sample_groups(2, 5, 2).tolist() == [0, 0, 1, 1, 2, 3, 3, 4, 4, 5]
    assert group_mean(torch.tensor([1.0, 3.0, 10.0]), torch.tensor([0, 0, 1])).tolist() == [2.0, 10.0]


@pytest.mark.parametrize("shape,radius", [((3, 4, 8, 8), 0.8), ((5, 197, 16), 0.1), ((2, 768), 4.0)])
def test_projection_keeps_linf_radius(shape, radius):
    g = torch.Generator().manual_seed(sum(shape))
    for _ in range(20):
        center = torch.randn(shape, generator=g) * 3
        z = center + torch.randn(shape, generator=g) * 5
        projected = project_linf(z, center, radius)
        assert (projected - center).abs().max() <= radius + 1e-6
        inside = (z - center).abs() <= radius
        assert torch.equal(projected[inside], z[inside])  # points inside the ball are untouched
        assert torch.allclose(project_linf(projected, center, radius), projected)  # idempotent


def test_perturbation_is_channel_wise():
    z = torch.randn(2, 4, 8, 8)
    e = torch.rand(2, 4, 1, 1)
    b = torch.randn(2, 4, 1, 1)
    out = perturb(z, e, b)
    assert torch.allclose(out, z * (1 + e) + b)
    # one scale and shift per channel: the residual of a per-channel affine fit is zero
    ratio = (out[:, :, 0, 0] - out[:, :, 1, 1]) / (z[:, :, 0, 0] - z[:, :, 1, 1])
    assert torch.allclose(ratio, 1 + e[:, :, 0, 0], atol=1e-4)


def _tiny_prior_and_guide():
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(
        torch.nn.ConvTranspose2d(4, 8, 4, 2, 1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(8, 3, 3, padding=1),
        torch.nn.Sigmoid(),
    )
    guide = Probe(SmallConvNet(5, 3, width=8, input_size=16), 16)
    return decoder, guide


def _score_fn(decoder, guide, seed_probs, groups, settings):
    def fn(z):
        images = decoder(z)
        emb = guide.embed(images)
        return criteria(seed_probs, guide.net.head(emb).softmax(-1), emb, groups, settings)

    return fn


def test_one_step_raises_the_guidance_score():
    decoder, guide = _tiny_prior_and_guide()
    n, k = 4, 3
    z0 = torch.randn(n * k, 4, 8, 8)
    seed_probs = torch.softmax(torch.randn(n, 5), -1).repeat_interleave(k, 0)
    groups = sample_groups(n, k, None)
    settings = GuidanceSettings(step_size=0.02)
    fn = _score_fn(decoder, guide, seed_probs, groups, settings)
    g = torch.Generator().manual_seed(1)
    e, b = torch.rand(n * k, 4, 1, 1, generator=g), torch.randn(n * k, 4, 1, 1, generator=g)
    res = guided_perturbation(z0, e, b, fn, settings, radius=100.0)
    with torch.no_grad():
        before = group_mean(fn(perturb(z0, e, b)).score, groups)
        after = group_mean(fn(res.latents).score, groups)
    assert torch.allclose(res.score_before, fn(perturb(z0, e, b)).score.detach())
    assert (after > before).all(), (before, after)


def test_steps_move_e_and_b_by_signed_gradient_and_result_is_projected():
    decoder, guide = _tiny_prior_and_guide()
    z0 = torch.randn(2, 4, 8, 8)
    seed_probs = torch.softmax(torch.randn(1, 5), -1).repeat(2, 1)
    settings = GuidanceSettings(n_steps=3, step_size=0.1)
    e, b = torch.rand(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    res = guided_perturbation(
        z0, e, b, _score_fn(decoder, guide, seed_probs, torch.tensor([0, 0]), settings), settings, radius=0.3
    )
    steps = (res.e - e) / 0.1
    assert torch.allclose(steps, steps.round(), atol=1e-5) and steps.abs().max() <= 3 + 1e-5
    assert (res.latents - z0).abs().max() <= 0.3 + 1e-6


def test_zero_steps_is_the_unguided_random_perturbation():
    decoder, guide = _tiny_prior_and_guide()
    z0 = torch.randn(2, 4, 8, 8)
    settings = GuidanceSettings(n_steps=0)
    e, b = torch.rand(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    fn = _score_fn(decoder, guide, torch.full((2, 5), 0.2), torch.tensor([0, 0]), settings)
    res = guided_perturbation(z0, e, b, fn, settings, radius=0.5)
    assert torch.allclose(res.latents, project_linf(perturb(z0, e, b), z0, 0.5))


def test_non_finite_gradient_is_an_error():
    settings = GuidanceSettings()

    def bad(z):
        v = (z * float("nan")).mean(dim=(1, 2, 3))
        return criteria(
            torch.full((2, 2), 0.5),
            torch.stack([v.sigmoid(), 1 - v.sigmoid()], 1),
            z.flatten(1),
            torch.tensor([0, 0]),
            settings,
        )

    with pytest.raises(ExpansionError, match="not finite"):
        guided_perturbation(
            torch.randn(2, 4, 2, 2), torch.rand(2, 4, 1, 1), torch.randn(2, 4, 1, 1), bad, settings, 1.0
        )


def test_radius_may_be_one_value_per_sample():
    decoder, guide = _tiny_prior_and_guide()
    z0 = torch.randn(2, 4, 8, 8)
    settings = GuidanceSettings(n_steps=1)
    e, b = torch.rand(2, 4, 1, 1), torch.randn(2, 4, 1, 1)
    fn = _score_fn(decoder, guide, torch.full((2, 5), 0.2), torch.tensor([0, 0]), settings)
    radius = torch.tensor([0.05, 0.3]).view(2, 1, 1, 1)
    res = guided_perturbation(z0, e, b, fn, settings, radius=radius)
    dist = (res.latents - z0).flatten(1).abs().max(dim=1).values
    assert dist[0] <= 0.05 + 1e-6 and dist[1] <= 0.3 + 1e-6 and dist[1] > 0.05
