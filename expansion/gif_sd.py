"""GIF-SD: guided imagination with a Stable Diffusion prior (arXiv 2211.13976),
and its unguided ablation ``sd_img2img``.

For each seed image and each of its k output images (all seeds of a batch at
once; every random draw from the output image's own seed):

1. preprocess: resize to ``resolution`` (512, bicubic), RandomRotation(15), hflip;
2. img2img: VAE-encode, noise to ``t = strength * T`` and denoise with DDIM
   (``num_inference_steps`` = 50, eta 0) under classifier-free guidance
   ``eps = eps_u + s (eps_c - eps_u)``, prompt "{domain} {adjective} {class}"
   (medical sets: the modality prefix as the only domain);
3. GIF (not in ``sd_img2img``): perturb the denoised latent z0 channel-wise,
   score the VAE-decoded samples with the guide, take the signed-gradient step,
   project onto the L-inf ball of radius c (see :mod:`expansion.guidance`);
4. decode with the VAE.

Official per-dataset settings (guidance scale / strength / radius / ratio) live
in ``conf/method/gif_sd.yaml``. The official loop (one seed, two images per pass,
fp32, criteria over each pass of two) is ``method=gif_sd method.batch_size=1
method.group_size=2 method.dtype=float32``; the default batches many seeds per pass,
scores each seed's k samples together and runs the UNet in half precision on GPU.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .gif_base import GifExpander, build_guide, check_dtype, pretrained_source, resolve_dtype, train_tensors  # noqa: F401 (build_guide: re-exported)
from .base import ExpansionContext, ExpansionError, ExpansionOutput
from .guidance import criteria, guided_perturbation
from .guides import Guide, to_rgb
from .seeding import derive, per_image_rand

DOMAINS = ("an image of", "a real-world photo of", "a cartoon image of", "an oil painting of", "a sketch of")
ADJECTIVES = ("", "colorful", "stylized", "high-contrast", "low-contrast", "posterized", "solarized", "sheared",
              "bright", "dark")


def load_sd_components(model_id: str, revision: str | None = None,
                       local_files_only: bool | None = None) -> dict[str, Any]:
    """VAE, UNet, text encoder, tokenizer and DDIM scheduler of an SD 1.x/2.x model
    (hub id or local diffusers folder). A missing model is an error that says how to get it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    source, kwargs = pretrained_source("Stable Diffusion", model_id, revision, local_files_only, (
        "set method.model_id to a diffusers "
        "folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/) or a hub id"))
    try:
        return {
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
            "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
        }
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ExpansionError(
            f"Stable Diffusion weights {model_id!r} are not available here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Provide them: download once on a machine with "
            f"network (`huggingface-cli download {model_id}`, cached under HF_HOME), or set method.model_id to a "
            "local diffusers folder."
        ) from exc


class GifSD(GifExpander):
    name = "gif_sd"
    guided = True
    speed_only_params = ("batch_size", "num_workers", "guidance_chunk", "local_files_only")

    def __init__(self, ratio: int, model_id: str = "CompVis/stable-diffusion-v1-4", revision: str | None = None,
                 guidance_scale: float = 50.0, strength: float = 0.9, radius: float = 0.8,
                 num_inference_steps: int = 50, resolution: int = 512, output_size: int | None = None,
                 guide: Mapping[str, Any] | None = None, guidance: Mapping[str, Any] | None = None,
                 group_size: int | None = None, prompt_randomization: bool = True,
                 domains: Sequence[str] = DOMAINS, adjectives: Sequence[str] = ADJECTIVES,
                 dreambooth: Mapping[str, Any] | None = None, dtype: str = "auto", vae_dtype: str = "float32",
                 guidance_chunk: int | None = None, local_files_only: bool | None = None, batch_size: int = 8,
                 num_workers: int = 0):
        guide = dict(guide or {"kind": "clip", "arch": "ViT-B-32", "pretrained": "openai"})
        guidance = dict(guidance or {})
        super().__init__(ratio, model_id=model_id, revision=revision, guidance_scale=guidance_scale,
                         strength=strength, radius=radius, num_inference_steps=num_inference_steps,
                         resolution=resolution, output_size=output_size,
                         guide=guide if self.guided else None, guidance=guidance if self.guided else None,
                         group_size=group_size if self.guided else None, prompt_randomization=prompt_randomization,
                         domains=list(domains), adjectives=list(adjectives), dreambooth=dreambooth, dtype=dtype,
                         vae_dtype=vae_dtype, guidance_chunk=guidance_chunk, local_files_only=local_files_only,
                         batch_size=batch_size, num_workers=num_workers)
        if not 0.0 < strength <= 1.0:
            raise ExpansionError(f"{self.name}: strength must be in (0, 1], got {strength}")
        if num_inference_steps < 1 or resolution % 8:
            raise ExpansionError(f"{self.name}: need num_inference_steps >= 1 and a resolution divisible by 8")
        for key in ("dtype", "vae_dtype"):
            check_dtype(self.name, key, self.params[key])
        self.init_guidance(guide, radius, guidance)
        self.needs_fit = self.needs_fit or bool(dreambooth)
        self.components: dict[str, Any] = {}
        self._dtypes_set_for: str | None = None

    # -- set-up ------------------------------------------------------------------
    def prepare(self, context: ExpansionContext) -> None:
        super().prepare(context)
        p = self.params
        self.set_components(load_sd_components(p["model_id"], p["revision"], p["local_files_only"]))
        self.build_clip_guide()

    def set_components(self, comps: Mapping[str, Any], guide: Guide | None = None) -> None:
        """Use already-built SD components (vae, unet, text_encoder, tokenizer, scheduler) and,
        optionally, a guide; e.g. benchmarks with random weights at the real architecture sizes."""
        for key in ("vae", "unet", "text_encoder"):
            comps[key].eval().requires_grad_(False)
            self.add_module(key, comps[key])
        self.tokenizer, self.scheduler_config = comps["tokenizer"], comps["scheduler"].config
        self.scheduler_cls = type(comps["scheduler"])
        self._dtypes_set_for = None
        if guide is not None:
            self.guide = guide

    def fit(self, train: Any, artifact_dir: Path) -> None:
        """DreamBooth fine-tuning (medical sets in the paper) and/or the probe guide, cached in ``artifact_dir``."""
        images, labels = train_tensors(train)
        if self.params["dreambooth"]:
            self._dreambooth(images, labels, artifact_dir)
        self.fit_probe_guide(images, labels, artifact_dir)

    def fit_signature(self) -> dict[str, Any]:
        return {"kind": "stable_diffusion", "model_id": self.params["model_id"], "revision": self.params["revision"],
                "dreambooth": self.params["dreambooth"],
                "probe": self.probe_fit_signature()}

    def _dreambooth(self, images: torch.Tensor, labels: torch.Tensor, artifact_dir: Path) -> None:
        """DreamBooth (400 steps, lr 2e-6, text encoder trained, one instance prompt per class);
        with prior preservation, class images are the base model's own samples of each class prompt."""
        from .dreambooth import (DreamBoothSettings, dreambooth_finetune, finetuned_available, generate_class_images,
                                 load_finetuned, save_finetuned)

        out = artifact_dir / "dreambooth"
        if not finetuned_available(out):
            spec = dict(self.params["dreambooth"])
            template = spec.pop("instance_prompt", "{prefix} {class}")
            settings = DreamBoothSettings(**spec)
            prompts = [self._instance_prompt(template, int(y)) for y in labels]
            device = "cuda" if torch.cuda.is_available() else "cpu"
            class_images = class_prompts = None
            if settings.prior_preservation:
                per_class = max(1, settings.num_class_images)
                class_prompts, chunks = [], []
                for c in range(len(self.context.class_names)):
                    prompt = self._instance_prompt(template, c)
                    chunks.append(generate_class_images(
                        self.unet, self.text_encoder, self.vae, self.tokenizer,
                        self.scheduler_cls.from_config(self.scheduler_config), prompt, per_class,
                        resolution=settings.resolution, seed=settings.seed + c, device=device))
                    class_prompts += [prompt] * per_class
                class_images = torch.cat(chunks)
            dreambooth_finetune(self.unet, self.text_encoder, self.vae, self.tokenizer,
                                _training_scheduler(self.scheduler_config), images, prompts, settings,
                                class_images=class_images, class_prompts=class_prompts, device=device,
                                mixed_precision="fp16" if device == "cuda" else None)
            save_finetuned(self.unet, self.text_encoder if settings.train_text_encoder else None, out)
        unet, text_encoder = load_finetuned(out)
        self.add_module("unet", unet)
        if text_encoder is not None:
            self.add_module("text_encoder", text_encoder)
        self._dtypes_set_for = None

    def _instance_prompt(self, template: str, label: int) -> str:
        prefix = self.context.prompt_prefix or "a photo of"
        return " ".join(template.format(prefix=prefix, **{"class": self.context.class_names[label]}).split())

    # -- generation ---------------------------------------------------------------
    def prompts(self, labels: torch.Tensor, seeds: torch.Tensor) -> list[str]:
        """One prompt per output image: "{domain} {adjective} {class}" drawn with the image's seed."""
        prefix = self.context.prompt_prefix
        domains = [prefix] if prefix else self.params["domains"]
        adjectives = self.params["adjectives"]
        prompt_seeds = derive(seeds, "prompt").tolist()
        out = []
        for label, row in zip(labels.tolist(), prompt_seeds):
            name = self.context.class_names[label]
            for s in row:
                if self.params["prompt_randomization"]:
                    rng = random.Random(s)
                    parts = (rng.choice(domains), rng.choice(adjectives), name)
                else:
                    parts = (domains[0], name)
                out.append(" ".join(p for p in parts if p))
        return out

    def _set_dtypes(self, device: torch.device) -> None:
        if self._dtypes_set_for == str(device):
            return
        self.unet_dtype = resolve_dtype(self.params["dtype"], device, cuda_auto="float16")
        self.vae_dtype_t = resolve_dtype(self.params["vae_dtype"], device)
        self.unet.to(dtype=self.unet_dtype)
        self.text_encoder.to(dtype=self.unet_dtype)
        self.vae.to(dtype=self.vae_dtype_t)  # diffusers' default attention processor is PyTorch SDPA
        self._dtypes_set_for = str(device)

    def _preprocess(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 [B,C,H,W] -> [-1,1] [B*k,3,R,R]: bicubic resize, then per image a rotation in
        [-15, 15] deg and a horizontal flip with p=0.5 (one batched grid_sample)."""
        b, k = seeds.shape
        r = self.params["resolution"]
        x = to_rgb(images.float() / 255.0)
        x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False).clamp(0, 1)
        x = x.repeat_interleave(k, dim=0)
        draws = per_image_rand(derive(seeds, "augment"), (2,), device=x.device).reshape(-1, 2)
        angle = (draws[:, 0] * 30 - 15) * (math.pi / 180)
        flip = torch.where(draws[:, 1] < 0.5, -1.0, 1.0)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros_like(cos)], -1),
                             torch.stack([sin * flip, cos, torch.zeros_like(cos)], -1)], 1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False) * 2 - 1

    def _encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """SD latent -> images in [0, 1]."""
        scale = self.vae.config.scaling_factor
        x = self.vae.decode((latents / scale).to(self.vae_dtype_t)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    def img2img(self, x: torch.Tensor, prompts: list[str], seeds: torch.Tensor) -> torch.Tensor:
        """Encode, noise to ``strength * T``, DDIM back with classifier-free guidance; returns z0 (fp32)."""
        p = self.params
        device = x.device
        flat_seeds = seeds.reshape(-1)
        posterior = self.vae.encode(x.to(self.vae_dtype_t)).latent_dist
        eps_vae = per_image_rand(derive(flat_seeds, "vae"), posterior.mean.shape[1:], normal=True, device=device)
        z = (posterior.mean.float() + posterior.std.float() * eps_vae) * self.vae.config.scaling_factor
        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        scheduler.set_timesteps(p["num_inference_steps"], device=device)
        n_steps = min(int(p["num_inference_steps"] * p["strength"]), p["num_inference_steps"])
        timesteps = scheduler.timesteps[p["num_inference_steps"] - n_steps:]
        if len(timesteps) == 0:
            return z
        noise = per_image_rand(derive(flat_seeds, "noise"), z.shape[1:], normal=True, device=device)
        latents = scheduler.add_noise(z, noise, timesteps[:1].repeat(z.shape[0]))
        cond = self._encode_text(prompts, device)
        use_cfg = p["guidance_scale"] != 1.0
        if use_cfg:
            uncond = self._encode_text([""], device).expand(len(prompts), -1, -1)
            cond = torch.cat([uncond, cond])
        for t in timesteps:
            model_in = torch.cat([latents, latents]) if use_cfg else latents
            eps = self.unet(model_in.to(self.unet_dtype), t, encoder_hidden_states=cond).sample.float()
            if use_cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + p["guidance_scale"] * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, eta=0.0).prev_sample
        return latents.float()

    @torch.no_grad()
    def _no_grad_img2img(self, x, prompts, seeds):
        return self.img2img(x, prompts, seeds)

    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        device = images.device
        self._set_dtypes(device)
        b, k = seeds.shape
        prompts = self.prompts(labels, seeds)
        x = self._preprocess(images, seeds)
        z0 = self._no_grad_img2img(x, prompts, seeds)
        fields: dict[str, Any] = {"prompt": prompts, "strength": [self.params["strength"]] * (b * k),
                                  "guidance_scale": [self.params["guidance_scale"]] * (b * k)}
        if not self.guided:
            with torch.no_grad():
                out = self.decode(z0)
            return ExpansionOutput(self._finish(out, b, k), fields)
        latents, fields_g = self._guide(images, z0, seeds)
        with torch.no_grad():
            out = self.decode(latents)
            final = self.guide(out)
        seed_probs = fields_g.pop("_seed_probs")
        fields.update(fields_g)
        fields["radius"] = [self.settings.radius] * (b * k)
        fields["score_after"] = criteria(seed_probs, final.probs, final.embeddings, self._groups(b, k, device),
                                         self.settings).score.tolist()
        fields["guide_class"] = final.probs.argmax(-1).tolist()
        fields["guide_confidence"] = final.probs.max(-1).values.tolist()
        return ExpansionOutput(self._finish(out, b, k), fields)


    def _guide(self, images: torch.Tensor, z0: torch.Tensor, seeds: torch.Tensor):
        """Steps 3 of the module doc, in chunks of ``guidance_chunk`` seeds (memory)."""
        b, k = seeds.shape
        if self.guide is None:
            raise ExpansionError("gif_sd: no guide was built (prepare/fit not run)")
        with torch.no_grad():
            seed_probs = self.guide(images.float() / 255.0).probs.repeat_interleave(k, 0)
        flat = seeds.reshape(-1)
        shape = (z0.shape[1],) + (1,) * (z0.ndim - 2)
        e = per_image_rand(derive(flat, "gif_e"), shape, device=z0.device)
        bias = per_image_rand(derive(flat, "gif_b"), shape, normal=True, device=z0.device)
        groups = self._groups(b, k, z0.device)
        chunk = int(self.params["guidance_chunk"] or b) * k
        latents, before = [], []
        for start in range(0, b * k, chunk):
            rows = slice(start, start + chunk)
            g = groups[rows] - groups[rows].min()

            def score_fn(z, rows=rows, g=g):
                out = self.guide(self.decode(z))
                return criteria(seed_probs[rows], out.probs, out.embeddings, g, self.settings)

            res = guided_perturbation(z0[rows], e[rows], bias[rows], score_fn, self.settings)
            latents.append(res.latents)
            before.append(res.score_before)
        return torch.cat(latents), {"score_before": torch.cat(before).tolist(), "_seed_probs": seed_probs}



class SDImg2Img(GifSD):
    """The unguided ablation: the same img2img with SD, no perturbation and no guide
    (with ``prompt_randomization: false`` also the official ablation's fixed prompt)."""

    name = "sd_img2img"
    guided = False


def _training_scheduler(config):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(config)
