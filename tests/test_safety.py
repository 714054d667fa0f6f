"""Safety: checkpoints load with weights_only=True (a planted pickle never runs), checkpoint
writes are atomic, pickled datasets are unpickled only after torchvision's checksum of the
official files, trust_remote_code is never switched on, secrets stay out of configs."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from expansion import files as files_mod
from experiments.data.datasets import DatasetError, build_dataset
from experiments.training.checkpoints import AtomicCheckpointIO, CheckpointError
from experiments.training.identity import training_signature
from experiments.training.job import Job
from experiments.training.pipeline import run
from tests.conftest import PROJECT_ROOT, compose, job_config

TRAIN = [
    "dataset=digits",
    "method=original",
    "logger=none",
    "quality.enabled=false",
    "train.compare_original=false",
    "train.epochs=1",
]


def _cfg(overrides):
    return job_config(overrides)


class Payload:
    """Unpickling this creates ``marker``: a stand-in for arbitrary code in a planted file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _plant(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def test_planted_checkpoint_in_the_run_dir_never_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    _plant(
        tmp_path / "run" / "train" / "checkpoints" / "last.ckpt",
        {"epoch": 0, "global_step": 1, "state_dict": {}, "run_signature": Payload(marker)},
    )
    with pytest.raises(
        CheckpointError, match=r"cannot resume training from .*last\.ckpt: UnpicklingError.*weights_only"
    ):
        run(_cfg(TRAIN), tmp_path / "run")
    assert not marker.exists()
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    run(_cfg(TRAIN), tmp_path / "run")
    last = tmp_path / "run" / "train" / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="is damaged or was not written by this framework.*delete it"):
        run(_cfg(TRAIN), tmp_path / "run")


def test_checkpoint_of_other_settings_is_not_resumed(tmp_path):
    run(_cfg(TRAIN), tmp_path / "run")
    with pytest.raises(CheckpointError, match="belongs to a run with other settings"):
        run(_cfg(TRAIN + ["train.lr=0.5"]), tmp_path / "run")
    # a requeued job may change settings that only change speed
    identity = build_dataset(_cfg(TRAIN).dataset).identity

    def signature(overrides):
        job = Job.from_config(_cfg(TRAIN + overrides))
        return training_signature(
            dataset_identity=identity,
            store_key=None,
            include_original=True,
            classifier=job.classifier,
            train=job.train,
            seed=job.seed,
        )

    assert signature(["train.eval_batch_size=7", "train.num_workers=2"]) == signature([])
    assert signature(["seed=1"]) != signature([])
    assert signature(["train.lr=0.5"]) != signature([])


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    """A save that fails (or is killed) half-way leaves the previous checkpoint intact and no temporary file."""
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"epoch": 1, "w": torch.ones(3)}, path)

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files_mod.os, "fsync", full_disk)
    with pytest.raises(OSError):
        io.save_checkpoint({"epoch": 2, "w": torch.zeros(3)}, path)
    assert io.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


def test_checkpoint_io_refuses_pickled_objects(tmp_path):
    marker = tmp_path / "pwned"
    _plant(tmp_path / "x.ckpt", {"epoch": 1, "obj": Payload(marker)})
    with pytest.raises(Exception, match="weights_only"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "x.ckpt")
    assert not marker.exists()


def test_cifar_pickles_are_checksummed_before_they_are_unpickled(tmp_path):
    """The one pickled data format (CIFAR's python batches): torchvision's MD5 check of the official
    files runs first, so a replaced batch is refused without being unpickled."""
    import pickle

    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
        "batches.meta",
    ]:
        (folder / name).write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(DatasetError, match="md5"):
        build_dataset(compose(["dataset=cifar10", f"dataset.root={tmp_path}"]).dataset)
    assert not marker.exists()


SOURCES = [p for d in ("expansion", "experiments", "baselines", "benchmarks") for p in (PROJECT_ROOT / d).rglob("*.py")]
SOURCES += [PROJECT_ROOT / "run.py", *(PROJECT_ROOT / "conf").rglob("*.yaml")]


@pytest.mark.parametrize(
    "pattern,why",
    [
        (r"trust_remote_code\s*[=:]\s*(True|true)", "trust_remote_code is never switched on"),
        (r"torch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True"),
        (r"\bpickle\.loads?\(|\bdill\.|\bjoblib\.load\(", "unpickling"),
        (r"allow_pickle\s*=\s*True", "numpy unpickling"),
        (r"(api_key|apikey|token|password|secret)\s*:\s*['\"]?[A-Za-z0-9_\-]{8,}", "a secret written into a config"),
    ],
)
def test_source_never_unpickles_or_trusts_remote_code(pattern, why):
    hits = [
        f"{p.relative_to(PROJECT_ROOT)}: {line.strip()}"
        for p in SOURCES
        for line in p.read_text().splitlines()
        if re.search(pattern, line)
    ]
    assert hits == [], f"{why}: {hits}"


def test_logger_config_holds_no_key_even_with_one_in_the_environment(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert "0123456789abcdef" not in OmegaConf.to_yaml(_cfg(["logger=wandb"]), resolve=True)
