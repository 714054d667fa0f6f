"""``diffusemix``: DiffuseMix (Islam et al., CVPR 2024; khawar-islam/diffuseMix@e58418d). Label-preserving:

1. InstructPix2Pix edits the seed image with a style prompt (``handler.py:10-17``: fp16, Euler ancestral,
   256 px; ``main.py:36``: CFG 4; the pipeline's image CFG 1.5 and 100 steps);
2. the hybrid keeps the original's left (or top) half and the edit's other half, joined by a linear ramp of
   ``blend_width`` = 20 px, horizontal or vertical at random (``utils.py:25-50``);
3. a random fractal image is blended in: ``(1 - lambda) hybrid + lambda fractal``, lambda = 0.2 (``:14-22``).

The official code applies every prompt to every image (``diffuseMix.py:54-56``): ``prompt_choice: every``
gives output j the prompt ``j mod len(prompts)`` (ratio 9 = the official expansion); ``sampled`` draws one per
image from its seed (DiffDA-Eval's port samples 5 of the 9 with replacement and rewrites the prompt; we keep the
raw style words of the README). An edit the official ``is_black_image`` flags (as coded: more than 90 % of the
grey levels at 255) is skipped there; here it is redrawn from a derived seed up to ``edit_attempts`` times and
the manifest says how many it took (an image still flagged is kept and marked ``black_filter_failed``).
Fractals: ``fractal_dir`` (a user folder, e.g. the authors' Drive set), else procedurally generated fractals
(an escape-time Julia set per image, colour-mapped): a documented departure."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..base import ExpansionContext, ExpansionError, ExpansionOutput
from ..seeding import derive, per_image_rand
from ..settings import check_ranges
from ..stable_diffusion import SDSampler, StableDiffusionExpander, step_generators

log = logging.getLogger(__name__)

#: the README's style prompts (README:34)
STYLE_PROMPTS = (
    "Autumn",
    "snowy",
    "watercolor art",
    "sunset",
    "rainbow",
    "aurora",
    "mosaic",
    "ukiyo-e",
    "a sketch with crayon",
)
PROMPT_CHOICES = ("every", "sampled")


@dataclass(frozen=True)
class DiffuseMixSettings(SDSampler):
    """InstructPix2Pix (``model_id``) with Euler ancestral, ``num_inference_steps`` 100, text CFG 4 and image CFG
    ``image_guidance_scale`` 1.5 at 256 px; ``prompts`` and ``prompt_choice`` (module doc); the hybrid's
    ``blend_width``; ``fractal_weight`` lambda; ``fractal_dir`` (None: generated fractals); ``edit_attempts``."""

    model_id: str = "timbrooks/instruct-pix2pix"
    scheduler: str = "euler_ancestral"
    num_inference_steps: int = 100
    guidance_scale: float = 4.0
    image_guidance_scale: float = 1.5
    resolution: int = 256
    prompts: tuple[str, ...] = STYLE_PROMPTS
    prompt_choice: str = "every"
    blend_width: int = 20
    fractal_weight: float = 0.2
    fractal_dir: str | None = None
    edit_attempts: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(
            self,
            [
                (len(self.prompts) >= 1, "prompts", "at least one prompt"),
                (self.prompt_choice in PROMPT_CHOICES, "prompt_choice", f"one of {PROMPT_CHOICES}"),
                (0 <= self.blend_width <= self.resolution // 2, "blend_width", "in [0, resolution / 2]"),
                (0.0 <= self.fractal_weight <= 1.0, "fractal_weight", "in [0, 1]"),
                (self.image_guidance_scale >= 1.0, "image_guidance_scale", ">= 1"),
                (self.edit_attempts >= 1, "edit_attempts", ">= 1"),
            ],
        )


def hybrid_mask(size: int, blend_width: int, vertical: torch.Tensor) -> torch.Tensor:
    """The official concatenation mask ``[N, 1, S, S]``: 0 (original) over the first ``S/2 - w/2`` rows (vertical)
    or columns (horizontal), a linear ramp ``linspace(0, 1, w)``, then 1 (edit) (``utils.py:25-43``)."""
    w = blend_width
    head = size // 2 - w // 2
    profile = torch.cat([torch.zeros(head), torch.linspace(0, 1, w), torch.ones(size - head - w)])
    rows = profile.view(size, 1).expand(size, size)
    cols = profile.view(1, size).expand(size, size)
    return torch.where(vertical.view(-1, 1, 1, 1), rows, cols).to(torch.float32)


def half_concat(original: torch.Tensor, edited: torch.Tensor, vertical: torch.Tensor, blend_width: int) -> torch.Tensor:
    """The hybrid ``(1 - mask) original + mask edit`` (:func:`hybrid_mask`): the original first."""
    mask = hybrid_mask(original.shape[-1], blend_width, vertical).to(original.device)
    return (1 - mask) * original + mask * edited


def fractal_blend(hybrid: torch.Tensor, fractal: torch.Tensor, weight: float) -> torch.Tensor:
    """``(1 - lambda) hybrid + lambda fractal`` (``utils.py:14-22``)."""
    return ((1 - weight) * hybrid + weight * fractal).clamp(0, 1)


def is_black_image(images01: torch.Tensor) -> torch.Tensor:
    """The official ``is_black_image`` as coded (``utils.py:53-56``), per image: more than 90 % of the grey levels
    (PIL's L) at 255 and no other level above 10 %: it flags white images."""
    from ..probe import LUMA

    grey = (images01 * LUMA.to(images01.device)).sum(1) if images01.shape[1] == 3 else images01[:, 0]
    levels = (grey * 255).round().clamp(0, 255).long().flatten(1)
    n = levels.shape[1]
    hist = torch.zeros(levels.shape[0], 256, dtype=torch.long, device=levels.device)
    hist.scatter_add_(1, levels, torch.ones_like(levels))
    return (hist[:, 255] > 0.9 * n) & (hist[:, :255].max(1).values < 0.1 * n)


def julia_fractals(seeds: torch.Tensor, size: int) -> torch.Tensor:
    """Procedural fractals in [0, 1] ``[N, 3, S, S]``: an escape-time Julia set per image, the constant, zoom and
    colour phases drawn from its seed (a stand-in for the authors' fractal folder)."""
    draws = per_image_rand(derive(seeds, "fractal"), (6,), device=torch.device("cpu")).reshape(-1, 6)
    angle, radius = draws[:, 0] * 2 * math.pi, 0.7 + 0.15 * draws[:, 1]
    c = torch.complex(radius * torch.cos(angle), radius * torch.sin(angle))
    zoom = 1.2 + 0.8 * draws[:, 2]
    axis = torch.linspace(-1.0, 1.0, size)
    grid = torch.complex(axis.view(1, 1, -1).expand(1, size, size), axis.view(1, -1, 1).expand(1, size, size))
    z = grid * zoom.view(-1, 1, 1)
    escape = torch.zeros(z.shape)
    for _ in range(48):
        z = torch.where(z.abs() <= 4, z * z + c.view(-1, 1, 1), z)
        escape += (z.abs() <= 4).float()
    value = (escape / 48).unsqueeze(1)
    phase = draws[:, 3:6].view(-1, 3, 1, 1) * 2 * math.pi
    return (0.5 + 0.5 * torch.cos(2 * math.pi * value * 3 + phase)).clamp(0, 1)


def fractal_files(fractal_dir: str) -> list[Path]:
    """The .png/.jpg/.jpeg files of a fractal folder, sorted; a missing or empty folder, or a file that resolves
    outside it (a link), is an error naming it."""
    folder = Path(str(fractal_dir)).expanduser()
    if not folder.is_dir():
        raise ExpansionError(f"method.fractal_dir={folder} is not a folder; set it to the fractal folder or null")
    root = folder.resolve()
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for path in files:
        if not path.resolve().is_relative_to(root) or not path.resolve().is_file():
            raise ExpansionError(f"method.fractal_dir: {path} is not a file inside {folder}")
    if not files:
        raise ExpansionError(
            f"method.fractal_dir={folder} holds no .png/.jpg images; set it to the fractal folder or null"
        )
    return files


def folder_digest(files: list[Path]) -> str:
    """sha256 over the files' names and bytes, in order."""
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class DiffuseMix(StableDiffusionExpander):
    name = "diffusemix"
    settings_class = DiffuseMixSettings
    unet_in_channels = 8

    def prepare(self, context: ExpansionContext) -> None:
        """Load the fractal folder first (a missing or empty one fails before any weight loads)."""
        self.context = context
        self.fractals = self.load_fractals() if self.settings.fractal_dir else None
        super().prepare(context)

    def load_fractals(self) -> torch.Tensor:
        """The user's fractal images (png/jpg/jpeg, as the official loader) in [0, 1] at ``resolution``; an
        unreadable file is an error naming it."""
        from PIL import Image, UnidentifiedImageError

        size = self.settings.resolution
        images = []
        for path in fractal_files(self.settings.fractal_dir):
            try:
                with Image.open(path) as image:
                    array = np.asarray(image.convert("RGB").resize((size, size)), dtype=np.float32) / 255.0
            except (OSError, UnidentifiedImageError) as exc:
                raise ExpansionError(f"method.fractal_dir: {path} is not a readable image ({exc})") from exc
            images.append(torch.from_numpy(array).permute(2, 0, 1))
        return torch.stack(images)

    def signature(self) -> dict[str, Any]:
        """The settings, and with ``fractal_dir`` the digest of its images (new fractals in the same folder
        make a new store); a folder that cannot be listed keeps its path only (``prepare`` then names it)."""
        out = super().signature()
        if self.settings.fractal_dir:
            with contextlib.suppress(ExpansionError):
                out["fractal_sha256"] = folder_digest(fractal_files(self.settings.fractal_dir))
        return out

    def prompts_for(self, seeds: torch.Tensor) -> list[str]:
        """Output j's style prompt: ``every``: prompt j mod len(prompts); ``sampled``: one drawn from its seed."""
        prompts = self.settings.prompts
        b, k = seeds.shape
        if self.settings.prompt_choice == "every":
            return [prompts[j % len(prompts)] for _ in range(b) for j in range(k)]
        draws = per_image_rand(derive(seeds.reshape(-1), "prompt"), (1,), device=torch.device("cpu")).reshape(-1)
        return [prompts[int(u * len(prompts))] for u in draws.tolist()]

    def edit(self, pixels: torch.Tensor, prompts: list[str], flat: torch.Tensor) -> torch.Tensor:
        """InstructPix2Pix: latents from per-image noise, the image latent (the posterior's mode, unscaled as in
        diffusers' pipeline) as 4 extra input channels, guidance
        ``eps_u + s_T (eps_text - eps_image) + s_I (eps_image - eps_u)``. Returns edits in [0, 1]."""
        s = self.settings
        device = pixels.device
        image_latents = self.vae.encode(pixels.to(self.vae_dtype)).latent_dist.mode().float()
        scheduler = self.scheduler()
        scheduler.set_timesteps(s.num_inference_steps, device=device)
        noise = per_image_rand(derive(flat, "noise"), tuple(image_latents.shape[1:]), normal=True, device=device)
        latents = noise * scheduler.init_noise_sigma
        text = self._encode_text(prompts, device)
        empty = self._encode_text([""], device).expand(len(prompts), -1, -1)
        cond = torch.cat([text, empty, empty])
        image_in = torch.cat([image_latents, image_latents, torch.zeros_like(image_latents)])
        generators = step_generators(flat, device)
        for t in scheduler.timesteps:
            model_in = scheduler.scale_model_input(torch.cat([latents] * 3), t)
            model_in = torch.cat([model_in, image_in], dim=1).to(self.unet_dtype)
            eps_text, eps_image, eps_u = self.unet(model_in, t, encoder_hidden_states=cond).sample.float().chunk(3)
            eps = eps_u + s.guidance_scale * (eps_text - eps_image) + s.image_guidance_scale * (eps_image - eps_u)
            latents = scheduler.step(eps, t, latents, generator=generators).prev_sample
        return self.decode_latents(latents.float())

    def fractals_for(self, flat: torch.Tensor) -> torch.Tensor:
        """One fractal per image: drawn uniformly from the folder with the image's seed, else generated."""
        size = self.settings.resolution
        if self.fractals is None:
            return julia_fractals(flat.cpu(), size)
        u = per_image_rand(derive(flat.cpu(), "fractal"), (1,), device=torch.device("cpu")).reshape(-1)
        return self.fractals[(u * len(self.fractals)).long().clamp_max(len(self.fractals) - 1)]

    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        """k images per seed, each from its own seed:

        1. place; the style prompt of every output image; the seed image at ``resolution`` (bicubic);
        2. the InstructPix2Pix edit, redrawn (seed derived per attempt) while ``is_black_image`` flags it;
        3. the hybrid: original first, then the edit, vertical or horizontal from the image's seed;
        4. the fractal blend ``(1 - lambda) hybrid + lambda fractal``;
        5. store.
        """
        s = self.settings
        b, k = seeds.shape
        flat = seeds.reshape(-1).to(images.device)
        # 1. inputs
        self._place(images.device)
        prompts = self.prompts_for(seeds)
        original = (self.seed_pixels(images, k) + 1) / 2
        # 2. edits (redrawn where the black-image filter fires)
        edited = self.edit(original * 2 - 1, prompts, flat)
        attempts = torch.ones(b * k, dtype=torch.long)
        flagged = is_black_image(edited).cpu()
        for attempt in range(1, s.edit_attempts):
            if not flagged.any():
                break
            redo = flagged.nonzero().reshape(-1)
            again = derive(flat[redo].cpu(), f"{attempt}edit").to(flat.device)
            edited[redo.to(edited.device)] = self.edit(original[redo] * 2 - 1, [prompts[i] for i in redo], again)
            attempts[redo] += 1
            flagged[redo] = is_black_image(edited[redo.to(edited.device)]).cpu()
        if flagged.any():
            log.warning(
                "diffusemix: %d edit(s) still flagged by the black-image filter after %d attempts (kept, marked)",
                int(flagged.sum()),
                s.edit_attempts,
            )
        # 3. hybrid
        vertical = per_image_rand(derive(flat.cpu(), "concat"), (1,), device=torch.device("cpu")).reshape(-1) < 0.5
        hybrid = half_concat(original, edited, vertical, s.blend_width)
        # 4. fractal blend
        blended = fractal_blend(hybrid, self.fractals_for(flat).to(hybrid.device), s.fractal_weight)
        # 5. store
        fields: dict[str, Any] = {
            "prompt": prompts,
            "concat": ["vertical" if v else "horizontal" for v in vertical.tolist()],
            "edit_attempts": attempts.tolist(),
            "black_filter_failed": flagged.tolist(),
        }
        return ExpansionOutput(self.stored(blended, b, k), fields)
