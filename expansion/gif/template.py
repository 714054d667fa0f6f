"""GIF (Zhang et al., "Expanding Small-Scale Datasets with Guided Imagination", arXiv 2211.13976,
Sec. 4) written once for every prior.

A prior (Stable Diffusion, a masked autoencoder, unCLIP, the Expansive Synthesis autoencoder)
supplies a loader, ``encode``, ``decode``, ``perturbation_shape`` and ``radius_unit``;
:meth:`GifExpander.expand` does the rest, in the numbered steps of its docstring. The guidance
step itself (criteria, signed-gradient ascent, projection) is :mod:`expansion.guidance`.

``guided: false`` is the unguided ablation of any prior: the same draws of the perturbation, the
same projection, no guidance step and no guide. With ``radius: 0`` it is the prior alone
(``sd_img2img``: the official ``*_wo_optimization`` ablation has no perturbation).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..base import (
    Expander,
    ExpansionContext,
    ExpansionError,
    ExpansionOutput,
    ImageSet,
    train_tensors,
)
from ..guidance import (
    GuidanceSettings,
    channel_shape,
    criteria,
    guided_perturbation,
    perturb,
    project_linf,
    sample_groups,
)
from ..seeding import derive, per_image_rand
from ..settings import check_fidelity, fidelity_quirk, field_signature, speed_only
from ..stable_diffusion import stored_images
from ..weights import Weights
from .guides import ClipGuide, Guide, GuideSpec, ProbeGuide, clip_weights


@dataclass(frozen=True)
class GifSettings:
    """GIF's settings, shared by every prior; a prior's settings class extends this one.

    fidelity: ``paper`` (the method as published) or ``official`` (as the official scripts ran it):
        the preset of every quirk setting (:func:`~expansion.settings.fidelity_quirk`: here
        ``group_size``, the guidance's ``consistency`` and ``diversity``, the guide's
        normalisations, and the prior's own); a quirk given explicitly wins (docs/fidelity.md);
    radius: the L-inf radius ``c`` of the projection around ``z0``, in the prior's unit
        (:meth:`GifExpander.radius_unit`: absolute for SD's scaled latent, a multiple of each
        image's latent std for the others);
    guided: false = the unguided ablation (same perturbation draws and projection, no guidance);
    guide: the guide that scores decoded samples (:class:`~expansion.gif.guides.GuideSpec`);
    guidance: criteria weights and ascent steps (official: one signed step of 0.1, weights 1);
    group_size: samples scored together, a "pass" (None = a seed's k samples; official: passes of 2);
    output_size: stored side in pixels (None = the decoder's);
    guidance_chunk: seeds per guided backward pass (None = the whole batch; lower to save memory).
    """

    fidelity: str = "paper"
    radius: float = 0.8
    guided: bool = True
    guide: GuideSpec = field(default_factory=GuideSpec)
    guidance: GuidanceSettings = field(default_factory=GuidanceSettings)
    group_size: int | None = fidelity_quirk(None, 2, keyed_at_paper=True)
    output_size: int | None = None
    guidance_chunk: int | None = speed_only()

    def __post_init__(self) -> None:
        check_fidelity(self.fidelity, "fidelity")
        if self.radius < 0:
            raise ExpansionError(f"radius must be >= 0, got {self.radius}")
        for name in ("group_size", "output_size", "guidance_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ExpansionError(f"{name} must be >= 1 or null, got {value}")

    def signature(self) -> dict[str, Any]:
        """``fidelity`` is only a preset (its quirks are in the key); unguided, the guide, its
        criteria and the groups do not change the output: left out."""
        out = field_signature(self)
        del out["fidelity"]
        if not self.guided:
            out.update(guide=None, guidance=None, group_size=None)
        return out


@dataclass
class Encoding:
    """What a prior's :meth:`GifExpander.encode` returns for B seeds x k copies (rows seed-major)."""

    z0: torch.Tensor  #: the latent GIF perturbs, ``[B*k, ...]``
    #: per-row tensors that ``decode`` needs besides the latent (sliced with it), e.g. MAE's ids_restore
    decode_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the prior's manifest fields, ``B*k`` values each (e.g. SD's prompt)
    fields: dict[str, Any] = field(default_factory=dict)

    def inputs_for(self, rows: slice) -> dict[str, torch.Tensor]:
        return {name: value[rows] for name, value in self.decode_inputs.items()}


class GifExpander(Expander):
    """GIF over one prior. Subclasses set ``settings_class`` (extending :class:`GifSettings`) and
    implement :meth:`load_prior`, :meth:`encode` and :meth:`decode`; ``radius_is_relative`` and
    :meth:`perturbation_shape` say how the prior's latent is perturbed."""

    settings_class: ClassVar[type] = GifSettings
    #: false: ``radius`` is absolute in latent units; true: a multiple of each image's latent std
    #: (the manifest then records the absolute radius as ``radius_abs``)
    radius_is_relative: ClassVar[bool] = False

    def __init__(self, ratio: int, **settings: Any):
        super().__init__(ratio, **settings)
        self.guide: Guide | None = None
        self._placed_on: str | None = None

    # -- capabilities ------------------------------------------------------------------------
    @property
    def needs_grad(self) -> bool:
        return self.settings.guided

    @property
    def needs_fit(self) -> bool:
        return self.uses_probe_guide

    @property
    def uses_probe_guide(self) -> bool:
        return self.settings.guided and self.settings.guide.kind == "probe"

    # -- what a prior supplies ---------------------------------------------------------------
    @abc.abstractmethod
    def load_prior(self) -> None:
        """Load the prior's weights (``prepare`` calls it; a missing weight is an error naming it)."""

    @abc.abstractmethod
    def encode(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> Encoding:
        """uint8 seeds ``[B, C, H, W]`` -> the latent of each of their ``B*k`` output images."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, final: bool) -> torch.Tensor:
        """Latents ``[N, ...]`` -> images in [0, 1] ``[N, C, H, W]``, differentiable in ``z``.
        ``final`` is false while guidance scores samples (a prior may decode more cheaply then)."""

    def perturbation_shape(self, z0: torch.Tensor) -> tuple[int, ...]:
        """Shape of one image's (e, b): one value per latent channel (dim 1), broadcast over the rest."""
        return channel_shape(z0)

    def radius_unit(self, z0: torch.Tensor) -> torch.Tensor:
        """The unit of ``radius`` per image, shaped to broadcast against ``z0``."""
        shape = (-1,) + (1,) * (z0.ndim - 1)
        if self.radius_is_relative:
            return z0.flatten(1).std(dim=1).view(shape)
        return torch.ones(z0.shape[0], device=z0.device, dtype=z0.dtype).view(shape)

    def prior_weights(self) -> list[Weights]:
        """The prior's pretrained weights (none for a prior fitted on the seeds)."""
        return []

    def pretrained_weights(self) -> list[Weights]:
        """The prior's weights and, guided by CLIP, the guide's."""
        guide = self.settings.guide
        weights = self.prior_weights()
        if self.settings.guided and guide.kind == "clip":
            weights.append(clip_weights(guide.arch, guide.pretrained, "method.guide.pretrained"))
            if guide.model_config:
                weights.append(Weights("open_clip model config", guide.model_config, "method.guide.model_config"))
        return weights

    def prior_fit_signature(self) -> dict[str, Any]:
        """What the prior's fitted artifacts (if any) depend on."""
        return {}

    # -- set-up ---------------------------------------------------------------------------------
    def prepare(self, context: ExpansionContext) -> None:
        super().prepare(context)
        self.load_prior()
        self._placed_on = None
        guide = self.settings.guide
        if self.settings.guided and guide.kind == "clip":
            self.use_guide(ClipGuide.from_spec(guide, context.class_names))

    def use_guide(self, guide: Guide) -> None:
        """Score with ``guide`` (a built CLIP or probe guide; tests and benchmarks pass their own)."""
        self.guide = guide

    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        """``guide.kind: probe``: the probe CNN trained on the seeds is the guide, cached in ``artifact_dir``."""
        images, labels = train_tensors(train)
        self.fit_probe_guide(images, labels, artifact_dir)

    def fit_probe_guide(self, images: torch.Tensor, labels: torch.Tensor, artifact_dir: Path) -> None:
        if self.uses_probe_guide:
            self.use_guide(
                ProbeGuide.fitted(
                    images,
                    labels,
                    len(self.context.class_names),
                    self.settings.guide,
                    artifact_dir / "probe_guide.safetensors",
                )
            )

    def fit_signature(self) -> dict[str, Any]:
        probe = self.settings.guide.signature() if self.uses_probe_guide else None
        return {**self.prior_fit_signature(), "probe": probe}

    # -- generation -----------------------------------------------------------------------------
    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        """GIF for B seeds x k copies:

        1. check: the prior is loaded (and placed on the device), the guide built when guided;
        2. encode: ``z0 [B*k, ...]``, the prior's latent of every output image;
        3. per-image draws ``e ~ U(0, 1)``, ``b ~ N(0, 1)`` of ``perturbation_shape(z0)``, each from
           its output image's own seed;
        4. radius ``c = settings.radius x radius_unit(z0)``;
        5. guided: in chunks of ``guidance_chunk`` seeds, ``guidance.n_steps`` signed-gradient steps
           on (e, b) of the criteria of ``guide(decode(z0 (1 + e) + b))``, then the projection onto
           the L-inf ball of radius c around z0; unguided: the projection of the drawn perturbation;
        6. decode the projected latents (and score them with the guide when guided);
        7. the manifest fields and the uint8 images at ``output_size`` with the dataset's channels.
        """
        s = self.settings
        b, k = seeds.shape
        flat = seeds.reshape(-1)
        # 1. check
        self._place(images.device)
        if s.guided and self.guide is None:
            raise ExpansionError(f"{self.name}: no guide was built (prepare/fit not run)")
        # 2. encode
        with torch.no_grad():
            encoding = self.encode(images, labels, seeds)
        z0 = encoding.z0
        # 3. draws of the perturbation
        shape = self.perturbation_shape(z0)
        e = per_image_rand(derive(flat, "gif_e"), shape, device=z0.device)
        bias = per_image_rand(derive(flat, "gif_b"), shape, normal=True, device=z0.device)
        # 4. radius
        radius = s.radius * self.radius_unit(z0)
        fields: dict[str, Any] = {**encoding.fields, "radius": [s.radius] * (b * k)}
        if self.radius_is_relative:
            fields["radius_abs"] = radius.reshape(-1).tolist()
        # 5. guidance (or the unguided projection)
        if s.guided:
            with torch.no_grad():
                seed_probs = self.guide(images.float() / 255.0, seed=True).probs.repeat_interleave(k, 0)
            groups = sample_groups(b, k, s.group_size).to(z0.device)
            latents, score_before = self.guided_latents(encoding, e, bias, radius, seed_probs, groups, b, k)
        else:
            latents = project_linf(perturb(z0, e, bias), z0, radius)
        # 6. decode and score
        with torch.no_grad():
            decoded = self.decode(latents, encoding.decode_inputs, final=True)
            if s.guided:
                final = self.guide(decoded)
                fields["score_before"] = score_before.tolist()
                fields["score_after"] = criteria(
                    seed_probs, final.probs, final.embeddings, groups, s.guidance
                ).score.tolist()
                fields["guide_class"] = final.probs.argmax(-1).tolist()
                fields["guide_confidence"] = final.probs.max(-1).values.tolist()
        # 7. stored images
        return ExpansionOutput(self.stored_images(decoded, b, k), fields)

    def guided_latents(
        self,
        encoding: Encoding,
        e: torch.Tensor,
        bias: torch.Tensor,
        radius: torch.Tensor,
        seed_probs: torch.Tensor,
        groups: torch.Tensor,
        b: int,
        k: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Step 5, chunk by chunk (each chunk's groups renumbered from 0: a group never spans chunks):
        the projected latents and the score before the ascent."""
        chunk = int(self.settings.guidance_chunk or b) * k
        latents, before = [], []
        for start in range(0, b * k, chunk):
            rows = slice(start, start + chunk)
            g = groups[rows] - groups[rows].min()
            inputs = encoding.inputs_for(rows)

            def score_fn(z: torch.Tensor, rows: slice = rows, g: torch.Tensor = g, inputs: dict = inputs):
                return self.score(z, inputs, seed_probs[rows], g)

            result = guided_perturbation(
                encoding.z0[rows], e[rows], bias[rows], score_fn, self.settings.guidance, radius=radius[rows]
            )
            latents.append(result.latents)
            before.append(result.score_before)
        return torch.cat(latents), torch.cat(before)

    def score(
        self, z: torch.Tensor, inputs: Mapping[str, torch.Tensor], seed_probs: torch.Tensor, groups: torch.Tensor
    ):
        """The criteria of the guide on the samples ``decode(z)`` (differentiable in ``z``)."""
        out = self.guide(self.decode(z, inputs, final=False))
        return criteria(seed_probs, out.probs, out.embeddings, groups, self.settings.guidance)

    def stored_images(self, images01: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """Decoded images in [0, 1] ``[B*k, C, H, W]`` -> uint8 ``[B, k, C', S, S]`` at ``output_size``
        (:func:`~expansion.stable_diffusion.stored_images`)."""
        return stored_images(images01, b, k, self.settings.output_size, self.context.channels)
