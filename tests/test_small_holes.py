"""The smaller holes of issue 30, each closed: the pre-flight runs the checks the run does (memory, disk,
every unreadable or oversized image at once), a decompression bomb's message suggests a limit that admits
it, a store that cannot fit on disk is refused before generating, a huge ratio is generated in small
batches (a preemption stops within one), the first batch gives a rough time for the whole, and an export
that runs out of space is one line and leaves nothing, its stale temporaries cleaned by the next one."""

from __future__ import annotations

import os
import re
import shutil
import signal
import struct
import time
import zlib
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from PIL import Image

from expansion.base import ExpansionError
from expansion.engine import MAX_IMAGES_PER_BATCH, seeds_per_batch
from expansion.store import ExpansionStore
from experiments.data import sharing
from experiments.data.datasets import DatasetError, build_dataset
from experiments.data.sharing import SharingError
from experiments.training import preflight
from experiments.training.job import Job
from experiments.training.pipeline import run, run_expansion
from experiments.training.preemption import EXIT_PREEMPTED, preemptible
from tests.conftest import job_config

FAST = ["train.epochs=1", "quality.enabled=false", "logger=none", "train.compare_original=false"]


def _cfg(overrides):
    return job_config(FAST + overrides)


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (no pixel data: a bomb's header costs bytes only)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IEND", b"")
    )


def _folder(root: Path) -> list[str]:
    for split in ("train", "test"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("L", (8, 8), 40 * i).save(root / split / c / f"{i}.png")
    return ["dataset=imagefolder", f"dataset.path={root}", "dataset.image_size=8", "dataset.val_fraction=0.34"]


def test_the_preflight_names_every_bad_image_at_once_and_what_the_run_would_refuse(tmp_path):
    dataset = _folder(tmp_path / "data")
    bombs = [tmp_path / "data" / "train" / "a" / "9.png", tmp_path / "data" / "test" / "b" / "9.png"]
    for bomb in bombs:
        bomb.write_bytes(_png_header(20000, 20000))  # 400 M pixels
    broken = tmp_path / "data" / "train" / "b" / "8.png"
    broken.write_bytes(b"not an image")
    report = preflight.check_jobs([_cfg([*dataset, "method=cutout"])], ["j"])
    problems = list(report.problems)
    assert len(problems) == 3, problems  # all three at once, not one per run
    for bomb in bombs:
        (line,) = [p for p in problems if str(bomb) in p]
        assert "decompression-bomb limit" in line and "max_image_pixels=400000000" in line  # a limit that admits it
    assert any(p.startswith(f"unreadable image {broken}") for p in problems)


def test_the_preflight_refuses_a_ratio_the_memory_cannot_hold(tmp_path):
    report = preflight.check_jobs([_cfg(["dataset=digits", "method=cutout", "method.ratio=1e9"])], ["j"])
    assert any("would make 200,000,000,000 images" in p for p in report.problems), list(report.problems)


def test_a_bomb_over_twice_the_limit_suggests_a_limit_that_admits_it(tmp_path):
    from experiments.data.datasets.core import read_image

    path = tmp_path / "big.png"
    path.write_bytes(_png_header(20000, 20000))
    with pytest.raises(DatasetError, match=r"max_image_pixels=400000000$"):
        read_image(path, 1)


def test_a_store_that_cannot_fit_on_disk_is_refused_before_generating(tmp_path, monkeypatch):
    free = shutil.disk_usage(tmp_path)._replace(free=50 * 2**20)  # 50 MiB free
    monkeypatch.setattr("experiments.training.job.shutil.disk_usage", lambda path: free)
    cfg = _cfg(["dataset=digits", "method=cutout", "method.ratio=100000"])  # 20 M images: 82 GiB in 4 KiB blocks
    with pytest.raises(ExpansionError, match=r"would write 20,000,000 images, about 81\.9 GiB in .* 0\.0 GiB free"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "cache" / "stores").exists() or not any(
        p for p in (tmp_path / "cache" / "stores").iterdir() if not p.name.startswith(".")
    )
    report = preflight.check_jobs([cfg], ["j"])  # the pre-flight says so too
    assert any("would write 20,000,000 images" in p for p in report.problems)


def test_the_disk_estimate_follows_the_stored_side():
    """A generator stores at its output_size (GIF-SD: 256 px), else at its resolution, else the dataset's
    side; at least one 4 KiB block per image."""
    from types import SimpleNamespace

    from experiments.training.job import store_disk_estimate

    def gif(output_size, resolution=512):
        return SimpleNamespace(settings=SimpleNamespace(output_size=output_size, resolution=resolution))

    per_image = 3 * 256 * 256 // 2  # half the raw pixels, in whole blocks, + 300 bytes of manifest and digest
    assert store_disk_estimate(10, gif(256), 3, 32) == 10 * (-(-per_image // 4096) * 4096 + 300)
    assert store_disk_estimate(10, gif(None), 3, 32) == 10 * (-(-(3 * 512 * 512 // 2) // 4096) * 4096 + 300)
    assert store_disk_estimate(10, SimpleNamespace(), 1, 8) == 10 * (4096 + 300)


def test_a_huge_ratio_is_generated_in_small_batches():
    assert seeds_per_batch(64, 5) == 64
    assert seeds_per_batch(64, 1000) == MAX_IMAGES_PER_BATCH // 1000
    assert seeds_per_batch(64, 100000) == 1


@pytest.mark.integration
def test_a_signal_stops_a_huge_ratio_within_one_small_batch(tmp_path, caplog):
    """ratio 1024 with batch_size 64: 4 seeds (4,096 images) per batch, not 64 (65,536 images); a signal
    in the second batch stops after it."""
    method = {
        "name": "signal_at_batch",
        "_target_": "tests.helpers.faulty_expanders.SignalAtBatch",
        "ratio": 1024,
        "batch": 1,
        "signum": int(signal.SIGUSR2),
        "batch_size": 64,
    }
    cfg = _cfg(["dataset=digits"])
    cfg.method = OmegaConf.create(method)
    with caplog.at_level("INFO", logger="expansion.engine"), pytest.raises(SystemExit) as stopped, preemptible():
        run(cfg, tmp_path / "run")
    assert stopped.value.code == EXIT_PREEMPTED
    (root,) = (p for p in (tmp_path / "cache" / "stores").iterdir() if not p.name.startswith("."))
    assert sorted({r["parent"] for r in ExpansionStore(root, "", {}).read_chunks()}) == list(range(8))
    # the first batch gives the pace and the time left for the whole
    assert re.search(r"generation: 4,096/204,800 images \(2%\), [\d,.]+ images/s, .*, ETA ", caplog.text)


def test_generation_logs_its_progress_with_an_eta(tmp_path, caplog, monkeypatch):
    """The first batch gives the pace and the time left; later lines at most every progress_every_s."""
    from expansion import progress

    monkeypatch.setattr(progress, "EVERY_SECONDS", 1e9)  # only the first and the last line
    cfg = _cfg(["dataset=digits", "method=cutout", "method.ratio=2", "method.batch_size=50"])
    with caplog.at_level("INFO", logger="expansion.engine"):
        run_expansion(Job.from_config(cfg), build_dataset(cfg.dataset))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation:")]
    assert len(lines) == 2, lines
    assert re.match(r"generation: 100/400 images \(25%\), [\d,.]+ images/s, [\d.]+ s, ETA [\d.]+ s$", lines[0])
    assert lines[1].startswith("generation: 400/400 images (100%)") and lines[1].endswith("(done)")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    cfg = _cfg(["dataset=digits", "method=cutout", "method.ratio=1", f"paths.cache_dir={root}"])
    return run_expansion(Job.from_config(cfg), build_dataset(cfg.dataset)).store.root


def test_an_export_without_disk_space_is_one_line_and_leaves_nothing(store, tmp_path, monkeypatch):
    import datasets

    def no_space(self, path, **kwargs):
        Path(path).write_bytes(b"PAR1 half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(datasets.Dataset, "to_parquet", no_space)
    out = tmp_path / "out"
    with pytest.raises(
        SharingError, match=r"^writing the export to .*out failed \(No space left on device\); nothing was kept"
    ) as caught:
        sharing.export(store, out)
    assert "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == [tmp_path / "cache"] or not any(
        p.name.startswith("out") for p in tmp_path.iterdir()
    )


def test_stale_export_temporaries_are_cleaned_by_the_next_export(store, tmp_path):
    out = tmp_path / "out"
    stale, fresh = tmp_path / "out.tmp-killed", tmp_path / "out.tmp-working"
    for folder in (stale, fresh):
        (folder / "data").mkdir(parents=True)
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    sharing.export(store, out)
    assert (out / sharing.META_FILE).is_file() and not stale.exists() and fresh.exists()


def test_make_install_takes_torch_from_another_index_first():
    """``make install TORCH_INDEX=<url>`` (the CPU-only route) installs torch and torchvision from that
    index before the framework, whose ``torch>=`` requirement the CPU build then satisfies."""
    import subprocess

    from experiments import PROJECT_ROOT

    def planned(*args):
        proc = subprocess.run(["make", "-n", "install", *args], cwd=PROJECT_ROOT, capture_output=True, text=True)
        return proc.stdout.splitlines()

    cpu = planned("TORCH_INDEX=https://download.pytorch.org/whl/cpu")
    torch_line = "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu"
    (first,) = [i for i, line in enumerate(cpu) if line.endswith(torch_line)]
    assert first < next(i for i, line in enumerate(cpu) if "pip install -e" in line)
    assert not any("--index-url" in line for line in planned())
