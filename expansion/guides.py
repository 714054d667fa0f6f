"""Guides: anything that maps images to class probabilities and embeddings.

* :class:`ClipGuide` -- GIF's zero-shot CLIP (open_clip ViT-B/32 by default,
  prompt "This is a photo of a {class}", logit scale 100, CLIP's own input
  normalisation, which the official code omits).
* :class:`ProbeGuide` -- for offline use: a small CNN trained on the seed set;
  probabilities from its head, embeddings from its penultimate layer.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .base import ExpansionError

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class GuideOutput:
    probs: torch.Tensor  # [N, K]
    embeddings: torch.Tensor  # [N, D]


def to_rgb(images: torch.Tensor) -> torch.Tensor:
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


class Guide(nn.Module):
    """``forward(images in [0, 1], [N, C, H, W]) -> GuideOutput``; differentiable in the images."""

    num_classes: int

    def forward(self, images: torch.Tensor) -> GuideOutput:  # pragma: no cover - abstract
        raise NotImplementedError


class ClipGuide(Guide):
    """Zero-shot CLIP: ``p = softmax(logit_scale * <f(x)/|f(x)|, t_c/|t_c|>)`` over the class prompts."""

    def __init__(self, model: nn.Module, tokenizer, class_names: Sequence[str],
                 template: str = "This is a photo of a {}", logit_scale: float = 100.0,
                 image_size: int = 224, mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 std: Sequence[float] = OPENAI_CLIP_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.num_classes = len(class_names)
        self.logit_scale = float(logit_scale)
        self.image_size = int(image_size)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        prompts = [template.format(name) for name in class_names]
        with torch.no_grad():
            text = model.encode_text(tokenizer(prompts)).float()
        self.register_buffer("text_features", F.normalize(text, dim=-1), persistent=False)
        self.prompts = prompts

    @classmethod
    def from_open_clip(cls, class_names: Sequence[str], arch: str = "ViT-B-32", pretrained: str = "openai",
                       cache_dir: str | None = None, **kwargs) -> "ClipGuide":
        """Load an open_clip model by architecture and pretrained tag (or a local weights file)."""
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained,
                                                                         cache_dir=cache_dir)
        except Exception as exc:  # offline hub miss, bad tag, corrupt file: say what is missing and how to get it
            raise ExpansionError(
                f"could not load the CLIP guide open_clip {arch!r} with pretrained={pretrained!r} ({type(exc).__name__}: "
                f"{exc}). Download it once on a machine with network (it is cached under "
                f"{cache_dir or os.environ.get('HF_HOME', '~/.cache/huggingface')}), or set the guide's pretrained "
                "to a local open_clip weights file."
            ) from exc
        size = getattr(model.visual, "image_size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        norm = next((t for t in getattr(preprocess, "transforms", []) if hasattr(t, "mean")), None)
        mean = tuple(norm.mean) if norm is not None else OPENAI_CLIP_MEAN
        std = tuple(norm.std) if norm is not None else OPENAI_CLIP_STD
        return cls(model, open_clip.get_tokenizer(arch), class_names, image_size=size, mean=mean, std=std, **kwargs)

    def forward(self, images: torch.Tensor) -> GuideOutput:
        x = to_rgb(images.float())
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > self.image_size)
        x = (x - self.mean) / self.std
        features = F.normalize(self.model.encode_image(x).float(), dim=-1)
        logits = self.logit_scale * features @ self.text_features.T
        return GuideOutput(logits.softmax(dim=-1), features)


class ProbeNet(nn.Module):
    """A small CNN probe: 3 conv blocks, global pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 32, input_size: int = 32):
        super().__init__()
        self.input_size = input_size
        blocks, c = [], 3
        for out in (width, width * 2, width * 4):
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(8 if out >= 8 else 1, out), nn.SiLU(),
                       nn.AvgPool2d(2)]
            c = out
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(c, num_classes)

    def embed(self, images01: torch.Tensor) -> torch.Tensor:
        x = to_rgb(images01.float())
        if x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return self.features(x * 2 - 1).mean(dim=(2, 3))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images01))


class ProbeGuide(Guide):
    """A classifier trained on the seed set as GIF's guide (no CLIP weights needed)."""

    def __init__(self, net: ProbeNet):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.num_classes = net.head.out_features

    @classmethod
    def train_on(cls, images: torch.Tensor, labels: torch.Tensor, num_classes: int, *, epochs: int = 30,
                 lr: float = 3e-3, batch_size: int = 64, width: int = 32, input_size: int = 32,
                 seed: int = 0) -> "ProbeGuide":
        """Train with AdamW + flips/shifts on uint8 ``images [N, C, H, W]`` (deterministic given ``seed``)."""
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = ProbeNet(num_classes, width, input_size)
        x = images.float() / 255.0
        y = labels.long()
        opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
        net.train()
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=g)
            for start in range(0, len(x), batch_size):
                idx = order[start:start + batch_size]
                batch = x[idx]
                flip = torch.rand(len(idx), generator=g) < 0.5
                batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
                loss = F.cross_entropy(net(batch), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return cls(net)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(path))

    @classmethod
    def load(cls, path: Path, num_classes: int, width: int = 32, input_size: int = 32) -> "ProbeGuide":
        from safetensors.torch import load_file

        net = ProbeNet(num_classes, width, input_size)
        net.load_state_dict(load_file(str(path)))
        return cls(net)

    def forward(self, images: torch.Tensor) -> GuideOutput:
        embeddings = self.net.embed(images)
        return GuideOutput(self.net.head(embeddings).softmax(dim=-1), embeddings)
