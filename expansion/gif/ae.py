"""GIF over the Expansive Synthesis autoencoder: guided imagination with no downloaded weights.

The prior is the convolutional autoencoder of :mod:`expansion.expansive_synthesis` (pretrained on
the auxiliary pool, fine-tuned on the seed set, cached and shared with ``expansive_synthesis``):
``z0`` is a seed's latent features ``[c, S/4, S/4]`` (shared by its k copies), decoded by the
autoencoder's decoder. The guide is, by default, the probe CNN trained on the seed set
(``guide.kind: probe``; ``clip`` works too where CLIP weights are at hand). ``radius`` is relative
to each image's latent std (the autoencoder's latent scale is arbitrary). ``gif_ae_unguided`` is
the same random perturbation without the guidance step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..base import ExpansionError, ImageSet
from ..expansive_synthesis.expander import AutoencoderMethod
from ..expansive_synthesis.fitting import AutoencoderFit
from .guides import GuideSpec
from .template import Encoding, GifExpander, GifSettings


@dataclass(frozen=True)
class GifAESettings(GifSettings, AutoencoderFit):
    """GIF's settings (``radius`` relative to each latent's std, a probe guide by default) and the
    autoencoder's fit (:class:`~expansion.expansive_synthesis.fitting.AutoencoderFit`)."""

    radius: float = 0.5
    guide: GuideSpec = field(default_factory=lambda: GuideSpec(kind="probe"))


class GifAE(AutoencoderMethod, GifExpander):
    name = "gif_ae"
    settings_class = GifAESettings
    radius_is_relative = True
    needs_fit = True  # the autoencoder is always fitted (then the probe guide, when guided)

    def load_prior(self) -> None:
        """Nothing to download: the autoencoder is fitted (or loaded from the fit cache) in ``fit``."""

    def place(self, device: torch.device) -> None:
        if getattr(self, "autoencoder", None) is None:
            raise ExpansionError(f"{self.name}: the autoencoder is not fitted (fit() has not run)")

    def prior_fit_signature(self) -> dict[str, Any]:
        return {"kind": "autoencoder", **self.autoencoder_fit_signature()}

    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        images, labels = self.fit_autoencoder(train, artifact_dir)
        self.fit_probe_guide(images, labels, artifact_dir)

    def encode(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> Encoding:
        return Encoding(self.features(images).repeat_interleave(seeds.shape[1], 0))

    def decode(self, z: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, final: bool) -> torch.Tensor:
        return self.autoencoder.decode(z)
