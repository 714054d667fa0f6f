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
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from expansion.base import ExpansionError
from expansion.files import content_key
from expansion.probe import PROBE_RECIPE, Probe
from expansion.probe import train_probe as fit_probe
from expansion.weights import Weights
from experiments.data.augment import resize_to

DUP_RULE = (
    "near-duplicate: pixel NN distance (RMS of [0,1] pixels, <=32 px) <= {f} x median leave-one-out "
    "NN distance among originals, or feature NN distance <= {f} x the same median in feature space; "
    "exact: pixel-identical"
)
PIXEL_SIZE = 32  # memorisation in pixel space compares images at most this large
EXTRACTORS = ("classifier", "inception", "clip")


class QualityError(ExpansionError):
    """A quality metric cannot be computed (e.g. missing extractor weights); one clear line."""


def _progress(enabled: bool) -> bool:
    """Bars only when asked for and on a terminal (quiet in CI logs and files)."""
    return bool(enabled) and sys.stderr.isatty()


def _tqdm(iterable, *, progress: bool, desc: str, total: int | None = None, unit: str = "it"):
    from tqdm.auto import tqdm

    return tqdm(
        iterable, desc=desc, total=total, unit=unit, leave=False, disable=not _progress(progress), dynamic_ncols=True
    )


# -- feature extractors ---------------------------------------------------------------------------------


class FeatureExtractor(nn.Module):
    """``forward(uint8 [N, C, H, W]) -> float [N, D]``; ``logits`` (optional) gives class scores."""

    description: str = "features"
    num_features: int

    def logits(self, images: torch.Tensor) -> torch.Tensor | None:
        return None


class ProbeExtractor(FeatureExtractor):
    """The probe (:mod:`expansion.probe`) trained on the original images: penultimate features, head logits."""

    def __init__(self, probe: Probe, description: str):
        super().__init__()
        self.probe = probe
        self.num_features = probe.num_features
        self.description = description

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe.embed(images.float() / 255.0)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.probe(images.float() / 255.0)


def train_probe(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_classes: int,
    *,
    epochs: int = 10,
    size: int = 32,
    seed: int = 0,
    min_steps: int = 200,
    progress: bool = False,
    cache_dir: Path | str | None = None,
) -> ProbeExtractor:
    """The probe trained on uint8 ``images`` (:func:`expansion.probe.train_probe`), as a feature extractor.
    With ``cache_dir`` it is trained once per training set and setting and reused by every later run (a
    sweep's jobs on the same data); a cached file that cannot be read is trained again, never used."""

    def bars(iterable, desc):
        return _tqdm(iterable, progress=progress, desc=f"quality: {desc}", unit="epoch")

    y = np.asarray(labels, dtype=np.int64)
    key = content_key(
        {
            "images": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest(),
            "shape": list(images.shape),
            "labels": hashlib.sha256(y.tobytes()).hexdigest(),
            "num_classes": num_classes,
            "epochs": epochs,
            "size": size,
            "seed": seed,
            "min_steps": min_steps,
            "recipe": PROBE_RECIPE,
        }
    )
    path = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
    probe = None
    if path is not None and path.is_file():
        try:
            probe = Probe.load(path)
        except Exception as exc:  # a damaged file: train again
            warnings.warn(
                f"quality probe {path} cannot be read ({type(exc).__name__}: {exc}); training it again", stacklevel=2
            )
    if probe is None:
        probe = fit_probe(
            images, y, num_classes, epochs=epochs, size=size, seed=seed, min_steps=min_steps, progress=bars
        )
        if path is not None:
            probe.save(path)
    description = (
        f"classifier(small_cnn, trained on {len(images)} original images, {probe.trained_epochs} epochs, "
        f"{probe.size} px, {probe.num_features}-d penultimate features)"
    )
    return ProbeExtractor(probe, description)


class InceptionExtractor(FeatureExtractor):
    """torchmetrics' FID InceptionV3 (2048-d pool3 features), as in the standard FID."""

    def __init__(self):
        super().__init__()
        try:
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"])
        except Exception as exc:  # torch-fidelity missing, or its weights cannot be fetched offline
            raise QualityError(
                f"quality.extractor=inception needs torch-fidelity and its FID InceptionV3 weights "
                f"(pt_inception-2015-12-05, downloaded once into the torch hub cache): {type(exc).__name__}: {exc}. "
                "Install with `pip install torch-fidelity` where there is network and run once, or use "
                "quality.extractor=classifier (offline)."
            ) from exc
        self.num_features = 2048
        self.description = "inception(torchmetrics FID InceptionV3, 2048-d pool features)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        return self.net(x).reshape(len(x), -1).float()


class ClipExtractor(FeatureExtractor):
    """An open_clip image encoder (unit-norm embeddings) and its zero-shot class prediction."""

    def __init__(self, class_names: Sequence[str], arch: str = "ViT-B-32", pretrained: str = "openai"):
        super().__init__()
        from expansion.gif.guides import ClipGuide

        try:
            self.guide = ClipGuide.from_open_clip(list(class_names), arch=arch, pretrained=pretrained)
        except ExpansionError as exc:
            raise QualityError(f"quality.extractor=clip: {exc} (or use quality.extractor=classifier)") from exc
        self.num_features = int(self.guide.text_features.shape[-1])
        self.description = f"clip(open_clip {arch}, pretrained={pretrained}, image embeddings)"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.guide(images.float() / 255.0).embeddings

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.guide(images.float() / 255.0).probs.log()


def _has_head(model: nn.Module) -> bool:
    return isinstance(model, FeatureExtractor) and type(model).logits is not FeatureExtractor.logits


def build_extractor(
    kind: str,
    original: torch.Tensor,
    original_labels,
    num_classes: int,
    *,
    class_names: Sequence[str] | None = None,
    epochs: int = 10,
    probe_size: int = 32,
    seed: int = 0,
    progress: bool = False,
    clip_arch: str = "ViT-B-32",
    clip_pretrained: str = "openai",
    cache_dir: Path | str | None = None,
) -> FeatureExtractor:
    if kind == "classifier":
        return train_probe(
            original,
            original_labels,
            num_classes,
            epochs=epochs,
            size=probe_size,
            seed=seed,
            progress=progress,
            cache_dir=cache_dir,
        )
    if kind == "inception":
        return InceptionExtractor()
    if kind == "clip":
        names = list(class_names) if class_names else [str(c) for c in range(num_classes)]
        return ClipExtractor(names, arch=clip_arch, pretrained=clip_pretrained)
    raise QualityError(f"unknown quality.extractor {kind!r}: use one of {EXTRACTORS}")


@torch.no_grad()
def extract(
    extractor: nn.Module,
    images: torch.Tensor,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    progress: bool = False,
    desc: str = "quality: features",
    logits: bool = False,
) -> torch.Tensor:
    """Run ``extractor`` (or its ``logits``) over uint8 ``images`` in batches; float32 on the CPU."""
    fn = extractor.logits if logits else extractor
    out = []
    starts = range(0, len(images), batch_size)
    for start in _tqdm(starts, progress=progress, desc=desc, total=len(starts), unit="batch"):
        out.append(fn(images[start : start + batch_size].to(device)).float().cpu())
    return torch.cat(out)


# -- the metrics ---------------------------------------------------------------------------------------------


class _Precomputed(nn.Module):
    """Hands already extracted features to torchmetrics (features are computed once and
    shared by FID, KID, diversity and memorisation)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


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
        doc = (fn.__doc__ or name).strip().splitlines()[0]
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
    import hashlib

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


def grid_parents(labels: Sequence[int] | np.ndarray, parents: Sequence[int], rows: int) -> list[int]:
    """``rows`` seed indices, round-robin over the classes (the first seed of each class,
    then the second, ...), among seeds that have expansions; deterministic."""
    labels = np.asarray(labels)
    have = sorted({int(p) for p in parents})
    by_class: dict[int, list[int]] = {}
    for p in have:
        by_class.setdefault(int(labels[p]), []).append(p)
    chosen: list[int] = []
    depth = 0
    while len(chosen) < rows and any(depth < len(v) for v in by_class.values()):
        for c in sorted(by_class):
            if depth < len(by_class[c]) and len(chosen) < rows:
                chosen.append(by_class[c][depth])
        depth += 1
    return chosen


def save_expansion_grid(
    path: Path | str,
    original: torch.Tensor,
    original_labels,
    expanded: torch.Tensor,
    parents: Sequence[int],
    copies: Sequence[int],
    *,
    rows: int = 8,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
) -> Path:
    """PNG grid: one row per seed image (first column), then its k expansions in copy order."""
    from PIL import Image, ImageDraw, ImageFont

    path = Path(path)
    parents = np.asarray(parents)
    copies = np.asarray(copies)
    chosen = grid_parents(original_labels, parents, rows)
    if not chosen:
        raise QualityError("no seed image has expansions: nothing to draw")
    k = int(max((parents == p).sum() for p in chosen))
    c, h, w = original.shape[1:]
    scale = max(1, math.ceil(48 / max(h, w)))
    ch, cw = h * scale, w * scale
    gap, sep, margin, header = 2, 8, 90, 16 + (16 if title else 0)
    width = margin + cw + sep + k * (cw + gap)
    height = header + len(chosen) * (ch + gap)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    if title:
        draw.text((4, 2), title, fill="black", font=font)
    draw.text((margin, header - 14), "seed", fill="black", font=font)
    draw.text((margin + cw + sep, header - 14), f"its {k} expansions", fill="black", font=font)

    def tile(img: torch.Tensor) -> Image.Image:
        arr = img.numpy()
        arr = arr[0] if c == 1 else arr.transpose(1, 2, 0)
        im = Image.fromarray(np.ascontiguousarray(arr)).convert("RGB")
        return im.resize((cw, ch), Image.NEAREST)

    labels = np.asarray(original_labels)
    for r, p in enumerate(chosen):
        y = header + r * (ch + gap)
        name = class_names[int(labels[p])] if class_names else str(int(labels[p]))
        draw.text((4, y + ch // 2 - 13), str(name)[:14], fill="black", font=font)
        draw.text((4, y + ch // 2 + 1), f"train #{p}", fill="gray", font=font)
        canvas.paste(tile(original[p]), (margin, y))
        idx = np.flatnonzero(parents == p)
        idx = idx[np.argsort(copies[idx], kind="stable")]
        for j, i in enumerate(idx):
            canvas.paste(tile(expanded[i]), (margin + cw + sep + j * (cw + gap), y))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


# -- the pipeline's entry point ------------------------------------------------------------------------


def extractor_weights(settings: QualitySettings) -> list[Weights]:
    """The pretrained weights the quality step loads (``clip``: open_clip's; ``classifier``: none, the
    probe is trained here; ``inception``: torch-fidelity fetches its own file, not checked beforehand)."""
    if settings.extractor != "clip":
        return []
    from expansion.gif.guides import clip_weights

    return [clip_weights(settings.clip_arch, settings.clip_pretrained, "quality.clip_pretrained")]


@dataclass(frozen=True)
class QualitySettings:
    """The quality step of a run (values: the ``quality:`` section of conf/config.yaml): ``extractor``
    (classifier = the probe, offline; inception; clip with ``clip_arch``/``clip_pretrained``), the
    seeded subsample ``max_images``, the probe's ``epochs`` and ``probe_size``, the near-duplicate
    ``dup_factor``, ``kid_subsets``, and ``grid_seeds`` rows of expansion_grid.png."""

    enabled: bool
    extractor: str
    max_images: int
    epochs: int
    probe_size: int
    dup_factor: float
    kid_subsets: int
    clip_arch: str
    clip_pretrained: str
    grid_seeds: int

    def __post_init__(self) -> None:
        if self.extractor not in EXTRACTORS:
            raise QualityError(f"quality.extractor must be one of {EXTRACTORS}, got {self.extractor!r}")
        if min(self.epochs, self.probe_size, self.kid_subsets, self.grid_seeds) < 1 or self.max_images < 0:
            raise QualityError("quality: need epochs, probe_size, kid_subsets and grid_seeds >= 1 and max_images >= 0")

    def options(self) -> dict[str, Any]:
        """``quality_metrics`` keyword arguments."""
        return {
            "extractor": self.extractor,
            "max_images": self.max_images,
            "epochs": self.epochs,
            "probe_size": self.probe_size,
            "dup_factor": self.dup_factor,
            "kid_subsets": self.kid_subsets,
            "clip_arch": self.clip_arch,
            "clip_pretrained": self.clip_pretrained,
        }


def quality_settings(section: Any) -> QualitySettings:
    """:class:`QualitySettings` from a ``quality:`` config section (a run's saved config included)."""
    from omegaconf import DictConfig, OmegaConf

    from expansion.settings import from_mapping

    values = OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)
    return from_mapping(QualitySettings, values, "quality")


def evaluate_expansion(
    settings: QualitySettings,
    data,
    expanded_set,
    expanded_images: torch.Tensor,
    run_dir: Path | str,
    *,
    seed: int,
    device: str,
    title: str,
    progress: bool = False,
    cache_dir: Path | str | None = None,
) -> dict[str, Any]:
    """Quality metrics of one run's expansion + ``<run_dir>/expansion_grid.png`` (the pipeline's step);
    ``cache_dir`` keeps the probe for later runs on the same training set."""
    start = time.perf_counter()
    original = data.train.to_tensor()
    labels = np.asarray(data.train.labels)
    metrics = quality_metrics(
        original,
        labels,
        expanded_images,
        expanded_set.labels,
        data.num_classes,
        class_names=data.class_names,
        seed=seed,
        device=device,
        progress=progress,
        cache_dir=cache_dir,
        **settings.options(),
    )
    grid = save_expansion_grid(
        Path(run_dir) / "expansion_grid.png",
        original,
        labels,
        expanded_images,
        [r["parent"] for r in expanded_set.rows],
        [r["copy"] for r in expanded_set.rows],
        rows=settings.grid_seeds,
        class_names=data.class_names,
        title=title,
    )
    metrics["grid"] = grid.name
    metrics["seconds"] = round(time.perf_counter() - start, 3)
    return metrics
