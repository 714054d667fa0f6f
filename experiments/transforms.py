"""Per-dataset training augmentations of the GIF paper's official code
(torchvision v2, on uint8 tensors), parametrised by the classifier's input
size so a recipe keeps its meaning at 224 px (paper) and at 28 px (CPU runs).

Recipes (``S`` = input size; official values at S = 224):

* ``cifar``: resize S + RandomRotation(15) + RandomCrop(S, padding S/8) + hflip
* ``fine_grained`` (Cars, Flowers, Pets): resize 256/224*S + RandomRotation(15)
  + RandomCrop(S) + hflip; eval: resize 256/224*S + CenterCrop(S)
* ``dtd``: resize S + CenterCrop(S) + hflip
* ``caltech``: Grayscale(3) + RandomResizedCrop(S, scale 0.8-1) + hflip
* ``medical``: resize S + RandomRotation(15) + hflip
* ``digits`` (not in the paper; digits are not mirror-symmetric): RandomAffine(10 deg, 10% shift)
* ``none``: resize S only
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2

RECIPES = ("cifar", "fine_grained", "dtd", "caltech", "medical", "digits", "none")


def _normalize(channels: int) -> list:
    mean, std = [0.5] * channels, [0.5] * channels
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _resize(size: int) -> v2.Resize:
    return v2.Resize((size, size), antialias=True)


def train_transform(recipe: str, input_size: int, channels: int) -> v2.Compose:
    s = int(input_size)
    if recipe == "cifar":
        ops = [_resize(s), v2.RandomRotation(15), v2.RandomCrop(s, padding=max(1, s // 8)), v2.RandomHorizontalFlip()]
    elif recipe == "fine_grained":
        ops = [_resize(round(s * 256 / 224)), v2.RandomRotation(15), v2.RandomCrop(s), v2.RandomHorizontalFlip()]
    elif recipe == "dtd":
        ops = [_resize(s), v2.CenterCrop(s), v2.RandomHorizontalFlip()]
    elif recipe == "caltech":
        ops = [v2.Grayscale(num_output_channels=channels), v2.RandomResizedCrop(s, scale=(0.8, 1.0), antialias=True),
               v2.RandomHorizontalFlip()]
    elif recipe == "medical":
        ops = [_resize(s), v2.RandomRotation(15), v2.RandomHorizontalFlip()]
    elif recipe == "digits":
        ops = [_resize(s), v2.RandomAffine(degrees=10, translate=(0.1, 0.1))]
    elif recipe == "none":
        ops = [_resize(s)]
    else:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; known: {RECIPES}")
    return v2.Compose(ops + _normalize(channels))


def eval_transform(recipe: str, input_size: int, channels: int) -> v2.Compose:
    s = int(input_size)
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; known: {RECIPES}")
    if recipe == "fine_grained":
        ops = [_resize(round(s * 256 / 224)), v2.CenterCrop(s)]
    elif recipe == "caltech":
        ops = [v2.Grayscale(num_output_channels=channels), _resize(s)]
    else:
        ops = [_resize(s)]
    return v2.Compose(ops + _normalize(channels))
