"""A shared set is untrusted input. Each hostile share below is re-signed as its sender could (the shard
sha256 in expansion.json recomputed), so only the import's own checks stand between it and the disk:
each is refused in one line naming what is wrong, and nothing outside the cache folder changes. The
decoded copy the import keeps in the cache is checked on every reuse and rebuilt from the share when
damaged."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.data import sharing
from experiments.data.datasets import build_dataset
from experiments.data.sharing import SharingError
from experiments.training.pipeline import run
from tests.conftest import compose, job_config

FAST = ["train.epochs=2", "quality.enabled=false", "logger=none", "train.compare_original=false"]


def _job(overrides):
    return job_config(overrides + FAST)


@pytest.fixture(scope="module")
def share(tmp_path_factory):
    """The digits default (randaugment x2) expanded once and exported: ``(export folder, dataset)``."""
    root = tmp_path_factory.mktemp("share")
    metrics = run(_job(["dataset=digits", "method.ratio=2", f"paths.cache_dir={root / 'cache'}"]), root / "run")
    out = root / "shared"
    sharing.export(Path(metrics.expansion.store), out)
    return out, build_dataset(compose(["dataset=digits"]).dataset)


def _tree(root: Path, skip: Path) -> dict[str, tuple]:
    """Every path under ``root`` but ``skip`` with its kind, size and mtime (what a write would change)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip or skip in Path(dirpath).parents:
            continue
        for name in dirnames + filenames:
            st = os.lstat(Path(dirpath) / name)
            found[str(Path(dirpath, name).relative_to(root))] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return found


def _shard(folder: Path) -> Path:
    return next((folder / "data").glob("*.parquet"))


def _resign(folder: Path) -> None:
    """What a sender writes: every shard's sha256 recomputed into expansion.json."""
    meta_path = folder / sharing.META_FILE
    meta = json.loads(meta_path.read_text())
    meta["shards"] = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in meta.get("shards", {})}
    meta_path.write_text(json.dumps(meta))


def _edit_rows(folder: Path, edit) -> None:
    """Rewrite the shard's rows through ``edit(rows)`` (rows: dicts of image, label, manifest_row
    parsed), then re-sign."""
    shard = _shard(folder)
    table = pq.read_table(shard)
    columns = table.to_pydict()
    rows = [
        {"image": dict(image), "label": label, "manifest_row": json.loads(text)}
        for image, label, text in zip(columns["image"], columns["label"], columns["manifest_row"])
    ]
    rows = edit(rows)
    new = {name: list(values) for name, values in columns.items()}
    new["image"] = [r["image"] for r in rows]
    new["label"] = [r["label"] for r in rows]
    new["manifest_row"] = [json.dumps(r["manifest_row"]) for r in rows]
    for name in columns:
        if name not in ("image", "label", "manifest_row"):
            new[name] = new[name][: len(rows)] + new[name][: max(0, len(rows) - len(new[name]))]
    pq.write_table(pa.Table.from_pydict(new, schema=table.schema), shard)
    _resign(folder)


def _set_row(index: int, **changes):
    def edit(rows):
        row = rows[index]
        for key, value in changes.items():
            if key == "bytes":
                row["image"]["bytes"] = value
            else:
                row["manifest_row"][key] = value
                if key == "label":
                    row["label"] = value
        return rows

    return edit


def _relabel(rows):
    for row in rows[:80]:
        row["manifest_row"]["label"] = row["label"] = (row["label"] + 1) % 10
    return rows


def _duplicate(rows):
    rows[1] = copy.deepcopy(rows[0])
    return rows


def _edit_meta(folder: Path, edit) -> None:
    path = folder / sharing.META_FILE
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))


def _symlinked_shard(folder: Path) -> None:
    """The shard replaced by a link to a copy outside the share (same bytes, so its sha256 matches)."""
    shard = _shard(folder)
    outside = folder.parent / "elsewhere.parquet"
    shutil.copy(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)


PTH_PAYLOAD = b"import pathlib; pathlib.Path(__file__).with_name('PWNED').write_text('x')\n"


def hostile_cases(tmp: Path) -> dict[str, tuple]:
    """name -> (how the share is made hostile, the one-line refusal it must get)."""
    return {
        "traversal": (lambda f: _edit_rows(f, _set_row(0, file="../../../outside/evil.png")), r"row 0: file '\.\./"),
        "absolute path": (
            lambda f: _edit_rows(f, _set_row(0, file=str(tmp / "abs" / "evil.png"))),
            r"row 0: file '/.*' is not 0000000_000\.png",
        ),
        "pth payload": (
            lambda f: _edit_rows(f, _set_row(3, file="../../../site-packages/evil.pth", bytes=PTH_PAYLOAD)),
            r"the image bytes are not a PNG",
        ),
        "damaged shard": (
            lambda f: _shard(f).write_bytes(_shard(f).read_bytes()[:-100]),  # not re-signed: a transfer error
            r"shard .* is missing or damaged \(its sha256 differs",
        ),
        "not a png": (lambda f: _edit_rows(f, _set_row(2, bytes=b"GIF89a" + b"\0" * 40)), r"row 2: the image bytes"),
        "symlinked shard": (_symlinked_shard, r"resolves to .*elsewhere\.parquet, outside the shared folder"),
        "shard name outside": (
            lambda f: _edit_meta(f, lambda m: m.update(shards={"../../x.parquet": "0" * 64})),
            r"shard name '\.\./\.\./x\.parquet' is not an exported shard's",
        ),
        "relabelled rows": (lambda f: _edit_rows(f, _relabel), r"row 0: label \d but its parent .* relabelled"),
        "label 99": (lambda f: _edit_rows(f, _set_row(0, label=99)), r"row 0: label 99 outside the 10 classes"),
        "label -1": (lambda f: _edit_rows(f, _set_row(5, label=-1)), r"row 5: label -1 outside the 10 classes"),
        "duplicate rows": (lambda f: _edit_rows(f, _duplicate), r"row 1: file 0000000_000\.png appears twice"),
        "bad json": (lambda f: (f / sharing.META_FILE).write_text("{not json"), r"expansion\.json is not valid JSON"),
        "no store key": (
            lambda f: _edit_meta(f, lambda m: m["store"].pop("key")),
            r"field store\.key is missing, expected str",
        ),
        "store not an object": (
            lambda f: _edit_meta(f, lambda m: m.update(store=[1, 2])),
            r"field store\.key is missing",
        ),
        "ratio a string": (
            lambda f: _edit_meta(f, lambda m: m["store"].update(ratio="2")),
            r"field store\.ratio is '2'",
        ),
        "card says another licence": (
            lambda f: (f / "README.md").write_text((f / "README.md").read_text().replace("cc-by-4.0", "mit", 1)),
            r"README\.md: license 'mit' differs from expansion\.json's",
        ),
        "card header broken": (
            lambda f: (f / "README.md").write_text("---\n[unclosed\n---\n"),
            r"README\.md: the YAML header does not parse",
        ),
    }


CASES = list(hostile_cases(Path("/tmp")))


@pytest.mark.integration
@pytest.mark.parametrize("case", CASES)
def test_a_hostile_share_is_refused_in_one_line_and_writes_nothing_outside_the_cache(case, share, tmp_path):
    exported, data = share
    folder = tmp_path / "incoming" / "share"
    shutil.copytree(exported, folder)
    make_hostile, message = hostile_cases(tmp_path)[case]
    make_hostile(folder)
    cache = tmp_path / "cache"
    before = _tree(tmp_path, cache)
    with pytest.raises(SharingError, match=message) as caught:
        sharing.import_set(str(folder), cache / "stores", data)
    assert "\n" not in str(caught.value)
    assert _tree(tmp_path, cache) == before  # nothing written, moved or removed outside the cache
    assert not list(tmp_path.rglob("PWNED")) and not list(tmp_path.rglob("evil*"))
    # the pre-flight runs the same checks: the job is stopped before it starts, with the same line
    from experiments.training import preflight

    report = preflight.check_jobs([_job(["dataset=digits", "method=imported", f"method.path={folder}"])], ["j"])
    assert any(caught.value.args[0] in p for p in report.problems), list(report.problems)


def test_the_preflight_names_a_share_made_from_another_training_split(share):
    exported, _ = share
    from experiments.training import preflight

    job = _job(["dataset=digits", "dataset.train_per_class=10", "method=imported", f"method.path={exported}"])
    (problem,) = preflight.check_jobs([job], ["j"]).problems
    assert "was expanded from another training set: its source fingerprint is" in problem


def test_a_sound_share_passes_the_same_checks(share, tmp_path):
    exported, data = share
    result, ratio, method = sharing.import_set(str(exported), tmp_path / "stores", data)
    assert (ratio, method, len(result.expanded)) == (2, "randaugment", 2 * len(data.train))
    assert result.store.check(digests=True) == []  # the decoded copy is a store with its digests
    assert result.info["license"] == "cc-by-4.0"


@pytest.mark.parametrize("tamper", ["swapped png", "relabelled manifest", "deleted image", "meta re-signed relabel"])
def test_a_tampered_imported_copy_is_rebuilt_from_the_share(tamper, share, tmp_path, caplog):
    exported, data = share
    stores = tmp_path / "stores"
    first, _, _ = sharing.import_set(str(exported), stores, data)
    decoded = first.store.root
    images = sorted((decoded / "images").iterdir())
    originals = {p.name: p.read_bytes() for p in images}
    manifest = (decoded / "manifest.jsonl").read_text()
    if tamper == "swapped png":
        images[0].write_bytes(images[1].read_bytes())
    elif tamper == "deleted image":
        images[3].unlink()
    else:
        rows = [json.loads(line) for line in manifest.splitlines()]
        for row in rows[:80]:
            row["label"] = (row["label"] + 1) % 10
        text = "".join(json.dumps(r, sort_keys=True, separators=(",", ":")) + "\n" for r in rows)
        (decoded / "manifest.jsonl").write_text(text)
        if tamper == "meta re-signed relabel":  # the digest recorded again: only the label rule catches it
            meta = json.loads((decoded / "meta.json").read_text())
            meta["manifest_sha256"] = hashlib.sha256(text.encode()).hexdigest()
            (decoded / "meta.json").write_text(json.dumps(meta))
    again, _, _ = sharing.import_set(str(exported), stores, data)
    assert not again.reused and "is damaged" in caplog.text and "rebuilding it from" in caplog.text
    assert {p.name: p.read_bytes() for p in (decoded / "images").iterdir()} == originals
    assert (decoded / "manifest.jsonl").read_text() == manifest
    assert again.store.check(digests=True) == []
    third, _, _ = sharing.import_set(str(exported), stores, data)
    assert third.reused  # a sound copy is reused as it is
