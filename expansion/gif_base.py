"""What every GIF prior (SD, MAE, unCLIP) shares beyond the guidance core: the
probe guide's fit stage, the seed groups that are scored together, and turning
decoded images into the stored uint8 batch, the guidance settings and the CLIP guide."""

from __future__ import annotations

import os
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .base import Expander, ExpansionError, to_uint8
from .guidance import GuidanceSettings, sample_groups
from .guides import ClipGuide, Guide, ProbeGuide

LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as PIL's RGB -> L
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype(method: str, key: str, value: str) -> None:
    """A prior's dtype setting is ``auto`` or a name in :data:`DTYPES`; anything else is an error now."""
    if value != "auto" and value not in DTYPES:
        raise ExpansionError(f"{method}: {key} must be auto or one of {sorted(DTYPES)}, got {value!r}")


def resolve_dtype(value: str, device: torch.device, cuda_auto: str | None = None) -> torch.dtype:
    """The dtype a prior runs in: ``auto`` is float32 on the CPU and, on CUDA, ``cuda_auto`` if given
    (SD's UNet: float16, as released) else bfloat16 where supported, float16 otherwise."""
    if value == "auto":
        if device.type != "cuda":
            value = "float32"
        else:
            value = cuda_auto or ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return DTYPES[value]


def pretrained_source(what: str, model_id: str, revision: str | None, local_files_only: bool | None,
                      missing_folder_hint: str) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` should read a model: ``(source, kwargs)``. A path-like id must
    be an existing folder (else an error with ``missing_folder_hint``); HF_HUB_OFFLINE is read
    at call time (huggingface_hub reads it only at import), so offline runs fail at once."""
    path = Path(model_id).expanduser()
    looks_local = model_id.startswith(("/", ".", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise ExpansionError(f"{what} folder {path} does not exist; {missing_folder_hint}")
    kwargs: dict[str, Any] = {"revision": revision} if revision and not looks_local else {}
    if local_files_only is None and os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        local_files_only = True
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    return (str(path) if looks_local else model_id), kwargs


def build_guide(spec: Mapping[str, Any], class_names: Sequence[str]) -> Guide:
    """A CLIP guide from an open_clip architecture + pretrained tag (or local file)."""
    kind = spec.get("kind", "clip")
    if kind != "clip":
        raise ExpansionError(f"guide kind {kind!r} is built in fit(); expected 'clip' here")
    if spec.get("model_config"):
        import open_clip

        open_clip.add_model_config(str(Path(spec["model_config"]).expanduser()))
    return ClipGuide.from_open_clip(class_names, arch=spec.get("arch", "ViT-B-32"),
                                    pretrained=spec.get("pretrained", "openai"), cache_dir=spec.get("cache_dir"),
                                    template=spec.get("template", "This is a photo of a {}"),
                                    logit_scale=float(spec.get("logit_scale", 100.0)))


def train_tensors(train: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[N, C, H, W]`` and labels of a training split."""
    images = train.to_tensor() if hasattr(train, "to_tensor") else torch.stack([train[i][0] for i in range(len(train))])
    return images, torch.as_tensor(train.labels)


class GifExpander(Expander):
    """Base of the GIF variants. Subclasses set ``guide_spec`` (the guide config) and
    ``params["output_size"]``/``params["group_size"]``."""

    guide_spec: dict[str, Any]
    guided: bool = True  # False: the unguided ablation (same perturbation draws, no guidance step)

    def init_guidance(self, guide: dict[str, Any], radius: float, guidance: Mapping[str, Any] | None) -> None:
        """GIF's guidance settings (the L-inf radius of the channel-wise perturbation, the criteria
        weights and steps) and the guide's config; a probe guide makes a fit stage."""
        self.guide_spec = guide
        self.settings = GuidanceSettings(radius=float(radius), **(guidance or {}))
        self.needs_grad = self.guided
        self.needs_fit = self.needs_fit or (self.guided and guide.get("kind") == "probe")
        self.guide: Guide | None = None

    def build_clip_guide(self) -> None:
        """``guide.kind: clip`` (the default): the zero-shot CLIP guide over the context's class names."""
        if self.guided and self.guide_spec.get("kind", "clip") == "clip":
            self.guide = build_guide(self.guide_spec, self.context.class_names)

    def fit(self, train: Any, artifact_dir: Path) -> None:
        images, labels = train_tensors(train)
        self.fit_probe_guide(images, labels, artifact_dir)

    def fit_probe_guide(self, images: torch.Tensor, labels: torch.Tensor, artifact_dir: Path) -> None:
        """``guide.kind: probe``: a CNN trained on the seeds is the guide, cached in ``artifact_dir``."""
        if not getattr(self, "guided", True) or self.guide_spec.get("kind") != "probe":
            return
        path = artifact_dir / "probe_guide.safetensors"
        opts = {k: self.guide_spec[k] for k in ("width", "input_size") if k in self.guide_spec}
        if path.is_file():
            self.guide = ProbeGuide.load(path, len(self.context.class_names), **opts)
        else:
            self.guide = ProbeGuide.train_on(images, labels, len(self.context.class_names),
                                             epochs=int(self.guide_spec.get("epochs", 30)), **opts)
            self.guide.save(path)

    def probe_fit_signature(self) -> dict[str, Any] | None:
        return self.guide_spec if self.guide_spec and self.guide_spec.get("kind") == "probe" else None

    def _groups(self, b: int, k: int, device) -> torch.Tensor:
        return sample_groups(b, k, self.params["group_size"]).to(device)

    def _finish(self, images01: torch.Tensor, b: int, k: int) -> torch.Tensor:
        """Decoded images in [0, 1] ``[B*k, 3, H, W]`` -> stored uint8 ``[B, k, C, S, S]`` at
        ``output_size`` with the dataset's channel count."""
        size = self.params["output_size"]
        if size and images01.shape[-1] != size:
            images01 = F.interpolate(images01, size=(size, size), mode="bilinear", antialias=True,
                                     align_corners=False)
        if self.context.channels == 1:
            images01 = (images01 * torch.tensor(LUMA, device=images01.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        out = to_uint8(images01)
        return out.reshape(b, k, *out.shape[1:]).cpu()
