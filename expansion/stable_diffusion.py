"""Stable Diffusion, written once for every method that samples it (GIF-SD and the field's methods).

:class:`StableDiffusionParts` holds the loaded networks and the pieces every SD sampler needs: place and cast
them, encode prompts (classifier-free guidance with the empty prompt), VAE-encode with per-image noise,
noise to an img2img start, denoise with any diffusers scheduler, decode. :class:`SDSampler` is the
typed settings of the field's SD methods and :class:`StableDiffusionExpander` their base (txt2img and img2img
from per-image seeds, so an output depends on its own seed only).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from .base import Expander, ExpansionContext, ExpansionError, resize, to_uint8
from .probe import LUMA
from .seeding import derive, per_image_rand
from .settings import check_ranges, keyed_when_set, speed_only
from .weights import Weights, unavailable_error

SCHEDULERS = ("ddim", "dpm_solver++", "euler_ancestral")


def sd_weights(model_id: str, revision: str | None = None) -> Weights:
    return Weights("Stable Diffusion", model_id, "method.model_id", revision, hub_files=("model_index.json",))


def load_sd_components(
    model_id: str, revision: str | None = None, local_files_only: bool | None = None, *, unet_in_channels: int = 4
) -> dict[str, Any]:
    """VAE, UNet, text encoder, tokenizer and scheduler of an SD 1.x/2.x model (hub id or local diffusers
    folder; InstructPix2Pix's has an 8-channel UNet). A missing model is an error that says how to get it."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    from .gif.loading import pretrained_source

    source, kwargs = pretrained_source(
        "Stable Diffusion",
        model_id,
        revision,
        local_files_only,
        ("set method.model_id to a diffusers folder (vae/, unet/, text_encoder/, tokenizer/, scheduler/) or a hub id"),
    )
    try:
        components = {
            "vae": AutoencoderKL.from_pretrained(source, subfolder="vae", **kwargs),
            "unet": UNet2DConditionModel.from_pretrained(source, subfolder="unet", **kwargs),
            "text_encoder": CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **kwargs),
            "tokenizer": CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kwargs),
            "scheduler": DDIMScheduler.from_pretrained(source, subfolder="scheduler", **kwargs),
        }
    except (OSError, ValueError) as exc:
        raise unavailable_error(sd_weights(model_id, revision), exc, "in diffusers layout") from exc
    check_unet_inputs(components["unet"], unet_in_channels, model_id)
    return components


def check_unet_inputs(unet, expected: int, model_id: str) -> None:
    """An img2img/txt2img UNet takes 4 latent channels, InstructPix2Pix's 8 (latent + image latent)."""
    got = int(unet.config.in_channels)
    if got != expected:
        raise ExpansionError(
            f"method.model_id={model_id}: its UNet takes {got} input channels, this method needs {expected} "
            "(InstructPix2Pix: 8; text-to-image and img2img: 4); set method.model_id to such a model"
        )


def make_scheduler(name: str, config: Mapping[str, Any]):
    """A fresh sampler ``name`` (:data:`SCHEDULERS`) on the model's noise schedule: DDIM (eta 0), DPM-Solver++
    (multistep, order 2: diffusers' StableDiffusionPipeline default for SD 1.5 in Diff-Mix and DiffDA-Eval) or
    Euler ancestral (InstructPix2Pix, DiffuseMix)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    config = dict(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpm_solver++":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    if name == "euler_ancestral":
        return EulerAncestralDiscreteScheduler.from_config(config)
    raise ExpansionError(f"method.scheduler must be one of {SCHEDULERS}, got {name!r}")


def stored_images(images01: torch.Tensor, b: int, k: int, output_size: int | None, channels: int) -> torch.Tensor:
    """Decoded images in [0, 1] ``[B*k, C, H, W]`` -> uint8 ``[B, k, C', S, S]``: resized to ``output_size``
    (antialiased bilinear) and, RGB for a 1-channel dataset, turned into luma."""
    if output_size:
        images01 = resize(images01, output_size)
    if channels == 1 and images01.shape[1] == 3:
        images01 = (images01 * LUMA.to(images01.device)).sum(1, keepdim=True)
    out = to_uint8(images01)
    return out.reshape(b, k, *out.shape[1:]).cpu()


def step_generators(seeds: torch.Tensor, device: torch.device) -> list[torch.Generator]:
    """One generator per image for a stochastic sampler's per-step noise (Euler ancestral), from its seed."""
    return [torch.Generator(device=device).manual_seed(int(s)) for s in derive(seeds, "steps").tolist()]


class StableDiffusionParts:
    """The loaded SD networks and what every sampler does with them. The owner's settings have ``dtype``,
    ``vae_dtype`` and ``guidance_scale``; ``self.name`` names the method in errors."""

    def set_components(self, comps: Mapping[str, Any]) -> None:
        """Use already-built SD components (vae, unet, text_encoder, tokenizer, scheduler); e.g. tests and
        benchmarks with random weights at the real architecture sizes."""
        for key in ("vae", "unet", "text_encoder"):
            comps[key].eval().requires_grad_(False)
            self.add_module(key, comps[key])
        self.tokenizer, self.scheduler_config = comps["tokenizer"], comps["scheduler"].config
        self._placed_on = None

    def place(self, device: torch.device) -> None:
        from .gif.loading import resolve_dtype

        if getattr(self, "unet", None) is None:
            raise ExpansionError(f"{self.name}: no Stable Diffusion loaded (prepare() or set_components() not run)")
        self.unet_dtype = resolve_dtype(self.settings.dtype, device, cuda_auto="float16")
        self.vae_dtype = resolve_dtype(self.settings.vae_dtype, device)
        self.unet.to(dtype=self.unet_dtype)
        self.text_encoder.to(dtype=self.unet_dtype)
        self.vae.to(dtype=self.vae_dtype)  # diffusers' default attention processor is PyTorch SDPA

    def _encode_text(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)
        return self.text_encoder(ids)[0]

    def conditioning(self, prompts: list[str], device: torch.device) -> torch.Tensor:
        """The prompts' text states, after those of the empty prompt when ``guidance_scale != 1``."""
        cond = self._encode_text(prompts, device)
        if self.settings.guidance_scale != 1.0:
            uncond = self._encode_text([""], device).expand(len(prompts), -1, -1)
            cond = torch.cat([uncond, cond])
        return cond

    def vae_latents(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] ``[N, 3, R, R]`` -> scaled latents, each sampled from its posterior with its seed."""
        posterior = self.vae.encode(x.to(self.vae_dtype)).latent_dist
        eps = per_image_rand(derive(seeds, "vae"), posterior.mean.shape[1:], normal=True, device=x.device)
        return (posterior.mean.float() + posterior.std.float() * eps) * self.vae.config.scaling_factor

    def guided_eps(self, latents: torch.Tensor, t, cond: torch.Tensor, scheduler) -> torch.Tensor:
        """The UNet's noise estimate under classifier-free guidance ``eps_u + s (eps_c - eps_u)``."""
        s = self.settings.guidance_scale
        use_cfg = s != 1.0
        model_in = torch.cat([latents, latents]) if use_cfg else latents
        model_in = scheduler.scale_model_input(model_in, t)
        eps = self.unet(model_in.to(self.unet_dtype), t, encoder_hidden_states=cond).sample.float()
        if use_cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + s * (eps_c - eps_u)
        return eps

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """SD latent -> images in [0, 1] (the VAE decoder)."""
        x = self.vae.decode((z / self.vae.config.scaling_factor).to(self.vae_dtype)).sample.float()
        return ((x + 1) / 2).clamp(0, 1)


@dataclass(frozen=True)
class SDSampler:
    """The settings of the field's SD methods: the model (hub id or diffusers folder), the sampler
    (``scheduler``, ``num_inference_steps``, ``guidance_scale``), the square ``resolution``, the UNet/text
    encoder ``dtype`` (auto: float16 on GPU) and the VAE's, and the stored ``output_size`` (None = the
    decoder's). Defaults: Diff-Mix's ``real-gen`` and DiffDA-Eval's generation (SD v1.5, DPM-Solver++ 25
    steps, CFG 7.5, 512 px)."""

    model_id: str = "runwayml/stable-diffusion-v1-5"
    revision: str | None = None
    scheduler: str = "dpm_solver++"
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    resolution: int = 512
    dtype: str = "auto"
    vae_dtype: str = "float32"
    output_size: int | None = 256
    local_files_only: bool | None = speed_only()

    def __post_init__(self) -> None:
        from .gif.loading import check_dtype

        check_dtype("dtype", self.dtype)
        check_dtype("vae_dtype", self.vae_dtype)
        check_ranges(
            self,
            [
                (self.scheduler in SCHEDULERS, "scheduler", f"one of {SCHEDULERS}"),
                (self.num_inference_steps >= 1, "num_inference_steps", ">= 1"),
                (self.resolution >= 8 and self.resolution % 8 == 0, "resolution", "a multiple of 8"),
                (self.guidance_scale >= 1.0, "guidance_scale", ">= 1"),
                (self.output_size is None or self.output_size >= 1, "output_size", ">= 1 or null"),
            ],
        )


@dataclass(frozen=True)
class ClassPromptSampler(SDSampler):
    """:class:`SDSampler` with a class prompt: the template ``prompt`` (``{class}``: the class name) and an
    optional ``super_class`` (adds ", a type of {super_class}"); DiffDA-Eval's "a photo of a {class}"."""

    prompt: str = "a photo of a {class}"
    super_class: str | None = keyed_when_set()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(self, [("{class}" in self.prompt, "prompt", "a template with {class}")])


class StableDiffusionExpander(StableDiffusionParts, Expander):
    """Base of the field's SD methods: loads the model named by ``model_id`` in :meth:`prepare` and gives
    txt2img/img2img from per-image seeds. Subclasses implement :meth:`expand`."""

    settings_class: ClassVar[type] = ClassPromptSampler
    #: the UNet's input channels the method needs (InstructPix2Pix: 8)
    unet_in_channels: ClassVar[int] = 4

    def pretrained_weights(self) -> list[Weights]:
        return [sd_weights(self.settings.model_id, self.settings.revision)]

    def prepare(self, context: ExpansionContext) -> None:
        super().prepare(context)
        s = self.settings
        self.set_components(
            load_sd_components(s.model_id, s.revision, s.local_files_only, unet_in_channels=self.unet_in_channels)
        )

    def scheduler(self):
        return make_scheduler(self.settings.scheduler, self.scheduler_config)

    def class_prompts(self, labels: torch.Tensor, k: int) -> list[str]:
        """One prompt per output image (rows seed-major): the template with the class name (and super-class)."""
        s = self.settings
        out = []
        for label in labels.tolist():
            prompt = s.prompt.replace("{class}", self.context.class_names[label])
            if s.super_class:
                prompt = f"{prompt}, a type of {s.super_class}"
            out += [prompt] * k
        return out

    def latent_shape(self) -> tuple[int, int, int]:
        """One image's latent ``(C, R/f, R/f)`` at ``resolution`` (f: the VAE's downsampling)."""
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        side = self.settings.resolution // factor
        return (int(self.vae.config.latent_channels), side, side)

    def seed_pixels(self, images: torch.Tensor, k: int) -> torch.Tensor:
        """uint8 seeds ``[B, C, H, W]`` -> ``[-1, 1]`` RGB at ``resolution`` (bicubic, aspect not kept, as
        DiffDA-Eval resizes), repeated for the k outputs ``[B*k, 3, R, R]``."""
        r = self.settings.resolution
        x = images.float() / 255.0
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        x = F.interpolate(x, size=(r, r), mode="bicubic", align_corners=False).clamp(0, 1)
        return x.repeat_interleave(k, dim=0) * 2 - 1

    def start(self, z: torch.Tensor | None, flat_seeds: torch.Tensor, strength: float, shape: Sequence[int]):
        """The sampler, the starting latents and the timesteps to denoise: txt2img (``z`` None) from pure noise
        scaled by the sampler's ``init_noise_sigma``; img2img from ``z`` noised to the first of the last
        ``int(steps x strength)`` timesteps (diffusers' img2img rule)."""
        s = self.settings
        scheduler = self.scheduler()
        device = flat_seeds.device if z is None else z.device
        scheduler.set_timesteps(s.num_inference_steps, device=device)
        noise = per_image_rand(derive(flat_seeds, "noise"), tuple(shape), normal=True, device=device)
        if z is None:
            return scheduler, noise * scheduler.init_noise_sigma, scheduler.timesteps
        n_steps = min(int(s.num_inference_steps * strength), s.num_inference_steps)
        timesteps = scheduler.timesteps[s.num_inference_steps - n_steps :]
        if len(timesteps) == 0:
            return scheduler, z, timesteps
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(s.num_inference_steps - n_steps)
        return scheduler, scheduler.add_noise(z, noise, timesteps[:1].repeat(z.shape[0])), timesteps

    def sample(
        self, scheduler, latents: torch.Tensor, timesteps, cond: torch.Tensor, flat_seeds: torch.Tensor
    ) -> torch.Tensor:
        """Denoise ``latents`` over ``timesteps`` under classifier-free guidance; a stochastic sampler's noise at
        every step comes from each image's own generator. Returns the final latents (fp32)."""
        kwargs: dict[str, Any] = {}
        if self.settings.scheduler == "euler_ancestral":
            kwargs["generator"] = step_generators(flat_seeds, latents.device)
        elif self.settings.scheduler == "ddim":
            kwargs["eta"] = 0.0
        for t in timesteps:
            eps = self.guided_eps(latents, t, cond, scheduler)
            latents = scheduler.step(eps, t, latents, **kwargs).prev_sample
        return latents.float()

    def stored(self, images01: torch.Tensor, b: int, k: int) -> torch.Tensor:
        return stored_images(images01, b, k, self.settings.output_size, self.context.channels)
