"""``real_guidance``: Real Guidance (He et al., "Is synthetic data from generative models ready for image
recognition?", ICLR 2023; CVMI-Lab/SyntheticData@062ac23). Each real image is noised to an intermediate step
and denoised under classifier-free guidance on its class prompt; optionally a zero-shot CLIP filter keeps
an image only if ``p(label) > 1/K`` (``select_glide_ims_by_clip.py:321-350``).

Departures (docs/fidelity.md): the official generator is GLIDE (64 px base, 100 respaced steps, CFG 3.0,
the ``fast27`` upsampler); ours is Stable Diffusion img2img at 512 px with 100 DDIM steps, so the official
``r`` of 100 steps (``r`` = 15/20/35/40/50 for 16/8/4/2/1 shots, README:120) is ``strength = r / 100`` and the
same number of denoising steps runs (DiffDA-Eval's port runs 25 DPM-Solver++ steps at strength 0.1: 2 steps).
The filter is per output image: up to ``filter_candidates`` draws, the first above ``1/K`` kept, else the most
confident (the official code filters a class's 800 images and fills its quota with the top ones). Language
enhancement and the official classifier (frozen CLIP, KD) are not part of generation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..base import ExpansionContext, ExpansionError, ExpansionOutput
from ..gif.guides import ClipGuide, GuideSpec, clip_weights
from ..seeding import derive
from ..settings import check_ranges, field_signature
from ..stable_diffusion import ClassPromptSampler, StableDiffusionExpander
from ..weights import Weights

#: the official strength per shot count: r / 100 of GLIDE's 100 respaced steps (README:120)
OFFICIAL_STRENGTH = {1: 0.50, 2: 0.40, 4: 0.35, 8: 0.20, 16: 0.15}


@dataclass(frozen=True)
class RealGuidanceSettings(ClassPromptSampler):
    """img2img at ``strength`` (None: :data:`OFFICIAL_STRENGTH` for the split's shots per class) of
    ``num_inference_steps`` DDIM steps, CFG ``guidance_scale`` (official 3.0); ``clip_filter``: filter with the
    zero-shot CLIP ``filter_guide`` (official: RN50, openai), ``filter_candidates`` draws per output image."""

    scheduler: str = "ddim"
    num_inference_steps: int = 100
    guidance_scale: float = 3.0
    strength: float | None = None
    clip_filter: bool = False
    filter_guide: GuideSpec = field(default_factory=lambda: GuideSpec(arch="RN50", pretrained="openai"))
    filter_candidates: int = 4

    def signature(self) -> dict[str, Any]:
        """Without the filter, its guide and candidate count do not change the output: left out."""
        out = field_signature(self)
        if not self.clip_filter:
            del out["filter_guide"], out["filter_candidates"]
        return out

    def __post_init__(self) -> None:
        super().__post_init__()
        check_ranges(
            self,
            [
                (self.strength is None or 0.0 < self.strength <= 1.0, "strength", "in (0, 1] or null"),
                (self.filter_candidates >= 1, "filter_candidates", ">= 1"),
                (self.filter_guide.kind == "clip", "filter_guide", "a CLIP guide (filter_guide.kind: clip)"),
            ],
        )


def official_strength(shots: int | None) -> float:
    """The official strength for ``shots`` images per class; other shot counts must set ``method.strength``."""
    if shots not in OFFICIAL_STRENGTH:
        raise ExpansionError(
            f"real_guidance: the official strength is given for {sorted(OFFICIAL_STRENGTH)} shots per class, this "
            f"split has {shots}; set method.strength (e.g. 0.15 for many shots)"
        )
    return OFFICIAL_STRENGTH[shots]


def filter_choice(p_label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``p_label [N, c]`` (each output image's c candidates' CLIP probability of its label) -> the chosen
    candidate per image: the first with ``p > 1/K``, else the most confident."""
    passes = p_label > 1.0 / num_classes
    first = torch.where(passes.any(1), passes.float().argmax(1), p_label.argmax(1))
    return first


class RealGuidance(StableDiffusionExpander):
    name = "real_guidance"
    settings_class = RealGuidanceSettings

    def pretrained_weights(self) -> list[Weights]:
        weights = super().pretrained_weights()
        spec = self.settings.filter_guide
        if self.settings.clip_filter:
            weights.append(clip_weights(spec.arch, spec.pretrained, "method.filter_guide.pretrained"))
        return weights

    def prepare(self, context: ExpansionContext) -> None:
        """The strength is resolved (an unknown shot count fails here, before any weight loads)."""
        self.context = context
        self.strength = self.settings.strength or official_strength(context.shots_per_class)
        super().prepare(context)
        s = self.settings
        self.clip = ClipGuide.from_spec(s.filter_guide, context.class_names) if s.clip_filter else None

    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        """k images per seed, each from its own seed:

        1. place the networks; c candidates per output image (c = ``filter_candidates`` with the filter, else 1),
           the first drawn from the image's seed, the others from seeds derived from it;
        2. img2img of the seed image at ``strength`` on the class prompt;
        3. decode; with the filter, CLIP's zero-shot probability of the label picks one candidate per image;
        4. store.
        """
        s = self.settings
        b, k = seeds.shape
        # 1. candidates
        self._place(images.device)
        c = s.filter_candidates if self.clip is not None else 1
        candidates = torch.stack([seeds] + [derive(seeds, f"{i}rg") for i in range(1, c)], -1)  # [B, k, c]
        flat = candidates.reshape(-1).to(images.device)
        # 2. img2img
        z = self.vae_latents(self.seed_pixels(images, k * c), flat)
        scheduler, latents, timesteps = self.start(z, flat, self.strength, z.shape[1:])
        prompts = self.class_prompts(labels, k * c)
        if len(timesteps):
            latents = self.sample(scheduler, latents, timesteps, self.conditioning(prompts, images.device), flat)
        # 3. decode (and filter)
        decoded = self.decode_latents(latents)
        decoded = decoded.reshape(b * k, c, *decoded.shape[1:])
        n = b * k
        fields = {"prompt": prompts[::c], "strength": [self.strength] * n, "denoising_steps": [len(timesteps)] * n}
        chosen = torch.zeros(b * k, dtype=torch.long, device=decoded.device)
        if self.clip is not None:
            probs = self.clip(decoded.flatten(0, 1)).probs.reshape(b * k, c, -1)
            label_index = labels.to(probs.device).repeat_interleave(k)[:, None, None].expand(-1, c, 1)
            p_label = probs.gather(2, label_index)[..., 0]
            chosen = filter_choice(p_label, probs.shape[-1])
            kept = p_label[torch.arange(n), chosen]
            fields["filter_p_label"] = kept.tolist()
            fields["filter_passed"] = (kept > 1.0 / probs.shape[-1]).tolist()
        picked = decoded[torch.arange(n, device=decoded.device), chosen]
        # 4. store
        return ExpansionOutput(self.stored(picked, b, k), fields)
