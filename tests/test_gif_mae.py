"""GIF-MAE with a tiny ViTMAE and a tiny open_clip built in code (no download)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from expansion.architectures import build_mae, save_tiny_clip
from expansion.base import ExpansionContext, ExpansionError
from expansion.gif.mae import GifMAE, load_mae
from expansion.seeding import image_seeds
from expansion.store import ExpansionStore
from tests.helpers.benchmarks import tiny_modes
from tests.helpers.gif_checks import assert_guidance_raises_the_score, run_tiny_job
from tests.helpers.tolerances import all_scores_close, same_up_to_float_rounding

CLASSES = ["malignant", "normal, benign"]
FIELDS = {"mask_ratio", "radius", "radius_abs", "score_before", "score_after", "guide_class", "guide_confidence"}


@pytest.fixture(scope="module")
def clip_spec(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="module")
def seeds_batch(shared_data):
    data = np.load(shared_data / "medmnist" / "breastmnist.npz")
    images = torch.from_numpy(data["train_images"][:4])[:, None]
    labels = torch.from_numpy(data["train_labels"][:4, 0].astype(np.int64))
    return images, labels


def _expander(clip_spec, model=None, **kw):
    from expansion.gif.guides import build_guide

    params = dict(ratio=3, model_id="unused (set_components)", guide=clip_spec, output_size=None)
    params.update(kw)
    exp = GifMAE(**params)
    exp.context = ExpansionContext("breastmnist", CLASSES, channels=1, prompt_prefix="Ultrasound image of")
    exp.set_components(model if model is not None else build_mae("tiny"))
    exp.use_guide(build_guide(clip_spec, CLASSES))
    return exp


@pytest.mark.parametrize("norm_pix_loss,mask_ratio", [(False, 0.0), (True, 0.5)])
def test_expand_shapes_fields_and_per_image_seed_determinism(clip_spec, seeds_batch, norm_pix_loss, mask_ratio):
    exp = _expander(clip_spec, build_mae("tiny", norm_pix_loss), mask_ratio=mask_ratio)
    images, labels = seeds_batch[0][:3], seeds_batch[1][:3]
    seeds = image_seeds(3, range(3), 3)
    full = exp.expand(images, labels, seeds)
    full.validate(3, 3)
    assert full.images.shape == (3, 3, 1, 32, 32) and full.images.dtype == torch.uint8
    rows = full.field_rows()
    assert set(rows[0]) == FIELDS
    assert all(r["mask_ratio"] == mask_ratio and r["radius"] == 0.8 and r["radius_abs"] > 0 for r in rows)
    assert all(0 <= r["guide_confidence"] <= 1 and r["guide_class"] in (0, 1) for r in rows)
    parts = [exp.expand(images[:1], labels[:1], seeds[:1]), exp.expand(images[1:], labels[1:], seeds[1:])]
    # batch of 3 vs 1 + 2: images up to float rounding, scores to float32 precision (tests/helpers/tolerances.py)
    assert same_up_to_float_rounding(full.images, torch.cat([p.images for p in parts]))
    assert all_scores_close(full.fields["score_after"], parts[0].fields["score_after"] + parts[1].fields["score_after"])
    other = exp.expand(images, labels, image_seeds(4, range(3), 3))
    assert not torch.equal(full.images, other.images)
    # a seed's k copies differ (own perturbation, own augmentation)
    assert not torch.equal(full.images[0, 0], full.images[0, 1])


def test_unaugmented_copies_share_the_encoding_and_still_differ(clip_spec, seeds_batch):
    exp = _expander(clip_spec, augment=False, output_size=24, ratio=2)
    out = exp.expand(*seeds_batch, image_seeds(0, range(4), 2))
    assert out.images.shape == (4, 2, 1, 24, 24)
    assert not torch.equal(out.images[:, 0], out.images[:, 1])
    assert exp.signature()["augment"] is False and "guidance_chunk" not in exp.signature()


def _real_images(shared_data, n_per_class=12):
    from PIL import Image

    root = shared_data / "cifar10_subset" / "train"
    files = [f for c in sorted(root.iterdir()) for f in sorted(c.glob("*.jpg"))[:n_per_class]]
    return torch.stack([torch.from_numpy(np.array(Image.open(f).convert("RGB"))).permute(2, 0, 1) for f in files])


def _train_mae(model, images, exp, steps=150, mask_ratio=0.75):
    """MAE pre-training with random masking; the loss on all patches (visible ones too, which the
    reconstruction at mask ratio 0 uses), per-patch normalised targets for norm_pix_loss models."""
    x = (exp.resize_to_model(images) - exp.pixel_mean) / exp.pixel_std
    model.train().requires_grad_(True)
    model.vit.embeddings.position_embeddings.requires_grad_(False)
    model.decoder.decoder_pos_embed.requires_grad_(False)
    for cfg in {id(c): c for c in (model.config, model.vit.config, model.vit.embeddings.config)}.values():
        cfg.mask_ratio = mask_ratio
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    n_patches = model.vit.embeddings.patch_embeddings.num_patches
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        out = model(pixel_values=x[idx], noise=torch.rand(len(idx), n_patches, generator=g))
        target = model.patchify(x[idx])
        if model.config.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        loss = ((out.logits - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.integration
@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_trained_mae_reconstructs_better_than_at_init(shared_data, norm_pix_loss):
    """Zero perturbation, mask ratio 0: encode + decode is a real autoencoder, not a pass-through --
    a few MAE training steps lower the reconstruction error on held-out real images."""
    images = _real_images(shared_data)
    train, held_out = images[::2], images[1::2]
    model = build_mae("tiny", norm_pix_loss)
    exp = GifMAE(ratio=1, mask_ratio=0.0, augment=False, output_size=None)
    exp.set_components(model)

    def mse():
        return ((exp.reconstruct(held_out) - exp.resize_to_model(held_out)) ** 2).mean().item()

    at_init = mse()
    exp.set_components(_train_mae(model, train, exp))
    trained = mse()
    assert trained < 0.5 * at_init, (at_init, trained)
    assert exp.mae.config.mask_ratio == 0.0  # reconstruct() encoded the whole image
    assert not exp.mae.training and not any(p.requires_grad for p in exp.mae.parameters())


def test_guidance_raises_the_score_of_the_same_inputs(clip_spec, seeds_batch):
    """score_after (projected, decoded) vs score_before (random perturbation) on the same seeds."""
    exp = _expander(clip_spec, radius=100.0, guidance={"step_size": 0.05})
    assert_guidance_raises_the_score(exp, *seeds_batch)


def test_radius_is_relative_to_the_token_std(clip_spec, seeds_batch):
    images, labels = seeds_batch
    seeds = image_seeds(5, range(4), 2)
    exp = _expander(clip_spec, ratio=2, augment=False, radius=0.0)
    z0 = exp.encode_tokens(exp.preprocess(images, seeds[:, :1]), seeds[:, 0]).z0
    assert exp.expand(images, labels, seeds).fields["radius_abs"] == [0.0] * 8
    exp = _expander(clip_spec, ratio=2, augment=False, radius=0.5)
    rows = exp.expand(images, labels, seeds).fields["radius_abs"]
    expected = (0.5 * z0.flatten(1).std(dim=1)).repeat_interleave(2).tolist()
    assert rows == pytest.approx(expected, rel=1e-5)


def test_bad_settings_and_missing_weights_are_clear(tmp_path, monkeypatch):
    with pytest.raises(ExpansionError, match="mask_ratio must be in"):
        GifMAE(ratio=2, mask_ratio=1.0)
    with pytest.raises(ExpansionError, match="dtype must be"):
        GifMAE(ratio=2, dtype="float8")
    with pytest.raises(ExpansionError, match="MAE folder .*nope does not exist"):
        load_mae(str(tmp_path / "nope"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExpansionError, match="'facebook/vit-mae-large' are not available.*huggingface-cli download"):
        load_mae("facebook/vit-mae-large")
    exp = GifMAE(ratio=2)  # the constructor never loads weights; prepare() does
    with pytest.raises(ExpansionError, match="facebook/vit-mae-large.*local folder"):
        exp.prepare(ExpansionContext("breastmnist", CLASSES, channels=1))


def test_saved_model_loads_from_a_local_folder(tmp_path):
    model = build_mae("tiny", seed=3)
    model.save_pretrained(tmp_path / "mae")
    loaded = load_mae(str(tmp_path / "mae"))
    assert loaded.config.hidden_size == 32
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.integration
def test_run_py_gif_mae_end_to_end(clip_spec, tmp_path):
    build_mae("tiny", seed=1).save_pretrained(tmp_path / "mae")
    metrics = run_tiny_job(tmp_path, "gif_mae", clip_spec, f"method.model_id={tmp_path / 'mae'}")
    assert metrics.method == "gif_mae" and metrics.expansion.num_images == 2 * 6
    store = ExpansionStore(Path(metrics.expansion.store), "", {})
    rows = store.read_rows()
    assert len(rows) == 12 and set(rows[0]) >= FIELDS
    per_parent = {}
    for r in rows:
        per_parent.setdefault(r["parent"], set()).add(r["copy"])
    assert per_parent == {p: {0, 1} for p in range(6)}
    assert rows[0]["mask_ratio"] == 0.0 and rows[0]["radius"] == 0.8
    assert all((store.images_dir / r["file"]).is_file() for r in rows)


def test_benchmark_script_runs_on_the_tiny_model(shared_data, tmp_path, capsys):
    from benchmarks import gif_mae_throughput as bench

    rows = tiny_modes(bench, shared_data, tmp_path, capsys, "--ratio", "2")
    assert rows["per_seed"]["seeds_per_call"] == [1, 2] and rows["per_seed"]["calls_per_repeat"] == 2
    assert rows["batched"]["seeds_per_call"] == [2, 2] and rows["batched"]["calls_per_repeat"] == 1
    assert all(r["images"] == 4 and r["dtype"] == "float32" for r in rows.values())


def test_real_architecture_has_the_released_size():
    from transformers import ViTMAEConfig, ViTMAEForPreTraining

    from expansion.architectures import ARCHITECTURES, RELEASED_PARAMS

    mae = ARCHITECTURES["real"]["mae"]
    with torch.device("meta"):
        model = ViTMAEForPreTraining(ViTMAEConfig(**mae))
    assert sum(p.numel() for p in model.parameters()) == RELEASED_PARAMS["mae"]
    n_tokens = 1 + (mae["image_size"] // mae["patch_size"]) ** 2
    assert (n_tokens, mae["hidden_size"]) == (197, 1024)
