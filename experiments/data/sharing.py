"""Share an expanded set: a finished store (or every store of a sweep) exported as a Hugging Face
``datasets`` dataset (Parquet shards with the image, its label and class name and every manifest field,
a dataset card, ``expansion.json``), and such a set imported to train on (``method=imported``).

    python -m experiments.data.sharing export SRC OUT [--push-to-hub REPO]   (make export SRC=... OUT=...)

The images travel as the store's PNG bytes (lossless), so an import decodes the same pixels; each
shard's sha256 is recorded, so a damaged one is named, never read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expansion.errors import ExpansionError
from expansion.files import TMP_MARK, atomic_directory, canonical_json, content_key
from expansion.store import FILE_NAME, ExpandedSet, ExpansionStore, image_name
from experiments.record import load_records, read_record

log = logging.getLogger(__name__)

#: the machine-readable record of an exported set (beside the shards and the card)
META_FILE = "expansion.json"
EXPORT_FORMAT = 1
SHARD_ROWS = 5000
#: a store folder the import wrote is complete when this file is there (written last)
IMPORTED_MARKER = "IMPORTED"


class SharingError(ExpansionError):
    """An export or import that cannot be done: one line with the cause and the fix."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


# -- export ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exported:
    folder: Path
    num_images: int
    shards: int
    seconds: float

    @property
    def images_per_second(self) -> float:
        return self.num_images / max(self.seconds, 1e-9)


def find_stores(src: Path) -> list[tuple[Path, Path | None]]:
    """``(store folder, run folder that used it or None)`` for a store folder, a run folder or a sweep
    folder (every distinct store its runs' metrics.json name)."""
    src = Path(src)
    if (src / "meta.json").is_file() and (src / "manifest.jsonl").is_file():
        return [(src, None)]
    found: dict[Path, Path] = {}
    for record in load_records(src)[0]:
        store = record.expansion.store if record.expansion else None
        if store and not (Path(store) / IMPORTED_MARKER).is_file():  # an imported copy is already shared
            found.setdefault(Path(store), record.folder)
    if not found:
        raise SharingError(f"no finished expansion store in or under {src}: give a store folder or a run/sweep folder")
    return list(found.items())


def _licence(dataset_name: str) -> str | None:
    """The source data's licence, where its dataset config states one (``license:``)."""
    import yaml

    from experiments import CONFIG_DIR

    path = CONFIG_DIR / "dataset" / f"{dataset_name}.yaml"
    return (yaml.safe_load(path.read_text()) or {}).get("license") if path.is_file() else None


def _command(run_dir: Path | None) -> str | None:
    """The command that made the store: the run's overrides (.hydra/overrides.yaml)."""
    if run_dir is None or not (run_dir / ".hydra" / "overrides.yaml").is_file():
        return None
    import shlex

    import yaml

    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) or []
    return shlex.join(["python", "run.py", *[o for o in overrides if not o.startswith("hydra.")]])


def dataset_card(meta: dict[str, Any]) -> str:
    """README.md of the exported set: YAML metadata for the hub, then what it is and how to remake it."""
    import yaml

    payload = meta["store"]["payload"]
    dataset, method = payload["dataset"], payload["method"]
    header = {
        "license": meta["license"] or "other",
        "task_categories": ["image-classification"],
        "tags": ["dataset-expansion", "synthetic", method["method"]],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}],
    }
    settings = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in method.items())
    quality = (
        "\n".join(f"| {k} | {v} |" for k, v in meta["quality"].items() if isinstance(v, int | float))
        if meta.get("quality")
        else None
    )
    command = meta.get("command") or "(not known to the store: the settings above, with expansion_seed, determine it)"
    return (
        f"---\n{yaml.safe_dump(header, sort_keys=False)}---\n\n"
        f"# {dataset['name']} expanded with {method['method']} x{meta['store']['ratio']}\n\n"
        f"{meta['num_images']} generated images from the {dataset['name']} training split "
        f"(source fingerprint `{dataset['train_fingerprint']}`), made by the dataset-expansion framework "
        f"{meta['framework']['version']} (commit `{meta['framework']['commit']}`).\n\n"
        f"- source data: {dataset['name']}, {len(dataset['class_names'])} classes, identity "
        f"`{json.dumps({k: v for k, v in dataset.items() if k != 'class_names'})}`\n"
        f"- licence of the source data: {meta['license'] or 'not stated in its config; check the source'}\n"
        f"- expansion seed: {payload['seed']}; store key `{meta['store']['key']}` (format {payload['format_version']})\n"
        f"- columns: `image`, `label`, `class_name`, every manifest field, `manifest_row` (the row as JSON)\n\n"
        f"## Method settings\n\n| setting | value |\n|---|---|\n{settings}\n\n"
        + (f"## Quality (from the run that made it)\n\n| metric | value |\n|---|---|\n{quality}\n\n" if quality else "")
        + f"## Reproduce\n\n```bash\n{command}\n```\n\n"
        "Train on it: `python run.py dataset="
        + dataset["name"]
        + " method=imported method.path=<this folder or hub id>`; "
        "the training split's fingerprint must match the one above.\n"
    )


def export_store(store_root: Path, out: Path, run_dir: Path | None = None) -> Exported:
    """One finished, intact store -> ``out`` (``data/train-*.parquet``, README.md, expansion.json)."""
    import datasets

    from experiments.environment import git_state, version

    start = time.perf_counter()
    datasets.disable_progress_bars()  # one line per export is printed instead
    store_root = Path(store_root)
    raw = ExpansionStore(store_root, store_root.name, {}).read_meta()
    if raw is None or raw.get("status") != "complete":
        raise SharingError(f"{store_root} is not a finished store; run the expansion to its end first")
    store = ExpansionStore(store_root, raw["key"], raw["payload"])
    damaged = store.check(digests=True)
    if damaged:
        raise SharingError(
            f"store {store_root} has {len(damaged)} missing or damaged image(s) (first: {damaged[0]['file']}); "
            "rerun the job that uses it (it regenerates them) before exporting"
        )
    rows = store.read_rows()
    class_names = [str(c) for c in raw["payload"]["dataset"]["class_names"]]
    fields = list(dict.fromkeys(k for row in rows for k in row))
    columns: dict[str, list[Any]] = {
        "image": [{"bytes": (store.images_dir / r["file"]).read_bytes(), "path": r["file"]} for r in rows],
        "label": [int(r["label"]) for r in rows],
        "class_name": [class_names[int(r["label"])] for r in rows],
        "manifest_row": [canonical_json(r) for r in rows],
    }
    columns.update({f: [r.get(f) for r in rows] for f in fields if f not in columns})
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=class_names),
            "class_name": datasets.Value("string"),
            "manifest_row": datasets.Value("string"),
        }
    )
    table = datasets.Dataset.from_dict({k: columns[k] for k in features})
    table = table.cast(features)
    extra = datasets.Dataset.from_dict({f: columns[f] for f in columns if f not in features})
    table = datasets.concatenate_datasets([table, extra], axis=1)
    out = Path(out)
    n_shards = max(1, -(-len(rows) // SHARD_ROWS))
    record = read_record(run_dir)[0] if run_dir else None
    remove_stale_temporaries(out)
    try:
        with atomic_directory(out) as tmp:
            (tmp / "data").mkdir()
            shards = {}
            for i in range(n_shards):
                name = f"data/train-{i:05d}-of-{n_shards:05d}.parquet"
                table.shard(n_shards, i, contiguous=True).to_parquet(str(tmp / name))
                shards[name] = _sha256(tmp / name)
            meta = {
                "format": EXPORT_FORMAT,
                "store": {"key": raw["key"], "payload": raw["payload"], "ratio": raw["ratio"]},
                "num_images": len(rows),
                "shards": shards,
                "license": _licence(raw["payload"]["dataset"]["name"]),
                "framework": {"version": version("dataset-expansion"), **git_state()},
                "command": _command(run_dir),
                "quality": record.quality if record else None,
            }
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
            (tmp / "README.md").write_text(dataset_card(meta))
    except OSError as exc:  # e.g. ENOSPC: the half-built folder is gone (atomic_directory), nothing is kept
        raise SharingError(
            f"writing the export to {out} failed ({exc.strerror or exc}); nothing was kept: free space "
            f"on {out.parent} (or export elsewhere) and run it again"
        ) from None
    return Exported(out, len(rows), n_shards, time.perf_counter() - start)


#: a temporary export folder older than this was left by a killed export and is removed by the next one
STALE_SECONDS = 3600


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove the ``<out>.tmp-*`` folders a killed export left beside ``out`` more than an hour ago (a
    younger one may be another export at work); returns what was removed."""
    import shutil

    removed = []
    for tmp in Path(out).parent.glob(f"{Path(out).name}{TMP_MARK}*"):
        try:
            old = time.time() - tmp.lstat().st_mtime > STALE_SECONDS
        except FileNotFoundError:
            continue
        if old and tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


def export(src: Path, out: Path) -> list[Exported]:
    """Every store of ``src`` (a store, run or sweep folder): one store -> ``out``; several ->
    ``out/<dataset>_<method>_x<ratio>_<short key>/`` each (:func:`export_name`)."""
    stores = find_stores(src)
    if len(stores) == 1:
        return [export_store(stores[0][0], out, stores[0][1])]
    return [export_store(store, Path(out) / export_name(store), run) for store, run in stores]


def export_name(store_root: Path) -> str:
    """``digits_randaugment_x5_94cb6156``: what the store holds, from its meta.json, and its key's first 8
    characters (two stores of one method and ratio differ in their settings or seed, hence the key)."""
    meta = ExpansionStore(store_root, store_root.name, {}).read_meta() or {}
    payload = meta.get("payload") or {}
    dataset = (payload.get("dataset") or {}).get("name", "dataset")
    method = (payload.get("method") or {}).get("method", "method")
    parts = [str(dataset), str(method), f"x{meta.get('ratio', '?')}", str(meta.get("key", store_root.name))[:8]]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts))


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload an exported folder as a hub dataset repo (created if needed); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="dataset")
    return f"https://huggingface.co/datasets/{repo_id}"


# -- import --------------------------------------------------------------------------------------------------


def fetch(source: str) -> Path:
    """A local exported folder, or a hub dataset id downloaded into the hub cache."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if source.startswith(("/", ".", "~")):
        raise SharingError(f"method.path={source}: no such folder; give an exported folder or a hub dataset id")
    from huggingface_hub import snapshot_download

    from expansion.weights import hub_reachable, no_network_reason

    try:
        return Path(snapshot_download(source, repo_type="dataset", local_files_only=not hub_reachable()))
    except Exception as exc:
        reason = no_network_reason() if not hub_reachable() else f"{type(exc).__name__}: {exc}".splitlines()[0]
        raise SharingError(
            f"method.path={source}: the hub dataset cannot be fetched ({reason}); download it where there is "
            "network (`huggingface-cli download --repo-type dataset " + source + "`) or give a local folder"
        ) from exc


def missing_import(source: str) -> str | None:
    """For the pre-flight: None when ``source`` can be imported here, else one line with the fix."""
    path = Path(source).expanduser()
    if path.is_dir():
        return (
            None if (path / META_FILE).is_file() else f"method.path={source} holds no {META_FILE}: not an exported set"
        )
    if source.startswith(("/", ".", "~")):
        return f"method.path={source}: no such folder; give an exported folder or a hub dataset id"
    from expansion.weights import Weights, missing

    return missing(Weights("shared expanded set", source, "method.path", hub_files=(META_FILE,), repo_type="dataset"))


#: the files an export writes: a shard's name in expansion.json must be one of these
SHARD_NAME = re.compile(r"data/train-\d{5}-of-\d{5}\.parquet")
_HEX = re.compile(r"[0-9a-f]+")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ShareMeta:
    """``expansion.json`` of a shared set, every field checked (see :func:`read_share_meta`)."""

    path: Path
    store_key: str
    payload: dict[str, Any]
    ratio: int
    num_images: int
    shards: dict[str, str]
    license: str | None

    @property
    def made_from(self) -> dict[str, Any]:
        return self.payload["dataset"]

    @property
    def method(self) -> str:
        return str(self.payload["method"]["method"])


def _field(meta: Any, dotted: str, kind: type | tuple[type, ...], path: Path) -> Any:
    """``meta[a][b]...`` for ``dotted = "a.b"``, of type ``kind``, else one line naming the field."""
    value = meta
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise SharingError(
            f"{path}: field {dotted} is {'missing' if value is None else f'{value!r:.60}'}, expected {names}; "
            "the share is damaged or was not written by `make export`: fetch it again"
        )
    return value


def share_root(folder: Path) -> Path:
    """The folder a share's files must resolve inside: the share itself, or for a hub download (whose
    files link into the repo cache's ``blobs/``) its repo cache folder."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        return folder.parent.parent
    return folder


def _inside(folder: Path, name: str) -> Path:
    """``folder/name`` for a file of the share, refused unless it resolves (symlinks followed) inside
    :func:`share_root`."""
    path = Path(folder) / name
    resolved, root = path.resolve(), share_root(folder)
    if not resolved.is_relative_to(root):
        raise SharingError(
            f"{path} resolves to {resolved}, outside the shared folder {root}: a share's files must lie inside it"
        )
    return path


def read_share_meta(folder: Path) -> ShareMeta:
    """``expansion.json`` parsed and checked field by field: every problem is one line naming the field."""
    path = _inside(folder, META_FILE)
    if not path.is_file():
        raise SharingError(f"{folder} holds no {META_FILE}: not a set exported by `make export`")
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SharingError(f"{path} is not valid JSON ({exc}); fetch the share again") from None
    if not isinstance(meta, dict):
        raise SharingError(f"{path} holds {type(meta).__name__}, not an object; fetch the share again")
    if meta.get("format") != EXPORT_FORMAT:
        raise SharingError(f"{path}: export format {meta.get('format')!r}, this framework reads {EXPORT_FORMAT}")
    key = _field(meta, "store.key", str, path)
    if not _HEX.fullmatch(key):
        raise SharingError(f"{path}: field store.key is {key!r:.60}, expected a hex content key")
    payload = _field(meta, "store.payload", dict, path)
    for name, kind in (
        ("store.payload.dataset.name", str),
        ("store.payload.dataset.train_fingerprint", str),
        ("store.payload.dataset.class_names", list),
        ("store.payload.method.method", str),
        ("store.payload.seed", int),
        ("store.payload.format_version", int),
    ):
        _field(meta, name, kind, path)
    ratio, num_images = _field(meta, "store.ratio", int, path), _field(meta, "num_images", int, path)
    if ratio < 1 or num_images < 1:
        raise SharingError(f"{path}: store.ratio {ratio} and num_images {num_images} must be >= 1")
    shards = _field(meta, "shards", dict, path)
    if not shards:
        raise SharingError(f"{path}: field shards is empty; the share holds no images")
    for name, digest in shards.items():
        if not SHARD_NAME.fullmatch(name):
            raise SharingError(
                f"{path}: shard name {name!r:.80} is not an exported shard's (data/train-NNNNN-of-NNNNN.parquet)"
            )
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise SharingError(f"{path}: field shards.{name} is {digest!r:.60}, expected a sha256 hex digest")
    license_ = meta.get("license")
    if license_ is not None and not isinstance(license_, str):
        raise SharingError(f"{path}: field license is {license_!r:.60}, expected a string or null")
    return ShareMeta(path, key, payload, ratio, num_images, dict(shards), license_)


def read_card(folder: Path, meta: ShareMeta) -> dict[str, Any]:
    """The dataset card's YAML header (README.md), which must parse and agree with ``expansion.json`` on
    the licence and the method (a card edited to say other than the data is refused)."""
    import yaml

    path = _inside(folder, "README.md")
    if not path.is_file():
        raise SharingError(f"{folder} holds no README.md (the dataset card): not a complete exported set")
    text = path.read_text(errors="replace")
    match = re.match(r"---\n(.*?)\n---\n", text, re.DOTALL)
    if not match:
        raise SharingError(f"{path}: no YAML header between --- lines; the dataset card is damaged")
    try:
        header = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise SharingError(f"{path}: the YAML header does not parse ({str(exc).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise SharingError(f"{path}: the YAML header is {type(header).__name__}, not a mapping")
    if header.get("license") != (meta.license or "other"):
        raise SharingError(
            f"{path}: license {header.get('license')!r} differs from {META_FILE}'s {meta.license!r}; "
            "the card and the data disagree"
        )
    if meta.method not in (header.get("tags") or []):
        raise SharingError(f"{path}: tags {header.get('tags')!r} do not name the method {meta.method!r} of {META_FILE}")
    return header


def check_png(data: Any, where: str) -> None:
    """Bytes that are a whole PNG (signature, header, every chunk's CRC; L or RGB; within the
    decompression-bomb limit), else one line."""
    import io

    from PIL import Image

    from experiments.data.datasets.core import MAX_IMAGE_PIXELS

    if not isinstance(data, bytes) or not data.startswith(_PNG_MAGIC):
        raise SharingError(f"{where}: the image bytes are not a PNG")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise SharingError(
                    f"{where}: a {image.width} x {image.height} image, more than max_image_pixels={MAX_IMAGE_PIXELS:,}"
                )
            if image.mode not in ("L", "RGB"):
                raise SharingError(f"{where}: image mode {image.mode}, a store holds L or RGB images")
            image.verify()  # every chunk's CRC, without decoding the pixels (training decodes them later)
    except SharingError:
        raise
    except Exception as exc:
        raise SharingError(f"{where}: the PNG does not decode ({type(exc).__name__}: {exc})") from None


def check_rows(rows: list[dict[str, Any]], ratio: int, train_labels: Any, num_classes: int, where: str) -> None:
    """Rows of a shared or imported set against the training split it claims to expand: every row names
    its image by the store's own pattern (``PPPPPPP_CCC.png`` of its parent and copy), each (parent,
    copy) of the split's parents x ``ratio`` copies exactly once, and a label equal to its parent's (every
    method keeps its seed image's label)."""
    import numpy as np

    labels = np.asarray(train_labels, dtype=np.int64).reshape(-1)
    seen: set[str] = set()
    for i, row in enumerate(rows):
        at = f"{where} row {i}"
        if not isinstance(row, dict):
            raise SharingError(f"{at}: a manifest row must be an object, got {type(row).__name__}")
        parent, copy, label, name = row.get("parent"), row.get("copy"), row.get("label"), row.get("file")
        for field_name, value in (("parent", parent), ("copy", copy), ("label", label)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise SharingError(f"{at}: field {field_name} is {value!r:.60}, expected an integer")
        if not (0 <= parent < len(labels)) or not (0 <= copy < ratio):
            raise SharingError(
                f"{at}: parent {parent} / copy {copy} outside the training split's {len(labels)} images x ratio {ratio}"
            )
        if not isinstance(name, str) or not FILE_NAME.fullmatch(name) or name != image_name(parent, copy):
            raise SharingError(f"{at}: file {name!r:.80} is not {image_name(parent, copy)} (the store's name for it)")
        if name in seen:
            raise SharingError(f"{at}: file {name} appears twice")
        seen.add(name)
        if not 0 <= label < num_classes:
            raise SharingError(f"{at}: label {label} outside the {num_classes} classes 0..{num_classes - 1}")
        if label != labels[parent]:
            raise SharingError(
                f"{at}: label {label} but its parent (training image {parent}) has label {labels[parent]}: "
                "the set was relabelled"
            )
    if len(seen) != len(labels) * ratio:
        raise SharingError(
            f"{where}: {len(seen)} images, the training split's {len(labels)} images x {ratio} need {len(labels) * ratio}"
        )


def read_export(
    folder: Path, data: Any | None = None, meta: ShareMeta | None = None
) -> tuple[ShareMeta, list[dict[str, Any]], list[bytes]]:
    """``(meta, manifest rows, PNG bytes)`` of an exported folder: every shard inside the folder and equal
    to its sha256, every row's label column equal to its manifest row's, every image a PNG; with
    ``data`` (the run's dataset) the rows are checked against its training split (:func:`check_rows`)."""
    import pyarrow.parquet as pq

    meta = meta or read_share_meta(folder)
    rows: list[dict[str, Any]] = []
    images: list[bytes] = []
    for name, digest in meta.shards.items():
        shard = _inside(folder, name)
        if not shard.is_file() or _sha256(shard) != digest:
            raise SharingError(
                f"shard {shard} is missing or damaged (its sha256 differs from {META_FILE}); fetch it again"
            )
        try:
            table = pq.read_table(shard, columns=["image", "label", "manifest_row"]).to_pydict()
        except Exception as exc:
            cause = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise SharingError(
                f"shard {shard} cannot be read as Parquet with image, label, manifest_row ({cause})"
            ) from None
        for i, (image, label, text) in enumerate(zip(table["image"], table["label"], table["manifest_row"])):
            where = f"shard {shard} row {i}"
            try:
                row = json.loads(text)
            except (TypeError, json.JSONDecodeError):
                raise SharingError(f"{where}: manifest_row is not JSON") from None
            if not isinstance(row, dict) or row.get("label") != label:
                raise SharingError(f"{where}: the label column ({label}) and manifest_row disagree")
            png = image.get("bytes") if isinstance(image, dict) else None
            check_png(png, where)
            rows.append(row)
            images.append(png)
    if len(rows) != meta.num_images:
        raise SharingError(f"{folder}: {len(rows)} images in the shards, {META_FILE} says {meta.num_images}")
    if data is not None:
        check_rows(rows, meta.ratio, data.train.labels, data.num_classes, str(folder))
    return meta, rows, images


def _check_source(source: str, meta: ShareMeta, identity: dict[str, Any]) -> None:
    made_from = meta.made_from
    if made_from["train_fingerprint"] != identity["train_fingerprint"] or [
        str(c) for c in made_from["class_names"]
    ] != [str(c) for c in identity["class_names"]]:
        raise SharingError(
            f"method.path={source} was expanded from another training set: its source fingerprint is "
            f"{made_from['train_fingerprint']} ({made_from['name']}), this run's training split is "
            f"{identity['train_fingerprint']} ({identity['name']}); use the dataset settings it was made with"
        )


def open_share(source: str, data: Any) -> tuple[Path, ShareMeta]:
    """The share's folder and its checked record: expansion.json, the card, and its source (the run's
    training split ``data``: same fingerprint and classes)."""
    folder = fetch(source)
    meta = read_share_meta(folder)
    read_card(folder, meta)
    _check_source(source, meta, data.identity)
    return folder, meta


def check_share(source: str, data: Any) -> ShareMeta:
    """Everything :func:`import_set` checks before it writes anything (for the pre-flight too): the
    share's record, card, shards, rows and images against the run's training split ``data``."""
    folder, meta = open_share(source, data)
    read_export(folder, data, meta)
    return meta


def import_set(source: str, store_dir: Path, data: Any, *, verify_digests: bool = True):
    """An exported set as a store folder under ``store_dir`` (written once per set, then reused); its
    source must be the training split in use (same fingerprint and classes). The copy is a complete store
    with its digests: on reuse it is checked like one (a damaged copy is rebuilt from the share, with a
    warning) and its rows against the split again. Returns the engine's
    :class:`~expansion.engine.ExpansionResult`, the set's ratio and the method that made it."""
    from expansion.engine import ExpansionResult

    start = time.perf_counter()
    folder, meta = open_share(source, data)
    key = "imported-" + content_key({"store": meta.store_key, "shards": meta.shards})
    target = Path(store_dir) / key
    store = ExpansionStore(target, key, meta.payload)
    reused = (target / IMPORTED_MARKER).is_file()
    if reused:
        try:
            damaged = store.check(digests=verify_digests)
            rows = store.read_rows()
            check_rows(rows, meta.ratio, data.train.labels, data.num_classes, str(target / "manifest.jsonl"))
        except (ExpansionError, OSError) as exc:
            damaged = [{"file": "manifest.jsonl", "problem": str(exc).splitlines()[0]}]
        if damaged:
            log.warning(
                "imported copy %s is damaged (%s: %s); rebuilding it from %s",
                target,
                damaged[0]["file"],
                damaged[0].get("problem"),
                source,
            )
            reused = False
    if not reused:
        _, rows, images = read_export(folder, data, meta)
        write_imported_copy(target, meta, rows, images, source)
    result = ExpansionResult(
        expanded=ExpandedSet(target, rows),
        store=store,
        generated_images=0,
        reused=reused,
        seconds=time.perf_counter() - start,
        info={"imported_from": source, "original_store_key": meta.store_key, "license": meta.license},
    )
    return result, meta.ratio, meta.method


def write_imported_copy(
    target: Path, meta: ShareMeta, rows: list[dict[str, Any]], images: list[bytes], source: str
) -> None:
    """The checked rows and images as a complete store in ``target`` (built beside it, moved in whole),
    with the digests a store's reuse check reads; file names come from :func:`check_rows`' pattern only,
    so nothing is written outside ``target``."""
    from expansion.store import FORMAT_VERSION, complete_meta, digest_of

    names = [image_name(r["parent"], r["copy"]) for r in rows]
    manifest = "".join(canonical_json(r) + "\n" for r in rows)
    head = {"key": target.name, "format_version": FORMAT_VERSION, "ratio": meta.ratio, "payload": meta.payload}
    store_meta = complete_meta(head, rows, manifest, {n: [len(p), digest_of(p)] for n, p in zip(names, images)})
    with atomic_directory(target) as tmp:
        (tmp / "images").mkdir()
        for name, png in zip(names, images):
            (tmp / "images" / name).write_bytes(png)
        (tmp / "manifest.jsonl").write_text(manifest)
        (tmp / "meta.json").write_text(json.dumps(store_meta, indent=1))
        (tmp / IMPORTED_MARKER).write_text(json.dumps({"source": source, "store_key": meta.store_key}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="a store, run or sweep folder -> a Hugging Face datasets folder")
    exp.add_argument("src", type=Path)
    exp.add_argument("out", type=Path)
    exp.add_argument("--push-to-hub", metavar="REPO", help="also upload it as a hub dataset repo")
    args = parser.parse_args(argv)
    try:
        done = export(args.src, args.out)
        for e in done:
            print(
                f"{e.folder}: {e.num_images} images in {e.shards} shard(s), {e.seconds:.2f} s ({e.images_per_second:.0f} images/s)"
            )
            if args.push_to_hub:
                repo = args.push_to_hub if len(done) == 1 else f"{args.push_to_hub}-{e.folder.name}"
                print(f"pushed to {push_to_hub(e.folder, repo)}")
    except ExpansionError as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
