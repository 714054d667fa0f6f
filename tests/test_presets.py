"""Presets in one place (experiments/presets.py): a method built by Hydra and the same method built by the
factory ``create_expander`` are the same expander, for every registered method x dataset x fidelity; the
per-dataset official entries reach a Python-built method; and the two fidelity switches no stand-in used
to tell apart: ``sample_normalization: none`` and the VAE swap at load time."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from experiments.config import CONFIG_DIR, method_names
from experiments.presets import DATASET_PRESETS, create_expander, preset_values
from experiments.training.job import build_expander
from tests.conftest import compose

DATASETS = sorted(p.stem for p in (CONFIG_DIR / "dataset").glob("*.yaml"))
DATASET_PATHS = {"imagefolder": "/data/my_set", "npz": "/data/my_scans.npz"}
METHODS = [m for m in method_names() if m != "imported"]


def _hydra_built(method: str, dataset: str, fidelity: str):
    overrides = [f"method={method}", f"dataset={dataset}", f"method.fidelity={fidelity}"]
    if dataset in DATASET_PATHS:
        overrides.append(f"dataset.path={DATASET_PATHS[dataset]}")
    cfg = compose(overrides)
    return build_expander(cfg.method), str(cfg.dataset.name)


def _has_fidelity(method: str) -> bool:
    return any(f.name == "fidelity" for f in dataclasses.fields(create_expander(method).settings_class))


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
def test_hydra_and_the_factory_build_the_same_expander_for_every_dataset_and_fidelity(method):
    fidelities = ("paper", "official") if _has_fidelity(method) else (None,)
    for dataset in DATASETS:
        for fidelity in fidelities:
            if fidelity is None:
                cfg = compose([f"method={method}", f"dataset={dataset}"] + _path(dataset))
                hydra, name = build_expander(cfg.method), str(cfg.dataset.name)
            else:
                hydra, name = _hydra_built(method, dataset, fidelity)
            factory = create_expander(method, dataset=name, fidelity=fidelity)
            where = f"{method} on {dataset} ({fidelity})"
            assert type(factory) is type(hydra), where
            assert factory.ratio == hydra.ratio and factory.settings == hydra.settings, where
            assert factory.signature() == hydra.signature(), where


def _path(dataset):
    return [f"dataset.path={DATASET_PATHS[dataset]}"] if dataset in DATASET_PATHS else []


def test_the_factory_takes_overrides_as_the_command_line_does():
    hydra = build_expander(
        compose(["method=gif_sd", "dataset=dtd", "method.strength=0.3", "method.guide.kind=probe"]).method
    )
    factory = create_expander("gif_sd", dataset="dtd", strength=0.3, guide={"kind": "probe"})
    assert factory.settings == hydra.settings and factory.settings.strength == 0.3
    assert create_expander("original") is None
    with pytest.raises(KeyError, match="unknown method 'gif_sdd'; registered: .*gif_sd"):
        create_expander("gif_sdd")


def test_a_python_built_official_gif_sd_gets_its_datasets_official_entries():
    """It used to get CIFAR's seed normalisation on DTD (the per-dataset entries lived in YAML only)."""
    dtd = create_expander("gif_sd", dataset="dtd", fidelity="official").settings
    assert dtd.guide.seed_normalization == "dtd" and dtd.guide.sample_normalization == "none"
    assert create_expander("gif_sd", dataset="cars", fidelity="official").settings.guide.seed_normalization == "cifar"
    flowers = create_expander("gif_sd", dataset="flowers102", fidelity="official").settings
    assert flowers.prompt_class_names == tuple(str(i) for i in range(1, 103))
    path = create_expander("gif_sd", dataset="pathmnist", fidelity="official").settings
    assert path.vae_id == "stabilityai/sd-vae-ft-mse"
    assert (path.dreambooth.batch_size, path.dreambooth.class_images, path.dreambooth.optimizer) == (
        4,
        "real",
        "adamw_8bit",
    )
    paper = create_expander("gif_sd", dataset="pathmnist").settings
    assert paper.vae_id is None and (paper.dreambooth.batch_size, paper.dreambooth.optimizer) == (2, "adamw")
    assert create_expander("gif_sd", dataset="pets").ratio == 10


def test_the_cifar100_unguided_official_preset_is_cifars_ablation():
    """CIFAR/..._wo_optimization_final.py l.531-532: fix_seed(888) commented out, all k copies of a seed in one
    pass, random prompts kept; every other official ablation reseeds per pass of 2 with the fixed prompt."""
    cifar = create_expander("sd_img2img", dataset="cifar100_subset", fidelity="official").settings
    assert (cifar.unguided_noise, cifar.group_size, cifar.prompt_randomization) == ("per_image", None, True)
    cars = create_expander("sd_img2img", dataset="cars", fidelity="official").settings
    assert (cars.unguided_noise, cars.group_size, cars.prompt_randomization) == ("reseeded_per_pass", 2, False)
    digits = create_expander("sd_img2img", dataset="digits", fidelity="official").settings
    assert digits.prompt_randomization is False
    assert (
        preset_values("sd_img2img", "cifar100_subset", "paper") == DATASET_PRESETS["gif_sd"]["cifar100_subset"]["paper"]
    )


def test_no_fidelity_pick_is_written_by_hand_in_conf():
    hand_written = [
        p for p in CONFIG_DIR.rglob("*.yaml") if "defaults" not in p.parts and "${fidelity_pick:" in p.read_text()
    ]
    assert not hand_written


# --------------------------------------------------------------------------- the two untested switches


def test_sample_normalization_none_leaves_the_samples_unnormalised_whatever_the_guides_statistics():
    """With CLIP's own statistics (not the stand-ins' mean 0 / std 1): ``none`` feeds the samples as they are,
    ``clip`` normalises them, and the seeds follow their own setting."""
    from expansion.gif.guides import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, ClipGuide

    torch.manual_seed(0)
    model = _LinearClip()
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    mean = torch.tensor(OPENAI_CLIP_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, dtype=torch.float64).view(1, 3, 1, 1)

    def guide(sample_normalization):
        return ClipGuide(
            model,
            lambda prompts: torch.arange(len(prompts)),
            ["a", "b"],
            image_size=8,
            seed_normalization="clip",
            sample_normalization=sample_normalization,
        ).double()

    raw = F.normalize(model.encode_image(x), dim=-1)
    normalised = F.normalize(model.encode_image((x - mean) / std), dim=-1)
    assert (raw - normalised).abs().max() > 1e-2  # the statistics matter for this guide
    assert torch.allclose(guide("none")(x).embeddings, raw, atol=1e-12)
    assert torch.allclose(guide("clip")(x).embeddings, normalised, atol=1e-12)
    assert torch.allclose(guide("none")(x, seed=True).embeddings, normalised, atol=1e-12)


class _LinearClip(torch.nn.Module):
    """An open_clip stand-in whose image features are a fixed linear map of the pixels."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 6, bias=True).double()
        self.logit_scale = torch.nn.Parameter(torch.tensor(0.0, dtype=torch.float64))

    def encode_image(self, x):
        return self.proj(x.flatten(1).to(self.proj.weight))

    def encode_text(self, tokens):
        return torch.nn.functional.one_hot(tokens % 6, 6).to(self.proj.weight)


def test_the_vae_is_swapped_at_load_time(tmp_path):
    """``vae_id`` (the official medical runs' ft-MSE VAE) replaces the model's own VAE when the prior is
    loaded: the loaded VAE's weights are the other folder's, not the SD folder's."""
    from diffusers import AutoencoderKL

    from expansion.architectures import build_sd, save_sd
    from expansion.gif.sd import GifSD

    sd_folder = save_sd("tiny", tmp_path / "sd", seed=0)
    other_vae = build_sd("tiny", tmp_path / "other", seed=1)["vae"]
    other_vae.save_pretrained(str(tmp_path / "vae"))
    own = AutoencoderKL.from_pretrained(str(sd_folder / "vae"))
    swapped = GifSD(ratio=1, model_id=str(sd_folder), vae_id=str(tmp_path / "vae"), local_files_only=True)
    swapped.load_prior()
    plain = GifSD(ratio=1, model_id=str(sd_folder), local_files_only=True)
    plain.load_prior()
    key = next(iter(own.state_dict()))
    assert torch.equal(plain.vae.state_dict()[key], own.state_dict()[key])
    assert torch.equal(swapped.vae.state_dict()[key], other_vae.state_dict()[key])
    assert not torch.equal(swapped.vae.state_dict()[key], own.state_dict()[key])
