"""The per-dataset training augmentations of the GIF paper, applied to whole
batches on the training device.

Every geometric recipe of the official code (resize, RandomRotation(15),
RandomCrop with or without padding, CenterCrop, RandomResizedCrop,
RandomAffine, horizontal flip) is an affine map of the image plane, so one
batch is augmented by drawing per-sample parameters, composing them into one
2x3 matrix per sample and calling ``grid_sample`` once (bilinear, zero fill
like torchvision's default fill 0). This replaces a per-sample Python
pipeline (about 4 ms per 28 px image on a CPU core for the medical recipe)
by a few batched tensor ops; the recipe keeps its meaning (tests compare the
flip and rotation with torchvision's).

Recipes, with S the classifier input size (official values at S = 224):

* ``cifar``: resize S, rotation +-15 deg, RandomCrop(S, padding S/8), hflip
* ``fine_grained``: resize R = 256/224 S, rotation +-15 deg, RandomCrop(S), hflip; eval CenterCrop(S)
* ``dtd``: resize S, CenterCrop(S), hflip
* ``caltech``: Grayscale(3), RandomResizedCrop(S, scale 0.8-1, ratio 3/4-4/3), hflip
* ``medical``: resize S, rotation +-15 deg, hflip
* ``digits``: RandomAffine(+-10 deg, translate 10%) (no flips)
* ``none``: resize S
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RECIPES = ("cifar", "fine_grained", "dtd", "caltech", "medical", "digits", "none")


def base_size(recipe: str, input_size: int) -> int:
    """The resolution the recipe resizes to before cropping (images are stored at it once)."""
    check_recipe(recipe)
    return round(input_size * 256 / 224) if recipe == "fine_grained" else int(input_size)


def check_recipe(recipe: str) -> None:
    if recipe not in RECIPES:
        raise ValueError(f"unknown augmentation recipe {recipe!r}; known: {RECIPES}")


def _rotation(angle_deg: torch.Tensor) -> torch.Tensor:
    a = angle_deg * (math.pi / 180.0)
    cos, sin = torch.cos(a), torch.sin(a)
    return torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # [B, 2, 2]


def _uniform(n: int, low: float, high: float, device) -> torch.Tensor:
    return torch.rand(n, device=device) * (high - low) + low


def affine_params(recipe: str, n: int, input_size: int, stored_size: int, device) -> torch.Tensor:
    """Per-sample 2x3 matrices mapping output to input coordinates (``affine_grid``'s
    normalised [-1, 1] convention). The output of a sample is
    ``rotate(angle) o crop(scale, shift) o flip``: x_in = R(a) (diag(s_x f, s_y) x_out + t)."""
    check_recipe(recipe)
    zeros, ones = torch.zeros(n, device=device), torch.ones(n, device=device)
    angle, sx, sy, tx, ty, flip = zeros, ones.clone(), ones.clone(), zeros.clone(), zeros.clone(), ones
    s = float(input_size)
    if recipe in ("cifar", "fine_grained", "dtd", "caltech", "medical"):
        flip = torch.where(torch.rand(n, device=device) < 0.5, -ones, ones)
    if recipe in ("cifar", "fine_grained", "medical"):
        angle = _uniform(n, -15.0, 15.0, device)
    if recipe == "cifar":
        pad = max(1, input_size // 8)  # integer pixel shifts, as RandomCrop(S, padding)
        tx = torch.randint(-pad, pad + 1, (n,), device=device).float() * (2.0 / s)
        ty = torch.randint(-pad, pad + 1, (n,), device=device).float() * (2.0 / s)
    elif recipe == "fine_grained":
        r = float(base_size(recipe, input_size))
        slack = int(r - s)  # integer crop offsets in [0, R - S], as RandomCrop(S)
        sx, sy = sx * (s / r), sy * (s / r)
        tx = (torch.randint(0, slack + 1, (n,), device=device).float() - slack / 2) * (2.0 / r)
        ty = (torch.randint(0, slack + 1, (n,), device=device).float() - slack / 2) * (2.0 / r)
    elif recipe == "caltech":
        area = _uniform(n, 0.8, 1.0, device)
        log_ratio = _uniform(n, math.log(3 / 4), math.log(4 / 3), device)
        ratio = torch.exp(log_ratio)
        sx = torch.sqrt(area * ratio).clamp(max=1.0)
        sy = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (torch.rand(n, device=device) * 2 - 1) * (1 - sx)
        ty = (torch.rand(n, device=device) * 2 - 1) * (1 - sy)
    elif recipe == "digits":
        angle = _uniform(n, -10.0, 10.0, device)
        tx = _uniform(n, -0.2, 0.2, device)  # 10% of the side = 0.2 in [-1, 1] units
        ty = _uniform(n, -0.2, 0.2, device)
    linear = torch.zeros(n, 2, 2, device=device)
    linear[:, 0, 0] = sx * flip
    linear[:, 1, 1] = sy
    rot = _rotation(angle)
    theta = torch.cat([rot @ linear, (rot @ torch.stack([tx, ty], -1)[..., None])], dim=2)
    return theta


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 or [0, 255] float to float in [-1, 1] (mean 0.5, std 0.5 per channel)."""
    return images.float().div_(127.5).sub_(1.0)


def to_grayscale3(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] != 3:
        return images
    weights = torch.tensor([0.299, 0.587, 0.114], device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images * weights).sum(1, keepdim=True).expand(-1, 3, -1, -1)


def augment_batch(images: torch.Tensor, recipe: str, input_size: int) -> torch.Tensor:
    """Training augmentation of a uint8 batch ``[B, C, H, W]`` stored at the recipe's base
    size; returns normalised float ``[B, C, S, S]``."""
    x = images.float()
    if recipe == "caltech":
        x = to_grayscale3(x)
    theta = affine_params(recipe, x.shape[0], input_size, x.shape[-1], x.device)
    grid = F.affine_grid(theta, [x.shape[0], x.shape[1], input_size, input_size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return normalize(x)


def prepare_eval(images: torch.Tensor, recipe: str, input_size: int) -> torch.Tensor:
    """Deterministic eval preprocessing of a batch: resize to the base size, centre-crop S."""
    return center_crop(resize_to(images, base_size(recipe, input_size)), input_size, recipe)


def resize_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Square bilinear resize (antialiased) of uint8 ``[B, C, H, W]``."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def shrink_to(images: torch.Tensor, size: int) -> torch.Tensor:
    """Resize only when larger than ``size`` (downsampling must be antialiased, once)."""
    return resize_to(images, size) if images.shape[-1] > size else images


def center_crop(images: torch.Tensor, size: int, recipe: str) -> torch.Tensor:
    if recipe == "caltech" and images.shape[1] == 3:
        images = to_grayscale3(images.float()).round().to(torch.uint8)
    h, w = images.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return images[..., top : top + size, left : left + size].contiguous()
