"""The caches that stand between verified bytes and training are verified too: a decoded-tensor cache
file whose pixels were changed after writing is rebuilt (it carries its tensors' sha256), and the
dataset fingerprint cache re-hashes a file edited in place at the same size with its mtime put back
(its key holds the inode and ctime, which no user can set)."""

from __future__ import annotations

import logging
import os

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from experiments.data.datamodule import load_expanded_images
from experiments.data.datasets import build_dataset, core
from experiments.training.job import Job
from experiments.training.pipeline import run_expansion
from tests.conftest import compose, job_config


def _cfg(overrides):
    return job_config(overrides)


def test_a_tensor_cache_file_with_edited_pixels_is_rebuilt(tmp_path, caplog):
    cfg = _cfg(["dataset=digits", "method=cutout", "method.ratio=1"])
    data = build_dataset(cfg.dataset).in_memory()
    expanded = run_expansion(Job.from_config(cfg), data).expanded
    tensors = tmp_path / "tensors"
    good = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    (path,) = tensors.glob("*.safetensors")
    with safe_open(str(path), framework="pt") as fh:  # every pixel inverted, metadata and labels kept
        metadata, labels = fh.metadata(), fh.get_tensor("labels")
        inverted = 255 - fh.get_tensor("images")
    save_file({"images": inverted, "labels": labels}, str(path), metadata=metadata)
    with caplog.at_level(logging.WARNING, logger="experiments.data.tensor_cache"):
        again = load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors)
    assert torch.equal(again, good), "the edited cache fed the classifier"
    assert "not the ones written" in caplog.text and path.name in caplog.text
    caplog.clear()
    assert torch.equal(load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors), good)
    assert "stale" not in caplog.text  # the rebuilt file is sound


def _write_folder(root):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(root / split / c / f"{i}.png")


def _load(root):
    overrides = ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8", "dataset.val_fraction=0.25"]
    return build_dataset(compose(overrides).dataset)


def test_a_same_size_edit_with_its_mtime_put_back_changes_the_fingerprint(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "FINGERPRINT_CACHE", tmp_path / "fingerprints")
    _write_folder(tmp_path / "data")
    first = _load(tmp_path / "data").train.fingerprint()
    assert list((tmp_path / "fingerprints").iterdir())  # cached
    victim = tmp_path / "data" / "train" / "a" / "0.png"
    st = victim.stat()
    with Image.open(victim) as image:
        pixels = np.asarray(image).copy()
    pixels[0, 0] ^= 0xFF  # one pixel changed; PNG of the same size (checked below)
    Image.fromarray(pixels).save(victim)
    if victim.stat().st_size != st.st_size:  # keep the size: pad or cut the trailing bytes after IEND
        raw = victim.read_bytes()
        victim.write_bytes(raw[: st.st_size] if len(raw) > st.st_size else raw + b"\0" * (st.st_size - len(raw)))
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime put back
    assert victim.stat().st_size == st.st_size and victim.stat().st_mtime_ns == st.st_mtime_ns
    assert _load(tmp_path / "data").train.fingerprint() != first


def test_a_damaged_fingerprint_cache_entry_is_computed_again(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "FINGERPRINT_CACHE", tmp_path / "fingerprints")
    _write_folder(tmp_path / "data")
    first = _load(tmp_path / "data").train.fingerprint()
    (entry,) = (tmp_path / "fingerprints").iterdir()
    written = entry.read_text()
    entry.write_text("not a digest\n")
    assert _load(tmp_path / "data").train.fingerprint() == first
    assert entry.read_text() == written  # rewritten whole
