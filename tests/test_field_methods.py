"""The field's methods (expansion/field/): each one's defining numbers on tiny random-weight models, and each
run end to end through the pipeline on a tiny prior offline."""

from __future__ import annotations

import pytest
import torch

from expansion.architectures import build_sd, save_sd
from expansion.base import ExpansionContext, ExpansionError
from expansion.field.diffusemix import DiffuseMix, fractal_blend, half_concat, is_black_image, julia_fractals
from expansion.field.distdiff import DistDiff, class_prototypes, prototype_energy
from expansion.field.real_guidance import OFFICIAL_STRENGTH, RealGuidance, filter_choice, official_strength
from expansion.field.txt2img import SDTxt2Img

CLASSES = ["cat", "dog"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    return build_sd("tiny", tmp_path_factory.mktemp("field_sd"))


def _ready(cls, parts, shots: int = 4, **settings):
    exp = cls(ratio=2, resolution=16, output_size=None, **settings)
    exp.context = ExpansionContext("toy", CLASSES, channels=3, shots_per_class=shots)
    exp.set_components(parts)
    return exp


class UNetCalls:
    """Counts the UNet's forward calls (and the batch each saw)."""

    def __init__(self, unet):
        self.batches: list[int] = []
        self.handle = unet.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _seeds(b: int = 2, k: int = 2) -> torch.Tensor:
    return torch.arange(b * k, dtype=torch.int64).reshape(b, k) + 11


def _images(b: int = 2) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, 16, 16), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


# ------------------------------------------------------------------------------------------------ real guidance


@pytest.mark.parametrize("strength, steps", [(0.15, 20), (0.5, 10), (0.1, 25)])
def test_real_guidance_runs_int_steps_times_strength_denoising_steps(tiny_sd, strength, steps):
    exp = _ready(RealGuidance, tiny_sd, strength=strength, num_inference_steps=steps)
    exp.strength = strength
    exp.clip = None
    with torch.no_grad(), UNetCalls(exp.unet) as calls:
        out = exp.expand(_images(), torch.tensor([0, 1]), _seeds())
    assert len(calls.batches) == int(steps * strength)  # DiffDA-Eval's 0.1 of 25 steps: 2 steps
    assert out.fields["denoising_steps"] == [int(steps * strength)] * 4
    assert out.fields["prompt"] == ["a photo of a cat"] * 2 + ["a photo of a dog"] * 2


def test_real_guidance_official_strength_per_shot_and_the_filter_rule():
    assert {s: official_strength(s) for s in (1, 2, 4, 8, 16)} == OFFICIAL_STRENGTH
    assert OFFICIAL_STRENGTH == {1: 0.5, 2: 0.4, 4: 0.35, 8: 0.2, 16: 0.15}  # r/100 of README:120
    with pytest.raises(ExpansionError, match="method.strength"):
        official_strength(5)
    # K = 4 classes: 1/K = 0.25; the first candidate above it, else the most confident
    p_label = torch.tensor([[0.20, 0.30, 0.90], [0.10, 0.24, 0.05], [0.26, 0.80, 0.10]])
    assert filter_choice(p_label, 4).tolist() == [1, 1, 0]


# -------------------------------------------------------------------------------------------------- sd_txt2img


def test_txt2img_runs_every_step_from_noise_and_ignores_the_seed_image(tiny_sd):
    exp = _ready(SDTxt2Img, tiny_sd, num_inference_steps=3, super_class="animal")
    with torch.no_grad(), UNetCalls(exp.unet) as calls:
        a = exp.expand(_images(), torch.tensor([0, 1]), _seeds())
        b = exp.expand(255 - _images(), torch.tensor([0, 1]), _seeds())
    assert calls.batches == [8, 8, 8] * 2  # 3 steps, 4 images, doubled for classifier-free guidance
    assert torch.equal(a.images, b.images)
    assert a.fields["prompt"][0] == "a photo of a cat, a type of animal"


# --------------------------------------------------------------------------------------------------- diffusemix


def test_diffusemix_hybrid_keeps_the_original_first_with_a_20px_ramp():
    size, w = 64, 20
    original, edit = torch.zeros(2, 3, size, size), torch.ones(2, 3, size, size)
    hybrid = half_concat(original, edit, torch.tensor([False, True]), w)
    horizontal, vertical = hybrid[0, 0], hybrid[1, 0]
    head = size // 2 - w // 2
    assert torch.all(horizontal[:, :head] == 0) and torch.all(horizontal[:, head + w :] == 1)  # left half original
    assert torch.allclose(horizontal[0, head : head + w], torch.linspace(0, 1, w))
    assert torch.equal(vertical, horizontal.T)  # top half original
    # the fractal blend on constant images: 0.8 * hybrid + 0.2 * fractal
    blended = fractal_blend(hybrid, torch.full_like(hybrid, 0.5), 0.2)
    assert torch.allclose(blended[0, 0, 0, 0], torch.tensor(0.1)) and torch.allclose(
        blended[0, 0, 0, -1], torch.tensor(0.9)
    )


def test_diffusemix_black_filter_is_the_official_as_coded_one():
    white, black, grey = torch.ones(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.full((1, 3, 8, 8), 0.5)
    assert is_black_image(torch.cat([white, black, grey])).tolist() == [True, False, False]  # it flags white images


def test_diffusemix_every_prompt_for_every_image_and_edits_per_seed(tiny_sd, tmp_path):
    parts = build_sd("tiny", tmp_path, unet_in_channels=8)
    exp = _ready(DiffuseMix, parts, num_inference_steps=2, blend_width=4, prompts=("snowy", "sunset", "mosaic"))
    exp.fractals = None
    seeds = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    assert exp.prompts_for(seeds) == ["snowy", "sunset", "mosaic"] * 2
    with torch.no_grad(), UNetCalls(exp.unet) as calls:
        out = exp.expand(_images(), torch.tensor([0, 1]), seeds)
    assert calls.batches == [18, 18]  # text, image and unconditional branches of 6 images, 2 steps
    assert out.images.shape == (2, 3, 3, 16, 16)
    fractals = julia_fractals(seeds.reshape(-1), 16)
    assert fractals.shape == (6, 3, 16, 16) and fractals.std() > 0.05 and not torch.equal(fractals[0], fractals[1])
    with pytest.raises(ExpansionError, match="InstructPix2Pix"):
        from expansion.stable_diffusion import check_unet_inputs

        check_unet_inputs(tiny_sd["unet"], 8, "tiny")


def test_diffusemix_fractal_folder_is_checked_and_keys_the_store(tmp_path):
    from PIL import Image

    folder = tmp_path / "fractals"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"f{i}.png")
    exp = DiffuseMix(ratio=2, resolution=16, blend_width=4, fractal_dir=str(folder))
    assert exp.load_fractals().shape == (2, 3, 16, 16)
    before = exp.signature()["fractal_sha256"]
    Image.new("RGB", (8, 8), (0, 0, 255)).save(folder / "f1.png")
    assert exp.signature()["fractal_sha256"] != before  # new fractals in the same folder: a new store
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (folder / "link.png").symlink_to(outside)
    with pytest.raises(ExpansionError, match="link.png is not a file inside"):
        exp.load_fractals()
    (folder / "link.png").unlink()
    (folder / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(ExpansionError, match="broken.jpg is not a readable image"):
        exp.load_fractals()
    with pytest.raises(ExpansionError, match="is not a folder"):
        DiffuseMix(ratio=2, fractal_dir=str(tmp_path / "missing")).load_fractals()


# ------------------------------------------------------------------------------------------------------ distdiff


def test_distdiff_prototypes_are_one_global_and_k_local_per_class():
    features = torch.tensor(
        [[1.0, 0, 0], [0.9, 0.1, 0], [0, 1.0, 0], [0, 0.9, 0.1], [0, 0, 1.0], [0.2, 0, 1], [0, 0.3, 1]]
    )
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    g, local = class_prototypes(features, labels, 2, k=2)
    assert g.shape == (2, 3) and local.shape == (2, 2, 3)
    assert torch.allclose(g.norm(dim=1), torch.ones(2)) and torch.allclose(local.norm(dim=2), torch.ones(2, 2))
    # class 0's two clusters are its x-like and its y-like images (average linkage)
    assert sorted(local[0].argmax(1).tolist()) == [0, 1]
    _, few = class_prototypes(features, labels, 2, k=5)  # fewer images than K: the last repeated
    assert few.shape == (2, 5, 3) and torch.equal(few[1, 2], few[1, 4])
    # the energy uses the local prototype of the largest dot product with f
    f = torch.tensor([[0.0, 1.0, 0.0]])
    energy = prototype_energy(f, torch.tensor([0]), g, local)
    expected = (f - g[0]).norm() + (f - local[0][local[0].argmax(1) == 1][0]).norm()
    assert torch.allclose(energy, expected.reshape(1))


def _distdiff(tiny_sd, **settings):
    exp = _ready(DistDiff, tiny_sd, num_inference_steps=10, guidance_step=4, **settings)
    from expansion.gif.guides import ProbeGuide
    from expansion.probe import train_probe

    images = _images(4)
    labels = torch.tensor([0, 0, 1, 1])
    exp.guide = ProbeGuide(train_probe(images, labels, 2, epochs=1, min_steps=2))
    with torch.no_grad():
        features = exp.guide.probe.embed(images.float() / 255)
    exp.global_protos, exp.local_protos = class_prototypes(features, labels, 2, exp.settings.num_local)
    return exp


def test_distdiff_guidance_runs_once_at_its_step_and_stays_in_the_ball(tiny_sd):
    exp = _distdiff(tiny_sd, strength=0.5)
    exp._place(torch.device("cpu"))
    scheduler = exp.scheduler()
    scheduler.set_timesteps(50)
    assert scheduler.timesteps[50 - 20 : 50 - 20 + 2].tolist() == [381, 361]  # the official guidance steps
    with torch.no_grad(), UNetCalls(exp.unet) as calls:
        out = exp.expand(_images(), torch.tensor([0, 1]), _seeds())
    # int(10 x 0.5) = 5 denoising steps and P = 2 look-ahead steps, each on 4 images x 2 (CFG)
    assert len(calls.batches) == 5 + 2
    assert all(e == e for e in out.fields["guidance_energy"])  # computed for every image
    # the projection: the moved latent is within epsilon of the one it moved, and epsilon 0 moves nothing
    z = torch.randn(3, 4, 8, 8)
    flat = torch.tensor([1, 2, 3])
    cond = exp.conditioning(["a photo of a cat."] * 3, torch.device("cpu"))
    ts = scheduler.timesteps[30:32]
    with torch.enable_grad():
        moved, _energy = exp.transform_guidance(z, scheduler, ts, cond, torch.tensor([0, 1, 0]), flat)
    assert (moved - z).abs().max() <= 0.2 + 1e-6 and not torch.equal(moved, z)
    still = _distdiff(tiny_sd, epsilon=0.0)
    still._place(torch.device("cpu"))
    with torch.enable_grad():
        same, _ = still.transform_guidance(z, scheduler, ts, cond, torch.tensor([0, 1, 0]), flat)
    assert torch.equal(same, z)


def test_distdiff_gradient_step_lowers_the_energy_and_is_affine_per_channel(tiny_sd):
    """Without the projection (a huge radius) the step moves the drawn transform down the look-ahead energy
    (a small rho lowers it), and the result is ``z (1 + a) + c`` with one (a, c) per image and channel."""
    z = torch.randn(2, 4, 8, 8)
    flat, labels = torch.tensor([5, 6]), torch.tensor([0, 1])
    exp = _distdiff(tiny_sd, rho=1e-3, epsilon=1e6)
    exp._place(torch.device("cpu"))
    scheduler = exp.scheduler()
    scheduler.set_timesteps(10)
    ts = scheduler.timesteps[6:8]
    cond = exp.conditioning(["a photo of a cat.", "a photo of a dog."], torch.device("cpu"))
    with torch.enable_grad():
        moved, before = exp.transform_guidance(z, scheduler, ts, cond, labels, flat)
    with torch.no_grad():
        after = exp.lookahead_energy(moved, scheduler, ts, cond, labels)
    assert torch.all(after < before)
    step, zz = moved.flatten(2), z.flatten(2)
    a = (step[..., :1] - step[..., 1:2]) / (zz[..., :1] - zz[..., 1:2])
    assert torch.allclose(step, a * zz + (step[..., :1] - a * zz[..., :1]), atol=1e-4)


def test_distdiff_official_fidelity_keeps_the_unnormalised_features(tiny_sd):
    paper, official = _distdiff(tiny_sd), _distdiff(tiny_sd, fidelity="official")
    assert (paper.settings.sample_features, paper.settings.guide_input) == ("normalized", "unit")
    assert (official.settings.sample_features, official.settings.guide_input) == ("raw", "signed")
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.allclose(paper.guide_features(x).norm(dim=1), torch.ones(2))
    assert not torch.allclose(official.guide_features(x).norm(dim=1), torch.ones(2))


# ---------------------------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("name", ["sd_txt2img", "real_guidance", "diffusemix", "distdiff"])
def test_each_field_method_runs_through_the_pipeline_on_a_tiny_prior(name, tmp_path, tiny_sd_models):
    from experiments.training.pipeline import run
    from tests.conftest import job_config
    from tests.test_contract import tiny_overrides

    sd, clip = tiny_sd_models
    weights = {"sd": sd, "ip2p": save_sd("tiny", tmp_path, unet_in_channels=8), "clip": _Attrs(clip)}
    cfg = job_config(
        ["dataset=breastmnist", "dataset.train_per_class=4", f"method={name}", *tiny_overrides(name, weights)]
        + ["train.epochs=1", "quality.enabled=false", "train.compare_original=false"]
    )
    cfg.paths.store_dir, cfg.paths.fit_dir = str(tmp_path / "stores"), str(tmp_path / "fits")
    record = run(cfg, tmp_path / "run")
    assert record.expansion.num_images == 2 * 8
    assert record.training.num_train_images == 8 + 16


class _Attrs(dict):
    __getattr__ = dict.__getitem__


def test_distdiff_gradient_checkpointing_is_speed_only(tmp_path):
    """Checkpointing the UNet and VAE decoder in the guidance's backward pass (the official
    --gradient_checkpointing) saves memory and changes no number."""
    z, flat, labels = torch.randn(2, 4, 8, 8), torch.tensor([3, 4]), torch.tensor([0, 1])
    moved = {}
    for on in (True, False):
        parts = build_sd("tiny", tmp_path / str(on))
        exp = _distdiff(parts, gradient_checkpointing=on)
        exp._place(torch.device("cpu"))
        assert exp.unet.is_gradient_checkpointing == on
        scheduler = exp.scheduler()
        scheduler.set_timesteps(10)
        cond = exp.conditioning(["a photo of a cat.", "a photo of a dog."], torch.device("cpu"))
        with torch.enable_grad():
            moved[on], _ = exp.transform_guidance(z, scheduler, scheduler.timesteps[6:8], cond, labels, flat)
    assert torch.allclose(moved[True], moved[False], atol=1e-5)
    assert "gradient_checkpointing" not in exp.signature()
