"""GIF over the Expansive Synthesis autoencoder: guided imagination with no downloaded weights.

The prior is the convolutional autoencoder of :mod:`expansion.expansive_synthesis` (pretrained
on the auxiliary pool, fine-tuned on the seed set, cached and shared with
``expansive_synthesis``); the guide is, by default, a probe CNN trained on the seed set
(``guide.kind: probe``; ``clip`` works too where CLIP weights are at hand). For each seed and
each of its k output images (all at once; every draw from the output image's own seed):

1. ``z0`` = the autoencoder's latent features of the seed ``[c, S/4, S/4]``;
2. GIF's channel-wise perturbation ``z' = z0 (1 + e) + b``, ``e ~ U(0, 1)``, ``b ~ N(0, 1)``,
   one value per latent channel (:mod:`expansion.guidance`);
3. guided (``guided: true``): ``guidance.n_steps`` signed-gradient steps on (e, b) that raise
   the three GIF criteria of the decoded samples under the guide; unguided (``guided: false``,
   the ablation): no step, the random perturbation as drawn;
4. projection onto the L-inf ball of radius ``radius * std(z0)`` around ``z0`` (the radius is
   relative to each image's latent scale, as for GIF-MAE: the autoencoder's latent scale is
   arbitrary), then decode.

Guided and unguided use the same draws of (e, b) and the same radius, so they differ only by
the guidance step.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .base import ExpansionContext, ExpansionError, ExpansionOutput
from .expansive_synthesis.expander import AutoencoderMethod
from .gif_base import GifExpander
from .guidance import channel_shape, criteria, guided_perturbation, perturb, project_linf
from .seeding import derive, per_image_rand


class GifAE(AutoencoderMethod, GifExpander):
    name = "gif_ae"
    needs_fit = True

    def __init__(self, ratio: int, guided: bool = True, radius: float = 0.5,
                 guide: Mapping[str, Any] | None = None, guidance: Mapping[str, Any] | None = None,
                 group_size: int | None = None, autoencoder: Mapping[str, Any] | None = None,
                 pretrain: Mapping[str, Any] | None = None, finetune: Mapping[str, Any] | None = None,
                 fit_seed: int = 0, batch_size: int = 256, num_workers: int = 0):
        guide = dict(guide or {"kind": "probe", "epochs": 30})
        guidance = dict(guidance or {})
        parts = self._autoencoder_settings(autoencoder, pretrain, finetune)
        super().__init__(ratio, guided=bool(guided), radius=float(radius),
                         guide=guide if guided else None, guidance=guidance if guided else None,
                         group_size=group_size, **parts, fit_seed=int(fit_seed), output_size=None,
                         batch_size=batch_size, num_workers=num_workers)
        if guide.get("kind") not in ("probe", "clip"):
            raise ExpansionError(f"{self.name}: guide.kind must be probe or clip, got {guide.get('kind')!r}")
        self.guided = bool(guided)
        self.init_guidance(guide, radius, guidance)

    def prepare(self, context: ExpansionContext) -> None:
        super().prepare(context)
        self.build_clip_guide()

    def fit_signature(self) -> dict[str, Any]:
        return {"kind": "autoencoder", **self.autoencoder_fit_signature(), "probe": self.probe_fit_signature()}

    def fit(self, train: Any, artifact_dir: Path) -> None:
        images, labels = self.fit_autoencoder(train, artifact_dir)
        self.fit_probe_guide(images, labels, artifact_dir)

    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        b, k = seeds.shape
        flat = seeds.reshape(-1)
        with torch.no_grad():
            z0 = self.features(images).repeat_interleave(k, 0)  # [B*k, c, h, w]
        shape = channel_shape(z0)
        e = per_image_rand(derive(flat, "gif_e"), shape, device=z0.device)
        bias = per_image_rand(derive(flat, "gif_b"), shape, normal=True, device=z0.device)
        radius = self.settings.radius * z0.flatten(1).std(dim=1).view(-1, 1, 1, 1)
        n = b * k
        fields: dict[str, Any] = {"radius": [self.settings.radius] * n, "radius_abs": radius.reshape(-1).tolist()}
        if self.guided:
            if self.guide is None:
                raise ExpansionError(f"{self.name}: no guide was built (prepare/fit not run)")
            groups = self._groups(b, k, z0.device)
            with torch.no_grad():
                seed_probs = self.guide(images.float() / 255.0).probs.repeat_interleave(k, 0)

            def score_fn(z):
                out = self.guide(self.autoencoder.decode(z))
                return criteria(seed_probs, out.probs, out.embeddings, groups, self.settings)

            result = guided_perturbation(z0, e, bias, score_fn, self.settings, radius=radius)
            latents = result.latents
            with torch.no_grad():
                decoded = self.autoencoder.decode(latents)
                final = self.guide(decoded)
            fields["score_before"] = result.score_before.tolist()
            fields["score_after"] = criteria(seed_probs, final.probs, final.embeddings, groups,
                                             self.settings).score.tolist()
            fields["guide_class"] = final.probs.argmax(-1).tolist()
            fields["guide_confidence"] = final.probs.max(-1).values.tolist()
        else:
            with torch.no_grad():
                latents = project_linf(perturb(z0, e, bias), z0, radius)
                decoded = self.autoencoder.decode(latents)
        return ExpansionOutput(self.to_images(decoded.detach(), b, k), fields)
