"""The one contract every expansion method implements.

An :class:`Expander` turns each seed image into ``ratio`` new labelled images.
The machinery around it (store, seeding, sharding over devices, resume) lives
in :mod:`expansion.store` and :mod:`expansion.engine` and is written once.

Contract
--------
* ``fit(train, artifact_dir)`` -- optional: train or fine-tune the generator on
  the training split. ``artifact_dir`` is a directory keyed by the dataset
  identity and :meth:`Expander.fit_signature`; an expander that finds its
  artifacts there must load them instead of training again.
* ``expand(images, labels, seeds)`` -- ``images`` uint8 ``[B, C, H, W]``,
  ``labels`` int64 ``[B]``, ``seeds`` int64 ``[B, k]`` (one seed per output
  image). Returns an :class:`ExpansionOutput` whose images are uint8
  ``[B, k, C', H', W']``. Every random draw for output image ``(b, j)`` must come
  from ``seeds[b, j]`` alone, so the result does not depend on the batch size
  or on how the seeds are sharded across devices.
* ``signature()`` -- everything that changes the output; it is hashed into the
  store key. Settings that only change speed (batch size, workers) stay out.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn


class ExpansionError(RuntimeError):
    """A clear, user-facing failure of an expansion run."""


@dataclass
class ExpansionOutput:
    """What :meth:`Expander.expand` returns for a batch of B seeds.

    images: uint8 tensor ``[B, k, C, H, W]``.
    fields: per-image manifest fields, each a sequence of length ``B * k`` in
        row-major ``(seed, copy)`` order, or a tensor of shape ``[B, k]``.
        Values must be JSON-serialisable scalars or strings.
    """

    images: torch.Tensor
    fields: dict[str, Any] = field(default_factory=dict)

    def validate(self, batch_size: int, ratio: int) -> None:
        imgs = self.images
        if imgs.dtype != torch.uint8 or imgs.ndim != 5:
            raise ExpansionError(
                f"expander returned images of dtype {imgs.dtype} and shape {tuple(imgs.shape)}; "
                "expected uint8 [B, k, C, H, W]"
            )
        if imgs.shape[0] != batch_size or imgs.shape[1] != ratio:
            raise ExpansionError(
                f"expander returned {tuple(imgs.shape[:2])} images for {batch_size} seeds at ratio "
                f"{ratio}; expected ({batch_size}, {ratio})"
            )
        if imgs.shape[2] not in (1, 3):
            raise ExpansionError(f"expander returned {imgs.shape[2]} channels; expected 1 or 3")
        for name, values in self.fields.items():
            n = values.numel() if isinstance(values, torch.Tensor) else len(values)
            if n != batch_size * ratio:
                raise ExpansionError(
                    f"manifest field {name!r} has {n} values for {batch_size * ratio} images"
                )

    def field_rows(self) -> list[dict[str, Any]]:
        """Per-image dicts of the method fields, in ``(seed, copy)`` order."""
        columns: dict[str, list] = {}
        for name, values in self.fields.items():
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu().reshape(-1).tolist()
            columns[name] = list(values)
        n = self.images.shape[0] * self.images.shape[1]
        return [{name: col[i] for name, col in columns.items()} for i in range(n)]


@dataclass
class ExpansionContext:
    """What a method may need to know about the dataset it expands (prompts, guides)."""

    dataset_name: str
    class_names: list[str]
    channels: int
    image_size: int | None = None
    prompt_prefix: str | None = None  # e.g. "Ultrasound image of" for the medical sets
    #: training images left out by the few-shot choice (an ImageSet or None): unlabelled data a
    #: generator may pretrain on; never validation or test images
    auxiliary: Any = None


class Expander(nn.Module, abc.ABC):
    """Base class of every expansion method (an ``nn.Module`` so that its
    networks follow the Lightning module to the right device).

    Subclasses set ``name`` and implement :meth:`expand`; generators that train
    implement :meth:`fit` and set ``needs_fit = True``.
    """

    name: str = "expander"
    needs_fit: bool = False
    #: when true, ``expand`` also receives ``parents`` (int64 ``[B]``: the seeds' indices in the
    #: training split), for methods that combine a seed with other training images
    wants_parents: bool = False
    #: constructor arguments that change speed only and stay out of the signature
    speed_only_params: tuple[str, ...] = ("batch_size", "num_workers")

    def __init__(self, ratio: int, **params: Any) -> None:
        super().__init__()
        ratio_int = int(ratio)
        if ratio_int != ratio or ratio_int < 1:
            raise ExpansionError(
                f"{self.name}: expansion ratio must be an integer >= 1 (new images per seed), got {ratio!r}"
            )
        self.ratio = ratio_int
        self.params = dict(params)

    # -- contract -------------------------------------------------------
    def prepare(self, context: ExpansionContext) -> None:
        """Called once before ``fit``/``expand`` when generation is needed: load weights,
        build prompts or guides. Kept out of ``__init__`` so that reusing a finished
        store never loads a model."""
        self.context = context

    def fit(self, train: Any, artifact_dir: Path) -> None:
        """Train or fine-tune on the training split; cache into ``artifact_dir``."""

    @abc.abstractmethod
    def expand(
        self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor
    ) -> ExpansionOutput:
        """Map B seeds to ``[B, k]`` new images; see the module docstring."""

    def signature(self) -> dict[str, Any]:
        """Settings that determine the output (hashed into the store key)."""
        kept = {k: v for k, v in sorted(self.params.items()) if k not in self.speed_only_params}
        return {"method": self.name, "ratio": self.ratio, **kept}

    def fit_signature(self) -> dict[str, Any]:
        """Settings that determine the fitted artifacts (defaults to the signature)."""
        return self.signature()

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, params={self.params}"


def to_uint8(images: torch.Tensor, *, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` to uint8; a NaN or inf (a diverged generator
    or guide) is an error, never silently clamped into the store."""
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).sum().item()
        raise ExpansionError(f"generator produced {bad} non-finite pixel values (NaN/inf); nothing was stored")
    lo, hi = value_range
    scaled = (images.float() - lo) / (hi - lo)
    return (scaled.clamp(0, 1) * 255.0).round().to(torch.uint8)
