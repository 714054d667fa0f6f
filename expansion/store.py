"""Content-addressed store of expanded images.

Layout of one store (``<store_dir>/<key>/``)::

    meta.json            key, format version, the full key payload, status
    images/PPPPPPP_CCC.png   parent index P, copy index C
    chunks/<first>-<last>-<digest>.jsonl   manifest rows of one written batch
    manifest.jsonl       all rows sorted by (parent, copy); written on completion
    .lock                a file lock held by the one job that writes the store

Atomicity and resume: every file is written to a temporary name in the same
folder and moved into place with ``os.replace``. A batch's images are written
before its manifest chunk, so a parent counts as done only when its chunk
exists, and a chunk names only images already in place. A run killed at any
moment therefore leaves complete chunks, possibly some orphan images that the
resumed run rewrites (bit-identically, thanks to per-image seeds), and
temporary files that :meth:`ExpansionStore.open_for_writing` removes.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from PIL import Image

from .errors import ExpansionError
from .files import TMP_MARK, atomic_write_bytes, atomic_write_text, canonical_json, content_key, remove_temporaries

#: bump when the layout, the meaning of a manifest field or the method signatures change.
#: 2: method signatures are the methods' typed settings (issue 15); version-1 stores are no longer
#: found (their images are not reused: delete them from the cache folder)
FORMAT_VERSION = 2
#: version of the payload that keys fitted artifacts (fit signatures did not change with store version 2)
FIT_FORMAT_VERSION = 1
#: chunk-row keys of an image's size and digest (moved into meta.json when the store completes)
_BYTES, _SHA256 = "_bytes", "_sha256"
FILE_NAME = re.compile(r"\d{7,}_\d{3,}\.png")
REBUILD = "delete the store folder to regenerate it (or use another expansion_seed)"


class StoreDamagedError(ExpansionError):
    """A complete store whose manifest or meta.json is not what was written: refused, never used."""


def key_payload(
    dataset_identity: Mapping[str, Any], signature: Mapping[str, Any], seed: int, format_version: int | None = None
) -> dict[str, Any]:
    """What a store (or, with ``FIT_FORMAT_VERSION``, a fitted artifact) is keyed on: format version,
    dataset identity, method signature, seed."""
    version = FORMAT_VERSION if format_version is None else format_version
    return {
        "format_version": int(version),
        "dataset": dict(dataset_identity),
        "method": dict(signature),
        "seed": int(seed),
    }


def store_key(dataset_identity: Mapping[str, Any], signature: Mapping[str, Any], seed: int) -> tuple[str, dict]:
    """:func:`~expansion.files.content_key` of :func:`key_payload`, and the payload."""
    payload = key_payload(dataset_identity, signature, seed)
    return content_key(payload), payload


def fit_key(dataset_identity: Mapping[str, Any], fit_signature: Mapping[str, Any]) -> tuple[str, dict]:
    """The key of a method's fitted artifacts (shared by every method with the same fit signature)."""
    payload = key_payload(dataset_identity, fit_signature, 0, FIT_FORMAT_VERSION)
    return content_key(payload), payload


def digest_of(data: bytes) -> str:
    """The sha256 of a file's bytes, as meta.json records it."""
    return hashlib.sha256(data).hexdigest()


def encode_png(image: torch.Tensor) -> bytes:
    """uint8 ``[C, H, W]`` (C = 1 or 3) to PNG bytes."""
    array = image.detach().cpu().numpy()
    array = array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def image_name(parent: int, copy: int) -> str:
    return f"{parent:07d}_{copy:03d}.png"


def complete_meta(
    meta: Mapping[str, Any], rows: list[dict[str, Any]], manifest: str, images: Mapping[str, list]
) -> dict[str, Any]:
    """``meta`` (key, format version, ratio, payload) marked complete, with what :meth:`ExpansionStore.check`
    verifies on reuse: the manifest's digest and row count, and every image's ``[size, sha256]``."""
    return {
        **meta,
        "status": "complete",
        "num_images": len(rows),
        "num_parents": len({r["parent"] for r in rows}),
        "manifest_sha256": digest_of(manifest.encode()),
        "images": dict(images),
    }


#: the manifest fields of a soft label: the second class and its weight
SOFT_FIELDS = frozenset({"soft_target", "soft_weight"})


@dataclass
class ExpandedSet:
    """A finished store, read back: the manifest rows and the image folder."""

    root: Path
    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        return np.asarray([r["label"] for r in self.rows], dtype=np.int64)

    @property
    def parents(self) -> np.ndarray:
        """Each image's seed: its index among the training images the store was expanded from."""
        return np.asarray([r["parent"] for r in self.rows], dtype=np.int64)

    @property
    def paths(self) -> list[Path]:
        return [self.root / "images" / r["file"] for r in self.rows]

    @property
    def has_soft_labels(self) -> bool:
        """Whether every row carries a soft label (``soft_target``, ``soft_weight``: a method such as Diff-Mix's)."""
        return bool(self.rows) and all(r.keys() >= SOFT_FIELDS for r in self.rows)

    def soft_labels(self, num_classes: int) -> np.ndarray:
        """Dense targets float32 ``[N, K]``: ``(1 - w) onehot(label) + w onehot(soft_target)``, built additively as
        Diff-Mix's ``base.py`` does (so a row whose ``soft_target`` is its own label gets 1.0 there). A store
        without the fields, a target outside the K classes or a weight outside [0, 1] is one error line."""
        if not self.has_soft_labels:
            raise ExpansionError(
                f"expansion store {self.root} has no soft labels (manifest fields {sorted(SOFT_FIELDS)}): "
                "train.synthetic.soft_labels=true needs a method that emits them"
            )
        labels = self.labels
        try:
            target = np.asarray([r["soft_target"] for r in self.rows], dtype=np.int64)
            weight = np.asarray([r["soft_weight"] for r in self.rows], dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ExpansionError(
                f"expansion store {self.root}: a soft_target or soft_weight is not a number ({exc}); {REBUILD}"
            ) from exc
        if (labels < 0).any() or (labels >= num_classes).any() or (target < 0).any() or (target >= num_classes).any():
            raise ExpansionError(
                f"expansion store {self.root}: a label or soft_target is outside the {num_classes} classes"
            )
        if not np.isfinite(weight).all() or (weight < 0).any() or (weight > 1).any():
            raise ExpansionError(f"expansion store {self.root}: a soft_weight is outside [0, 1]")
        dense = np.zeros((len(self.rows), num_classes), dtype=np.float64)
        rows = np.arange(len(self.rows))
        np.add.at(dense, (rows, labels), 1.0 - weight)
        np.add.at(dense, (rows, target), weight)
        return dense.astype(np.float32)


class ExpansionStore:
    """One store directory. Create with :meth:`ExpansionStore.at`."""

    def __init__(self, root: Path, key: str, payload: Mapping[str, Any]):
        self.root = Path(root)
        self.key = key
        self.payload = dict(payload)

    @classmethod
    def at(
        cls, store_dir: Path | str, dataset_identity: Mapping[str, Any], signature: Mapping[str, Any], seed: int
    ) -> ExpansionStore:
        key, payload = store_key(dataset_identity, signature, seed)
        return cls(Path(store_dir) / key, key, payload)

    # -- paths -------------------------------------------------------------
    @property
    def meta_path(self) -> Path:
        return self.root / "meta.json"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.jsonl"

    @property
    def images_dir(self) -> Path:
        return self.root / "images"

    @property
    def chunks_dir(self) -> Path:
        return self.root / "chunks"

    # -- state ----------------------------------------------------------------
    def read_meta(self) -> dict[str, Any] | None:
        if not self.meta_path.is_file():
            return None
        try:
            meta = json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as exc:
            raise ExpansionError(
                f"store {self.root}: meta.json is corrupt ({exc}); delete the folder to regenerate"
            ) from exc
        version = meta.get("format_version")
        if version != FORMAT_VERSION:
            raise ExpansionError(
                f"store {self.root} was written by store format version {version}, this framework reads "
                f"version {FORMAT_VERSION}; delete the folder to regenerate it"
            )
        return meta

    def is_complete(self) -> bool:
        meta = self.read_meta()
        return bool(meta and meta.get("status") == "complete" and self.manifest_path.is_file())

    @property
    def lock_path(self) -> Path:
        """Beside the store, not in it: a start that fails before writing anything removes the store
        folder while another job may wait on the lock."""
        return self.root.parent / ".locks" / f"{self.key or self.root.name}.lock"

    @contextmanager
    def lock(self, timeout: float = -1) -> Iterator[None]:
        """Exclusive writer lock (flock: released by the OS if the holder dies).
        A second job blocks here until the first finishes, then finds the store complete."""
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.lock_path))
        try:
            lock.acquire(timeout=timeout)
        except Timeout as exc:
            raise ExpansionError(f"store {self.root} is locked by another job (waited {timeout}s)") from exc
        try:
            yield
        finally:
            lock.release()

    def open_for_writing(self, ratio: int, *, writer: bool = True) -> None:
        """Create or reopen the store for writing; the writer (rank 0) removes temporaries of a killed
        run (other ranks never do: they would remove files the writer is writing)."""
        self.images_dir.mkdir(parents=True, exist_ok=True)
        self.chunks_dir.mkdir(parents=True, exist_ok=True)
        meta = self.read_meta()
        if meta is None and writer:
            atomic_write_text(
                self.meta_path,
                json.dumps(
                    {
                        "key": self.key,
                        "format_version": FORMAT_VERSION,
                        "status": "writing",
                        "ratio": ratio,
                        "payload": self.payload,
                    },
                    indent=2,
                    default=str,
                ),
            )
        elif meta is not None and meta.get("key") != self.key:
            raise ExpansionError(f"store {self.root} holds key {meta.get('key')}, expected {self.key}")
        if writer:
            for folder in (self.root, self.images_dir, self.chunks_dir):
                remove_temporaries(folder)

    def holds_nothing(self) -> bool:
        """True when no image or manifest chunk was written (a start that failed before generating)."""
        return not any(self.images_dir.glob("*.png")) and not any(self.chunks_dir.glob("*.jsonl"))

    def read_chunks(self) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for chunk in sorted(self.chunks_dir.glob("*.jsonl")):
            for line_no, line in enumerate(chunk.read_text().splitlines(), 1):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ExpansionError(f"store chunk {chunk} line {line_no} is corrupt: {exc}") from exc
        return rows

    def done_parents(self, ratio: int) -> set[int]:
        """Parents whose k images and manifest rows are all written."""
        if self.is_complete():
            return {r["parent"] for r in self.read_rows()}
        copies: dict[int, set[int]] = {}
        for row in self.read_chunks():
            copies.setdefault(row["parent"], set()).add(row["copy"])
        return {p for p, c in copies.items() if len(c) == ratio}

    def write_batch(self, images: torch.Tensor, rows: list[dict[str, Any]]) -> None:
        """Write ``images`` (uint8 ``[N, C, H, W]``) and their rows (each with
        ``parent``, ``copy``); images first, then the chunk that vouches for them."""
        if len(rows) != images.shape[0]:
            raise ExpansionError(f"{images.shape[0]} images but {len(rows)} manifest rows")
        if not torch.is_tensor(images) or images.dtype != torch.uint8:
            raise ExpansionError("store images must be uint8 tensors")
        written: list[Path] = []
        try:
            for image, row in zip(images, rows):
                row["file"] = image_name(row["parent"], row["copy"])
                png = encode_png(image)
                atomic_write_bytes(self.images_dir / row["file"], png)
                written.append(self.images_dir / row["file"])
                row[_BYTES], row[_SHA256] = len(png), digest_of(png)
            text = "".join(canonical_json(r) + "\n" for r in rows)
            parents = [r["parent"] for r in rows]
            digest = hashlib.sha256(text.encode()).hexdigest()[:12]
            atomic_write_text(self.chunks_dir / f"{min(parents):07d}-{max(parents):07d}-{digest}.jsonl", text)
        except OSError as exc:
            # e.g. ENOSPC: drop this batch's images (no chunk vouches for them) so nothing half-written stays
            for path in written:
                path.unlink(missing_ok=True)
            raise ExpansionError(
                f"store {self.root}: writing a batch of {len(rows)} images failed ({exc}); nothing of this batch "
                "was kept, earlier batches are intact: fix the cause (e.g. free disk space) and rerun to resume"
            ) from exc

    def finalize(self, expected_parents: Iterable[int], ratio: int) -> None:
        """Merge chunks into ``manifest.jsonl`` (sorted) and mark the store complete.
        Fails if any expected parent is missing (nothing is marked complete then)."""
        by_image: dict[tuple[int, int], dict[str, Any]] = {}
        for row in self.read_chunks():
            by_image[(row["parent"], row["copy"])] = row  # duplicates (padded DDP batches) collapse
        expected = sorted({int(p) for p in expected_parents})
        missing = [p for p in expected if any((p, c) not in by_image for c in range(ratio))]
        if missing:
            raise ExpansionError(
                f"store {self.root}: {len(missing)} seeds have no complete expansion (first: {missing[:5]}); "
                "rerun to resume"
            )
        rows = [by_image[(p, c)] for p in expected for c in range(ratio)]
        for row in rows:
            if not (self.images_dir / row["file"]).is_file():
                raise ExpansionError(f"store {self.root}: manifest names {row['file']} but the image is missing")
        images = {r["file"]: [r.pop(_BYTES), r.pop(_SHA256)] for r in rows}
        manifest = "".join(canonical_json(r) + "\n" for r in rows)
        atomic_write_text(self.manifest_path, manifest)
        meta = complete_meta(self.read_meta() or {}, rows, manifest, images)
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1, default=str))
        self.remove_obsolete_chunks()

    def remove_obsolete_chunks(self) -> None:
        """Delete the per-batch chunks of a complete store (the manifest holds their rows); a run
        killed while deleting them leaves some, which the next run that reuses the store removes."""
        if self.is_complete():
            shutil.rmtree(self.chunks_dir, ignore_errors=True)

    def read_rows(self) -> list[dict[str, Any]]:
        if not self.manifest_path.is_file():
            raise ExpansionError(f"store {self.root} is not complete (no manifest.jsonl)")
        return self._parse_rows(self.manifest_path.read_text())

    def _parse_rows(self, text: str) -> list[dict[str, Any]]:
        rows = []
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise StoreDamagedError(
                    f"store {self.root}: manifest.jsonl line {line_no} is corrupt ({exc.msg}); {REBUILD}"
                ) from exc
            if not isinstance(row, dict) or not FILE_NAME.fullmatch(str(row.get("file", ""))):
                raise StoreDamagedError(
                    f"store {self.root}: manifest.jsonl line {line_no} names no image of this "
                    f"store ({row.get('file') if isinstance(row, dict) else row!r}); {REBUILD}"
                )
            rows.append(row)
        return rows

    def check(self, *, digests: bool = True) -> list[dict[str, Any]]:
        """Check a complete store before it is reused. The manifest must be the one written (its digest
        and row count as recorded in meta.json), else :class:`StoreDamagedError` says what is damaged
        and how to rebuild. Returns the rows whose image is missing, of another size or, with
        ``digests``, other bytes than were written (empty: sound); those can be regenerated."""
        meta = self.read_meta() or {}
        if meta.get("key") != self.key:
            raise StoreDamagedError(
                f"store {self.root}: meta.json names key {meta.get('key')}, the folder is "
                f"{self.key} (a store copied or moved into another's place); {REBUILD}"
            )
        if "manifest_sha256" not in meta or "images" not in meta:
            raise StoreDamagedError(
                f"store {self.root}: meta.json records no digests (written before they were kept); {REBUILD}"
            )
        text = self.manifest_path.read_text() if self.manifest_path.is_file() else ""
        rows = self._parse_rows(text)
        if digest_of(text.encode()) != meta["manifest_sha256"] or len(rows) != meta.get("num_images"):
            raise StoreDamagedError(
                f"store {self.root}: manifest.jsonl is not the one written (it has {len(rows)} rows, "
                f"{meta.get('num_images')} were written, and its digest differs): it was cut, edited or corrupted; "
                f"{REBUILD}"
            )
        damaged = []
        recorded = meta["images"]
        for row in rows:
            path = self.images_dir / row["file"]
            size, digest = recorded.get(row["file"], (None, None))
            if not path.is_file():
                damaged.append({**row, "problem": "missing"})
            elif path.stat().st_size != size:
                damaged.append({**row, "problem": f"{path.stat().st_size} bytes, {size} written"})
            elif digests and digest_of(path.read_bytes()) != digest:
                damaged.append({**row, "problem": "other bytes than written"})
        return damaged

    def replace_images(self, images: Mapping[str, bytes]) -> None:
        """Write regenerated images (file name -> PNG bytes) in place of damaged ones and record their
        digests (the manifest's rows, seeds and fields stay as they were)."""
        meta = self.read_meta() or {}
        for name, png in images.items():
            atomic_write_bytes(self.images_dir / name, png)
            meta["images"][name] = [len(png), digest_of(png)]
        atomic_write_text(self.meta_path, json.dumps(meta, indent=1, default=str))

    def load(self) -> ExpandedSet:
        if not self.is_complete():
            raise ExpansionError(f"store {self.root} is not complete; run the expansion first")
        return ExpandedSet(self.root, self.read_rows())

    def verify(self) -> list[str]:
        """Problems of a store that claims to be complete (empty list: sound): every manifest row
        names one decodable image, no image or temporary file is left over, no chunk remains."""
        if not self.is_complete():
            return [f"store {self.root} is not complete"]
        problems = []
        rows = self.read_rows()
        names = [r["file"] for r in rows]
        if len(set(names)) != len(names):
            problems.append("manifest names an image twice")
        for name in names:
            try:
                with Image.open(self.images_dir / name) as img:
                    img.load()
            except (OSError, ValueError) as exc:
                problems.append(f"image {name} is missing or unreadable: {exc}")
        extra = sorted({p.name for p in self.images_dir.iterdir()} - set(names))
        if extra:
            problems.append(f"{len(extra)} images not in the manifest (first: {extra[:3]})")
        leftovers = [str(p.relative_to(self.root)) for p in self.root.rglob(f"*{TMP_MARK}*")]
        if leftovers:
            problems.append(f"temporary files left: {leftovers[:3]}")
        if self.chunks_dir.exists():
            problems.append("chunks/ left in a complete store")
        return problems

    def content_hash(self) -> str:
        """sha256 over the manifest and every image's bytes (equal stores hash equal)."""
        h = hashlib.sha256(self.manifest_path.read_bytes())
        for row in self.read_rows():
            h.update((self.images_dir / row["file"]).read_bytes())
        return h.hexdigest()
