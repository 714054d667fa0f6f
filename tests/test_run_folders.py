"""A run folder has one owner: a job refused in a live folder reports and exits without deleting or
writing anything there, a finished folder is never rewritten, and two copies of one sweep started at
once run every job exactly once and both exit 0. A sweep's bookkeeping comes from complete, valid
records: a cut record is not a finished job, a copied job folder counts once, a failed aggregation
exits non-zero, and the data's fingerprint is part of a job's identity."""

from __future__ import annotations

import fcntl
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import PROJECT_ROOT, job_config
from tests.helpers.cli import run_py, user_env

FAST = ["train.epochs=1", "quality.enabled=false", "logger=none", "train.compare_original=false"]


def _env(tmp_path):
    return user_env(tmp_path / "cache")


def _run_py(tmp_path, *args, timeout=600):
    return run_py(args, cache=tmp_path / "cache", timeout=timeout)


def _snapshot(folder: Path, but: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every file under ``folder`` (but those named) with its bytes and mtime (what a write, a delete or a
    rename changes)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in but
    }


@pytest.mark.integration
def test_a_job_refused_in_a_live_run_folder_deletes_and_writes_nothing(tmp_path):
    live = tmp_path / "live"
    (live / ".hydra").mkdir(parents=True)
    (live / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (live / "run.log").write_text("the live job's log\n")
    with open(live / ".run.lock", "a+") as lock:  # held as a live job holds it (flock, whatever wrote it)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _snapshot(live)
        proc = _run_py(tmp_path, *FAST, "seed=7", f"hydra.run.dir={live}")
        after = _snapshot(live)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: run folder {live} is in use by another job")
    assert after == before  # not deleted, no .hydra rewritten, no error.json, no line in its log


@pytest.mark.integration
def test_a_finished_run_folder_is_never_rewritten(tmp_path):
    folder = tmp_path / "run"
    first = _run_py(tmp_path, *FAST, "method.ratio=1", f"hydra.run.dir={folder}")
    assert first.returncode == 0, first.stderr[-2000:]
    metrics = json.loads((folder / "metrics.json").read_text())
    assert OmegaConf.load(folder / ".hydra" / "config.yaml").seed == 0  # written by the job, once it owned the folder
    before = _snapshot(folder, but=(".run.lock",))  # whoever holds the lock notes itself in it

    other = _run_py(tmp_path, *FAST, "method.ratio=1", "seed=7", f"hydra.run.dir={folder}")
    assert other.returncode == 2, other.stderr[-2000:]
    assert "holds another configuration's results" in other.stderr and "give this job its own folder" in other.stderr
    assert (
        _snapshot(folder, but=(".run.lock",)) == before
    )  # .hydra/config.yaml still says seed 0, as metrics.json; no error.json

    same = _run_py(tmp_path, *FAST, "method.ratio=1", f"hydra.run.dir={folder}")
    assert same.returncode == 0, same.stderr[-2000:]
    assert "nothing to do" in same.stdout + same.stderr and f"seed {metrics['seed']}]" in same.stdout
    assert _snapshot(folder, but=(".run.lock",)) == before


@pytest.mark.integration
def test_two_copies_of_one_sweep_at_once_run_every_job_once_and_both_exit_0(tmp_path):
    sweep = tmp_path / "sweep"
    args = [sys.executable, "run.py", "-m", *FAST, "method.ratio=1,2", f"hydra.sweep.dir={sweep}"]
    procs = [
        subprocess.Popen(
            args, cwd=PROJECT_ROOT, env=_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    both = "\n".join(outputs)
    assert both.count("test acc: final") == 2, both[-4000:]  # each job trained once, by one of the two
    assert both.count("done before, skipped") == 2, both[-4000:]  # and found done by the other
    assert len(list(sweep.rglob("metrics.json"))) == 2
    assert not list(sweep.rglob("error.json")) and not list(sweep.rglob("best-v1.ckpt"))
    assert "2 runs under" in (sweep / "results.md").read_text()


@pytest.mark.integration
def test_a_sweep_job_whose_folder_holds_another_configuration_is_refused_and_listed(tmp_path):
    sweep = tmp_path / "sweep"
    folder = sweep / "digits_s0"  # where the sweep below runs its job (a folder name of the user's choosing)
    _write(folder, _record(config_hash="f" * 16))
    before = _snapshot(folder, but=(".run.lock",))  # whoever holds the lock notes itself in it
    subdir = "hydra.sweep.subdir=${dataset.name}_s${seed}"
    proc = _run_py(tmp_path, "-m", *FAST, "method.ratio=1", f"hydra.sweep.dir={sweep}", subdir)
    assert proc.returncode == 1, proc.stderr[-2000:]  # a sweep with a refused job exits non-zero
    assert _snapshot(folder, but=(".run.lock",)) == before  # not a byte written there, no log either
    (refusal,) = (sweep / "refused").glob("0_*/error.json")
    error = json.loads(refusal.read_text())
    assert "holds another configuration's results (config hash ffffffffffffffff" in error["error"]
    assert "## Failed jobs (1)" in (sweep / "results.md").read_text()


# -- sweep bookkeeping from the record ----------------------------------------------------------------------


def _record(**changes):
    record = {
        "config_hash": "a" * 16,
        "data_fingerprint": "b" * 16,
        "dataset": "digits",
        "method": "cutout",
        "classifier": "small_cnn",
        "seed": 0,
        "ratio": 2,
        "test_acc_final": 90.0,
        "test_acc_best_val": 90.0,
        "total_seconds": 3.0,
    }
    return {**record, **changes}


def _write(folder: Path, record) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps(record))
    return folder


def test_a_cut_record_is_not_a_finished_job_and_fails_the_aggregation(tmp_path, capsys):
    from experiments.analysis.aggregate import aggregate
    from experiments.callbacks import AggregateOnMultirunEnd
    from experiments.jobs import find_done

    _write(tmp_path / "0_ok", _record())
    _write(tmp_path / "1_cut", {"config_hash": "c" * 16})
    assert find_done(tmp_path, "c" * 16, lambda: "b" * 16) is None  # a cut record is no finished twin
    assert find_done(tmp_path, "a" * 16, lambda: "b" * 16) == tmp_path / "0_ok" / "metrics.json"
    _, md = aggregate(tmp_path)
    text = md.read_text()
    assert "1 runs under" in text and "## Failed jobs (1)" in text and "field dataset is missing" in text
    with pytest.raises(SystemExit) as stop:
        AggregateOnMultirunEnd().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert stop.value.code == 1 and "1 job(s) of the sweep failed" in capsys.readouterr().err


def test_a_copied_job_folder_counts_once_and_is_reported(tmp_path):
    from experiments.analysis.aggregate import build_cells, load_paper_numbers, scan_runs

    for seed in range(4):
        _write(tmp_path / f"{seed}_job", _record(config_hash=f"{seed:016d}", seed=seed, test_acc_final=90.0 + seed))
    _write(tmp_path / "copy_of_3", _record(config_hash=f"{3:016d}", seed=3, test_acc_final=93.0))
    runs, damaged = scan_runs(tmp_path)
    assert len(runs) == 5 and not damaged  # every record is read; the table keeps one per seed
    (cell,) = build_cells(runs, load_paper_numbers())
    assert cell.stats("test_acc_final")[2] == 4  # n = 4, not 5
    assert [(r.folder.name, counted.folder.name) for r, counted in cell.repeats] == [("copy_of_3", "3_job")]


def test_an_aggregation_that_fails_exits_non_zero_and_says_why(tmp_path, capsys, monkeypatch):
    from experiments.analysis import aggregate as module
    from experiments.callbacks import AggregateOnMultirunEnd

    _write(tmp_path / "0_ok", _record())
    monkeypatch.setattr(module, "build_cells", lambda *a: {}["a key the tables lack"])
    with pytest.raises(SystemExit) as stop:
        AggregateOnMultirunEnd().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert stop.value.code == 1
    assert "error: the sweep's results could not be aggregated: KeyError" in capsys.readouterr().err


def test_a_failure_beside_a_later_valid_record_is_history(tmp_path):
    from experiments.jobs import find_failures

    job = _write(tmp_path / "0_job", _record())
    (job / "error.json").write_text(json.dumps({"error": "killed earlier", "type": "X"}))
    (tmp_path / "1_job").mkdir()
    (tmp_path / "1_job" / "error.json").write_text(json.dumps({"error": "failed", "type": "X"}))
    assert [f["job"] for f in find_failures(tmp_path)] == ["1_job"]


def _npz_dataset(path: Path, test_labels=None):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 12)
    test = np.repeat(np.arange(3), 4) if test_labels is None else test_labels
    np.savez(
        path,
        train_images=rng.integers(0, 255, (36, 8, 8), dtype=np.uint8),
        train_labels=labels,
        test_images=rng.integers(0, 255, (12, 8, 8), dtype=np.uint8),
        test_labels=test,
    )
    return ["dataset=npz", f"dataset.path={path}", "dataset.image_size=8"]


def test_the_data_fingerprint_is_part_of_a_jobs_identity(tmp_path):
    from experiments.jobs import find_done
    from experiments.training.identity import config_hash
    from experiments.training.job import data_fingerprint_of

    overrides = _npz_dataset(tmp_path / "toy.npz")
    job = job_config(overrides + FAST)
    before = data_fingerprint_of(job)()
    _write(tmp_path / "sweep" / "0_job", _record(config_hash=config_hash(job), data_fingerprint=before))
    assert find_done(tmp_path / "sweep", config_hash(job), data_fingerprint_of(job)) is not None
    relabelled = np.repeat(np.arange(3), 4)
    relabelled[0] = 1  # one test label changed, same files otherwise
    _npz_dataset(tmp_path / "toy.npz", test_labels=relabelled)
    after = data_fingerprint_of(job)()
    assert after != before and config_hash(job) == config_hash(job)
    assert find_done(tmp_path / "sweep", config_hash(job), data_fingerprint_of(job)) is None  # rerun, not skipped


def test_the_other_ranks_of_a_multi_process_job_share_rank_0s_folder(tmp_path, monkeypatch):
    from experiments.jobs import RunFolderBusy, own_run_folder, owns

    folder = tmp_path / "ddp"
    # this process owns it; another open of the lock file sees it locked, as another process would
    with own_run_folder(folder, wait=False), open(folder / ".run.lock", "a+") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    monkeypatch.setenv("SLURM_PROCID", "1")
    with open(folder / ".run.lock", "a+") as rank0:
        fcntl.flock(rank0, fcntl.LOCK_EX | fcntl.LOCK_NB)  # rank 0 of the job, in another process
        with own_run_folder(folder, wait=False):  # rank 1 joins it instead of being refused
            assert owns(folder)
        monkeypatch.setenv("SLURM_PROCID", "0")
        with pytest.raises(RunFolderBusy, match="is in use by another job"), own_run_folder(folder, wait=False):
            pass


def test_a_sweep_job_folder_is_named_by_its_identity():
    """An extended sweep (other settings, same method and seed) never lands in a finished job's folder, and
    the same job always gets the same folder (a rerun of an interrupted sweep resumes there)."""
    from experiments.config import compose
    from experiments.training.identity import config_hash

    def subdir(overrides):
        cfg = compose(["dataset=digits", "method=cutout", *overrides], with_hydra=True)
        return cfg, cfg.hydra.sweep.subdir

    cfg, first = subdir(["train.epochs=2"])
    assert first == f"digits_cutout_small_cnn_s0_{config_hash(cfg)[:10]}"
    assert subdir(["train.epochs=2"])[1] == first
    assert subdir(["train.epochs=3"])[1] != first and subdir(["seed=1", "train.epochs=2"])[1] != first
