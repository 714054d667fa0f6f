"""Decoded images kept on disk by key, so image files are decoded once, not by every run.

A dataset split read from image files, or a finished expansion store (PNGs), is decoded
into one uint8 tensor ``[N, C, S, S]`` at the resolution the runs use; that tensor and its
labels are written to ``<tensor_dir>/<key>.safetensors`` (``paths.tensor_dir``, by default
``<cache_dir>/tensors``; ``EXPANSION_CACHE`` moves it, ``paths.tensor_dir=null`` turns the
cache off). The next run, or another classifier seed, loads that file instead.

The key hashes what the tensor was decoded from and how:

* a dataset split: the dataset name, the split name, the split's content fingerprint (every
  file's bytes and label; subset indices) and every file's path, size, mtime, inode and ctime;
* an expansion store: its key (dataset identity + method settings + seed), a digest of its
  manifest rows and every image's sha256 as the store recorded it (the store checks its images
  against those before it is reused, so the key follows the bytes: a regenerated image is
  another key);
* the target resolution, the channel count and :data:`FORMAT_VERSION`.

A cache file also carries the sha256 of the tensors it holds, checked on every load. Writes are
atomic (a temporary file in the same folder, fsync, ``os.replace``); a reader sees no file or a
whole one. Files are read with safetensors (never pickle). A cache file that cannot be read,
holds other shapes or labels than its key promises, or other pixels than were written, is
**rebuilt**: a warning names it, the images are decoded again and the file is replaced.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from expansion.files import atomic_file, canonical_json, content_key, file_stats_digest
from expansion.store import ExpandedSet

log = logging.getLogger(__name__)

#: bump when the layout of a cache file or the decoding it stands for changes
#: (2: store sources keyed by image digests; the file carries its tensors' digest)
FORMAT_VERSION = 2


def cache_key(source: Mapping[str, Any], resolution: int | None, channels: int) -> tuple[str, dict[str, Any]]:
    """``sha256`` (20 hex chars) of the source, the resolution, the channels and the format version."""
    payload = {
        "format_version": FORMAT_VERSION,
        "source": dict(source),
        "resolution": None if resolution is None else int(resolution),
        "channels": int(channels),
    }
    return content_key(payload), payload


def tensors_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    """sha256 of the images' and labels' bytes (what a cache file promises to hold)."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().data)
    h.update(labels.contiguous().numpy().data)
    return h.hexdigest()


def split_source(dataset_name: str, split_name: str, fingerprint: str, files: Sequence[Path]) -> dict[str, Any]:
    """What a dataset split decoded from ``files`` is keyed on."""
    return {
        "kind": "dataset_split",
        "dataset": dataset_name,
        "split": split_name,
        "fingerprint": fingerprint,
        "num_files": len(files),
        "files": file_stats_digest(files),
    }


def store_source(expanded: ExpandedSet) -> dict[str, Any]:
    """What a finished expansion store is keyed on (its folder name is the store key): its rows and its
    images' sha256 as recorded in its meta.json (checked against the bytes before the store is reused;
    a store without them has its images hashed here)."""
    try:
        recorded = json.loads((expanded.root / "meta.json").read_text()).get("images") or {}
    except (OSError, json.JSONDecodeError):
        recorded = {}
    digests = []
    for row, path in zip(expanded.rows, expanded.paths):
        entry = recorded.get(row["file"])
        digests.append(entry[1] if entry else hashlib.sha256(path.read_bytes()).hexdigest())
    return {
        "kind": "expansion_store",
        "store_key": expanded.root.name,
        "manifest_rows": content_key(expanded.rows),
        "num_images": len(expanded),
        "image_digests": content_key(digests),
    }


class TensorCache:
    """uint8 image tensors + int64 labels under ``root``, one safetensors file per key."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get_or_decode(
        self,
        source: Mapping[str, Any],
        resolution: int | None,
        channels: int,
        labels: np.ndarray | Sequence[int],
        decode: Callable[[], torch.Tensor],
    ) -> torch.Tensor:
        """The cached tensor of ``source``, or ``decode()``'s result, written to the cache first."""
        key, payload = cache_key(source, resolution, channels)
        labels = torch.as_tensor(np.asarray(labels, dtype=np.int64).reshape(-1))
        images = self.load(key, payload, labels)
        if images is not None:
            return images
        images = decode()
        problem = _mismatch(images, labels, resolution, channels)
        if problem:
            raise ValueError(f"decoded images do not match their cache key: {problem}")
        self.save(key, payload, images, labels)
        return images

    def load(self, key: str, payload: Mapping[str, Any], labels: torch.Tensor) -> torch.Tensor | None:
        """The images under ``key``; None when absent, or when the file is damaged or stale (warned)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as fh:
                metadata = fh.metadata() or {}
                stored_payload = json.loads(metadata.get("payload", "null"))
                images, stored_labels = fh.get_tensor("images"), fh.get_tensor("labels")
        except Exception as exc:
            log.warning(
                "decoded-image cache %s is unreadable (%s: %s); decoding the images again",
                path,
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            return None
        problem = None
        if stored_payload != canonical_json_roundtrip(payload):
            problem = "it was written for another source"
        elif not torch.equal(stored_labels, labels):
            problem = "its labels differ from the source's"
        else:
            problem = _mismatch(images, labels, payload["resolution"], payload["channels"])
        if problem is None and metadata.get("sha256") != tensors_digest(images, stored_labels):
            problem = "its pixels are not the ones written (damaged or edited)"
        if problem:
            log.warning("decoded-image cache %s is stale (%s); decoding the images again", path, problem)
            return None
        return images

    def save(self, key: str, payload: Mapping[str, Any], images: torch.Tensor, labels: torch.Tensor) -> Path:
        """Write atomically: the file is absent, old or complete, never half-written."""
        from safetensors.torch import save_file

        path = self.path(key)
        with atomic_file(path) as tmp:
            save_file(
                {"images": images.contiguous(), "labels": labels.contiguous()},
                str(tmp),
                metadata={"payload": canonical_json(payload), "sha256": tensors_digest(images, labels)},
            )
        return path


def canonical_json_roundtrip(payload: Mapping[str, Any]) -> Any:
    """``payload`` as it reads back from the file's metadata (JSON types only)."""
    return json.loads(canonical_json(payload))


def _mismatch(images: torch.Tensor, labels: torch.Tensor, resolution: int | None, channels: int) -> str | None:
    if images.dtype != torch.uint8 or images.ndim != 4:
        return f"expected uint8 [N, C, S, S], got {images.dtype} {tuple(images.shape)}"
    if images.shape[0] != len(labels):
        return f"{images.shape[0]} images but {len(labels)} labels"
    if images.shape[1] != channels:
        return f"{images.shape[1]} channels, expected {channels}"
    if resolution is not None and tuple(images.shape[-2:]) != (resolution, resolution):
        return f"{tuple(images.shape[-2:])} px, expected {resolution} x {resolution}"
    return None
