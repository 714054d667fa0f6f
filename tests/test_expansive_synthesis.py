"""Expansive Synthesis and GIF over its autoencoder, on the real MNIST images of ../shared/data:
expander graphs, the OT distance, the autoencoder fit, the Koopman fit, the expander end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import networkx as nx
import numpy as np
import pytest
import torch

from expansion.base import ExpansionContext, ExpansionError
from expansion.expansive_synthesis import ExpansiveSynthesis
from expansion.expansive_synthesis.autoencoder import (
    AutoencoderSpec,
    ConvAutoencoder,
    reconstruction_error,
    train_autoencoder,
)
from expansion.expansive_synthesis.graph import build_expander_graph, ramanujan_bound
from expansion.expansive_synthesis.transport import KINDS, ot_distance
from expansion.gif.ae import GifAE
from expansion.seeding import image_seeds
from experiments.data.datasets import build_dataset
from experiments.training.job import build_expander
from experiments.training.pipeline import run
from tests.conftest import compose, job_config
from tests.helpers.tolerances import same_up_to_float_rounding

#: a fit small enough for tests (seconds on 2 cores), large enough to learn something
TINY_FIT = {"pretrain": {"steps": 150, "max_images": 2000}, "finetune": {"steps": 60}, "autoencoder": {"width": 8}}


def _cfg(overrides):
    return job_config(overrides)


@pytest.fixture(scope="module")
def mnist(shared_data):
    """The seeded 10-per-class MNIST few-shot split and its leftover pool (real images)."""
    return build_dataset(compose(["dataset=mnist", "dataset.train_per_class=10"]).dataset).in_memory()


def _context(data):
    return ExpansionContext(data.name, data.class_names, channels=1, image_size=28, auxiliary=data.unused_train)


@pytest.fixture(scope="module")
def fitted_es(mnist, tmp_path_factory):
    exp = ExpansiveSynthesis(ratio=6, **TINY_FIT, koopman={"steps": 60})
    exp.prepare(_context(mnist))
    fit_dir = tmp_path_factory.mktemp("fits") / "es"
    fit_dir.mkdir()
    exp.fit(mnist.train, fit_dir)
    return exp, fit_dir


# -- expander graphs ------------------------------------------------------------------------------


@pytest.mark.parametrize("n,degree", [(10, 4), (100, 4), (37, 6), (200, 3)])
def test_expander_graph_is_regular_connected_and_ramanujan(n, degree):
    g = build_expander_graph(n, degree, seed=3)
    assert g.graph.number_of_nodes() == n and g.degree == degree
    assert all(d == degree for _, d in g.graph.degree())  # d-regular
    assert nx.is_connected(g.graph)
    eig = np.sort(np.real(nx.adjacency_spectrum(g.graph)))[::-1]  # independent of the module's own spectrum
    assert eig[0] == pytest.approx(degree)
    assert g.spectral_gap == pytest.approx(degree - eig[1], abs=1e-6) and g.spectral_gap > 0.1
    assert g.second_eigenvalue == pytest.approx(max(abs(eig[1]), abs(eig[-1])), abs=1e-6)
    assert g.ramanujan and g.second_eigenvalue <= ramanujan_bound(degree) + 1e-9
    assert build_expander_graph(n, degree, seed=3).neighbours == g.neighbours  # deterministic per seed


def test_expander_graph_small_classes_and_impossible_degree():
    tiny = build_expander_graph(3, 4, seed=0)  # fewer nodes than the degree: the complete graph K3
    assert tiny.degree == 2 and tiny.neighbours == [[1, 2], [0, 2], [0, 1]] and tiny.spectral_gap == pytest.approx(3)
    with pytest.raises(ExpansionError, match="n \\* degree is odd"):
        build_expander_graph(7, 3, seed=0)
    with pytest.raises(ExpansionError, match="at least 2 samples"):
        build_expander_graph(1, 4, seed=0)
    with pytest.raises(ExpansionError, match="family must be one of"):
        build_expander_graph(10, 4, seed=0, family="margulis")


# -- optimal transport ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_ot_distance_is_zero_for_identical_sets_and_positive_otherwise(kind):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 16, generator=g)
    assert float(ot_distance(x, x.clone(), kind)) == pytest.approx(0.0, abs=1e-6)
    assert float(ot_distance(x, x[torch.randperm(40, generator=g)], kind)) == pytest.approx(0.0, abs=1e-6)
    y = torch.randn(50, 16, generator=g) + 0.3
    shifted = ot_distance(x, y, kind)
    assert float(shifted) > 1e-3
    assert float(ot_distance(x, x + 1.0, kind)) > float(ot_distance(x, x + 0.1, kind)) > 0
    z = x.clone().requires_grad_(True)
    ot_distance(z, y, kind).backward()  # differentiable: a regulariser can be trained with it
    assert z.grad is not None and z.grad.abs().sum() > 0


# -- autoencoder and Koopman fit on real MNIST ------------------------------------------------------


@pytest.mark.integration
def test_autoencoder_reconstruction_error_drops_on_real_mnist(mnist):
    pool = mnist.unused_train.to_tensor()[:800]
    model = ConvAutoencoder(AutoencoderSpec(channels=1, image_size=28, width=8), num_classes=10)
    before = reconstruction_error(model, pool)
    losses = train_autoencoder(model, pool, steps=120, batch_size=64)
    after = reconstruction_error(model, pool)
    assert after < 0.35 * before, (before, after)
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    held_out = mnist.test.to_tensor()[:200]  # it learned digits, not these 800 images
    assert reconstruction_error(model, held_out) < 0.5 * before


def test_attention_mixes_latent_positions_without_positional_encoding():
    spec = AutoencoderSpec(channels=1, image_size=16, width=8, latent_channels=4, heads=2, attention_dim=8)
    model = ConvAutoencoder(spec)
    torch.nn.init.normal_(model.attention.proj_out.weight)
    z = torch.randn(1, 4, 4, 4)
    perm = torch.randperm(16)
    out = model.attention(z).flatten(2)
    out_perm = model.attention(z.flatten(2)[..., perm].reshape(1, 4, 4, 4)).flatten(2)
    # no positional encoding: permuting the latent positions permutes the output the same way
    assert torch.allclose(out[..., perm], out_perm, atol=1e-5)
    assert not torch.allclose(out, z.flatten(2))  # and it does change the latent


@pytest.mark.integration
def test_fit_report_caches_and_koopman_regulariser(mnist, fitted_es):
    exp, fit_dir = fitted_es
    report = json.loads((fit_dir / "fit_report.json").read_text())
    ae = report["autoencoder"]
    assert ae["pretrain_pool_images"] == 2000
    assert ae["recon_mse_pretrained"] < 0.5 * ae["recon_mse_init"]
    assert ae["recon_mse_finetuned"] <= ae["recon_mse_pretrained"]
    ko = report["koopman"]
    # the OT regulariser brings the expanded latents closer to each class's distribution (on mixes
    # the fit never saw) than edge interpolation alone (K = I)
    assert ko["ot_fitted"] < 0.97 * ko["ot_identity"]
    for info in report["graphs"]["per_class"].values():
        assert info["nodes"] == 10 and info["degree"] == 4 and info["spectral_gap"] > 0 and info["ramanujan"]
    # a second expander with the same settings loads everything from the cache
    again = ExpansiveSynthesis(ratio=6, **TINY_FIT, koopman={"steps": 60})
    again.prepare(_context(mnist))
    again.fit(mnist.train, fit_dir)
    assert torch.equal(again.koopman.delta_matrix(), exp.koopman.delta_matrix())
    assert torch.equal(again.train_features, exp.train_features)


def test_koopman_dynamics_term_fits_the_graph_walk(fitted_es, mnist):
    from expansion.expansive_synthesis.koopman import fit_koopman

    exp, _ = fitted_es
    fit = fit_koopman(
        exp.train_features,
        torch.as_tensor(mnist.train.labels),
        exp.neighbours,
        steps=40,
        lr=3e-3,
        rank=None,
        dynamics_weight=1.0,
        ot_weight=0.0,
        identity_weight=0.0,
    )
    assert fit.dynamics_fitted < 0.9 * fit.dynamics_identity  # K y_i ~ y_j along the edges
    assert fit.losses[-1] < fit.losses[0]


def test_expanded_latents_stay_in_their_class_region(mnist, fitted_es):
    exp, _ = fitted_es
    n = len(mnist.train)
    parents = torch.arange(n)
    seeds = image_seeds(0, parents, exp.ratio)
    y_new, neighbour, t = exp.new_latents(parents, seeds)
    labels = torch.as_tensor(mnist.train.labels)
    assert torch.equal(labels[neighbour], labels[:, None].expand_as(neighbour))  # edges stay within the class
    assert float(t.min()) >= 0.1 and float(t.max()) <= 0.5
    # nearest original of each new latent (the seed itself excluded) has the seed's class
    dist = torch.cdist(y_new, exp.train_features)
    dist[torch.arange(n * exp.ratio), parents.repeat_interleave(exp.ratio)] = float("inf")
    same = (labels[dist.argmin(1)] == labels.repeat_interleave(exp.ratio)).float().mean()
    assert same > 0.8, float(same)
    # and the decoded images re-encode near their class too (not only in the latent they came from)
    with torch.no_grad():
        images = exp.autoencoder.decode(y_new.reshape(-1, *exp.latent_shape))
        again = exp.autoencoder.features(images).flatten(1)
    dist = torch.cdist(again, exp.train_features)
    assert (labels[dist.argmin(1)] == labels.repeat_interleave(exp.ratio)).float().mean() > 0.8


def test_expand_is_deterministic_per_image_and_names_its_parents(mnist, fitted_es):
    exp, _ = fitted_es
    images, labels = mnist.train.to_tensor(), torch.as_tensor(mnist.train.labels)
    parents = torch.tensor([3, 50, 77])
    seeds = image_seeds(1, parents, exp.ratio)
    out = exp.expand(images[parents], labels[parents], seeds, parents=parents)
    assert out.images.shape == (3, 6, 1, 28, 28) and out.images.dtype == torch.uint8
    rows = out.field_rows()
    for b, p in enumerate(parents.tolist()):
        copies = rows[b * 6 : (b + 1) * 6]
        assert [r["parents"][0] for r in copies] == [p] * 6
        # the 6 copies walk over all 4 graph edges of the seed before reusing one
        assert sorted({r["parents"][1] for r in copies}) == sorted(exp.neighbours[p])
    single = exp.expand(images[parents[1:2]], labels[parents[1:2]], seeds[1:2], parents=parents[1:2])
    assert same_up_to_float_rounding(single.images[0], out.images[1])  # batch-independent (1 vs 3 seeds)
    with pytest.raises(ExpansionError, match="not the training images"):
        exp.expand(images[parents].flip(-1), labels[parents], seeds, parents=parents)


def test_bad_settings_fail_early():
    with pytest.raises(ExpansionError, match=r"graph: unknown setting\(s\) \['degre'\]"):
        ExpansiveSynthesis(ratio=2, graph={"degre": 4})
    with pytest.raises(ExpansionError, match="mix_range"):
        ExpansiveSynthesis(ratio=2, mix_range=[0.6, 0.2])
    with pytest.raises(ExpansionError, match="ot.kind"):
        ExpansiveSynthesis(ratio=2, ot={"kind": "wasserstein"})
    with pytest.raises(ExpansionError, match="pretrain.source must be one of"):
        ExpansiveSynthesis(ratio=2, pretrain={"source": "other_dataset"})


# -- GIF over the autoencoder ---------------------------------------------------------------------


@pytest.mark.integration
def test_gif_ae_guidance_raises_the_score_and_unguided_uses_the_same_draws(mnist, fitted_es):
    fit_dir = fitted_es[1].parent / "gif_ae"  # beside the Expansive Synthesis fit: the autoencoder is reused
    fit_dir.mkdir()
    guided = GifAE(ratio=4, **TINY_FIT, guide={"kind": "probe", "epochs": 15})
    unguided = GifAE(ratio=4, guided=False, **TINY_FIT)
    for exp in (guided, unguided):
        exp.prepare(_context(mnist))
        exp.fit(mnist.train, fit_dir)
    assert (fit_dir / "probe_guide.safetensors").is_file()
    images, labels = mnist.train.to_tensor()[:12], torch.as_tensor(mnist.train.labels[:12])
    seeds = image_seeds(0, torch.arange(12), 4)
    g_out, u_out = guided.expand(images, labels, seeds), unguided.expand(images, labels, seeds)
    rows = g_out.field_rows()
    before = np.array([r["score_before"] for r in rows])
    after = np.array([r["score_after"] for r in rows])
    assert after.mean() > before.mean()  # one signed-gradient step raises GIF's criteria
    assert g_out.images.shape == u_out.images.shape == (12, 4, 1, 28, 28)
    assert not torch.equal(g_out.images, u_out.images)
    # the guided result stays within the same L-inf ball: both radii are the same per image
    assert [r["radius_abs"] for r in rows] == [r["radius_abs"] for r in u_out.field_rows()]
    assert same_up_to_float_rounding(unguided.expand(images[:1], labels[:1], seeds[:1]).images[0], u_out.images[0])
    assert set(u_out.fields) == {"radius", "radius_abs"}


# -- end to end -----------------------------------------------------------------------------------


@pytest.mark.integration
def test_run_py_expansive_synthesis_end_to_end(tmp_path, shared_data):
    overrides = [
        "dataset=mnist",
        "dataset.train_per_class=10",
        "method=expansive_synthesis",
        "method.ratio=3",
        "method.pretrain.steps=60",
        "method.pretrain.max_images=1000",
        "method.finetune.steps=20",
        "method.koopman.steps=10",
        "method.autoencoder.width=8",
        "train.epochs=1",
        "train.include_original=false",
        "quality.enabled=false",
    ]
    metrics = run(_cfg(overrides), tmp_path / "run")
    assert metrics.train_data == "generated only" and metrics.training.num_train_images == 300
    store = metrics.expansion.store
    rows = [json.loads(line) for line in Path(f"{store}/manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and len({r["parent"] for r in rows}) == 100
    fits = list((tmp_path / "cache" / "fits").glob("*/graphs.json"))
    neighbours = json.loads(fits[0].read_text())["neighbours"]
    labels = build_dataset(compose(["dataset=mnist", "dataset.train_per_class=10"]).dataset).train.labels
    for r in rows:
        parent, neighbour = r["parents"]
        assert parent == r["parent"] and neighbour in neighbours[parent]
        assert labels[neighbour] == labels[parent] == r["label"]
    # batch size is speed only: the same store is reused
    again = run(_cfg(overrides + ["method.batch_size=7"]), tmp_path / "run2")
    assert again.expansion.reused and again.expansion.key == metrics.expansion.key


def test_method_configs_compose_and_share_the_autoencoder_fit():
    es = build_expander(compose(["method=expansive_synthesis"]).method)
    guided = build_expander(compose(["method=gif_ae"]).method)
    unguided = build_expander(compose(["method=gif_ae_unguided"]).method)
    assert isinstance(es, ExpansiveSynthesis) and isinstance(guided, GifAE) and not unguided.settings.guided
    assert es.autoencoder_fit_signature() == guided.autoencoder_fit_signature() == unguided.autoencoder_fit_signature()
    assert guided.signature() != unguided.signature()
    assert math.isclose(es.settings.koopman.tau, 0.5)
