"""Pretrain-then-fine-tune of the autoencoder, cached by key and shared by every method that
uses it (``expansive_synthesis`` and ``gif_ae`` on the same data fit it once).

Stage 1, pretraining (``pretrain.source``): on an auxiliary pool similar to the target,
reconstruction loss only. ``unused_train`` is the dataset's training images that the few-shot
choice left out (e.g. the MNIST digits not in the 10-per-class set; never validation or test
images); ``auto`` takes it when there is one and skips pretraining otherwise; ``none`` skips it.
The pretrained weights are cached under ``<fit_dir>/autoencoder/pretrain-<key>``, the key
hashing the architecture, the pretraining settings and the pool's fingerprint.

Stage 2, fine-tuning on the small labelled set (reconstruction + ``classifier_weight`` x the
linear head's cross-entropy), cached under ``<fit_dir>/autoencoder/finetune-<key>`` (the key
adds the training split's fingerprint and the fine-tuning settings). Both stages write their
weights with safetensors and a ``report.json`` (reconstruction error before and after).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file

from ..base import ExpansionError
from ..files import atomic_file, atomic_write_text, content_key
from .autoencoder import AutoencoderSpec, ConvAutoencoder, reconstruction_error, train_autoencoder

log = logging.getLogger(__name__)

PRETRAIN_SOURCES = ("auto", "unused_train", "none")


@dataclass(frozen=True)
class AutoencoderShape:
    """The conv autoencoder (S -> S/4) with multi-head spatial self-attention: first conv ``width``
    (then 2x, 4x), ``latent_channels`` (the latent is ``[c, S/4, S/4]``), attention ``heads``, the
    latent ``patch`` side per token (tokens stacked without positional encoding), ``attention_dim``."""

    width: int = 16
    latent_channels: int = 8
    heads: int = 4
    patch: int = 1
    attention_dim: int = 64


@dataclass(frozen=True)
class PretrainSettings:
    """Stage 1, reconstruction only, on an auxiliary pool (``source``: ``auto``, ``unused_train``
    -- the training images the few-shot choice left out -- or ``none``), a seeded subsample of at
    most ``max_images``."""

    source: str = "auto"
    steps: int = 600
    lr: float = 2e-3
    batch_size: int = 64
    max_images: int = 20000

    def __post_init__(self) -> None:
        if self.source not in PRETRAIN_SOURCES:
            raise ExpansionError(f"pretrain.source must be one of {PRETRAIN_SOURCES}, got {self.source!r}")


@dataclass(frozen=True)
class FinetuneSettings:
    """Stage 2, on the small labelled set: reconstruction + ``classifier_weight`` x the cross-entropy
    of a linear head on the pooled features (discriminative latents; at 0.1 it outweighed the
    reconstruction and made it worse)."""

    steps: int = 200
    lr: float = 5e-4
    batch_size: int = 64
    classifier_weight: float = 0.01


@dataclass(frozen=True)
class AutoencoderFit:
    """The autoencoder and its two-stage fit, shared by the methods built on it: equal settings are
    one cached fit."""

    autoencoder: AutoencoderShape = field(default_factory=AutoencoderShape)
    pretrain: PretrainSettings = field(default_factory=PretrainSettings)
    finetune: FinetuneSettings = field(default_factory=FinetuneSettings)
    fit_seed: int = 0


def _save(model: ConvAutoencoder, folder: Path, report: Mapping[str, Any]) -> None:
    """Weights then report, each atomically: a folder with a report holds complete weights."""
    with atomic_file(folder / "autoencoder.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    atomic_write_text(folder / "report.json", json.dumps(report, indent=2))


def _load(model: ConvAutoencoder, folder: Path) -> dict[str, Any] | None:
    """The cached weights and report of a stage, or None when there are none or they are damaged (the
    stage is then trained again and the files replaced)."""
    if not (folder / "report.json").is_file():
        return None
    try:
        model.load_state_dict(load_file(str(folder / "autoencoder.safetensors")))
        report = json.loads((folder / "report.json").read_text())
    except Exception as exc:
        log.warning("autoencoder cache %s is damaged (%s: %s): training again", folder, type(exc).__name__, exc)
        return None
    model.eval()
    return report


def pretraining_pool(source: str, auxiliary: Any, max_images: int, seed: int) -> torch.Tensor | None:
    """uint8 images of the pretraining pool (a seeded subsample of at most ``max_images``), or None."""
    if source == "none" or (source == "auto" and auxiliary is None):
        return None
    if auxiliary is None:
        raise ExpansionError(
            "pretrain.source=unused_train but the dataset leaves no training images out: set "
            "dataset.train_per_class (few-shot) or pretrain.source=none"
        )
    n = len(auxiliary)
    if max_images and n > max_images:
        keep = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:max_images].sort().values
        auxiliary = auxiliary.subset(keep.numpy())
    return auxiliary.to_tensor()


def fitted_autoencoder(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    spec: AutoencoderSpec,
    pretrain: PretrainSettings,
    finetune: FinetuneSettings,
    auxiliary: Any,
    cache_root: Path,
    train_fingerprint: str,
    seed: int = 0,
) -> tuple[ConvAutoencoder, dict[str, Any]]:
    """The autoencoder pretrained on the auxiliary pool and fine-tuned on ``images``/``labels``
    (module doc); loaded from the cache when both stages are there. Returns it with the report."""
    cache_root = Path(cache_root) / "autoencoder"
    cache_root.mkdir(parents=True, exist_ok=True)
    pool = pretraining_pool(pretrain.source, auxiliary, pretrain.max_images, seed)
    pool_id = None if pool is None else hashlib.sha256(pool.numpy().tobytes()).hexdigest()[:16]
    pre_payload = {
        "spec": spec.as_dict(),
        "pretrain": {k: v for k, v in asdict(pretrain).items() if k != "source"},
        "pool": pool_id,
        "seed": seed,
    }
    fine_payload = {
        "pretrained": content_key(pre_payload),
        "finetune": asdict(finetune),
        "train": train_fingerprint,
        "num_classes": num_classes,
    }
    fine_dir = cache_root / f"finetune-{content_key(fine_payload)}"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvAutoencoder(spec, num_classes)
    with FileLock(str(cache_root / f"{fine_dir.name}.lock")):
        report = _load(model, fine_dir)
        if report is not None:
            return model, report
        report = {
            "pretrain_pool_images": 0 if pool is None else len(pool),
            "recon_mse_init": reconstruction_error(model, images),
        }
        if pool is not None:
            pre_dir = cache_root / f"pretrain-{content_key(pre_payload)}"
            with FileLock(str(cache_root / f"{pre_dir.name}.lock")):
                pre_report = _load(model, pre_dir)
                if pre_report is None:
                    log.info("autoencoder: pretraining on %d auxiliary images for %d steps", len(pool), pretrain.steps)
                    losses = train_autoencoder(
                        model,
                        pool,
                        steps=pretrain.steps,
                        lr=pretrain.lr,
                        batch_size=pretrain.batch_size,
                        seed=seed,
                        what="autoencoder pretraining",
                    )
                    pre_report = {
                        "pool_images": len(pool),
                        "loss_first": losses[0] if losses else None,
                        "loss_last": losses[-1] if losses else None,
                    }
                    _save(model, pre_dir, pre_report)
            report["recon_mse_pretrained"] = reconstruction_error(model, images)
        log.info("autoencoder: fine-tuning on %d images for %d steps", len(images), finetune.steps)
        losses = train_autoencoder(
            model,
            images,
            labels,
            steps=finetune.steps,
            lr=finetune.lr,
            batch_size=finetune.batch_size,
            classifier_weight=finetune.classifier_weight,
            seed=seed + 1,
            what="autoencoder fine-tuning",
        )
        report.update(
            recon_mse_finetuned=reconstruction_error(model, images),
            finetune_loss_first=losses[0] if losses else None,
            finetune_loss_last=losses[-1] if losses else None,
        )
        _save(model, fine_dir, report)
    return model, report
