"""The probe: a small CNN trained on a few labelled images, used wherever the framework needs a
classifier of the dataset without downloaded weights: GIF's offline guide
(``guide.kind: probe``) and the feature space of the quality metrics (``quality.extractor:
classifier``). It is also the classifier ``small_cnn``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .base import resize
from .files import atomic_file
from .progress import ProgressLog

log = logging.getLogger(__name__)

#: what the probe's training and network are; part of every key that caches a trained probe
PROBE_RECIPE = "small_cnn(width 32), AdamW 3e-3, random shifts of 1/8, >= 200 steps"
LUMA = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)  # ITU-R 601, as PIL's RGB -> L


class SmallConvNet(nn.Module):
    """A CPU-friendly CNN for 8-32 px inputs: 3 conv blocks (32-64-128, BN, ReLU),
    max-pooling only while the map is >= 8 px, global average pooling, linear head."""

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, input_size: int = 28):
        super().__init__()
        layers: list[nn.Module] = []
        channels, size = in_chans, input_size
        for i, out in enumerate((width, width * 2, width * 4)):
            layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
            if i < 2 and size >= 8:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The penultimate (global-pooled) features ``[N, 4 x width]``."""
        return torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


class Probe(nn.Module):
    """A trained :class:`SmallConvNet` on images in [0, 1] with the channels it was trained on
    (1 or 3; other inputs are converted: luma or repetition) resized to ``size``: ``embed``
    (penultimate features) and ``forward`` (logits), both differentiable in the images."""

    def __init__(self, net: SmallConvNet, size: int):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.size = int(size)
        self.channels = int(net.features[0].in_channels)
        self.num_classes = net.head.out_features
        self.num_features = net.head.in_features
        self.trained_epochs: int | None = None  # set by train_probe

    def prepare(self, images01: torch.Tensor) -> torch.Tensor:
        """[0, 1] images ``[N, 1 or 3, H, W]`` -> the network's input: its channels, ``size`` px, in [-1, 1]."""
        x = images01.float()
        if x.shape[1] != self.channels:
            x = x.expand(-1, 3, -1, -1) if self.channels == 3 else (x * LUMA.to(x.device)).sum(1, keepdim=True)
        return resize(x, self.size) * 2 - 1

    def embed(self, images01: torch.Tensor) -> torch.Tensor:
        return self.net.embed(self.prepare(images01))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.net.head(self.embed(images01))

    def save(self, path: Path | str) -> None:
        from safetensors.torch import save_file

        with atomic_file(Path(path)) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self.net.state_dict().items()},
                str(tmp),
                metadata={
                    "num_classes": str(self.num_classes),
                    "size": str(self.size),
                    "channels": str(self.channels),
                    "trained_epochs": str(self.trained_epochs),
                },
            )

    @classmethod
    def load(cls, path: Path | str) -> Probe:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
        net = SmallConvNet(int(meta["num_classes"]), int(meta["channels"]), input_size=int(meta["size"]))
        net.load_state_dict(load_file(str(path)))
        probe = cls(net, int(meta["size"]))
        epochs = meta.get("trained_epochs", "None")
        probe.trained_epochs = None if epochs == "None" else int(epochs)
        return probe


def train_probe(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    *,
    epochs: int = 10,
    size: int = 32,
    seed: int = 0,
    batch_size: int = 32,
    lr: float = 3e-3,
    min_steps: int = 200,
    progress: Callable[[Iterable, str], Iterable] | None = None,
) -> Probe:
    """Train the probe on uint8 ``images [N, C, H, W]`` (AdamW, cross-entropy, random shifts of up
    to 1/8 of the side) for ``epochs`` epochs, more if needed to make ``min_steps`` optimisation
    steps (a few-shot set has few batches per epoch). Deterministic given ``seed``; the global RNG
    is left untouched. ``size`` is capped at the images' side."""
    size = min(int(size), images.shape[-1])
    steps_per_epoch = max(1, math.ceil(len(images) / batch_size))
    epochs = max(int(epochs), math.ceil(int(min_steps) / steps_per_epoch))
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    g = torch.Generator().manual_seed(int(seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        probe = Probe(SmallConvNet(num_classes, images.shape[1], input_size=size), size)
    x = probe.prepare(images.float() / 255.0)
    net = probe.net.train().requires_grad_(True)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    pad = max(1, size // 8)
    rounds = range(epochs) if progress is None else progress(range(epochs), "probe training")
    lines = ProgressLog("quality probe training", epochs, "epochs", log)
    for epoch in rounds:
        order = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch_size):
            idx = order[start : start + batch_size]
            if len(idx) < 2:  # BatchNorm needs two images
                continue
            batch = F.pad(x[idx], (pad, pad, pad, pad), mode="replicate")
            dx, dy = torch.randint(0, 2 * pad + 1, (2,), generator=g).tolist()
            loss = F.cross_entropy(net(batch[..., dy : dy + size, dx : dx + size]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        lines.update(epoch + 1)
    probe = Probe(net, size)
    probe.trained_epochs = epochs
    return probe
