"""Feature spaces of the quality metrics: the probe CNN trained on the original images (offline), torchmetrics'
Inception, an open_clip image encoder; and batched feature extraction."""

from __future__ import annotations

import hashlib
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from expansion.base import ExpansionError
from expansion.files import content_key
from expansion.probe import PROBE_RECIPE, Probe
from expansion.probe import train_probe as fit_probe

EXTRACTORS = ("classifier", "inception", "clip")


class QualityError(ExpansionError):
    """A quality metric cannot be computed (e.g. missing extractor weights); one clear line."""


def _progress(enabled: bool) -> bool:
    """Bars only when asked for and on a terminal (quiet in CI logs and files)."""
    return bool(enabled) and sys.stderr.isatty()


def _tqdm(iterable, *, progress: bool, desc: str, total: int | None = None, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, total=total, unit=unit, leave=False, disable=not _progress(progress), dynamic_ncols=True
    )


# -- feature extractors ---------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """``forward(uint8 [N, C, H, W]) -> float [N, D]``; ``logits`` (optional) gives class scores."""

    description: str = "features"
    num_features: int

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        return None


class ProbeExtractor(FeatureExtractor):
    """The probe (:mod:`expansion.probe`) trained on the original images: penultimate features, head logits."""

    def __init__(self, probe: Probe, description: str):
        super().__init__()
        self.probe = probe
        self.num_features = probe.num_features
        self.description = description

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe.embed(images.float() / 255.0)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe(images.float() / 255.0)


def train_probe(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    *,
    epochs: int = 10,
    size: int = 32,
    seed: int = 0,
    min_steps: int = 200,
    progress: bool = False,
    cache_dir: Path | str | None = None,
) -> ProbeExtractor:
    """The probe trained on uint8 ``images`` (:func:`expansion.probe.train_probe`), as a feature extractor.
    With ``cache_dir`` it is trained once per training set and setting and reused by every later run (a
    sweep's jobs on the same data); a cached file that cannot be read is trained again, never used."""

    def bars(iterable, desc):
        return _tqdm(iterable, progress=progress, desc=f"quality: {desc}", unit="epoch")

    y = np.asarray(labels, dtype=np.int64)
    key = content_key(
        {
            "images": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(),
            "shape": list(images.shape),
            "labels": hashlib.sha256(y.tobytes()).hexdigest(),
            "num_classes": num_classes,
            "epochs": epochs,
            "size": size,
            "seed": seed,
            "min_steps": min_steps,
            "recipe": PROBE_RECIPE,
        }
    )
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    probe = None
    if path is not None and path.is_file():
        try:
            probe = Probe.load(path)
        except Exception as exc:  # a damaged file: train again
            warnings.warn(
                f"quality probe {path} cannot be read ({type(exc).__name__}: {exc}); training it again", stacklevel=2
            )
    if probe is None:
        probe = fit_probe(
            images, y, num_classes, epochs=epochs, size=size, seed=seed, min_steps=min_steps, progress=bars
        )
        if path is not None:
            probe.save(path)
    description = (
        f"classifier(small_cnn, trained on {len(images)} original images, {probe.trained_epochs} epochs, "
        f"{probe.size} px, {probe.num_features}-d penultimate features)"
    )
    return ProbeExtractor(probe, description)


class InceptionExtractor(FeatureExtractor):
    """torchmetrics' FID InceptionV3 (2048-d pool3 features), as in the standard FID."""

    def __init__(self):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except Exception as exc:  # torch-fidelity missing, or its weights cannot be fetched offline
            raise QualityError(
                f"quality.extractor=inception needs torch-fidelity and its FID InceptionV3 weights "
                f"(pt_inception-2015-12-05, downloaded once into the torch hub cache): {type(exc).__name__}: {exc}. "
                "Install with `pip install torch-fidelity` where there is network and run once, or use "
                "quality.extractor=classifier (offline)."
            ) from exc
        self.num_features = 2048
        self.description = "inception(torchmetrics FID InceptionV3, 2048-d pool features)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return self.net(x).reshape(len(x), -1).float()


class ClipExtractor(FeatureExtractor):
    """An open_clip image encoder (unit-norm embeddings) and its zero-shot class prediction."""

    def __init__(self, class_names: Sequence[str], arch: str = "ViT-B-32", pretrained: str = "openai"):
        super().__init__()
        from expansion.gif.guides import ClipGuide

        try:
            self.guide = ClipGuide.from_open_clip(list(class_names), arch=arch, pretrained=pretrained)
        except ExpansionError as exc:
            raise QualityError(f"quality.extractor=clip: {exc} (or use quality.extractor=classifier)") from exc
        self.num_features = int(self.guide.text_features.shape[-1])
        self.description = f"clip(open_clip {arch}, pretrained={pretrained}, image embeddings)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.guide(images.float() / 255.0).embeddings

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.guide(images.float() / 255.0).probs.log()


def _has_head(model: nn.Module) -> bool:
    return isinstance(model, FeatureExtractor) and type(model).logits is not FeatureExtractor.logits


def build_extractor(
    kind: str,
    original: torch.Tensor,
    original_labels,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    epochs: int = 10,
    probe_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    clip_arch: str = "ViT-B-32",
    clip_pretrained: str = "openai",
    cache_dir: Path | str | None = None,
) -> FeatureExtractor:
    if kind == "classifier":
        return train_probe(
            original,
            original_labels,
            num_classes,
            epochs=epochs,
            size=probe_size,
            seed=seed,
            progress=progress,
            cache_dir=cache_dir,
        )
    if kind == "inception":
        return InceptionExtractor()
    if kind == "clip":
        names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        return ClipExtractor(names, arch=clip_arch, pretrained=clip_pretrained)
    raise QualityError(f"unknown quality.extractor {kind!r}: use one of {EXTRACTORS}")


@torch.no_grad()
def extract(
    extractor: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
    desc: str = "quality: features",
    logits: bool = False,
) -> torch.Tensor:
    """Run ``extractor`` (or its ``logits``) over uint8 ``images`` in batches; float32 on the CPU."""
    fn = extractor.logits if logits else extractor
    out = []
    starts = range(0, len(images), batch_size)
    for start in _tqdm(starts, progress=progress, desc=desc, total=len(starts), unit="batch"):
        out.append(fn(images[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


# -- the metrics ---------------------------------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Hands already extracted features to torchmetrics (features are computed once and
    shared by FID, KID, diversity and memorisation)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features
