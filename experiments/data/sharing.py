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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from expansion.errors import ExpansionError
from expansion.files import atomic_directory, canonical_json, content_key
from expansion.store import ExpandedSet, ExpansionStore

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
    for metrics_path in sorted(src.rglob("metrics.json")):
        store = (json.loads(metrics_path.read_text()).get("expansion") or {}).get("store")
        if store and not (Path(store) / IMPORTED_MARKER).is_file():  # an imported copy is already shared
            found.setdefault(Path(store), metrics_path.parent)
    if not found:
        raise SharingError(f"no finished expansion store in or under {src}: give a store folder or a run/sweep folder")
    return list(found.items())


def _licence(dataset_name: str) -> str | None:
    """The source data's licence, where its dataset config states one (``license:``)."""
    import yaml

    from experiments.config import CONFIG_DIR

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

    from experiments.training.environment import git_state, version

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
    metrics = (
        json.loads((run_dir / "metrics.json").read_text()) if run_dir and (run_dir / "metrics.json").is_file() else {}
    )
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
            "quality": metrics.get("quality"),
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        (tmp / "README.md").write_text(dataset_card(meta))
    return Exported(out, len(rows), n_shards, time.perf_counter() - start)


def export(src: Path, out: Path) -> list[Exported]:
    """Every store of ``src`` (a store, run or sweep folder): one store -> ``out``; several ->
    ``out/<store key>/`` each."""
    stores = find_stores(src)
    if len(stores) == 1:
        return [export_store(stores[0][0], out, stores[0][1])]
    return [export_store(store, Path(out) / store.name, run) for store, run in stores]


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


def read_export(folder: Path) -> tuple[dict[str, Any], list[dict[str, Any]], list[bytes]]:
    """``(meta, manifest rows, PNG bytes)`` of an exported folder, every shard checked against its sha256."""
    import pyarrow.parquet as pq

    meta_path = folder / META_FILE
    if not meta_path.is_file():
        raise SharingError(f"{folder} holds no {META_FILE}: not a set exported by `make export`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise SharingError(f"{meta_path}: export format {meta.get('format')!r}, this framework reads {EXPORT_FORMAT}")
    rows: list[dict[str, Any]] = []
    images: list[bytes] = []
    for name, digest in meta["shards"].items():
        shard = folder / name
        if not shard.is_file() or _sha256(shard) != digest:
            raise SharingError(
                f"shard {shard} is missing or damaged (its sha256 differs from {META_FILE}); fetch it again"
            )
        table = pq.read_table(shard, columns=["image", "manifest_row"]).to_pydict()
        rows += [json.loads(r) for r in table["manifest_row"]]
        images += [image["bytes"] for image in table["image"]]
    if len(rows) != meta["num_images"]:
        raise SharingError(f"{folder}: {len(rows)} images in the shards, {META_FILE} says {meta['num_images']}")
    return meta, rows, images


def import_set(source: str, store_dir: Path, identity: dict[str, Any]):
    """An exported set as a store folder under ``store_dir`` (written once per set, then reused); its
    source must be the training split in use (same fingerprint and classes). Returns the engine's
    :class:`~expansion.engine.ExpansionResult` and the set's ratio."""
    from expansion.engine import ExpansionResult

    start = time.perf_counter()
    folder = fetch(source)
    meta = json.loads((folder / META_FILE).read_text()) if (folder / META_FILE).is_file() else None
    if meta is None:
        read_export(folder)  # raises the clear error
    made_from = meta["store"]["payload"]["dataset"]
    if made_from["train_fingerprint"] != identity["train_fingerprint"] or list(made_from["class_names"]) != list(
        identity["class_names"]
    ):
        raise SharingError(
            f"method.path={source} was expanded from another training set: its source fingerprint is "
            f"{made_from['train_fingerprint']} ({made_from['name']}), this run's training split is "
            f"{identity['train_fingerprint']} ({identity['name']}); use the dataset settings it was made with"
        )
    key = "imported-" + content_key({"store": meta["store"]["key"], "shards": meta["shards"]})
    target = Path(store_dir) / key
    reused = (target / IMPORTED_MARKER).is_file()
    if not reused:
        _, rows, images = read_export(folder)
        with atomic_directory(target) as tmp:
            (tmp / "images").mkdir()
            for row, png in zip(rows, images):
                (tmp / "images" / row["file"]).write_bytes(png)
            (tmp / "manifest.jsonl").write_text("".join(canonical_json(r) + "\n" for r in rows))
            (tmp / IMPORTED_MARKER).write_text(json.dumps({"source": source, "store_key": meta["store"]["key"]}))
    rows = [json.loads(line) for line in (target / "manifest.jsonl").read_text().splitlines() if line]
    store = ExpansionStore(target, key, meta["store"]["payload"])
    result = ExpansionResult(
        expanded=ExpandedSet(target, rows),
        store=store,
        generated_images=0,
        reused=reused,
        seconds=time.perf_counter() - start,
        info={"imported_from": source, "original_store_key": meta["store"]["key"]},
    )
    return result, int(meta["store"]["ratio"]), meta["store"]["payload"]["method"]["method"]


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
