"""Guides: anything that maps images in [0, 1] to class probabilities and embeddings.

* :class:`ClipGuide` -- GIF's zero-shot CLIP (open_clip ViT-B/32 by default, prompt
  "This is a photo of a {class}", logit scale 100). Input normalisation, seeds and generated samples
  apart: ``clip`` (CLIP's own statistics, the paper's setting) for both; the official scripts
  normalise seeds with CIFAR statistics (``cifar``; DTD: ``dtd``) and feed samples unnormalised
  (``none``), e.g. Caltech l.310-314 and l.564-566.
* :class:`ProbeGuide` -- offline: the probe CNN (:mod:`expansion.probe`) trained on the seed set;
  probabilities from its head, embeddings from its penultimate layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..base import resize
from ..errors import ExpansionError
from ..probe import PROBE_RECIPE, Probe, train_probe
from ..settings import fidelity_quirk, speed_only
from ..weights import Weights, is_local_path

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
GUIDE_KINDS = ("clip", "probe")
#: input statistics (mean, std) by name; ``clip``: the model's own, ``none``: no normalisation
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]] | None] = {
    "clip": None,
    "cifar": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # every official script but DTD's
    "dtd": (  # GIF_SD/dtd/dataset_expansion_stable_diffusion_CLIP_batch_optimization.py l.307-308
        (0.5329876098715876, 0.474260843249454, 0.42627281899380676),
        (0.26549755708788914, 0.25473554309855373, 0.2631728035662832),
    ),
    "none": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


@dataclass(frozen=True)
class GuideSpec:
    """Which guide scores the decoded samples.

    kind: ``clip`` (zero-shot open_clip: ``arch``, ``pretrained`` tag or local weights file,
    ``model_config`` a JSON to register for a custom architecture, prompt ``template``,
    ``logit_scale``) or ``probe`` (the probe CNN trained ``epochs`` epochs on the seeds);
    seed_normalization / sample_normalization: CLIP's input statistics for the seed images and for
    the generated samples, one of :data:`NORMALIZATIONS` (paper: ``clip`` for both; the official
    code: ``cifar`` (DTD: ``dtd``) for seeds, ``none`` for samples);
    cache_dir: where open_clip keeps downloaded weights (location only).
    """

    kind: str = "clip"
    arch: str = "ViT-B-32"
    pretrained: str = "openai"
    model_config: str | None = None
    template: str = "This is a photo of a {}"
    logit_scale: float = 100.0
    epochs: int = 30
    seed_normalization: str = fidelity_quirk("clip", "cifar")
    sample_normalization: str = fidelity_quirk("clip", "none")
    cache_dir: str | None = speed_only()

    def __post_init__(self) -> None:
        if self.kind not in GUIDE_KINDS:
            raise ExpansionError(f"guide.kind must be one of {GUIDE_KINDS}, got {self.kind!r}")
        if self.epochs < 1:
            raise ExpansionError(f"guide.epochs must be >= 1, got {self.epochs}")
        for key in ("seed_normalization", "sample_normalization"):
            if getattr(self, key) not in NORMALIZATIONS:
                raise ExpansionError(f"guide.{key} must be one of {tuple(NORMALIZATIONS)}, got {getattr(self, key)!r}")

    def signature(self) -> dict[str, Any]:
        """Only the settings of the chosen kind change the output."""
        if self.kind == "probe":
            return {"kind": "probe", "epochs": self.epochs, "network": PROBE_RECIPE}
        out = {
            "kind": "clip",
            "arch": self.arch,
            "pretrained": self.pretrained,
            "model_config": self.model_config,
            "template": self.template,
            "logit_scale": self.logit_scale,
        }
        for key in ("seed_normalization", "sample_normalization"):  # keyed when not CLIP's own (older keys hold)
            if getattr(self, key) != "clip":
                out[key] = getattr(self, key)
        return out


def clip_weights(arch: str, pretrained: str, setting: str) -> Weights:
    """The open_clip weights ``arch``/``pretrained`` loads: a local file, or the hub repo open_clip's
    pretrained table names for the tag."""
    what = f"CLIP weights (open_clip {arch}, {pretrained})"
    if is_local_path(pretrained):
        return Weights(what, pretrained, setting)
    import open_clip

    hub = (open_clip.get_pretrained_cfg(arch, pretrained) or {}).get("hf_hub", "")
    parts = hub.strip("/").split("/")  # "org/repo/" or "org/repo/file"
    repo, file = "/".join(parts[:2]), "/".join(parts[2:])
    files = (file,) if file else ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
    return Weights(what, repo or f"{arch}/{pretrained}", setting, hub_files=files)


@dataclass
class GuideOutput:
    probs: torch.Tensor  # [N, K]
    embeddings: torch.Tensor  # [N, D]


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def rgb_at(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (or [0, 1] float) ``[B, C, H, W]`` -> RGB in [0, 1] at ``size`` px (bicubic, antialiased
    when shrinking), as a prior's image encoder takes it."""
    x = to_rgb(images.float() / 255.0 if images.dtype == torch.uint8 else images.float())
    return resize(x, size, "bicubic").clamp(0, 1)


class Guide(nn.Module):
    """``forward(images in [0, 1], [N, C, H, W], seed=...) -> GuideOutput``; differentiable in the
    images; ``seed``: the images are seed images (true) or generated samples (false)."""

    num_classes: int

    def forward(self, images: torch.Tensor, seed: bool = False) -> GuideOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class ClipGuide(Guide):
    """Zero-shot CLIP: ``p = softmax(logit_scale * <f(x)/|f(x)|, t_c/|t_c|>)`` over the class prompts,
    ``x`` resized to ``image_size`` (bicubic, antialiased) and normalised with ``mean``/``std`` (the
    model's statistics) or, for seeds and samples apart, the named :data:`NORMALIZATIONS`."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        class_names: Sequence[str],
        template: str = "This is a photo of a {}",
        logit_scale: float = 100.0,
        image_size: int = 224,
        mean: Sequence[float] = OPENAI_CLIP_MEAN,
        std: Sequence[float] = OPENAI_CLIP_STD,
        seed_normalization: str = "clip",
        sample_normalization: str = "clip",
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.num_classes = len(class_names)
        self.logit_scale = float(logit_scale)
        self.image_size = int(image_size)
        for role, name in (("seed", seed_normalization), ("sample", sample_normalization)):
            if name not in NORMALIZATIONS:
                raise ExpansionError(f"guide.{role}_normalization must be one of {tuple(NORMALIZATIONS)}, got {name!r}")
            stats = NORMALIZATIONS[name] or (mean, std)
            # float64 constants (cast to the input's dtype when used), so a float64 guide uses them unrounded
            self.register_buffer(f"{role}_mean", torch.tensor(stats[0], dtype=torch.float64).view(1, 3, 1, 1), False)
            self.register_buffer(f"{role}_std", torch.tensor(stats[1], dtype=torch.float64).view(1, 3, 1, 1), False)
        prompts = [template.format(name) for name in class_names]
        with torch.no_grad():
            text = model.encode_text(tokenizer(prompts)).float()
        self.register_buffer("text_features", F.normalize(text, dim=-1), persistent=False)
        self.prompts = prompts

    @classmethod
    def from_spec(cls, spec: GuideSpec, class_names: Sequence[str]) -> ClipGuide:
        """The CLIP guide a :class:`GuideSpec` of kind ``clip`` names."""
        if spec.model_config:
            import open_clip

            open_clip.add_model_config(str(Path(spec.model_config).expanduser()))
        return cls.from_open_clip(
            class_names,
            arch=spec.arch,
            pretrained=spec.pretrained,
            cache_dir=spec.cache_dir,
            template=spec.template,
            logit_scale=spec.logit_scale,
            seed_normalization=spec.seed_normalization,
            sample_normalization=spec.sample_normalization,
        )

    @classmethod
    def from_open_clip(
        cls,
        class_names: Sequence[str],
        arch: str = "ViT-B-32",
        pretrained: str = "openai",
        cache_dir: str | None = None,
        **kwargs,
    ) -> ClipGuide:
        """Load an open_clip model by architecture and pretrained tag (or a local weights file)."""
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=pretrained, cache_dir=cache_dir
            )
        except Exception as exc:  # offline hub miss, bad tag, corrupt file: say what is missing and how to get it
            raise ExpansionError(
                f"could not load the CLIP guide open_clip {arch!r} with pretrained={pretrained!r} ({type(exc).__name__}: "
                f"{exc}). Download it once on a machine with network (it is cached under "
                f"{cache_dir or os.environ.get('HF_HOME', '~/.cache/huggingface')}), or set the guide's pretrained "
                "to a local open_clip weights file."
            ) from exc
        size = getattr(model.visual, "image_size", 224)
        size = size[0] if isinstance(size, tuple | list) else size
        norm = next((t for t in getattr(preprocess, "transforms", []) if hasattr(t, "mean")), None)
        mean = tuple(norm.mean) if norm is not None else OPENAI_CLIP_MEAN
        std = tuple(norm.std) if norm is not None else OPENAI_CLIP_STD
        return cls(model, open_clip.get_tokenizer(arch), class_names, image_size=size, mean=mean, std=std, **kwargs)

    def forward(self, images: torch.Tensor, seed: bool = False) -> GuideOutput:
        role = "seed" if seed else "sample"
        x = to_rgb(images.to(self.text_features.dtype))  # float32 (float64 when the guide is .double())
        x = resize(x, self.image_size, "bicubic")
        x = (x - getattr(self, f"{role}_mean").to(x)) / getattr(self, f"{role}_std").to(x)
        features = self.model.encode_image(x)
        features = F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)
        logits = self.logit_scale * features @ self.text_features.T
        return GuideOutput(logits.softmax(dim=-1), features)


class ProbeGuide(Guide):
    """The probe trained on the seed set as GIF's guide (no CLIP weights needed)."""

    def __init__(self, probe: Probe):
        super().__init__()
        self.probe = probe
        self.num_classes = probe.num_classes

    @classmethod
    def fitted(
        cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, spec: GuideSpec, path: Path
    ) -> ProbeGuide:
        """The probe saved at ``path`` or, if there is none, trained on uint8 ``images`` and saved there."""
        if path.is_file():
            return cls(Probe.load(path))
        probe = train_probe(images, labels, num_classes, epochs=spec.epochs, seed=0)
        probe.save(path)
        return cls(probe)

    def forward(self, images: torch.Tensor, seed: bool = False) -> GuideOutput:
        embeddings = self.probe.embed(images)
        return GuideOutput(self.probe.net.head(embeddings).softmax(dim=-1), embeddings)


def build_guide(spec: GuideSpec | Any, class_names: Sequence[str]) -> ClipGuide:
    """The CLIP guide of ``spec`` (a :class:`GuideSpec` or its mapping), e.g. for tests and benchmarks."""
    from ..settings import from_mapping

    spec = from_mapping(GuideSpec, spec, "guide")
    if spec.kind != "clip":
        raise ExpansionError(f"guide kind {spec.kind!r} is trained in fit(); expected 'clip' here")
    return ClipGuide.from_spec(spec, class_names)
