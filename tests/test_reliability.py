"""Kills, preemption signals and restarts: training resumes from its checkpoint, expansion
from its store, and nothing is lost (experiments/training/preemption.py, experiments/training/checkpoints.py,
the chaos drill experiments/drills/chaos.py)."""

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

from expansion.store import ExpansionStore
from experiments.data.datasets import build_dataset
from experiments.record import read_record
from experiments.training.classifier import ImageClassifier
from experiments.training.job import Job
from experiments.training.pipeline import run, run_expansion
from experiments.training.preemption import EXIT_PREEMPTED, PREEMPTED_CHECKPOINT, preemptible
from tests.conftest import PROJECT_ROOT, job_config

TRAIN = ["dataset=digits", "method=original", "logger=none", "quality.enabled=false", "train.compare_original=false"]


def _cfg(overrides):
    return job_config(overrides)


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _signal_at_step(monkeypatch, step: int, signum: int) -> None:
    """Send ``signum`` to this process during training step ``step``, as a cluster would."""
    original = ImageClassifier.training_step

    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == step:
            os.kill(os.getpid(), signum)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(ImageClassifier, "training_step", training_step)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_during_training_checkpoints_exits_for_requeue_and_resumes(tmp_path, monkeypatch, signum):
    cfg = _cfg(TRAIN + ["train.epochs=3"])
    run_dir = tmp_path / "run"
    _signal_at_step(monkeypatch, 4, signum)
    with pytest.raises(SystemExit) as stopped, preemptible():
        run(cfg, run_dir)
    assert stopped.value.code == EXIT_PREEMPTED
    checkpoints = run_dir / "train" / "checkpoints"
    preempted = _load(checkpoints / PREEMPTED_CHECKPOINT)
    assert preempted["global_step"] == 5  # stopped right after the step that got the signal
    assert not (run_dir / "metrics.json").exists()
    assert signal.getsignal(signum) in (signal.SIG_DFL, signal.default_int_handler)  # handlers restored

    monkeypatch.undo()
    metrics = run(cfg, run_dir)  # the requeued job: same config, same run dir
    assert metrics.training.resumed_from == {
        "checkpoint": PREEMPTED_CHECKPOINT,
        "epoch": preempted["epoch"],
        "global_step": 5,
    }
    last = _load(checkpoints / "last.ckpt")
    # as many optimizer steps as an uninterrupted run (full batches only, see experiments/data/datamodule.py)
    steps_per_epoch = max(1, metrics.training.num_train_images // int(cfg.train.batch_size))
    assert last["global_step"] == 3 * steps_per_epoch > 5
    assert len(last["val_history"]) == 3 and metrics.training.best_val_epoch == int(
        torch.tensor(last["val_history"]).argmax()
    )
    assert not (checkpoints / PREEMPTED_CHECKPOINT).exists()
    assert 0 <= metrics.training.test_acc_final <= 100


def test_signal_during_expansion_stops_after_the_batch_and_resumes(tmp_path):
    method = {
        "name": "signal_at_batch",
        "_target_": "tests.helpers.faulty_expanders.SignalAtBatch",
        "ratio": 2,
        "batch": 2,
        "signum": int(signal.SIGUSR2),
        "batch_size": 10,
    }
    cfg = _cfg(["dataset=digits", "logger=none", "quality.enabled=false", "train.epochs=1"])
    cfg.method = OmegaConf.create(method)
    with pytest.raises(SystemExit) as stopped, preemptible():
        run(cfg, tmp_path / "run")
    assert stopped.value.code == EXIT_PREEMPTED
    (root,) = (p for p in (tmp_path / "cache" / "stores").iterdir() if not p.name.startswith("."))
    store = ExpansionStore(root, "", {})
    # the batch that was running when the signal came is finished and stored, nothing after it
    assert sorted({r["parent"] for r in store.read_chunks()}) == list(range(30))
    assert len(list(store.images_dir.iterdir())) == 60 and not list(root.rglob("*.tmp-*"))
    assert not (tmp_path / "run" / "metrics.json").exists()

    cfg.method.batch = 999  # the requeued job gets no signal
    metrics = run(cfg, tmp_path / "run")
    assert metrics.expansion.generated_images == 2 * (200 - 30)
    reference = _cfg(["dataset=digits", f"paths.cache_dir={tmp_path / 'ref'}"])
    reference.method = OmegaConf.create({**method, "batch": 999})
    clean = run_expansion(Job.from_config(reference), build_dataset(reference.dataset))
    assert store.verify() == [] and store.content_hash() == clean.store.content_hash()


def _run_py(args, **kwargs):
    env = {**os.environ, "PROGRESS_BAR": "false", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [sys.executable, "run.py", *args],
        cwd=PROJECT_ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        **kwargs,
    )


def _wait_for(path: Path, proc, timeout=240.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


def test_signal_in_an_epochs_last_step_stops_after_its_validation(tmp_path, monkeypatch):
    """A checkpoint taken right after an epoch's last step would resume into the next epoch and skip
    that epoch's validation: the stop comes one step later, and the resumed run validates every epoch."""
    cfg = _cfg(TRAIN + ["train.epochs=3"])
    train_images = len(build_dataset(cfg.dataset).in_memory().train)
    steps_per_epoch = train_images // int(cfg.train.batch_size)
    assert steps_per_epoch >= 2
    run_dir = tmp_path / "run"
    _signal_at_step(monkeypatch, steps_per_epoch - 1, signal.SIGTERM)  # the first epoch's last step
    with pytest.raises(SystemExit) as stopped, preemptible():
        run(cfg, run_dir)
    assert stopped.value.code == EXIT_PREEMPTED
    checkpoints = run_dir / "train" / "checkpoints"
    preempted = _load(checkpoints / PREEMPTED_CHECKPOINT)
    assert preempted["global_step"] == steps_per_epoch + 1 and len(preempted["val_history"]) == 1

    monkeypatch.undo()
    run(cfg, run_dir)
    last = _load(checkpoints / "last.ckpt")
    assert last["global_step"] == 3 * steps_per_epoch and len(last["val_history"]) == 3


@pytest.mark.integration
def test_sigterm_to_a_running_job_checkpoints_and_exits_75(tmp_path):
    """The real process, the real signal: run.py gets SIGTERM mid-training (what SLURM sends
    before preempting), writes its checkpoint and exits with 75; the rerun resumes and completes."""
    overrides = TRAIN + ["train.epochs=8"]
    job = _run_py(overrides + [f"hydra.run.dir={tmp_path / 'run'}"])
    checkpoints = tmp_path / "run" / "train" / "checkpoints"
    _wait_for(checkpoints / "last.ckpt", job)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=120)
    assert job.returncode == EXIT_PREEMPTED, err[-3000:]
    assert "preempted (SIGTERM)" in out + err
    assert (checkpoints / PREEMPTED_CHECKPOINT).is_file() and not (tmp_path / "run" / "metrics.json").exists()

    metrics = run(_cfg(overrides), tmp_path / "run")
    assert metrics.training.resumed_from["checkpoint"] == PREEMPTED_CHECKPOINT
    assert metrics.training.resumed_from["epoch"] >= 1
    assert len(_load(checkpoints / "last.ckpt")["val_history"]) == 8


@pytest.mark.slow
def test_kill_9_during_training_resumes_from_the_last_checkpoint(tmp_path):
    overrides = TRAIN + ["train.epochs=30"]
    job = _run_py(overrides + [f"hydra.run.dir={tmp_path / 'run'}"])
    last = tmp_path / "run" / "train" / "checkpoints" / "last.ckpt"
    _wait_for(last, job)
    first = last.stat().st_mtime_ns
    while last.stat().st_mtime_ns == first:  # kill right after a later epoch replaced last.ckpt
        assert job.poll() is None
        time.sleep(0.01)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    killed_at = _load(last)
    assert killed_at["epoch"] < 29

    metrics = run(_cfg(overrides), tmp_path / "run")
    assert metrics.training.resumed_from == {
        "checkpoint": "last.ckpt",
        "epoch": killed_at["epoch"],
        "global_step": killed_at["global_step"],
    }
    assert len(_load(last)["val_history"]) == 30
    assert not list(last.parent.glob("*.tmp-*"))


def _chaos(tmp_path, *args):
    report = tmp_path / "chaos.json"
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.drills.chaos", *args, "--json", str(report)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(report.read_text()), proc.stdout


@pytest.mark.integration
def test_chaos_drill_few_kills_and_concurrency(tmp_path, shared_data):
    """kill -9 at random moments of an expansion (3 times), then finish: the store equals an
    uninterrupted run's; two processes on one key: one generates, one reuses; the lock holder
    killed: the waiting process takes over."""
    report, out = _chaos(
        tmp_path,
        "--kills",
        "3",
        "--train-per-class",
        "20",
        "--ratio",
        "3",
        "--batch-size",
        "4",
        "--data",
        str(shared_data),
    )
    kill = report["kill"]
    assert len(kill["kills"]) == 3 and any(k["landed_mid_expansion"] for k in kill["kills"])
    assert kill["files_lost"] == 0 and kill["problems"] == [] and kill["hash_equal"]
    together = report["concurrency"]["simultaneous"]
    assert together["one_generated"] and together["same_store"] and together["hash_equal"]
    holder = report["concurrency"]["holder_killed"]
    assert holder["hash_equal"] and holder["files_lost"] == 0 and 0 < holder["waiter"]["generated"] <= 120
    assert "OK" in out.splitlines()[-1]


@pytest.mark.slow
def test_chaos_drill_twenty_kills(tmp_path, shared_data):
    report, _ = _chaos(tmp_path, "--kills", "20", "--train-per-class", "100", "--data", str(shared_data))
    kill = report["kill"]
    assert sum(k["landed_mid_expansion"] for k in kill["kills"]) >= 18
    assert kill["files_lost"] == 0 and kill["problems"] == [] and kill["hash_equal"]
    assert report["concurrency"]["holder_killed"]["files_lost"] == 0


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


@pytest.mark.slow
def test_submitit_time_limit_signal_requeues_and_resumes(tmp_path):
    """launcher=submitit_local runs the job through submitit as launcher=slurm does. SIGUSR2 (the
    time-limit signal submitit asks SLURM to send) reaches the running job: it checkpoints, submitit
    requeues it into the same job folder, and the requeued job resumes and completes."""
    sweep = tmp_path / "sweep"
    job = _run_py(
        [
            "-m",
            *TRAIN,
            "launcher=submitit_local",
            "train.epochs=40",
            f"hydra.sweep.dir={sweep}",
            "hydra.sweep.subdir=job",
        ]
    )
    job_dir = sweep / "job"
    _wait_for(job_dir / "train" / "checkpoints" / "last.ckpt", job)
    (controller,) = [int(p.name) for p in (sweep / ".submitit").iterdir() if p.name.isdigit()]
    tasks = _children(controller)
    assert tasks, "no submitit task process found"
    for pid in tasks:
        os.kill(pid, signal.SIGUSR2)
    _, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    metrics = read_record(job_dir)[0]
    assert metrics.training.resumed_from["checkpoint"] == PREEMPTED_CHECKPOINT
    log = "".join(p.read_text() for p in (sweep / ".submitit" / str(controller)).glob("*_log.err"))
    assert "Caught signal SIGUSR2" in log
    assert "preempted (SIGUSR2)" in (job_dir / "run.log").read_text()


@pytest.mark.parametrize(
    ("record", "procid", "requeued"),
    [
        ("JobId=7 JobState=RUNNING PreemptTime=2026-12-06T18:27:12", "0", True),  # preempted, in its grace time
        ("JobId=7 JobState=COMPLETING PreemptTime=None", "0", False),  # a user's scancel: respected
        ("JobId=7 JobState=COMPLETING PreemptTime=2026-12-06T18:27:12", "0", False),  # cancelled in its grace time
        ("JobId=7 JobState=RUNNING PreemptTime=None", "0", False),  # a plain SIGTERM, not a preemption
        ("JobId=7 JobState=RUNNING PreemptTime=2026-12-06T18:27:12", "1", False),  # not the job's first task
    ],
)
def test_a_job_preempted_by_slurm_requeues_itself_once(monkeypatch, record, procid, requeued):
    from experiments.training import preemption

    calls = []

    def fake_run(command, **kwargs):
        calls.append(command[:2])
        return subprocess.CompletedProcess(command, 0, stdout=record if command[1] == "show" else "", stderr="")

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_PROCID", procid)
    monkeypatch.setattr(preemption.shutil, "which", lambda name: "/usr/bin/scontrol")
    monkeypatch.setattr(preemption.subprocess, "run", fake_run)
    assert preemption.requeue_if_preempted_by_slurm(signal.SIGTERM) is requeued
    assert (["scontrol", "requeue"] in calls) is requeued
    assert preemption.requeue_if_preempted_by_slurm(signal.SIGUSR2) is False  # submitit's own handler requeues
