"""Bad input, end to end through ``pipeline.run``: every case ends in one clear error, and the
run dir and the store hold nothing half-written (no metrics.json, no temporary file, no chunk
naming a missing image, no image without its chunk). Mixed image modes and sizes are not an
error: they are converted, and the test shows it."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from expansion import files as files_mod
from expansion import store as store_mod
from expansion.base import ExpansionError
from expansion.store import ExpansionStore
from experiments.data.datasets import DatasetError, build_dataset
from experiments.training.job import Job
from experiments.training.pipeline import run, run_expansion
from tests.conftest import job_config

FAST = ["train.epochs=1", "quality.enabled=false", "logger=none", "train.compare_original=false"]


def _cfg(overrides):
    return job_config(overrides + FAST)


def _stores(tmp_path) -> list[Path]:
    root = tmp_path / "cache" / "stores"
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


def assert_nothing_half_written(tmp_path, run_dir):
    """No metrics.json or checkpoint from the failed run, no temporary file anywhere, and every
    store is consistent: chunks name only images that exist, every image has its chunk."""
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.rglob("*.ckpt"))
    assert not list(tmp_path.rglob("*.tmp-*"))
    for root in _stores(tmp_path):
        store = ExpansionStore(root, "", {})
        if store.is_complete():
            assert store.verify() == []
            continue
        rows = store.read_chunks()
        named = {r["file"] for r in rows}
        on_disk = {p.name for p in store.images_dir.iterdir()} if store.images_dir.is_dir() else set()
        assert named == on_disk, (
            f"images without a chunk: {on_disk - named}, chunk rows without image: {named - on_disk}"
        )


def _image_folder(root: Path, classes=("a", "b"), n=4, size=(12, 12), mode="RGB"):
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                color = i * 50 if mode == "L" else (i * 50, 30, 200)
                Image.new(mode, size, color).save(root / split / c / f"{i}.png")


def _folder_cfg(root: Path, *extra):
    return _cfg(
        [
            "dataset=imagefolder",
            f"dataset.path={root}",
            "dataset.image_size=12",
            "dataset.val_fraction=0.25",
            "method=cutout",
            "method.ratio=1",
            *extra,
        ]
    )


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_or_truncated_image_is_named(tmp_path, damage):
    _image_folder(tmp_path / "data")
    bad = tmp_path / "data" / "train" / "b" / "3.png"
    noise = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    Image.fromarray(noise).save(bad)
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)
    with pytest.raises(DatasetError, match=r"unreadable image .*train/b/3\.png"):
        run(_folder_cfg(tmp_path / "data"), tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    assert _stores(tmp_path) == []  # the data is decoded before any expansion


def test_empty_class_folder_is_named(tmp_path):
    _image_folder(tmp_path / "data")
    (tmp_path / "data" / "train" / "c_empty").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*train/c_empty holds no images"):
        run(_folder_cfg(tmp_path / "data"), tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    assert _stores(tmp_path) == []


def test_mixed_modes_and_sizes_are_converted_and_run(tmp_path):
    """L, RGB, RGBA and palette images of different sizes become one 3-channel 12 px set."""
    root = tmp_path / "data"
    _image_folder(root)
    Image.new("L", (30, 7), 90).save(root / "train" / "a" / "gray.png")
    Image.new("RGBA", (5, 9), (200, 10, 10, 128)).save(root / "train" / "a" / "alpha.png")
    Image.new("P", (16, 16), 3).save(root / "train" / "b" / "palette.png")
    Image.new("RGB", (40, 20), (1, 2, 3)).save(root / "test" / "b" / "wide.jpg")
    metrics = run(_folder_cfg(root), tmp_path / "run")
    assert metrics.sizes["train"] + metrics.sizes["val"] == 11
    store = ExpansionStore(Path(metrics.expansion.store), "", {})
    assert store.verify() == []
    shapes = {Image.open(p).size + (Image.open(p).mode,) for p in store.images_dir.iterdir()}
    assert shapes == {(12, 12, "RGB")}


def test_16_bit_image_is_refused_not_clipped(tmp_path):
    """A 16-bit scan (common for medical images) would be clipped to white by an 8-bit conversion."""
    _image_folder(tmp_path / "data", mode="L")
    wide = (np.arange(144).reshape(12, 12) * 400).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "data" / "train" / "a" / "scan16.png")
    with pytest.raises(DatasetError, match=r"scan16\.png has I;16 pixels \(more than 8 bits per channel\); convert"):
        run(_folder_cfg(tmp_path / "data"), tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    assert _stores(tmp_path) == []


def test_mixed_sizes_without_an_image_size_is_an_error(tmp_path):
    root = tmp_path / "data"
    _image_folder(root)
    Image.new("RGB", (30, 7)).save(root / "train" / "a" / "wide.png")
    with pytest.raises(DatasetError, match="images of different sizes in one split; set dataset.image_size"):
        run(_folder_cfg(root, "dataset.image_size=null"), tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")


def _breastmnist_copy(shared_data, tmp_path, **changes) -> Path:
    raw = dict(np.load(shared_data / "medmnist" / "breastmnist.npz"))
    raw.update(changes)
    folder = tmp_path / "medmnist"
    folder.mkdir()
    np.savez(folder / "breastmnist.npz", **raw)
    return folder


def test_label_out_of_range(shared_data, tmp_path):
    raw = np.load(shared_data / "medmnist" / "breastmnist.npz")
    labels = raw["train_labels"].copy()
    labels[5, 0] = 7
    folder = _breastmnist_copy(shared_data, tmp_path, train_labels=labels)
    with pytest.raises(DatasetError, match=r"train_labels span \[0, 7\] but the dataset has 2 classes"):
        run(
            _cfg(["dataset=breastmnist", f"dataset.root={folder}", "method=cutout", "method.ratio=1"]), tmp_path / "run"
        )
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    assert _stores(tmp_path) == []


def test_class_count_differs_from_config(shared_data, tmp_path):
    with pytest.raises(DatasetError, match="config says num_classes=3 but the data has 2 classes"):
        run(_cfg(["dataset=breastmnist", "dataset.num_classes=3", "method=cutout", "method.ratio=1"]), tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    assert _stores(tmp_path) == []


def _faulty(name: str, **params):
    return {"name": name, "_target_": f"tests.helpers.faulty_expanders.{name}", "batch_size": 10, **params}


def _digits_with(method: dict):
    cfg = _cfg(["dataset=digits"])
    cfg.method = OmegaConf.create(method)
    return cfg


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_generator_output_is_never_stored(tmp_path, value):
    cfg = _digits_with(_faulty("NonFiniteGenerator", ratio=2, first_bad_batch=3, value=value))
    with pytest.raises(ExpansionError, match="generator produced .* non-finite pixel values .*nothing was stored"):
        run(cfg, tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    (store_root,) = _stores(tmp_path)
    store = ExpansionStore(store_root, "", {})
    assert not store.is_complete()
    # the three sound batches (30 seeds) are kept for a resume, nothing of the diverged one
    assert sorted({r["parent"] for r in store.read_chunks()}) == list(range(30))


def test_non_finite_guidance_gradient_is_never_stored(tmp_path):
    cfg = _digits_with(_faulty("NonFiniteGuide", ratio=2, first_bad_batch=2))
    with pytest.raises(ExpansionError, match="guidance gradient is not finite"):
        run(cfg, tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    (store_root,) = _stores(tmp_path)
    assert sorted({r["parent"] for r in ExpansionStore(store_root, "", {}).read_chunks()}) == list(range(20))


def test_disk_full_while_writing_the_store(tmp_path, monkeypatch):
    """ENOSPC in the middle of a batch (after some of its images are written): a clear error,
    the batch's images and temporaries removed, earlier batches kept; a rerun resumes to the
    same store as an uninterrupted run."""
    overrides = ["dataset=digits", "method=cutout", "method.ratio=2", "method.batch_size=25"]
    real_fsync, calls = files_mod.os.fsync, {"n": 0}
    fail_at = 1 + 2 * (50 + 1) + 7  # meta.json, two batches of 50 images + their chunks, the 7th image of the third

    def fsync_until_full(fd):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(files_mod.os, "fsync", fsync_until_full)
    with pytest.raises(
        ExpansionError,
        match=r"writing a batch of 50 images failed \(\[Errno 28\] No space left on "
        r"device\); nothing of this batch was kept.*rerun to resume",
    ):
        run(_cfg(overrides), tmp_path / "run")
    assert_nothing_half_written(tmp_path, tmp_path / "run")
    (store_root,) = _stores(tmp_path)
    store = ExpansionStore(store_root, "", {})
    assert len(list(store.images_dir.iterdir())) == 2 * 25 * 2
    assert sorted({r["parent"] for r in store.read_chunks()}) == list(range(50))

    monkeypatch.setattr(files_mod.os, "fsync", real_fsync)  # space freed
    resumed = run(_cfg(overrides), tmp_path / "run")
    assert resumed.expansion.generated_images == 2 * (resumed.sizes["train"] - 50)
    reference = _expand_only(overrides + [f"paths.cache_dir={tmp_path / 'ref'}"])
    assert reference.key == resumed.expansion.key
    assert store.verify() == []
    assert store.content_hash() == reference.content_hash()


def _expand_only(overrides) -> ExpansionStore:
    """The store a run with ``overrides`` expands into (expansion only, no training)."""
    cfg = _cfg(overrides)
    return run_expansion(Job.from_config(cfg), build_dataset(cfg.dataset)).store


def _complete_store(tmp_path):
    return _expand_only(["dataset=digits", "method=cutout", "method.ratio=1"])


def test_store_of_another_format_version_is_refused_untouched(tmp_path):
    store = _complete_store(tmp_path)
    meta = json.loads(store.meta_path.read_text())
    meta["format_version"] = 999
    store.meta_path.write_text(json.dumps(meta))
    before = {p: p.stat().st_mtime_ns for p in store.root.rglob("*")}
    with pytest.raises(
        ExpansionError,
        match=rf"written by store format version 999, this framework reads version {store_mod.FORMAT_VERSION}; "
        "delete the folder to regenerate it",
    ):
        run(_cfg(["dataset=digits", "method=cutout", "method.ratio=1"]), tmp_path / "run")
    assert {p: p.stat().st_mtime_ns for p in store.root.rglob("*")} == before
    assert not (tmp_path / "run" / "metrics.json").exists() and not list(tmp_path.rglob("*.tmp-*"))


def test_corrupt_store_metadata_is_refused(tmp_path):
    store = _complete_store(tmp_path)
    store.meta_path.write_text('{"key": "abc", "format_ver')
    with pytest.raises(ExpansionError, match="meta.json is corrupt .*delete the folder to regenerate"):
        run(_cfg(["dataset=digits", "method=cutout", "method.ratio=1"]), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists() and not list(tmp_path.rglob("*.tmp-*"))


def test_corrupt_manifest_chunk_is_named(tmp_path):
    """A chunk damaged outside the framework (atomic writes never leave a partial one)."""
    cfg = _digits_with(_faulty("NonFiniteGenerator", ratio=1, first_bad_batch=2))
    with pytest.raises(ExpansionError):
        run(cfg, tmp_path / "partial")
    (store_root,) = _stores(tmp_path)
    chunk = sorted((store_root / "chunks").glob("*.jsonl"))[0]
    chunk.write_text(chunk.read_text()[:-20])
    cfg = _digits_with(_faulty("NonFiniteGenerator", ratio=1, first_bad_batch=99))
    with pytest.raises(ExpansionError, match=r"store chunk .*\.jsonl line \d+ is corrupt"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_damaged_store_image_is_named_and_regenerated(tmp_path, caplog):
    """A truncated image of a finished store is named (verify, and the run's warning) and regenerated
    from its seed before anything trains on it (issue 17: it used to fail every later run)."""
    store = _complete_store(tmp_path)
    clean = store.content_hash()
    victim = sorted(store.images_dir.iterdir())[3]
    victim.write_bytes(victim.read_bytes()[:20])
    assert any(victim.name in p for p in store.verify())
    metrics = run(_cfg(["dataset=digits", "method=cutout", "method.ratio=1"]), tmp_path / "run")
    assert f"{victim.name} 20 bytes" in caplog.text and "regenerating them from their seeds" in caplog.text
    assert metrics.expansion.generated_images == 1 and store.content_hash() == clean and store.verify() == []


def test_store_writer_refuses_non_uint8_images(tmp_path):
    store = ExpansionStore(tmp_path / "s", "k", {})
    store.open_for_writing(1)
    with pytest.raises(ExpansionError, match="store images must be uint8"):
        store.write_batch(torch.zeros(1, 1, 4, 4), [{"parent": 0, "copy": 0, "label": 0, "seed": 1}])
    assert not list(store.images_dir.iterdir()) and not list(store.chunks_dir.iterdir())
