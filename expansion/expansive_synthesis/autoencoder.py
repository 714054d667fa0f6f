"""The convolutional autoencoder of Expansive Synthesis (arXiv 2406.17238, steps 1-2), with
multi-head *spatial* self-attention over its latent patches.

``x [B, C, S, S]`` in [0, 1] --encoder--> ``z [B, c, S/4, S/4]`` --spatial attention-->
``y`` (same shape: the latent features that the expander graph, the Koopman operator and
GIF's guidance act on) --decoder--> ``x_hat`` in [0, 1].

Spatial attention (the paper's step 2): ``z`` is cut into ``patch x patch`` latent patches;
each patch is flattened into one token, the tokens are stacked WITHOUT positional encoding
and mixed by multi-head self-attention (``heads`` heads, tokens projected to ``attention_dim``
and back), added back to ``z`` as a residual: ``y = z + fold(MHA(LN(P_in tokens))) P_out``.

Training (:func:`train_autoencoder`): AdamW on the mean squared reconstruction error, plus,
when labels are given and ``classifier_weight > 0``, a linear head's cross-entropy on the
pooled features ``y`` -- the "discriminative features" of the paper, which a pure
reconstruction loss does not ask for. Pretraining on an auxiliary (unlabelled) pool uses the
reconstruction loss only; fine-tuning on the small labelled set uses both.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..base import ExpansionError, resize
from ..progress import ProgressLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoencoderSpec:
    """Architecture of the autoencoder (every field goes into the fit cache key)."""

    channels: int = 1  # image channels
    image_size: int = 28  # S, divisible by 4
    width: int = 32  # first conv width (then 2x, 4x)
    latent_channels: int = 8  # c: the latent is [c, S/4, S/4]
    heads: int = 4  # attention heads (L in the paper)
    patch: int = 1  # latent patch side per token
    attention_dim: int = 64  # token width inside the attention

    def __post_init__(self) -> None:
        if self.image_size % 4 or self.image_size < 8:
            raise ExpansionError(f"the autoencoder needs an image side divisible by 4 (>= 8), got {self.image_size}")
        if (self.image_size // 4) % self.patch:
            raise ExpansionError(f"latent side {self.image_size // 4} is not divisible by attention patch {self.patch}")
        if self.attention_dim % self.heads:
            raise ExpansionError(f"attention_dim {self.attention_dim} is not divisible by heads {self.heads}")
        if self.channels not in (1, 3):
            raise ExpansionError(f"the autoencoder takes 1 or 3 channels, got {self.channels}")

    @property
    def latent_side(self) -> int:
        return self.image_size // 4

    @property
    def latent_dim(self) -> int:
        return self.latent_channels * self.latent_side**2

    def as_dict(self) -> dict:
        return asdict(self)


def _block(cin: int, cout: int, *, down: bool = False, up: bool = False) -> list[nn.Module]:
    if down:
        conv = nn.Conv2d(cin, cout, 4, stride=2, padding=1)
    elif up:  # nearest upsampling + conv: no checkerboard, and far faster on CPU than ConvTranspose2d
        return [nn.Upsample(scale_factor=2, mode="nearest"), *_block(cin, cout)]
    else:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
    return [conv, nn.GroupNorm(min(8, cout), cout), nn.SiLU()]


class SpatialSelfAttention(nn.Module):
    """Multi-head self-attention over flattened latent patches, no positional encoding (module doc)."""

    def __init__(self, channels: int, patch: int, heads: int, dim: int):
        super().__init__()
        self.patch = patch
        token = channels * patch * patch
        self.norm = nn.LayerNorm(token)
        self.proj_in = nn.Linear(token, dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.proj_out = nn.Linear(dim, token)
        nn.init.zeros_(self.proj_out.weight)  # starts as the identity map: attention is learned as a correction
        nn.init.zeros_(self.proj_out.bias)

    def tokens(self, z: torch.Tensor) -> torch.Tensor:
        """``[B, c, h, w]`` -> ``[B, T, c p p]``: one token per non-overlapping p x p latent patch
        (a reshape; F.unfold's im2col is orders of magnitude slower here on CPU)."""
        b, c, h, w = z.shape
        p = self.patch
        return z.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), -1)

    def untokens(self, tokens: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        b, c, h, w = shape
        p = self.patch
        return tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        q = self.proj_in(self.norm(self.tokens(z)))
        mixed, _ = self.attention(q, q, q, need_weights=False)
        return z + self.untokens(self.proj_out(mixed), z.shape)


class ConvAutoencoder(nn.Module):
    def __init__(self, spec: AutoencoderSpec, num_classes: int = 0):
        super().__init__()
        self.spec = spec
        w, c = spec.width, spec.latent_channels
        # strided convs straight from the input: no full-resolution feature maps in the encoder
        self.encoder = nn.Sequential(
            *_block(spec.channels, w, down=True),
            *_block(w, 2 * w, down=True),
            *_block(2 * w, 4 * w),
            nn.Conv2d(4 * w, c, 1),
        )
        self.attention = SpatialSelfAttention(c, spec.patch, spec.heads, spec.attention_dim)
        self.decoder = nn.Sequential(
            *_block(c, 4 * w),
            *_block(4 * w, 2 * w, up=True),
            *_block(2 * w, w, up=True),
            nn.Conv2d(w, spec.channels, 3, padding=1),
        )
        self.head = nn.Linear(c, num_classes) if num_classes else None

    def features(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] ``[B, C, S, S]`` -> latent features ``y [B, c, S/4, S/4]``."""
        return self.attention(self.encoder(images01 * 2 - 1))

    def decode(self, features: torch.Tensor) -> torch.Tensor:
        """Latent features -> images in [0, 1] (differentiable)."""
        return torch.sigmoid(self.decoder(features))

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self.decode(self.features(images01))


def to_unit(images: torch.Tensor, spec: AutoencoderSpec) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` -> float [0, 1] at the autoencoder's size and channel count."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if x.shape[1] != spec.channels:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        else:
            x = (x * torch.tensor((0.299, 0.587, 0.114), device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = resize(x, spec.image_size)
    return x


def reconstruction_error(model: ConvAutoencoder, images: torch.Tensor, batch_size: int = 512) -> float:
    """Mean squared error per pixel (images in [0, 1]) of reconstructing uint8 ``images``."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            x = to_unit(images[start : start + batch_size], model.spec)
            total += F.mse_loss(model(x), x, reduction="sum").item()
            count += x.numel()
    return total / max(count, 1)


def train_autoencoder(
    model: ConvAutoencoder,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    steps: int,
    lr: float = 2e-3,
    batch_size: int = 128,
    classifier_weight: float = 0.0,
    seed: int = 0,
    what: str = "autoencoder training",
) -> list[float]:
    """AdamW on MSE reconstruction (+ ``classifier_weight`` x cross-entropy of the head on the
    pooled features when labels are given); seeded batch sampling, no augmentation. Returns the
    loss per step. ``images``: uint8 ``[N, C, H, W]``."""
    if steps < 0 or len(images) == 0:
        raise ExpansionError(f"autoencoder training needs images and steps >= 0 (got {len(images)}, {steps})")
    use_head = labels is not None and classifier_weight > 0 and model.head is not None
    x_all = to_unit(images, model.spec)
    y_all = labels.long() if use_head else None
    g = torch.Generator().manual_seed(seed)
    params = [p for name, p in model.named_parameters() if use_head or not name.startswith("head.")]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    model.train()
    losses = []
    progress = ProgressLog(what, steps, "steps", log)
    for step in range(steps):
        idx = torch.randint(len(x_all), (min(batch_size, len(x_all)),), generator=g)
        x = x_all[idx]
        y = model.features(x)
        loss = F.mse_loss(model.decode(y), x)
        if use_head:
            loss = loss + classifier_weight * F.cross_entropy(model.head(y.mean(dim=(2, 3))), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update(step + 1, f"loss {losses[-1]:.4f}")
    model.eval()
    return losses
