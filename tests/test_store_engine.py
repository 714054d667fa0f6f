"""The expansion store and engine: keys, atomic writes, reuse, resume after a real kill,
batch-size independence, locking, format versions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from expansion import store as store_mod
from expansion.base import ExpansionError
from expansion.engine import expand_dataset
from expansion.seeding import image_seeds
from expansion.store import ExpansionStore, store_key
from experiments.data.datasets import build_dataset
from experiments.data.datasets.core import read_image
from tests.helpers.expanders import NoiseShift

HELPERS = Path(__file__).parent / "helpers"


@pytest.fixture(scope="module")
def breast(shared_data):
    cfg = OmegaConf.create(
        {
            "name": "breastmnist",
            "loader": "medmnist",
            "root": f"{shared_data}/medmnist",
            "image_size": 28,
            "train_per_class": 12,
        }
    )
    return build_dataset(cfg)


def _expand(data, tmp_path, expander, seed=5, batch_size=8):
    return expand_dataset(
        expander,
        data.train,
        data.identity,
        store_dir=tmp_path / "stores",
        fit_dir=tmp_path / "fits",
        seed=seed,
        batch_size=batch_size,
    )


def test_image_seeds_are_per_image_and_stable():
    a = image_seeds(3, [0, 1, 2], 4)
    assert a.shape == (3, 4) and a.dtype == torch.int64
    assert len(set(a.flatten().tolist())) == 12
    assert torch.equal(image_seeds(3, [2], 4)[0], a[2])  # independent of which other parents are in the batch
    assert not torch.equal(image_seeds(4, [0, 1, 2], 4), a)
    assert (a >= 0).all()


def test_store_key_changes_with_every_component():
    ident, sig = {"name": "d", "train_fingerprint": "abc"}, {"method": "m", "ratio": 5}
    key, _ = store_key(ident, sig, 0)
    assert store_key(dict(ident), dict(sig), 0)[0] == key
    assert store_key({**ident, "train_fingerprint": "abd"}, sig, 0)[0] != key
    assert store_key(ident, {**sig, "ratio": 6}, 0)[0] != key
    assert store_key(ident, sig, 1)[0] != key


def test_store_key_changes_with_format_version(monkeypatch):
    key, _ = store_key({"a": 1}, {"b": 2}, 0)
    monkeypatch.setattr(store_mod, "FORMAT_VERSION", store_mod.FORMAT_VERSION + 1)
    assert store_key({"a": 1}, {"b": 2}, 0)[0] != key


def test_expansion_writes_images_and_manifest(breast, tmp_path):
    result = _expand(breast, tmp_path, NoiseShift(3))
    rows = result.expanded.rows
    assert len(rows) == 3 * len(breast.train) == result.generated_images
    assert [(r["parent"], r["copy"]) for r in rows] == [(p, c) for p in range(len(breast.train)) for c in range(3)]
    assert all(r["label"] == int(breast.train.labels[r["parent"]]) for r in rows)
    assert {"seed", "file", "noise_mean"} <= set(rows[0])
    assert all(p.is_file() for p in result.expanded.paths)
    meta = json.loads((result.store.root / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["num_images"] == len(rows)
    assert not (result.store.root / "chunks").exists()
    assert not list(result.store.root.rglob("*.tmp-*"))


def test_second_run_generates_nothing(breast, tmp_path):
    first = _expand(breast, tmp_path, NoiseShift(3))
    before = {p: p.stat().st_mtime_ns for p in first.expanded.paths}
    second = _expand(breast, tmp_path, NoiseShift(3))
    assert second.reused and second.generated_images == 0
    assert second.store.root == first.store.root
    assert {p: p.stat().st_mtime_ns for p in second.expanded.paths} == before


def test_output_independent_of_batch_size(breast, tmp_path):
    a = _expand(breast, tmp_path / "a", NoiseShift(3), batch_size=3)
    b = _expand(breast, tmp_path / "b", NoiseShift(3), batch_size=16)
    assert a.store.key == b.store.key
    assert a.store.content_hash() == b.store.content_hash()


@pytest.mark.integration
def test_two_devices_shard_to_the_same_store(breast, tmp_path):
    """Trainer.predict over 2 CPU processes (DDP) writes the same store as one process."""
    single = _expand(breast, tmp_path / "one", NoiseShift(2), batch_size=5)
    sharded = expand_dataset(
        NoiseShift(2),
        breast.train,
        breast.identity,
        store_dir=tmp_path / "two" / "stores",
        fit_dir=tmp_path / "two" / "fits",
        seed=5,
        batch_size=3,
        trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn"},
    )
    assert sharded.generated_images == 2 * len(breast.train)
    assert sharded.store.content_hash() == single.store.content_hash()


def test_different_seed_or_setting_gives_a_new_store(breast, tmp_path):
    a = _expand(breast, tmp_path, NoiseShift(3))
    assert _expand(breast, tmp_path, NoiseShift(3), seed=6).store.key != a.store.key
    assert _expand(breast, tmp_path, NoiseShift(3, amplitude=10.0)).store.key != a.store.key
    # a speed-only setting does not change the key
    assert NoiseShift(3, delay=0.5).signature() == NoiseShift(3).signature()


def test_partial_store_resumes_without_redoing_done_parents(breast, tmp_path):
    full = _expand(breast, tmp_path / "full", NoiseShift(2))
    # simulate a run that stopped after some batches: keep two chunks' worth of work
    partial = ExpansionStore.at(tmp_path / "part" / "stores", breast.identity, NoiseShift(2).signature(), 5)
    partial.open_for_writing(2)
    rows = full.expanded.rows
    first = [dict(r) for r in rows if r["parent"] < 5]
    images = torch.stack([read_image(full.expanded.root / "images" / r["file"], 1) for r in first])
    partial.write_batch(images, first)
    # an orphan temp file, as a kill during a write leaves behind
    (partial.images_dir / "0000009_000.png.tmp-xyz").write_bytes(b"partial")
    assert partial.done_parents(2) == set(range(5))
    resumed = _expand(breast, tmp_path / "part", NoiseShift(2))
    assert resumed.generated_images == 2 * (len(breast.train) - 5)
    assert resumed.store.content_hash() == full.store.content_hash()
    assert not list(resumed.store.root.rglob("*.tmp-*"))


def test_store_from_another_format_version_is_refused(breast, tmp_path):
    result = _expand(breast, tmp_path, NoiseShift(2))
    meta = json.loads(result.store.meta_path.read_text())
    meta["format_version"] = 999
    result.store.meta_path.write_text(json.dumps(meta))
    with pytest.raises(ExpansionError, match="format version 999"):
        _expand(breast, tmp_path, NoiseShift(2))


def test_finalize_refuses_incomplete_store(tmp_path):
    store = ExpansionStore(tmp_path / "s", "k", {})
    store.open_for_writing(2)
    store.write_batch(
        torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        [{"parent": 0, "copy": 0, "label": 0, "seed": 1}, {"parent": 0, "copy": 1, "label": 0, "seed": 2}],
    )
    with pytest.raises(ExpansionError, match="no complete expansion"):
        store.finalize(range(2), 2)
    assert not store.is_complete()


def _run_job(shared, cache, delay, batch_size=2, limit=12):
    return subprocess.Popen(
        [
            sys.executable,
            str(HELPERS / "expand_job.py"),
            str(shared),
            str(cache),
            str(delay),
            str(batch_size),
            str(limit),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


@pytest.mark.integration
def test_killed_generation_resumes_to_the_same_store(shared_data, tmp_path):
    """kill -9 a real generation process mid-way, rerun: same manifest and images as an uninterrupted run."""
    reference = _run_job(shared_data, tmp_path / "ref", 0.0)
    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    ref_root = Path(out.split()[1])

    cache = tmp_path / "killed"
    job = _run_job(shared_data, cache, 0.15)
    chunks_dir = None
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until some (not all) batches are written
        found = list((cache / "stores").glob("*/chunks/*.jsonl")) if (cache / "stores").exists() else []
        if len(found) >= 3:
            chunks_dir = found[0].parent
            break
        time.sleep(0.05)
    assert chunks_dir is not None, "the job wrote no chunk in time"
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert job.returncode == -signal.SIGKILL
    store_root = chunks_dir.parent
    assert not (store_root / "manifest.jsonl").exists()
    done_before = len(list(chunks_dir.glob("*.jsonl")))

    rerun = _run_job(shared_data, cache, 0.0)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    generated = int(out.split()[2])
    assert 0 < generated < 24 * 3 - done_before  # resumed: finished batches were not redone
    assert (store_root / "manifest.jsonl").read_text() == (ref_root / "manifest.jsonl").read_text()
    ref = ExpansionStore(ref_root, "", {})
    assert ExpansionStore(store_root, "", {}).content_hash() == ref.content_hash()


@pytest.mark.integration
def test_concurrent_jobs_one_generates_other_reuses(shared_data, tmp_path):
    cache = tmp_path / "shared-cache"
    a = _run_job(shared_data, cache, 0.05)
    time.sleep(0.5)
    b = _run_job(shared_data, cache, 0.05)
    out_a, err_a = a.communicate(timeout=300)
    out_b, err_b = b.communicate(timeout=300)
    assert a.returncode == 0 and b.returncode == 0, (err_a, err_b)
    generated = sorted([int(out_a.split()[2]), int(out_b.split()[2])])
    assert generated == [0, 24 * 3]
    assert out_a.split()[1] == out_b.split()[1]
