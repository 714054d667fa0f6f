"""Quality metrics of an expanded set on real images (sklearn digits, BreastMNIST):
FID/KID, memorisation, diversity, label agreement, the expansion grid, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.quality import QualityError, quality_metrics, save_expansion_grid
from experiments.quality.extractors import train_probe
from experiments.quality.grid import grid_parents
from experiments.quality.metrics import vendi_score


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]
    return images, torch.from_numpy(d.target)


@pytest.fixture(scope="module")
def breast(shared_data):
    z = np.load(shared_data / "medmnist" / "breastmnist.npz")
    train = torch.from_numpy(z["train_images"])[:, None], torch.from_numpy(z["train_labels"].ravel().astype(np.int64))
    test = torch.from_numpy(z["test_images"])[:, None], torch.from_numpy(z["test_labels"].ravel().astype(np.int64))
    return train, test


@pytest.fixture(scope="module")
def breast_probe(breast):
    (x, y), _ = breast
    return train_probe(x, y, 2, epochs=1, min_steps=60, seed=0)


def _noisy(images, sigma, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (images.float() + sigma * torch.randn(images.shape, generator=g)).round().clamp(0, 255).to(torch.uint8)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digits):
    images, labels = digits[0][:500], digits[1][:500]
    probe = train_probe(images, labels, 10, seed=0)
    same = quality_metrics(images, labels, images, labels, 10, probe)
    noisy = [quality_metrics(images, labels, _noisy(images, s), labels, 10, probe) for s in (10, 30, 60)]
    fids = [m["fid"] for m in noisy]
    assert fids[0] < fids[1] < fids[2], fids
    assert abs(same["fid"]) < 1e-3 * fids[-1] and abs(same["fid"]) < 1e-6
    assert noisy[-1]["kid_mean"] > noisy[0]["kid_mean"] > same["kid_mean"]
    # the probe is named, agrees with the labels of clean images, less so of very noisy ones
    assert same["feature_extractor"].startswith("classifier(small_cnn, trained on 500 original images")
    assert same["label_agreement"] > 0.9 and noisy[-1]["label_agreement"] < same["label_agreement"]
    # an exact copy of the training set is all duplicates
    assert same["exact_duplicates"] == same["near_duplicates"] == 500 and same["near_duplicate_fraction"] == 1.0


def test_memorisation_counts_exactly_the_inserted_copies(breast, breast_probe):
    (train_x, train_y), (test_x, test_y) = breast
    clean = quality_metrics(train_x, train_y, test_x, test_y, 2, breast_probe)
    # real, unseen images: BreastMNIST's test image 76 is a pixel copy of training image 115, and it is found
    assert torch.equal(test_x[76], train_x[115])
    assert clean["exact_duplicates"] == 1 and clean["near_duplicates"] <= 2
    g = torch.Generator().manual_seed(0)
    copied = torch.randperm(len(train_x), generator=g)[:7]
    nudged = train_x[copied[:3]].clone()
    nudged[:, :, 0, 0] ^= 1  # one pixel one grey level off: a near-duplicate, not an exact one
    generated = torch.cat([test_x, train_x[copied], nudged])
    labels = torch.cat([test_y, train_y[copied], train_y[copied[:3]]])
    order = torch.randperm(len(generated), generator=g)
    m = quality_metrics(train_x, train_y, generated[order], labels[order], 2, breast_probe)
    assert m["exact_duplicates"] == 1 + 7
    assert m["near_duplicates"] == clean["near_duplicates"] + 10
    assert m["near_duplicate_fraction"] == pytest.approx(m["near_duplicates"] / len(generated), abs=1e-6)
    assert m["nn_pixel_original_median"] > 0 and "0.05 x median" in m["near_duplicate_rule"]


def test_diversity_orders_identical_below_varied(breast, breast_probe):
    (train_x, train_y), _ = breast
    identical = train_x[:1].repeat(100, 1, 1, 1)
    five = train_x[:5].repeat(20, 1, 1, 1)
    varied = train_x[:100]
    scores = [
        quality_metrics(train_x, train_y, s, train_y[:1].repeat(100), 2, breast_probe)
        for s in (identical, five, varied)
    ]
    vendi = [s["vendi_expanded"] for s in scores]
    spread = [s["pairwise_distance_expanded"] for s in scores]
    assert vendi[0] == pytest.approx(1.0, abs=1e-4) and spread[0] == pytest.approx(0.0, abs=1e-4)
    assert vendi[0] < vendi[1] < vendi[2] and spread[0] < spread[1] < spread[2]
    assert vendi[1] <= 5 + 1e-6
    assert scores[0]["vendi_original"] == scores[2]["vendi_original"] > vendi[0]


def test_vendi_score_counts_distinct_orthogonal_items():
    eye = torch.eye(4)
    assert vendi_score(eye.repeat(5, 1)) == pytest.approx(4.0, rel=1e-6)
    assert vendi_score(torch.ones(10, 3)) == pytest.approx(1.0, rel=1e-6)


def test_expansion_grid_rows_are_seeds_then_their_expansions(tmp_path, digits):
    images, labels = digits[0][:40], digits[1][:40].numpy()
    k = 3
    parents = np.repeat(np.arange(40), k)
    copies = np.tile(np.arange(k), 40)
    expanded = 255 - images.repeat_interleave(k, dim=0)
    chosen = grid_parents(labels, parents, 12)
    assert len(chosen) == 12 and [labels[p] for p in chosen[:10]] == list(range(10))
    assert chosen == grid_parents(labels, parents, 12)
    path = save_expansion_grid(
        tmp_path / "grid.png",
        images,
        labels,
        expanded,
        parents,
        copies,
        rows=12,
        class_names=[str(i) for i in range(10)],
        title="digits",
    )
    with Image.open(path) as im:
        w, h = im.size
    assert w > (k + 1) * 48 and h > 12 * 48


def test_bad_extractor_and_missing_weights_are_clear(digits, monkeypatch):
    images, labels = digits[0][:20], digits[1][:20]
    with pytest.raises(QualityError, match="unknown quality.extractor 'vgg'"):
        quality_metrics(images, labels, images, labels, 10, "vgg")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        with pytest.raises(QualityError, match="inception needs torch-fidelity.*quality.extractor=classifier"):
            quality_metrics(images, labels, images, labels, 10, "inception")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(QualityError, match="quality.extractor=clip: could not load the CLIP guide"):
        quality_metrics(images, labels, images, labels, 10, "clip", class_names=[str(i) for i in range(10)])
    with pytest.raises(QualityError, match="differ in shape"):
        quality_metrics(images, labels, images[:, :, :4], labels, 10, "classifier")


def test_a_registered_metric_reaches_metrics_json_results_and_the_report(digits, tmp_path, monkeypatch):
    """A metric is one function + its registration: no other edit puts it in metrics.json, results.csv and
    the quality table of results.md (which the report includes)."""
    import csv
    import json

    from experiments import quality
    from experiments.analysis.aggregate import aggregate

    monkeypatch.setattr(quality.metrics, "METRICS", dict(quality.metrics.METRICS))

    @quality.register_metric("brightness", {"brightness_gap": quality.Column("brightness_gap", "brightness gap")})
    def brightness(q):
        """Mean grey level of the expanded images minus that of the originals."""
        return {"brightness_gap": float(q.expanded.float().mean() - q.original.float().mean())}

    images, labels = digits[0][:100], digits[1][:100]
    metrics = quality.quality_metrics(images, labels, 255 - images, labels, 10, epochs=1)
    assert metrics["brightness_gap"] == pytest.approx(
        float((255 - images).float().mean() - images.float().mean()), rel=1e-5
    )
    for i in range(2):
        run = tmp_path / f"job{i}"
        run.mkdir()
        (run / "metrics.json").write_text(
            json.dumps(
                {
                    "table": "medical",
                    "dataset": "breastmnist",
                    "method": "cutout",
                    "classifier": "resnet50",
                    "ratio": 5,
                    "seed": i,
                    "test_acc_final": 70.0,
                    "test_acc_best_val": 69.0,
                    "quality": metrics,
                }
            )
        )
    csv_path, md_path = aggregate(tmp_path)
    (row,) = list(csv.DictReader(csv_path.open()))
    assert float(row["brightness_gap"]) == pytest.approx(metrics["brightness_gap"], rel=1e-5)
    md = md_path.read_text()
    assert "brightness gap" in md and "brightness: Mean grey level" in md


def test_the_probe_is_trained_once_per_training_set_and_a_damaged_one_again(tmp_path, monkeypatch):
    from experiments.quality import extractors as quality_mod

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    labels = np.arange(40) % 4
    first = quality_mod.train_probe(images, labels, 4, epochs=1, min_steps=4, cache_dir=tmp_path)
    (cached,) = tmp_path.glob("*.safetensors")
    real_fit = quality_mod.fit_probe

    def no_training(*args, **kwargs):
        raise AssertionError("the cached probe should have been reused")

    monkeypatch.setattr(quality_mod, "fit_probe", no_training)
    again = quality_mod.train_probe(images, labels, 4, epochs=1, min_steps=4, cache_dir=tmp_path)
    assert torch.equal(first(images), again(images)) and again.description == first.description
    with pytest.raises(AssertionError, match="reused"):  # another training set is another probe
        quality_mod.train_probe(images.flip(0), labels, 4, epochs=1, min_steps=4, cache_dir=tmp_path)
    monkeypatch.setattr(quality_mod, "fit_probe", real_fit)
    cached.write_bytes(cached.read_bytes()[:100])  # damaged: trained again, never used
    with pytest.warns(UserWarning, match="cannot be read"):
        repaired = quality_mod.train_probe(images, labels, 4, epochs=1, min_steps=4, cache_dir=tmp_path)
    assert torch.equal(first(images), repaired(images))
