"""The one contract every expansion method implements.

An :class:`Expander` turns each seed image into ``ratio`` new labelled images. The machinery
around it (store, seeding, sharding over devices, resume, fitting cache) lives in
:mod:`expansion.store` and :mod:`expansion.engine` and is written once.

Contract
--------
* ``settings_class`` -- a frozen dataclass of the method's settings and the one place their
  defaults live; the constructor is ``Method(ratio, **settings)`` and builds it
  (:mod:`expansion.settings`: an unknown key or a bad value is one error line naming it).
* ``prepare(context)`` -- called once before ``fit``/``expand`` when generation is needed: load
  weights, build prompts or guides. Kept out of ``__init__`` so that reusing a finished store
  never loads a model.
* ``fit(train, artifact_dir)`` -- only when ``needs_fit``: train or fine-tune the generator on the
  training split (an :class:`ImageSet`). ``artifact_dir`` is keyed by the dataset identity and
  :meth:`Expander.fit_signature`; an expander that finds its artifacts there loads them instead
  of training again.
* ``expand(images, labels, seeds)`` -- ``images`` uint8 ``[B, C, H, W]``, ``labels`` int64 ``[B]``,
  ``seeds`` int64 ``[B, k]`` (one seed per output image); with ``wants_parents`` also
  ``parents`` int64 ``[B]`` (the seeds' indices in the training split). Returns an
  :class:`ExpansionOutput` whose images are uint8 ``[B, k, C', H', W']``. Every random draw for
  output image ``(b, j)`` must come from ``seeds[b, j]`` alone, so the result does not depend on
  the batch size or on how the seeds are sharded across devices.
* ``signature()`` -- everything that changes the output: the method's name, the ratio and its
  settings minus the speed-only ones; it is hashed into the store key.

Capabilities the engine reads (class attributes, or properties where a setting decides):
``needs_fit`` (there is a fit stage), ``needs_grad`` (``expand`` differentiates, so generation
runs under ``no_grad`` instead of ``inference_mode``), ``wants_parents`` (``expand`` takes
``parents``), ``emits_soft_labels`` (its manifest rows carry ``soft_target`` and ``soft_weight``, which
``train.synthetic.soft_labels`` trains on). How many seeds go into one ``expand`` call is the engine's business
(``method.batch_size`` in the config), never the method's.
"""

from __future__ import annotations

import abc
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExpansionError
from .settings import from_mapping, signature_of
from .weights import Weights

__all__ = [
    "Expander",
    "ExpansionContext",
    "ExpansionError",
    "ExpansionOutput",
    "ImageSet",
    "NoSettings",
    "resize",
    "to_uint8",
    "train_tensors",
]


@runtime_checkable
class ImageSet(Protocol):
    """A labelled split as the expansion layer sees it (``experiments.data.datasets.ImageSet`` is one)."""

    labels: np.ndarray  #: int64 ``[N]``
    channels: int

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """uint8 ``[C, H, W]`` and the label of image ``index``."""

    def to_tensor(self) -> torch.Tensor:
        """Every image, uint8 ``[N, C, H, W]``."""

    def fingerprint(self) -> str:
        """A digest of the images and labels (part of every key that depends on them)."""


def train_tensors(train: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images ``[N, C, H, W]`` and int64 labels ``[N]`` of a training split."""
    return train.to_tensor(), torch.as_tensor(np.asarray(train.labels), dtype=torch.long)


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
                raise ExpansionError(f"manifest field {name!r} has {n} values for {batch_size * ratio} images")

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
    auxiliary: ImageSet | None = None
    #: the fewest training images of any class (a few-shot method's shot count; None = not known)
    shots_per_class: int | None = None


def fewest_per_class(labels: np.ndarray | torch.Tensor) -> int:
    """The fewest images of any class present in ``labels`` (the shot count of a few-shot split)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64))
    return int(counts[counts > 0].min()) if counts.size else 0


@dataclass(frozen=True)
class NoSettings:
    """The settings of a method that has none besides its ratio."""


class Expander(nn.Module, abc.ABC):
    """Base class of every expansion method (an ``nn.Module`` so that its networks follow the
    Lightning module to the right device). See the module docstring for the contract."""

    name: ClassVar[str] = "expander"
    settings_class: ClassVar[type] = NoSettings
    needs_fit: ClassVar[bool] = False
    needs_grad: ClassVar[bool] = False
    wants_parents: ClassVar[bool] = False
    emits_soft_labels: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.wants_parents and "parents" not in inspect.signature(cls.expand).parameters:
            raise TypeError(f"{cls.__name__} sets wants_parents but its expand() takes no 'parents'")

    def __init__(self, ratio: int, **settings: Any) -> None:
        super().__init__()
        if isinstance(ratio, bool) or not isinstance(ratio, int | float) or int(ratio) != ratio or ratio < 1:
            raise ExpansionError(
                f"{self.name}: expansion ratio must be an integer >= 1 (new images per seed), got {ratio!r}"
            )
        self.ratio = int(ratio)
        self.settings = from_mapping(self.settings_class, settings, f"method {self.name}")
        self.context: ExpansionContext | None = None

    # -- contract -------------------------------------------------------
    def prepare(self, context: ExpansionContext) -> None:
        """Called once before ``fit``/``expand`` when generation is needed (see the module doc)."""
        self.context = context

    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        """Train or fine-tune on the training split; cache into ``artifact_dir`` (only if ``needs_fit``)."""

    def place(self, device: torch.device) -> None:
        """Move and cast the method's networks for ``device`` (called once per device by :meth:`_place`)."""

    def _place(self, device: torch.device) -> None:
        """:meth:`place` the first time ``expand`` runs on ``device`` (loading new networks resets
        ``_placed_on`` to None)."""
        if getattr(self, "_placed_on", None) != str(device):
            self.place(device)
            self._placed_on = str(device)

    @abc.abstractmethod
    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        """Map B seeds to ``[B, k]`` new images; see the module docstring."""

    def pretrained_weights(self) -> list[Weights]:
        """The pretrained weights ``prepare`` or ``fit`` will load (checked before any work, so that a
        missing one is named with the others); none by default."""
        return []

    def signature(self) -> dict[str, Any]:
        """Settings that determine the output (hashed into the store key)."""
        return {"method": self.name, "ratio": self.ratio, **signature_of(self.settings)}

    def fit_signature(self) -> dict[str, Any]:
        """Settings that determine the fitted artifacts (defaults to the signature)."""
        return self.signature()

    def extra_repr(self) -> str:
        return f"ratio={self.ratio}, settings={self.settings}"


def resize(images: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Float images ``[N, C, H, W]`` to ``size x size`` (differentiable; antialiased when shrinking);
    unchanged when already that size."""
    if images.shape[-2:] == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode=mode, align_corners=False, antialias=images.shape[-1] > size)


def to_uint8(images: torch.Tensor, *, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Float images in ``value_range`` to uint8; a NaN or inf (a diverged generator
    or guide) is an error, never silently clamped into the store."""
    if not torch.isfinite(images).all():
        bad = (~torch.isfinite(images)).sum().item()
        raise ExpansionError(f"generator produced {bad} non-finite pixel values (NaN/inf); nothing was stored")
    lo, hi = value_range
    scaled = (images.float() - lo) / (hi - lo)
    return (scaled.clamp(0, 1) * 255.0).round().to(torch.uint8)
