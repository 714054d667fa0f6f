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
``conf/method/gif_sd.yaml``. Departures from the official scripts: the UNet and text encoder run
in float16 on a GPU (``dtype: float32`` is the official precision); seeds are augmented per output
image, not per pass of two, with a bilinear rotation; several seeds go through one pass and a
seed's k samples are scored together (``group_size: 2`` and ``method.batch_size=1`` give the
official passes); the official sampler noises to ``ddim_timesteps[t_enc]`` but denoises from
``t_enc - 1`` (strength 0.9: noised to t=901, denoised from t=881), here both are t=881; outputs
are stored at ``output_size`` 256, in luma for 1-channel datasets.
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

from ..base import ExpansionError, ImageSet, train_tensors
from ..seeding import derive, per_image_rand
from ..settings import signature_of, speed_only
from ..weights import Weights, unavailable_error
from .dreambooth import DreamBoothSettings
from .guides import to_rgb
from .loading import check_dtype, pretrained_source, resolve_dtype
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
    template (``{prefix}``: the dataset's prompt prefix, ``{class}``: the class name)."""

    instance_prompt: str = "{prefix} {class}"


@dataclass(frozen=True)
class SDSettings(GifSettings):
    """GIF-SD's settings: GIF's (:class:`GifSettings`; ``radius`` absolute on the scaled latent)
    and the prior's: the SD model (hub id or diffusers folder), img2img's ``guidance_scale``,
    ``strength``, ``num_inference_steps`` and ``resolution``, the prompt's random domain and
    adjective, DreamBooth, the UNet/text encoder ``dtype`` (auto: float16 on GPU, float32 on CPU)
    and the VAE's."""

    model_id: str = "CompVis/stable-diffusion-v1-4"
    revision: str | None = None
    guidance_scale: float = 50.0
    strength: float = 0.9
    num_inference_steps: int = 50
    resolution: int = 512
    prompt_randomization: bool = True
    domains: tuple[str, ...] = DOMAINS
    adjectives: tuple[str, ...] = ADJECTIVES
    dreambooth: SDDreamBooth | None = None
    dtype: str = "auto"
    vae_dtype: str = "float32"
    local_files_only: bool | None = speed_only()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.strength <= 1.0:
            raise ExpansionError(f"strength must be in (0, 1], got {self.strength}")
        if self.num_inference_steps < 1 or self.resolution < 8 or self.resolution % 8:
            raise ExpansionError("need num_inference_steps >= 1 and a resolution divisible by 8")
        check_dtype("dtype", self.dtype)
        check_dtype("vae_dtype", self.vae_dtype)


def sd_weights(model_id: str, revision: str | None = None) -> Weights:
    return Weights("Stable Diffusion", model_id, "method.model_id", revision, hub_files=("model_index.json",))


def load_sd_components(
    model_id: str, revision: str | None = None, local_files_only: bool | None = None
) -> dict[str, Any]:
    """VAE, UNet, text encoder, tokenizer and DDIM scheduler of an SD 1.x/2.x model
    (hub id or local diffusers folder). A missing model is an error that says how to get it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source, kwargs = pretrained_source(
        "Stable Diffusion",
        model_id,
        revision,
        local_files_only,
        ("set method.model_id to a diffusers folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/) or a hub id"),
    )
    try:
        return {
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
            "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
        }
    except (OSError, ValueError) as exc:
        raise unavailable_error(sd_weights(model_id, revision), exc, "in diffusers layout") from exc


def rotate_flip(x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """GIF-SD's seed augmentation on ``x [N, C, H, W]``: a rotation in [-15, 15] degrees and a
    horizontal flip with p = 0.5 per image, drawn from ``seeds [N]`` (one batched grid_sample, zero fill)."""
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
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class GifSD(GifExpander):
    name = "gif_sd"
    settings_class = SDSettings

    @property
    def needs_fit(self) -> bool:
        return super().needs_fit or self.settings.dreambooth is not None

    # -- the prior's loader -----------------------------------------------------------------
    def prior_weights(self) -> list[Weights]:
        weights = sd_weights(self.settings.model_id, self.settings.revision)
        if self.settings.dreambooth is not None:  # DreamBooth fine-tunes this model first
            weights = replace(weights, what="Stable Diffusion (the base of this dataset's DreamBooth fine-tune)")
        return [weights]

    def load_prior(self) -> None:
        s = self.settings
        self.set_components(load_sd_components(s.model_id, s.revision, s.local_files_only))

    def set_components(self, comps: Mapping[str, Any]) -> None:
        """Use already-built SD components (vae, unet, text_encoder, tokenizer, scheduler); e.g.
        benchmarks with random weights at the real architecture sizes."""
        for key in ("vae", "unet", "text_encoder"):
            comps[key].eval().requires_grad_(False)
            self.add_module(key, comps[key])
        self.tokenizer, self.scheduler_config = comps["tokenizer"], comps["scheduler"].config
        self.scheduler_cls = type(comps["scheduler"])
        self._placed_on = None

    def place(self, device: torch.device) -> None:
        if getattr(self, "unet", None) is None:
            raise ExpansionError(f"{self.name}: no Stable Diffusion loaded (prepare() or set_components() not run)")
        self.unet_dtype = resolve_dtype(self.settings.dtype, device, cuda_auto="float16")
        self.vae_dtype = resolve_dtype(self.settings.vae_dtype, device)
        self.unet.to(dtype=self.unet_dtype)
        self.text_encoder.to(dtype=self.unet_dtype)
        self.vae.to(dtype=self.vae_dtype)  # diffusers' default attention processor is PyTorch SDPA

    # -- fit: DreamBooth and/or the probe guide -------------------------------------------------
    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        images, labels = train_tensors(train)
        if self.settings.dreambooth is not None:
            self._dreambooth(images, labels, artifact_dir)
        self.fit_probe_guide(images, labels, artifact_dir)

    def prior_fit_signature(self) -> dict[str, Any]:
        s = self.settings
        dreambooth = None if s.dreambooth is None else signature_of(s.dreambooth)
        return {"kind": "stable_diffusion", "model_id": s.model_id, "revision": s.revision, "dreambooth": dreambooth}

    def _dreambooth(self, images: torch.Tensor, labels: torch.Tensor, artifact_dir: Path) -> None:
        """DreamBooth (400 steps, lr 2e-6, text encoder trained, one instance prompt per class);
        with prior preservation, class images are the base model's own samples of each class prompt."""
        from .dreambooth import (
            dreambooth_finetune,
            finetuned_available,
            generate_class_images,
            load_finetuned,
            save_finetuned,
        )

        out = artifact_dir / "dreambooth"
        spec = self.settings.dreambooth
        if not finetuned_available(out):
            prompts = [self._instance_prompt(spec.instance_prompt, int(y)) for y in labels]
            device = "cuda" if torch.cuda.is_available() else "cpu"
            class_images = class_prompts = None
            if spec.prior_preservation:
                per_class = max(1, spec.num_class_images)
                class_prompts, chunks = [], []
                for c in range(len(self.context.class_names)):
                    prompt = self._instance_prompt(spec.instance_prompt, c)
                    chunks.append(
                        generate_class_images(
                            self.unet,
                            self.text_encoder,
                            self.vae,
                            self.tokenizer,
                            self.scheduler_cls.from_config(self.scheduler_config),
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

    def _instance_prompt(self, template: str, label: int) -> str:
        prefix = self.context.prompt_prefix or "a photo of"
        return " ".join(template.format(prefix=prefix, **{"class": self.context.class_names[label]}).split())

    # -- encode: img2img ----------------------------------------------------------------------
    def prompts(self, labels: torch.Tensor, seeds: torch.Tensor) -> list[str]:
        """One prompt per output image: "{domain} {adjective} {class}" drawn with the image's seed."""
        s = self.settings
        prefix = self.context.prompt_prefix
        domains = [prefix] if prefix else list(s.domains)
        prompt_seeds = derive(seeds, "prompt").tolist()
        out = []
        for label, row in zip(labels.tolist(), prompt_seeds):
            name = self.context.class_names[label]
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
        :func:`rotate_flip` per output image."""
        r = self.settings.resolution
        x = to_rgb(images.float() / 255.0)
        x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False).clamp(0, 1)
        x = x.repeat_interleave(seeds.shape[1], dim=0)
        return rotate_flip(x, seeds.reshape(-1)) * 2 - 1

    def encode(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> Encoding:
        s = self.settings
        n = seeds.numel()
        prompts = self.prompts(labels, seeds)
        z0 = self.img2img(self.preprocess(images, seeds), prompts, seeds)
        return Encoding(
            z0, fields={"prompt": prompts, "strength": [s.strength] * n, "guidance_scale": [s.guidance_scale] * n}
        )

    def _encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return self.text_encoder(ids)[0]

    def img2img(self, x: torch.Tensor, prompts: list[str], seeds: torch.Tensor) -> torch.Tensor:
        """Encode, noise to ``strength * T``, DDIM back with classifier-free guidance; returns z0 (fp32)."""
        s = self.settings
        device = x.device
        flat_seeds = seeds.reshape(-1)
        posterior = self.vae.encode(x.to(self.vae_dtype)).latent_dist
        eps_vae = per_image_rand(derive(flat_seeds, "vae"), posterior.mean.shape[1:], normal=True, device=device)
        z = (posterior.mean.float() + posterior.std.float() * eps_vae) * self.vae.config.scaling_factor
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(s.num_inference_steps, device=device)
        n_steps = min(int(s.num_inference_steps * s.strength), s.num_inference_steps)
        timesteps = scheduler.timesteps[s.num_inference_steps - n_steps :]
        if len(timesteps) == 0:
            return z
        noise = per_image_rand(derive(flat_seeds, "noise"), z.shape[1:], normal=True, device=device)
        latents = scheduler.add_noise(z, noise, timesteps[:1].repeat(z.shape[0]))
        cond = self._encode_text(prompts, device)
        use_cfg = s.guidance_scale != 1.0
        if use_cfg:
            uncond = self._encode_text([""], device).expand(len(prompts), -1, -1)
            cond = torch.cat([uncond, cond])
        for t in timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            eps = self.unet(model_in.to(self.unet_dtype), t, encoder_hidden_states=cond).sample.float()
            if use_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + s.guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        return latents.float()

    # -- decode -------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, final: bool) -> torch.Tensor:
        """SD latent -> images in [0, 1] (the VAE decoder)."""
        scale = self.vae.config.scaling_factor
        x = self.vae.decode((z / scale).to(self.vae_dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)


def _training_scheduler(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)
