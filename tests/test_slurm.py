"""Through a real SLURM scheduler (``make slurm-up``: a one-node cluster on this machine,
experiments/tools/slurm_cluster.sh): a CPU sweep with ``launcher=slurm`` and a failing job,
SIGUSR2 and ``scontrol requeue`` that checkpoint, requeue and resume, and partition preemption
with a grace time. Skipped where no cluster is up, unless ``REQUIRE_SLURM=1`` (CI) makes that a
failure."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.record import read_record
from experiments.training.preemption import PREEMPTED_CHECKPOINT
from tests.conftest import PROJECT_ROOT

pytestmark = pytest.mark.slurm
CPU_JOBS = [
    "launcher=slurm",
    "trainer=cpu",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "dataset=digits",
    "quality.enabled=false",
    "progress_bar=false",
]


def _cluster_problem() -> str | None:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return "no SLURM client commands (make slurm-up)"
    try:
        states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    if not re.search(r"^(idle|mixed|allocated)", states, re.M):
        return f"no SLURM node is up (sinfo: {states.strip() or 'nothing'}; make slurm-up)"
    return None


@pytest.fixture(scope="module")
def slurm_env():
    problem = _cluster_problem()
    if problem:
        if os.environ.get("REQUIRE_SLURM") == "1":
            pytest.fail(f"REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    accounting = subprocess.run(["sacct", "-n", "-j", "1"], capture_output=True, text=True)
    if accounting.returncode != 0 or "accounting storage is disabled" in accounting.stdout + accounting.stderr:
        # submitit waits forever on a job that ended without a result when sacct cannot answer
        pytest.fail(f"the SLURM cluster has no working accounting (sacct: {accounting.stderr.strip()}); make slurm-up")
    return {**os.environ, "PROGRESS_BAR": "false", "HYDRA_FULL_ERROR": "0", "WANDB_MODE": "disabled"}


def _sweep(args: list[str], env: dict, sweep: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run.py", "-m", *CPU_JOBS, *args, f"hydra.sweep.dir={sweep}"],
        cwd=PROJECT_ROOT,
        env={**env, "EXPANSION_CACHE": str(sweep.parent / "cache")},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = 180.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = condition()
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended before {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def _job_ids(sweep: Path) -> dict[str, str]:
    """Array task index -> ``<array>_<index>`` of each running task of the sweep's array (from squeue;
    the bare id of the array's first task would name the whole array to scontrol)."""
    submitted = [p.name for p in (sweep / ".submitit").iterdir() if p.name.isdigit()] if sweep.exists() else []
    found = {}
    for array in submitted:
        out = subprocess.run(
            ["squeue", "-h", "-j", array, "-t", "RUNNING", "-o", "%i"], capture_output=True, text=True
        ).stdout
        for name in out.split():
            found[name.split("_")[-1]] = name
    return found


def _finish(proc: subprocess.Popen, timeout: float = 300.0) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


def test_a_cpu_sweep_through_slurm_writes_results_and_survives_a_failing_job(slurm_env, tmp_path):
    """The README's CPU example, no GPU override: sbatch is not asked for GPUs; the bad job
    (ratio 0) fails in its task and is listed, the others finish and results.md is written."""
    sweep = tmp_path / "sweep"
    proc = _sweep(["method=cutout", "method.ratio=0,1", "train.epochs=2"], slurm_env, sweep)
    code, err = _finish(proc)
    assert code == 1, err[-3000:]  # one job failed
    sbatch = next((sweep / ".submitit").rglob("*_submission.sh")).read_text()
    assert "--gpus-per-node" not in sbatch and "#SBATCH --cpus-per-task=1" in sbatch
    done = sorted(p.parent.name for p in sweep.glob("*/metrics.json"))
    failed = sorted(p.parent.name for p in sweep.glob("*/error.json"))
    assert len(done) == 1 and len(failed) == 1, (done, failed)
    results = (sweep / "results.md").read_text()
    assert "## Failed jobs (1)" in results and "ratio must be an integer" in results and "| cutout |" in results


def test_usr2_and_scontrol_requeue_resume_and_max_num_timeout_is_honoured(slurm_env, tmp_path):
    """Job 1 is requeued by ``scontrol requeue``: it stops, SLURM runs it again in the same job folder
    and it resumes. Job 0 gets SIGUSR2 (submitit's time-limit signal, ``scancel --signal=USR2``);
    with ``timeout_min`` <= 10 submitit counts every SIGUSR2 as a time-out, so with
    ``max_num_timeout=1`` the first is requeued and resumes, the second ends the job as failed (its
    checkpoint on disk, the reason in error.json and results.md)."""
    sweep = tmp_path / "sweep"
    limits = ["hydra.launcher.timeout_min=5", "hydra.launcher.max_num_timeout=1"]
    proc = _sweep(["method=original", "seed=0,1", "train.epochs=40", *limits], slurm_env, sweep)
    dirs = {}
    for i in ("0", "1"):
        ckpt = _wait(lambda i=i: next(iter(sweep.glob(f"*_s{i}_*/train/checkpoints/last.ckpt")), None), proc, "epoch 1")
        dirs[i] = ckpt.parents[2]
    jobs = _wait(lambda: (j := _job_ids(sweep)) and len(j) == 2 and j, proc, "both tasks running")
    subprocess.run(["scancel", "--signal=USR2", jobs["0"]], check=True)
    subprocess.run(["scontrol", "requeue", jobs["1"]], check=True)
    _wait(lambda: "resuming training" in (dirs["0"] / "run.log").read_text(), proc, "job 0 requeued", timeout=240)
    _wait(lambda: "0" in _job_ids(sweep), proc, "job 0 running again")
    subprocess.run(["scancel", "--signal=USR2", jobs["0"]], check=True)
    code, err = _finish(proc)
    assert code == 1, err[-3000:]  # job 0 ran out of requeues
    requeued = read_record(dirs["1"])[0]
    assert requeued.training.resumed_from is not None
    restarts = subprocess.run(["scontrol", "show", "job", "-o", jobs["1"]], capture_output=True, text=True).stdout
    assert re.search(r"Restarts=[1-9]", restarts), restarts
    assert "preempted (SIGUSR2)" in (dirs["0"] / "run.log").read_text()
    error = json.loads((dirs["0"] / "error.json").read_text())
    assert "timed-out too many times" in error["error"], error
    assert (dirs["0"] / "train" / "checkpoints" / PREEMPTED_CHECKPOINT).is_file()
    assert not (dirs["0"] / "metrics.json").exists()
    assert "## Failed jobs (1)" in (sweep / "results.md").read_text()


def test_preemption_with_a_grace_time_requeues_and_resumes(slurm_env, tmp_path):
    """Partition ``debug`` has a GraceTime: SLURM sends SIGTERM when a job of ``urgent`` needs the node
    and waits. The job checkpoints, requeues itself (else SLURM marks it FAILED) and resumes. (100
    epochs: the preemption, which comes at slurmctld's next scheduling pass, must find it training.)"""
    sweep = tmp_path / "sweep"
    cpus = int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])
    proc = _sweep(
        [
            "method=original",
            "train.epochs=100",
            "hydra.launcher.partition=debug",
            f"hydra.launcher.cpus_per_task={cpus}",
        ],
        slurm_env,
        sweep,
    )
    ckpt = _wait(lambda: next(iter(sweep.glob("*_s0_*/train/checkpoints/last.ckpt")), None), proc, "epoch 1")
    (job,) = _wait(lambda: list(_job_ids(sweep).values()), proc, "the task running")
    urgent = subprocess.run(
        ["sbatch", "--parsable", "-p", "urgent", "-c", str(cpus), "-o", "/dev/null", "--wrap", "sleep 3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    code, err = _finish(proc)
    assert code == 0, err[-3000:]
    metrics = read_record(ckpt.parents[2])[0]
    assert metrics.training.resumed_from["checkpoint"] == PREEMPTED_CHECKPOINT
    assert "requeued itself" in (ckpt.parents[2] / "run.log").read_text()
    shown = subprocess.run(["scontrol", "show", "job", "-o", urgent], capture_output=True, text=True).stdout
    assert "JobState=COMPLETED" in shown, shown
    assert job
