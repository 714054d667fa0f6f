"""How good is an expanded set? Quality metrics against the original training images,
and a picture of seeds beside their expansions.

``quality_metrics(original, original_labels, expanded, expanded_labels, num_classes,
extractor)`` returns one flat dict (written under ``metrics["quality"]``):

* **feature space** (``feature_extractor`` names it): ``classifier`` (the offline default)
  is the probe CNN (:mod:`expansion.probe`, the one GIF's offline guide uses) trained, seeded, for a
  few epochs on the ORIGINAL training images; its 128-d penultimate (global-pooled)
  activations are the features and its predictions give the label agreement.
  ``inception`` is torchmetrics' FID InceptionV3 (2048-d pool features; needs
  torch-fidelity and its weights), ``clip`` an open_clip image encoder (needs weights;
  CLIP's zero-shot prediction over the class names then gives the label agreement).
* ``fid``: Fréchet distance between Gaussians fitted to original and expanded features
  (torchmetrics ``FrechetInceptionDistance`` with the custom extractor). ``kid_mean`` /
  ``kid_std``: torchmetrics' ``KernelInceptionDistance`` (unbiased polynomial-kernel MMD²,
  ``kid_subsets`` (50) seeded subsets of ``min(1000, n_original, n_expanded)``). Both are 0
  for identical distributions; values are only comparable under one extractor.
* ``label_agreement``: fraction of expanded images whose predicted class (the probe's,
  or CLIP zero-shot's) equals the label the expansion assigned; ``label_agreement_original``
  is the same on the original images (the probe's training accuracy: the ceiling).
* diversity: ``vendi_*`` = Vendi score ``exp(-sum_i l_i log l_i)``, ``l_i`` the eigenvalues
  of ``K / n`` with ``K`` the cosine-similarity kernel of the features (1 = all images
  identical, at most min(n, feature dim)); ``pairwise_distance_*`` = mean L2 distance
  between the features of two different images. Both for the expanded and the original set.
* memorisation: for every expanded image the nearest-neighbour (NN) distance to the
  training images, in pixel space (RMS difference of [0, 1] pixels, images resized to at
  most 32 px, against ALL training images) and in feature space. An expanded image is a
  **near-duplicate** when its pixel NN distance is <= ``dup_factor`` (0.05) x the median
  leave-one-out NN distance among original images, or its feature NN distance is <=
  ``dup_factor`` x the same median in feature space. ``exact_duplicates`` counts
  pixel-identical copies. ``near_duplicate_fraction`` = near-duplicates / expanded images.

Both sets are subsampled (seeded) to ``max_images`` before feature work; everything is
batched (``torch.cdist`` in chunks).
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from experiments.data.augment import resize_to

from .extractors import FeatureExtractor, QualityError, _has_head, _Precomputed, build_extractor, extract, train_probe

DUP_RULE = (
    "near-duplicate: pixel NN distance (RMS of [0,1] pixels, <=32 px) <= {f} x median leave-one-out "
    "NN distance among originals, or feature NN distance <= {f} x the same median in feature space; "
    "exact: pixel-identical"
)
PIXEL_SIZE = 32  # memorisation in pixel space compares images at most this large


def fid_kid(
    real: torch.Tensor, fake: torch.Tensor, *, kid_subsets: int = 50, kid_subset_size: int = 1000, seed: int = 0
) -> dict[str, float]:
    """FID and KID (torchmetrics) between two feature sets ``[N, D]``, ``[M, D]``."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    dim = real.shape[1]
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    subset = min(int(kid_subset_size), len(real), len(fake))
    # every subset is the whole of both sets: one is enough
    subsets = 1 if subset == len(real) == len(fake) else int(kid_subsets)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
        kid = KernelInceptionDistance(feature=_Precomputed(dim), subsets=subsets, subset_size=subset)
    kid.update(real.float(), real=True)
    kid.update(fake.float(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std)}


def vendi_score(features: torch.Tensor) -> float:
    """Vendi score with the cosine-similarity kernel: ``exp(entropy(eig(K / n)))``.
    The nonzero eigenvalues of ``X X^T / n`` equal those of ``X^T X / n`` (D x D): cheap."""
    x = F.normalize(features.double(), dim=1)
    n, d = x.shape
    gram = (x.T @ x) / n if d < n else (x @ x.T) / n
    eig = torch.linalg.eigvalsh(gram).clamp_min(0)
    eig = eig / eig.sum()
    eig = eig[eig > 0]
    return float(torch.exp(-(eig * eig.log()).sum()))


def mean_pairwise_distance(features: torch.Tensor) -> float:
    n = len(features)
    if n < 2:
        return 0.0
    x = features.double()
    total = sum(float(torch.cdist(x[s : s + 1024], x).sum()) for s in range(0, n, 1024))
    return total / (n * (n - 1))


def nn_distances(
    queries: torch.Tensor, reference: torch.Tensor, *, exclude_self: bool = False, chunk: int = 256
) -> torch.Tensor:
    """L2 distance of every query row to its nearest reference row (``exclude_self``:
    queries ARE the reference, skip the diagonal)."""
    out = []
    q, r = queries.double(), reference.double()
    for s in range(0, len(q), chunk):
        d = torch.cdist(q[s : s + chunk], r)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + s] = math.inf
        out.append(d.min(dim=1).values)
    return torch.cat(out)


def _pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> flat [0, 1] vectors at most PIXEL_SIZE px, scaled so L2 distance = RMS difference."""
    x = resize_to(images, PIXEL_SIZE) if images.shape[-1] > PIXEL_SIZE else images
    x = x.reshape(len(x), -1).float() / 255.0
    return x / math.sqrt(x.shape[1])


def _subsample(n: int, cap: int, generator: torch.Generator) -> torch.Tensor:
    if cap <= 0 or n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=generator)[:cap].sort().values


def _num(x: float | None) -> float | None:
    if x is None or not math.isfinite(x):
        return None if x is None else float(x)
    return float(f"{x:.6g}")


# -- the registry: a metric is one function + its registration --------------------------------------------


@dataclass
class QualityInputs:
    """What every metric may use, computed once: the (subsampled) original and expanded images, their
    labels and features, the extractor, and the settings."""

    original_all: torch.Tensor  # uint8 [N, C, H, W], every training image
    original_labels_all: torch.Tensor
    original: torch.Tensor  # the subsample
    original_labels: torch.Tensor
    expanded: torch.Tensor
    expanded_labels: torch.Tensor
    f_original: torch.Tensor  # features [n, D]
    f_expanded: torch.Tensor
    extractor: FeatureExtractor
    num_classes: int
    settings: dict[str, Any]  # dup_factor, kid_subsets, seed, epochs, probe_size, batch_size, device, progress


@dataclass(frozen=True)
class Column:
    """One value of a metric shown in results.csv / results.md / the report: its key under
    ``metrics["quality"]``, the column title and the number format (``%``: a fraction shown in percent)."""

    key: str
    title: str
    fmt: str = ".3g"


@dataclass(frozen=True)
class Metric:
    name: str
    fn: Callable[[QualityInputs], dict[str, Any]]
    columns: dict[str, Column]  # results.csv column name -> the value it shows
    description: str


#: every quality metric, in registration order; ``quality_metrics`` runs them all
METRICS: dict[str, Metric] = {}


def register_metric(name: str, columns: dict[str, Column] | None = None):
    """Register ``fn(inputs: QualityInputs) -> {key: value}`` as a quality metric: its values go into
    metrics.json (``quality``) and the W&B run, its ``columns`` into results.csv, results.md and the report."""

    def deco(fn: Callable[[QualityInputs], dict[str, Any]]):
        if name in METRICS:
            raise ValueError(f"quality metric {name!r} is registered twice")
        doc = " ".join((fn.__doc__ or name).strip().split("\n\n")[0].split())  # the whole first paragraph
        METRICS[name] = Metric(name, fn, dict(columns or {}), doc)
        return fn

    return deco


def quality_columns() -> dict[str, Column]:
    """results.csv column name -> :class:`Column`, over every registered metric."""
    return {csv: col for metric in METRICS.values() for csv, col in metric.columns.items()}


@register_metric("fid_kid", {"fid": Column("fid", "FID"), "kid": Column("kid_mean", "KID")})
def _fid_kid_metric(q: QualityInputs) -> dict[str, Any]:
    """FID and KID between original and expanded features (torchmetrics; 0 = same distribution)."""
    return fid_kid(q.f_original, q.f_expanded, kid_subsets=q.settings["kid_subsets"], seed=q.settings["seed"])


@register_metric("label_agreement", {"label_agreement": Column("label_agreement", "label agreement", "%")})
def _label_agreement_metric(q: QualityInputs) -> dict[str, Any]:
    """How often the extractor's classifier (the probe, CLIP zero-shot; for Inception a probe trained on
    the originals) predicts the label an expanded image was given; ``_original``: the same on the originals."""
    st = q.settings
    judge = q.extractor if _has_head(q.extractor) else None
    if judge is None and st["trained_here"]:
        judge = train_probe(
            q.original_all,
            q.original_labels_all,
            q.num_classes,
            epochs=st["epochs"],
            size=st["probe_size"],
            seed=st["seed"],
            progress=st["progress"],
        ).to(st["device"])
    if judge is None:
        return {"label_agreement": None, "label_agreement_original": None, "label_agreement_by": None}
    pred_exp = extract(judge, q.expanded, batch_size=st["batch_size"], device=st["device"], logits=True).argmax(1)
    pred_orig = extract(judge, q.original, batch_size=st["batch_size"], device=st["device"], logits=True).argmax(1)
    return {
        "label_agreement": float((pred_exp == q.expanded_labels).double().mean()),
        "label_agreement_original": float((pred_orig == q.original_labels).double().mean()),
        "label_agreement_by": judge.description.split("(")[0],
    }


@register_metric(
    "diversity",
    {
        "vendi": Column("vendi_expanded", "Vendi", ".2f"),
        "vendi_original": Column("vendi_original", "Vendi (original)", ".2f"),
    },
)
def _diversity_metric(q: QualityInputs) -> dict[str, Any]:
    """Vendi score and mean pairwise feature distance of the expanded and of the original set."""
    return {
        "vendi_expanded": vendi_score(q.f_expanded),
        "vendi_original": vendi_score(q.f_original),
        "pairwise_distance_expanded": mean_pairwise_distance(q.f_expanded),
        "pairwise_distance_original": mean_pairwise_distance(q.f_original),
    }


@register_metric("memorisation", {"near_duplicate_fraction": Column("near_duplicate_fraction", "near-duplicates", "%")})
def _memorisation_metric(q: QualityInputs) -> dict[str, Any]:
    """Nearest-neighbour distances of the expanded images to the training images, exact and near duplicates."""
    dup_factor = q.settings["dup_factor"]
    p_train = _pixels(q.original_all)
    nn_pix = nn_distances(_pixels(q.expanded), p_train)
    # leave-one-out NN among originals: queries are the subsample, reference all originals
    ref_pix = float(_loo_nn(_pixels(q.original), p_train, q.settings["original_index"]).median())
    nn_feat = nn_distances(q.f_expanded, q.f_original)
    ref_feat = float(nn_distances(q.f_original, q.f_original, exclude_self=True).median())
    train_hashes = {_digest(img) for img in q.original_all}
    exact = torch.tensor([_digest(img) in train_hashes for img in q.expanded], dtype=torch.bool)
    near = exact | (nn_pix <= dup_factor * ref_pix) | (nn_feat <= dup_factor * ref_feat)
    return {
        "nn_pixel_mean": float(nn_pix.mean()),
        "nn_pixel_median": float(nn_pix.median()),
        "nn_pixel_original_median": ref_pix,
        "nn_feature_mean": float(nn_feat.mean()),
        "nn_feature_median": float(nn_feat.median()),
        "nn_feature_original_median": ref_feat,
        "exact_duplicates": int(exact.sum()),
        "near_duplicates": int(near.sum()),
        "near_duplicate_fraction": float(near.double().mean()),
        "near_duplicate_rule": DUP_RULE.format(f=dup_factor),
    }


def quality_metrics(
    original: torch.Tensor,
    original_labels,
    expanded: torch.Tensor,
    expanded_labels,
    num_classes: int,
    extractor: str | FeatureExtractor = "classifier",
    *,
    class_names: Sequence[str] | None = None,
    max_images: int = 2000,
    epochs: int = 10,
    probe_size: int = 32,
    dup_factor: float = 0.05,
    kid_subsets: int = 50,
    seed: int = 0,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
    clip_arch: str = "ViT-B-32",
    clip_pretrained: str = "openai",
    cache_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Every registered quality metric of ``expanded`` (uint8 ``[M, C, H, W]``) against ``original``
    (uint8 ``[N, C, H, W]``, the training images), in one flat dict; see the module docstring."""
    start = time.perf_counter()
    for name, t in (("original", original), ("expanded", expanded)):
        if not torch.is_tensor(t) or t.dtype != torch.uint8 or t.dim() != 4:
            raise QualityError(f"{name} images must be a uint8 tensor [N, C, H, W]")
    if original.shape[1:] != expanded.shape[1:]:
        raise QualityError(
            f"original images {tuple(original.shape[1:])} and expanded images "
            f"{tuple(expanded.shape[1:])} differ in shape"
        )
    if len(original) < 2 or len(expanded) < 2:
        raise QualityError("quality metrics need at least two original and two expanded images")
    original_labels = torch.as_tensor(np.asarray(original_labels), dtype=torch.long)
    expanded_labels = torch.as_tensor(np.asarray(expanded_labels), dtype=torch.long)

    if isinstance(extractor, str):
        model = build_extractor(
            extractor,
            original,
            original_labels,
            num_classes,
            class_names=class_names,
            epochs=epochs,
            probe_size=probe_size,
            seed=seed,
            progress=progress,
            clip_arch=clip_arch,
            clip_pretrained=clip_pretrained,
            cache_dir=cache_dir,
        )
    else:
        model = extractor
    model = model.to(device).eval()

    g = torch.Generator().manual_seed(int(seed))
    oi = _subsample(len(original), int(max_images), g)
    ei = _subsample(len(expanded), int(max_images), g)
    orig, exp = original[oi], expanded[ei]
    inputs = QualityInputs(
        original_all=original,
        original_labels_all=original_labels,
        original=orig,
        original_labels=original_labels[oi],
        expanded=exp,
        expanded_labels=expanded_labels[ei],
        f_original=extract(
            model, orig, batch_size=batch_size, device=device, progress=progress, desc="quality: original features"
        ),
        f_expanded=extract(
            model, exp, batch_size=batch_size, device=device, progress=progress, desc="quality: expanded features"
        ),
        extractor=model,
        num_classes=num_classes,
        settings={
            "dup_factor": dup_factor,
            "kid_subsets": kid_subsets,
            "seed": seed,
            "epochs": epochs,
            "probe_size": probe_size,
            "batch_size": batch_size,
            "device": device,
            "progress": progress,
            "trained_here": isinstance(extractor, str),
            "original_index": oi,
        },
    )
    out: dict[str, Any] = {
        "feature_extractor": getattr(model, "description", type(model).__name__),
        "num_original": len(orig),
        "num_expanded": len(exp),
        "num_expanded_total": len(expanded),
    }
    for metric in METRICS.values():
        out.update(metric.fn(inputs))
    out = {k: (_num(v) if isinstance(v, float) else v) for k, v in out.items()}
    out["seconds"] = round(time.perf_counter() - start, 3)
    return out


def _digest(image: torch.Tensor) -> bytes:

    return hashlib.blake2b(image.contiguous().numpy().tobytes(), digest_size=16).digest()


def _loo_nn(
    queries: torch.Tensor, reference: torch.Tensor, query_index: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """NN distance of original images (``reference[query_index]``) to the other originals."""
    out = []
    q, r = queries.double(), reference.double()
    for s in range(0, len(q), chunk):
        d = torch.cdist(q[s : s + chunk], r)
        rows = torch.arange(d.shape[0])
        d[rows, query_index[s : s + chunk]] = math.inf
        out.append(d.min(dim=1).values)
    return torch.cat(out)


# -- the picture -------------------------------------------------------------------------------------------
