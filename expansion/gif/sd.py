"""GIF-SD: GIF with a Stable Diffusion prior (arXiv 2211.13976); ``sd_img2img`` is its unguided
ablation (``guided: false, radius: 0``).

The prior, for each seed and each of its k output images (every random draw from the output
image's own seed):

1. preprocess: resize to ``resolution`` (512, bicubic), then a rotation in [-15, 15] degrees and a
   horizontal flip with p = 0.5 (:func:`rotate_flip`);
2. encode = img2img: VAE-encode, noise to ``t = strength x T`` and denoise with DDIM
   (``num_inference_steps`` = 50, eta 0) under classifier-free guidance
   ``eps = eps_u + s (eps_c - eps_u)``, prompt "{domain} {adjective} {class}" (medical sets: the
   modality prefix as the only domain); ``z0`` is the denoised latent, scaled by the VAE's
   ``scaling_factor`` (the space GIF perturbs, where ``radius`` is absolute);
3. decode with the VAE.

The official per-dataset settings (guidance scale, strength, radius, ratio) are in
``conf/method/gif_sd.yaml``. ``fidelity: official`` (docs/fidelity.md) sets every quirk of the
official run; each is also a setting of its own:

* ``img2img_start``: ``first_step`` noises the seed latent to the first denoising timestep
  (strength 0.9: t=881); ``compvis``: one DDIM step higher (t=901) while denoising still starts at
  t=881, as the CompVis sampler (``ldm/models/diffusion/ddim.py`` ``stochastic_encode`` /
  ``decode``) the official code calls;
* ``seed_augmentation``: ``per_image`` rotation/flip, or ``per_pass`` (one draw per pass of
  ``group_size`` images, as the official DataLoader yields one augmented seed per pass);
* ``rotation_interpolation``: ``bilinear`` or ``nearest`` (torchvision's ``RandomRotation``);
* ``unguided_noise`` (unguided only): ``per_image`` noise, or ``reseeded_per_pass``: the official
  ``*_wo_optimization`` scripts call ``fix_seed(888)`` before every pass, so the i-th image of
  every pass gets the same VAE and DDIM noise;
* per dataset, in the config: Flowers' SD prompts use the folder numbers as class names
  (``prompt_class_names``), the medical sets decode with ``vae_id`` stabilityai/sd-vae-ft-mse,
  and the DreamBooth settings of :mod:`expansion.gif.dreambooth`.

The DDIM scheduler is always set to the CompVis sampler's behaviour (:func:`compvis_ddim`),
whatever the checkpoint's scheduler config says. Our own choices: the UNet and text encoder run
in float16 on a GPU (``dtype: float32`` is the official precision); several seeds go through one
pass and by default a seed's k samples are scored together; outputs are stored at
``output_size`` 256, in luma for 1-channel datasets.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..base import ExpansionContext, ExpansionError, ImageSet, train_tensors
from ..seeding import derive, image_seeds, per_image_rand
from ..settings import check_ranges, fidelity_quirk, keyed_when_set, signature_of, speed_only
from ..stable_diffusion import StableDiffusionParts, load_sd_components, sd_weights
from ..weights import Weights, unavailable_error
from .dreambooth import DreamBoothSettings
from .guides import to_rgb
from .loading import check_dtype, pretrained_source
from .template import Encoding, GifExpander, GifSettings

DOMAINS = ("an image of", "a real-world photo of", "a cartoon image of", "an oil painting of", "a sketch of")
ADJECTIVES = (
    "",
    "colorful",
    "stylized",
    "high-contrast",
    "low-contrast",
    "posterized",
    "solarized",
    "sheared",
    "bright",
    "dark",
)


@dataclass(frozen=True)
class SDDreamBooth(DreamBoothSettings):
    """DreamBooth before expanding (the paper's medical sets): its settings and the instance prompt
    template (``{prefix}``: the dataset's prompt prefix, ``{class}``: the class name, from
    ``class_names`` when given, else the dataset's)."""

    instance_prompt: str = "{prefix} {class}"
    class_names: tuple[str, ...] | None = keyed_when_set()


IMG2IMG_STARTS = ("first_step", "compvis")
SEED_AUGMENTATIONS = ("per_image", "per_pass")
ROTATION_INTERPOLATIONS = ("bilinear", "nearest")
UNGUIDED_NOISES = ("per_image", "reseeded_per_pass")
OFFICIAL_PASS_SEED = 888  # fix_seed(888) in the official *_wo_optimization scripts


@dataclass(frozen=True)
class SDSettings(GifSettings):
    """GIF-SD's settings: GIF's (:class:`GifSettings`; ``radius`` absolute on the scaled latent)
    and the prior's: the SD model (hub id or diffusers folder), img2img's ``guidance_scale``,
    ``strength``, ``num_inference_steps`` and ``resolution``, the prompt's random domain and
    adjective, ``prompt_class_names`` (the class names in SD's prompt; None = the dataset's),
    DreamBooth, the UNet/text encoder ``dtype`` (auto: float16 on GPU, float32 on CPU), the VAE's
    dtype and ``vae_id`` (a VAE to use instead of the model's own), and the official run's quirks
    (module doc)."""

    model_id: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    guidance_scale: float = 50.0
    strength: float = 0.9
    num_inference_steps: int = 50
    resolution: int = 512
    prompt_randomization: bool = True
    domains: tuple[str, ...] = DOMAINS
    adjectives: tuple[str, ...] = ADJECTIVES
    prompt_class_names: tuple[str, ...] | None = keyed_when_set()
    dreambooth: SDDreamBooth | None = None
    dtype: str = "auto"
    vae_dtype: str = "float32"
    vae_id: str | None = keyed_when_set()
    img2img_start: str = fidelity_quirk("first_step", "compvis")
    seed_augmentation: str = fidelity_quirk("per_image", "per_pass")
    rotation_interpolation: str = fidelity_quirk("bilinear", "nearest")
    unguided_noise: str = fidelity_quirk("per_image", "reseeded_per_pass")
    local_files_only: bool | None = speed_only()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.strength <= 1.0:
            raise ExpansionError(f"strength must be in (0, 1], got {self.strength}")
        if self.num_inference_steps < 1 or self.resolution < 8 or self.resolution % 8:
            raise ExpansionError("need num_inference_steps >= 1 and a resolution divisible by 8")
        check_dtype("dtype", self.dtype)
        check_dtype("vae_dtype", self.vae_dtype)
        check_ranges(
            self,
            [
                (self.img2img_start in IMG2IMG_STARTS, "img2img_start", f"one of {IMG2IMG_STARTS}"),
                (self.seed_augmentation in SEED_AUGMENTATIONS, "seed_augmentation", f"one of {SEED_AUGMENTATIONS}"),
                (
                    self.rotation_interpolation in ROTATION_INTERPOLATIONS,
                    "rotation_interpolation",
                    f"one of {ROTATION_INTERPOLATIONS}",
                ),
                (self.unguided_noise in UNGUIDED_NOISES, "unguided_noise", f"one of {UNGUIDED_NOISES}"),
            ],
        )
        if (
            self.img2img_start == "compvis"
            and int(self.num_inference_steps * self.strength) >= self.num_inference_steps
        ):
            raise ExpansionError(
                "img2img_start=compvis needs strength < 1: the CompVis sampler noises one step above its "
                "first denoising step, and there is none above the last (set method.img2img_start=first_step)"
            )

    @property
    def uses_passes(self) -> bool:
        """Whether the passes of ``group_size`` shape the output beyond guidance."""
        return self.seed_augmentation == "per_pass" or (not self.guided and self.unguided_noise == "reseeded_per_pass")

    def signature(self) -> dict[str, Any]:
        """GIF's; ``unguided_noise`` only counts unguided, and the passes count whenever they are used."""
        out = super().signature()
        if self.guided:
            out.pop("unguided_noise", None)
        elif self.uses_passes:
            out["group_size"] = self.group_size
        return out


def vae_weights(vae_id: str) -> Weights:
    return Weights("the VAE", vae_id, "method.vae_id", hub_files=("config.json",))


def compvis_ddim(config: Mapping[str, Any]):
    """A DDIM scheduler with the CompVis sampler's behaviour (``ldm/models/diffusion/ddim.py``), the
    model's noise schedule kept: no x0 clipping or thresholding, timesteps ``range(0, T, T // S) + 1``
    (``leading`` spacing, offset 1), the last step's previous alpha ``alphas_cumprod[0]``. eta 0 is
    passed at each step."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(
        dict(config),
        clip_sample=False,
        thresholding=False,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
    )


def rotate_flip(x: torch.Tensor, seeds: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """GIF-SD's seed augmentation on ``x [N, C, H, W]``: a rotation in [-15, 15] degrees and a
    horizontal flip with p = 0.5 per image, drawn from ``seeds [N]`` (one batched grid_sample with
    interpolation ``mode``, zero fill)."""
    draws = per_image_rand(derive(seeds, "augment"), (2,), device=x.device).reshape(-1, 2)
    angle = (draws[:, 0] * 30 - 15) * (math.pi / 180)
    flip = torch.where(draws[:, 1] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos * flip, -sin, torch.zeros_like(cos)], -1),
            torch.stack([sin * flip, cos, torch.zeros_like(cos)], -1),
        ],
        1,
    ).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def pass_first_seeds(seeds: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``seeds [B, k]`` -> ``[B, k]``: each image's seed replaced by the seed of the first image of
    its pass (passes of ``group_size`` consecutive copies; None = all k)."""
    k = seeds.shape[1]
    size = group_size or k
    return seeds[:, (torch.arange(k) // size) * size]


def official_pass_noise_seeds(shape: tuple[int, int], group_size: int | None) -> torch.Tensor:
    """``[B, k]`` seeds that depend only on each copy's position in its pass: what reseeding with 888
    before every pass gives (every pass of every seed draws the same noise)."""
    b, k = shape
    position = torch.arange(k) % (group_size or k)
    return image_seeds(OFFICIAL_PASS_SEED, [0], k)[0][position].expand(b, k)


class GifSD(StableDiffusionParts, GifExpander):
    name = "gif_sd"
    settings_class = SDSettings

    @property
    def needs_fit(self) -> bool:
        return super().needs_fit or self.settings.dreambooth is not None

    def prepare(self, context: ExpansionContext) -> None:
        """GIF's set-up, after checking the class-name lists against the dataset (before any loading)."""
        s = self.settings
        lists = {"method.prompt_class_names": s.prompt_class_names}
        if s.dreambooth is not None:
            lists["method.dreambooth.class_names"] = s.dreambooth.class_names
        for key, names in lists.items():
            if names is not None and len(names) != len(context.class_names):
                raise ExpansionError(
                    f"{key} has {len(names)} names for the dataset's {len(context.class_names)} classes"
                )
        super().prepare(context)

    # -- the prior's loader -----------------------------------------------------------------
    def prior_weights(self) -> list[Weights]:
        weights = sd_weights(self.settings.model_id, self.settings.revision)
        if self.settings.dreambooth is not None:  # DreamBooth fine-tunes this model first
            weights = replace(weights, what="Stable Diffusion (the base of this dataset's DreamBooth fine-tune)")
        return [weights] + ([vae_weights(self.settings.vae_id)] if self.settings.vae_id else [])

    def load_prior(self) -> None:
        s = self.settings
        components = load_sd_components(s.model_id, s.revision, s.local_files_only)
        if s.vae_id:
            components["vae"] = load_vae(s.vae_id, s.local_files_only)
        self.set_components(components)

    def scheduler(self):
        """A fresh DDIM sampler (:func:`compvis_ddim`) on the model's noise schedule."""
        return compvis_ddim(self.scheduler_config)

    # -- fit: DreamBooth and/or the probe guide -------------------------------------------------
    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        images, labels = train_tensors(train)
        if self.settings.dreambooth is not None:
            self._dreambooth(images, labels, artifact_dir)
        self.fit_probe_guide(images, labels, artifact_dir)

    def prior_fit_signature(self) -> dict[str, Any]:
        s = self.settings
        dreambooth = None if s.dreambooth is None else signature_of(s.dreambooth)
        out = {"kind": "stable_diffusion", "model_id": s.model_id, "revision": s.revision, "dreambooth": dreambooth}
        if s.vae_id:  # DreamBooth trains on this VAE's latents (keyed only when set: older fits are still found)
            out["vae_id"] = s.vae_id
        return out

    def _dreambooth(self, images: torch.Tensor, labels: torch.Tensor, artifact_dir: Path) -> None:
        """DreamBooth (400 steps, lr 2e-6, text encoder trained, one instance prompt per class);
        with prior preservation, class images are the base model's own samples of each class prompt."""
        from .dreambooth import (
            check_optimizer,
            dreambooth_finetune,
            finetuned_available,
            generate_class_images,
            load_finetuned,
            save_finetuned,
        )

        out = artifact_dir / "dreambooth"
        spec = self.settings.dreambooth
        if not finetuned_available(out):
            prompts = [self._instance_prompt(spec, int(y)) for y in labels]
            device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                check_optimizer(spec, device)
            except ValueError as exc:
                raise ExpansionError(str(exc)) from exc
            class_images = class_prompts = None
            if spec.prior_preservation and spec.class_images == "real":  # the official PathMNIST run
                class_images, class_prompts = images, prompts
            elif spec.prior_preservation:
                per_class = max(1, spec.num_class_images)
                class_prompts, chunks = [], []
                for c in range(len(self.context.class_names)):
                    prompt = self._instance_prompt(spec, c)
                    chunks.append(
                        generate_class_images(
                            self.unet,
                            self.text_encoder,
                            self.vae,
                            self.tokenizer,
                            self.scheduler(),
                            prompt,
                            per_class,
                            resolution=spec.resolution,
                            seed=spec.seed + c,
                            device=device,
                        )
                    )
                    class_prompts += [prompt] * per_class
                class_images = torch.cat(chunks)
            dreambooth_finetune(
                self.unet,
                self.text_encoder,
                self.vae,
                self.tokenizer,
                _training_scheduler(self.scheduler_config),
                images,
                prompts,
                spec,
                class_images=class_images,
                class_prompts=class_prompts,
                device=device,
                mixed_precision="fp16" if device == "cuda" else None,
            )
            save_finetuned(self.unet, self.text_encoder if spec.train_text_encoder else None, out)
        unet, text_encoder = load_finetuned(out)
        self.add_module("unet", unet)
        if text_encoder is not None:
            self.add_module("text_encoder", text_encoder)
        self._placed_on = None

    def _instance_prompt(self, spec: SDDreamBooth, label: int) -> str:
        prefix = self.context.prompt_prefix or "a photo of"
        name = self.class_name(label, spec.class_names)
        return " ".join(spec.instance_prompt.format(prefix=prefix, **{"class": name}).split())

    def class_name(self, label: int, names: tuple[str, ...] | None) -> str:
        """Class ``label``'s name from ``names`` (checked against the dataset in :meth:`prepare`) or the dataset's."""
        return self.context.class_names[label] if names is None else names[label]

    # -- encode: img2img ----------------------------------------------------------------------
    def prompts(self, labels: torch.Tensor, seeds: torch.Tensor) -> list[str]:
        """One prompt per output image: "{domain} {adjective} {class}" drawn with the image's seed."""
        s = self.settings
        prefix = self.context.prompt_prefix
        domains = [prefix] if prefix else list(s.domains)
        prompt_seeds = derive(seeds, "prompt").tolist()
        out = []
        for label, row in zip(labels.tolist(), prompt_seeds):
            name = self.class_name(label, s.prompt_class_names)
            for seed in row:
                if s.prompt_randomization:
                    rng = random.Random(seed)
                    parts = (rng.choice(domains), rng.choice(s.adjectives), name)
                else:
                    parts = (domains[0], name)
                out.append(" ".join(p for p in parts if p))
        return out

    def preprocess(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` -> ``[-1, 1]`` ``[B*k, 3, R, R]``: bicubic resize, then
        :func:`rotate_flip` per output image (``per_pass``: drawn with the pass's first seed)."""
        s = self.settings
        r = s.resolution
        x = to_rgb(images.float() / 255.0)
        x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False).clamp(0, 1)
        x = x.repeat_interleave(seeds.shape[1], dim=0)
        if s.seed_augmentation == "per_pass":
            seeds = pass_first_seeds(seeds, s.group_size)
        return rotate_flip(x, seeds.reshape(-1), s.rotation_interpolation) * 2 - 1

    def encode(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> Encoding:
        s = self.settings
        n = seeds.numel()
        prompts = self.prompts(labels, seeds)
        z0 = self.img2img(self.preprocess(images, seeds), prompts, seeds)
        return Encoding(
            z0, fields={"prompt": prompts, "strength": [s.strength] * n, "guidance_scale": [s.guidance_scale] * n}
        )

    def img2img(self, x: torch.Tensor, prompts: list[str], seeds: torch.Tensor) -> torch.Tensor:
        """Encode, noise (:meth:`noised_start`), DDIM back with classifier-free guidance; returns z0 (fp32).
        Unguided with ``unguided_noise: reseeded_per_pass`` the noise depends on the position in the pass only."""
        s = self.settings
        device = x.device
        noise_seeds = seeds
        if not s.guided and s.unguided_noise == "reseeded_per_pass":
            noise_seeds = official_pass_noise_seeds(tuple(seeds.shape), s.group_size)
        flat_seeds = noise_seeds.reshape(-1)
        z = self.vae_latents(x, flat_seeds)
        noise = per_image_rand(derive(flat_seeds, "noise"), z.shape[1:], normal=True, device=device)
        scheduler, latents, timesteps = self.noised_start(z, noise)
        if len(timesteps) == 0:
            return z
        return self.denoise(scheduler, latents, timesteps, self.conditioning(prompts, device))

    def denoise(self, scheduler, latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """DDIM (eta 0) from ``latents`` over ``timesteps`` under classifier-free guidance
        ``eps = eps_u + s (eps_c - eps_u)``; returns z0 (fp32)."""
        for t in timesteps:
            latents = scheduler.step(self.guided_eps(latents, t, cond, scheduler), t, latents, eta=0.0).prev_sample
        return latents.float()

    def noised_start(self, z: torch.Tensor, noise: torch.Tensor):
        """img2img's start: the DDIM sampler, the noised latent and the denoising timesteps
        (``int(strength x steps)`` of them, from the ``strength`` point down). ``img2img_start``:
        ``first_step`` noises to the first denoising timestep, ``compvis`` one DDIM step higher."""
        s = self.settings
        scheduler = self.scheduler()
        scheduler.set_timesteps(s.num_inference_steps, device=z.device)
        n_steps = min(int(s.num_inference_steps * s.strength), s.num_inference_steps)
        first = s.num_inference_steps - n_steps
        timesteps = scheduler.timesteps[first:]
        if len(timesteps) == 0:
            return scheduler, z, timesteps
        noise_index = first - 1 if s.img2img_start == "compvis" else first
        noise_t = scheduler.timesteps[noise_index : noise_index + 1].repeat(z.shape[0])
        return scheduler, scheduler.add_noise(z, noise, noise_t), timesteps

    # -- decode -------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, final: bool) -> torch.Tensor:
        """SD latent -> images in [0, 1] (the VAE decoder)."""
        return self.decode_latents(z)


def load_vae(vae_id: str, local_files_only: bool | None = None):
    """An ``AutoencoderKL`` by hub id or local folder (e.g. the official medical runs'
    stabilityai/sd-vae-ft-mse); a missing one is an error that says how to get it."""
    from diffusers import AutoencoderKL

    source, kwargs = pretrained_source(
        "the VAE", vae_id, None, local_files_only, "set method.vae_id to a diffusers AutoencoderKL folder or a hub id"
    )
    try:
        return AutoencoderKL.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise unavailable_error(vae_weights(vae_id), exc, "in diffusers layout") from exc


def _training_scheduler(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)
