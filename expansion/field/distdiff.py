"""``distdiff``: DistDiff (Zhu et al., "Distribution-Aware Data Expansion with Diffusion Models", NeurIPS 2024;
haoweiz23/DistDiff@cab7e16), training-free guidance of SD img2img by class prototypes:

1. fit: a guide CNN trained on the seeds; from its L2-normalised penultimate features, per class a global
   prototype (the mean) and K = 3 local ones (agglomerative clustering, average linkage, cluster means), each
   L2-normalised (``dataloader.py:664-747``, ``generate_data.py:1103-1121``);
2. each seed's latent is noised to strength 0.5 of 50 DDIM steps and denoised under CFG 7.5 on "a photo of a
   {class}." (``expand_diff.sh``, SD v1.4);
3. when M = 20 steps remain (t = 381 with SD's schedule), transform guidance (``generate_data.py:687-732``):
   alpha ~ U(0, 1), beta ~ N(0, 1) per latent channel; P = 2 look-ahead steps from ``z (1 + alpha) + beta``,
   each step's predicted x0 decoded and embedded by the guide, energy
   ``sum_steps (|f - g_y| + |f - l_y|) / P`` with ``l_y`` the local prototype of largest dot product with f;
   one step ``alpha, beta -= rho grad`` (rho = 10); ``z' = z (1 + alpha) + beta`` projected onto the L-inf ball
   of radius epsilon = 0.2 around z; then the ordinary step at t.

``fidelity: official`` keeps the official code's quirks: the features inside the guidance are not normalised
(the prototypes are: ``sample_features: raw``) and the guide sees the decoded x0 in [-1, 1] without its own
input normalisation (``guide_input: signed``); ``paper`` normalises f and feeds the guide [0, 1] images.
Departures: the guide is the framework's probe CNN (expansion/probe.py, trained on the seeds and cached as a
fit) instead of a ResNet-50 trained from scratch at 224 px; the energy is summed over a batch's images (the
official mean over a batch of 1), so an image's guidance does not depend on its batch; seeds are resized to
the resolution (the official code random-crops to 512).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..base import ExpansionError, ExpansionOutput, ImageSet, train_tensors
from ..gif.guides import GuideSpec, ProbeGuide
from ..seeding import derive, per_image_rand
from ..settings import check_fidelity, check_ranges, fidelity_quirk, field_signature, speed_only
from ..stable_diffusion import ClassPromptSampler, StableDiffusionExpander


@dataclass(frozen=True)
class DistDiffSettings(ClassPromptSampler):
    """``expand_diff.sh``'s settings: SD v1.4, DDIM 50 steps, CFG 7.5, ``strength`` 0.5, ``guidance_step`` M = 20
    (steps remaining when the guidance runs), ``guidance_period`` P = 2, ``rho`` 10, ``epsilon`` 0.2 (absolute, on
    the scaled latent), ``num_local`` K = 3, the energy's ``global_weight`` and ``local_weight`` (1, 1); ``guide``:
    the probe CNN trained on the seeds; ``fidelity`` and its quirks (module doc); ``gradient_checkpointing``
    (speed/memory only): recompute the UNet's and the VAE decoder's activations in the guidance's backward pass,
    as the official script's ``--gradient_checkpointing``."""

    fidelity: str = "paper"
    model_id: str = "CompVis/stable-diffusion-v1-4"
    scheduler: str = "ddim"
    num_inference_steps: int = 50
    prompt: str = "a photo of a {class}."
    strength: float = 0.5
    guidance_step: int = 20
    guidance_period: int = 2
    rho: float = 10.0
    epsilon: float = 0.2
    num_local: int = 3
    global_weight: float = 1.0
    local_weight: float = 1.0
    guide: GuideSpec = field(default_factory=lambda: GuideSpec(kind="probe", epochs=30))
    sample_features: str = fidelity_quirk("normalized", "raw")
    guide_input: str = fidelity_quirk("unit", "signed")
    gradient_checkpointing: bool = speed_only(True)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fidelity(self.fidelity)
        n = self.num_inference_steps
        check_ranges(
            self,
            [
                (self.scheduler == "ddim", "scheduler", "ddim (the look-ahead steps need a stateless sampler)"),
                (0.0 < self.strength <= 1.0, "strength", "in (0, 1]"),
                (
                    self.guidance_period <= self.guidance_step <= int(n * self.strength),
                    "guidance_step",
                    "between guidance_period and the denoising steps int(num_inference_steps x strength)",
                ),
                (self.guidance_period >= 1, "guidance_period", ">= 1"),
                (self.epsilon >= 0, "epsilon", ">= 0"),
                (self.num_local >= 1, "num_local", ">= 1"),
                (self.guide.kind == "probe", "guide", "a probe guide (guide.kind: probe)"),
                (self.sample_features in ("normalized", "raw"), "sample_features", "normalized or raw"),
                (self.guide_input in ("unit", "signed"), "guide_input", "unit or signed"),
            ],
        )

    def signature(self) -> dict[str, Any]:
        out = field_signature(self)
        del out["fidelity"]  # a preset only: its quirks are in the key
        return out


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int):
    """Global ``[C, D]`` and local ``[C, K, D]`` prototypes of L2-normalised ``features``: the class mean and
    the means of K agglomerative clusters (average linkage), each L2-normalised. A class with fewer than K
    images has one cluster per image, the last repeated to K (a repeated prototype changes no distance)."""
    from sklearn.cluster import AgglomerativeClustering

    f = F.normalize(features.float(), dim=1)
    global_protos, local_protos = [], []
    for c in range(num_classes):
        members = f[labels == c]
        if len(members) == 0:
            raise ExpansionError(f"distdiff: class {c} has no training image, so it has no prototype")
        global_protos.append(members.mean(0))
        n_clusters = min(k, len(members))
        if n_clusters > 1:
            assignment = AgglomerativeClustering(n_clusters=n_clusters, linkage="average").fit(members.numpy()).labels_
        else:
            assignment = np.zeros(len(members), dtype=np.int64)
        means = [members[torch.from_numpy(assignment == j)].mean(0) for j in range(n_clusters)]
        local_protos.append(torch.stack(means + [means[-1]] * (k - n_clusters)))
    return F.normalize(torch.stack(global_protos), dim=-1), F.normalize(torch.stack(local_protos), dim=-1)


def prototype_energy(
    features: torch.Tensor,
    labels: torch.Tensor,
    global_protos: torch.Tensor,
    local_protos: torch.Tensor,
    global_weight: float = 1.0,
    local_weight: float = 1.0,
) -> torch.Tensor:
    """Per image ``w_g |f - g_y| + w_l |f - l_y|``, ``l_y`` the class's local prototype of largest ``<f, l>``
    (``generate_data.py:713-724``)."""
    g = global_protos[labels]
    local = local_protos[labels]  # [N, K, D]
    nearest = torch.bmm(local, features.unsqueeze(2)).squeeze(2).argmax(1)
    l_y = local[torch.arange(len(labels), device=local.device), nearest]
    return global_weight * (features - g.detach()).norm(dim=1) + local_weight * (features - l_y.detach()).norm(dim=1)


class DistDiff(StableDiffusionExpander):
    name = "distdiff"
    settings_class = DistDiffSettings
    needs_fit = True
    needs_grad = True

    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        """The guide CNN trained on the seeds (cached in ``artifact_dir``) and the class prototypes of its features."""
        images, labels = train_tensors(train)
        num_classes = len(self.context.class_names)
        self.guide = ProbeGuide.fitted(
            images, labels, num_classes, self.settings.guide, artifact_dir / "guide.safetensors"
        )
        with torch.no_grad():
            features = torch.cat([self.guide.probe.embed(chunk.float() / 255.0) for chunk in images.split(256)])
        self.global_protos, self.local_protos = class_prototypes(features, labels, num_classes, self.settings.num_local)

    def fit_signature(self) -> dict[str, Any]:
        return {"kind": "distdiff_guide", "guide": self.settings.guide.signature()}

    def guide_features(self, decoded_signed: torch.Tensor) -> torch.Tensor:
        """The guide's penultimate features of decoded images in [-1, 1] (``guide_input``: ``unit`` maps them to
        [0, 1] first; ``signed`` feeds them as they are, as the official code does)."""
        x = (decoded_signed + 1) / 2 if self.settings.guide_input == "unit" else decoded_signed
        f = self.guide.probe.embed(x)
        return F.normalize(f, dim=1) if self.settings.sample_features == "normalized" else f

    def place(self, device: torch.device) -> None:
        super().place(device)
        if self.settings.gradient_checkpointing:  # diffusers checkpoints only while gradients are on: the guidance
            self.unet.enable_gradient_checkpointing()
            self.vae.enable_gradient_checkpointing()

    def lookahead_energy(self, x, scheduler, guide_timesteps, cond, labels) -> torch.Tensor:
        """Per image: the P look-ahead DDIM steps from ``x``, each predicted x0 decoded and embedded by the guide,
        the prototype energy averaged over the steps (differentiable in ``x``)."""
        s = self.settings
        energy = torch.zeros(len(x), device=x.device)
        for t in guide_timesteps:
            out = scheduler.step(self.guided_eps(x, t, cond, scheduler), t, x, eta=0.0)
            x, x0 = out.prev_sample, out.pred_original_sample
            decoded = self.vae.decode((x0 / self.vae.config.scaling_factor).to(self.vae_dtype)).sample.float()
            features = self.guide_features(decoded)
            protos = self.global_protos.to(features.device), self.local_protos.to(features.device)
            energy = energy + prototype_energy(features, labels, *protos, s.global_weight, s.local_weight)
        return energy / s.guidance_period

    def transform_guidance(self, latents, scheduler, guide_timesteps, cond, labels, flat):
        """alpha, beta per latent channel drawn from each image's seed; one step ``-rho grad`` of the look-ahead
        energy of ``z (1 + alpha) + beta``; the moved latents projected onto the L-inf ball of radius epsilon around
        z. Returns them and the energy before the step."""
        s = self.settings
        shape = (latents.shape[1], 1, 1)
        alpha = per_image_rand(derive(flat, "alpha"), shape, device=latents.device).requires_grad_(True)
        beta = per_image_rand(derive(flat, "beta"), shape, normal=True, device=latents.device).requires_grad_(True)
        energy = self.lookahead_energy(latents * (1 + alpha) + beta, scheduler, guide_timesteps, cond, labels)
        grad_alpha, grad_beta = torch.autograd.grad(energy.sum(), [alpha, beta])
        with torch.no_grad():
            moved = latents * (1 + alpha - s.rho * grad_alpha) + (beta - s.rho * grad_beta)
            projected = torch.minimum(torch.maximum(moved, latents - s.epsilon), latents + s.epsilon)
        return projected.detach(), energy.detach()

    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        """k images per seed, each from its own seed:

        1. place; the class prompts; the seed latents (sampled from the VAE posterior) noised to ``strength``;
        2. DDIM steps under CFG; at the step where ``guidance_step`` steps remain, transform guidance first;
        3. decode and store.
        """
        s = self.settings
        b, k = seeds.shape
        flat = seeds.reshape(-1).to(images.device)
        rows = labels.to(images.device).repeat_interleave(k)
        # 1. start
        self._place(images.device)
        prompts = self.class_prompts(labels, k)
        cond = self.conditioning(prompts, images.device)
        with torch.no_grad():
            z = self.vae_latents(self.seed_pixels(images, k), flat)
        scheduler, latents, timesteps = self.start(z, flat, s.strength, z.shape[1:])
        first_guided = s.num_inference_steps - s.guidance_step
        guide_timesteps = scheduler.timesteps[first_guided : first_guided + s.guidance_period]
        # 2. denoise, with the transform guidance once
        energy = torch.full((b * k,), float("nan"))
        for t in timesteps:
            if t == guide_timesteps[0]:
                with torch.enable_grad():
                    latents, energy = self.transform_guidance(latents, scheduler, guide_timesteps, cond, rows, flat)
            with torch.no_grad():
                latents = scheduler.step(self.guided_eps(latents, t, cond, scheduler), t, latents, eta=0.0).prev_sample
        # 3. decode
        with torch.no_grad():
            decoded = self.decode_latents(latents.float())
        fields = {"prompt": prompts, "strength": [s.strength] * (b * k), "guidance_energy": energy.cpu().tolist()}
        return ExpansionOutput(self.stored(decoded, b, k), fields)
