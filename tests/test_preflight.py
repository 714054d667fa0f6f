"""Pre-flight and provenance: a sweep names every missing piece of every job before any job runs
(``preflight=only`` runs none), offline is said at once, a failed start leaves nothing behind, and
every metrics.json records where its numbers came from."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest
import torch

from expansion.base import ExpansionError
from expansion.weights import Weights, hub_reachable, missing
from experiments.analysis.aggregate import aggregate
from experiments.record import read_record
from experiments.training import preflight
from experiments.training.pipeline import run
from tests.conftest import PROJECT_ROOT, job_config
from tests.test_pipeline import _run_py

FAST = ["train.epochs=1", "quality.enabled=false", "logger=none", "train.compare_original=false"]


def _job(overrides):
    return job_config(overrides)


@pytest.mark.integration
def test_a_sweep_preflight_lists_the_missing_dataset_and_runs_no_job(tmp_path):
    """digits is there, pathmnist is not (an empty data folder): only the check runs, exit 2."""
    sweep = tmp_path / "sweep"
    args = ["-m", "dataset=digits,pathmnist", "method=cutout", f"paths.data_dir={tmp_path}/data", "train.epochs=1"]
    proc = _run_py(*args, "preflight=only", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    report = proc.stderr
    assert "preflight: 1 of 2 jobs miss something (1 missing piece):" in report
    assert f"dataset 'pathmnist': expected {tmp_path}/data/medmnist/pathmnist.npz but it is missing" in report
    assert "Set dataset.download=true" in report  # the fix
    assert "(stops #1 dataset=pathmnist method=cutout" in report and "#0" not in report
    assert not sweep.exists()  # no job ran, no folder made
    assert "Traceback" not in proc.stderr


@pytest.mark.integration
def test_preflight_only_with_nothing_missing_exits_0(tmp_path):
    proc = _run_py("dataset=digits", "preflight=only", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "preflight: 1 job checked, nothing missing" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_every_missing_piece_of_every_job_at_once_each_once(tmp_path):
    """Two GIF-SD jobs offline (the tests set HF_HUB_OFFLINE=1) on a GPU trainer with no GPU, and a
    bad ratio: SD and CLIP weights listed once for both jobs, the GPU and the ratio for theirs."""
    jobs = [
        _job(["method=gif_sd", "trainer=gpu"]),
        _job(["method=gif_sd", "method.ratio=0"]),
    ]
    report = preflight.check_jobs(jobs, ["gpu job", "ratio job"])
    problems = list(report.problems)
    sd = next(p for p in problems if p.startswith("Stable Diffusion 'CompVis/stable-diffusion-v1-4'"))
    clip = next(p for p in problems if p.startswith("CLIP weights (open_clip ViT-B-32, openai)"))
    assert report.problems[sd] == [0] and report.problems[clip] == [0]  # job 1's settings fail before its weights
    assert "HF_HUB_OFFLINE=1 is set" in sd and "huggingface-cli download CompVis/stable-diffusion-v1-4" in sd
    gpu = next(p for p in problems if "no CUDA device" in p) if not torch.cuda.is_available() else None
    if gpu:
        assert report.problems[gpu] == [0]
    ratio = next(p for p in problems if "expansion ratio must be an integer >= 1" in p)
    assert report.problems[ratio] == [1]
    text = report.render()
    assert text.count("Stable Diffusion 'CompVis") == 1 and "(stops #0 gpu job)" in text


def test_a_single_gif_sd_run_names_every_missing_weight_before_any_work(tmp_path):
    start = time.perf_counter()
    with pytest.raises(preflight.PreflightError) as err:
        run(_job(["method=gif_sd", *FAST]), tmp_path / "run")
    assert time.perf_counter() - start < 30  # no hub retries
    message = str(err.value)
    assert message.startswith("preflight: the job misses something (2 missing pieces):")
    assert "Stable Diffusion 'CompVis/stable-diffusion-v1-4'" in message and "CLIP weights" in message
    assert not (tmp_path / "cache" / "stores").exists()


def test_weights_checks(tmp_path, monkeypatch):
    assert hub_reachable() is False  # HF_HUB_OFFLINE=1 in the tests: no connection is tried
    assert missing(Weights("SD", str(tmp_path), "method.model_id")) is None  # a local folder that exists
    assert "does not exist; set method.model_id" in missing(Weights("SD", str(tmp_path / "no"), "method.model_id"))
    # a hub repo found in the local cache is not missing, offline or not
    snapshot = tmp_path / "hub" / "models--org--model" / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--model" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--model" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "hub"))
    assert missing(Weights("MAE", "org/model", "method.model_id")) is None
    assert "is not in the Hugging Face cache" in missing(Weights("MAE", "org/other", "method.model_id"))
    assert missing(Weights("MAE", "not a repo id!", "method.model_id")) is not None  # invalid id: missing, no crash


def test_an_offline_loader_says_no_network_at_once():
    from expansion.gif.sd import load_sd_components

    start = time.perf_counter()
    with pytest.raises(ExpansionError, match=r"not in the Hugging Face cache .* HF_HUB_OFFLINE=1 is set"):
        load_sd_components("org/not-cached-sd")
    assert time.perf_counter() - start < 10


@pytest.mark.integration
def test_a_failed_start_prints_its_error_once_and_leaves_no_run_folder(tmp_path):
    proc = _run_py("method=original", "method.ratio=-3", f"hydra.run.dir={tmp_path}/run")
    assert proc.returncode == 2
    line = "method.ratio=-3 is not a ratio (an integer >= 1; method=original generates no images and ignores it)"
    assert (proc.stdout + proc.stderr).count(line) == 1
    assert not (tmp_path / "run").exists()


# -- provenance ------------------------------------------------------------------------------------------


def test_metrics_json_records_its_environment(tmp_path):
    metrics = run(_job(["dataset=digits", "method=cutout", "method.ratio=1", *FAST]), tmp_path / "run")
    env = read_record(tmp_path / "run")[0].environment
    assert env == metrics.environment
    import diffusers
    import lightning
    import timm

    assert torch.__version__.startswith(env["torch"])
    assert (env["lightning"], env["diffusers"], env["timm"]) == (
        lightning.__version__,
        diffusers.__version__,
        timm.__version__,
    )
    # the job's own thread count (threads: 1, or OMP_NUM_THREADS), whatever the caller's
    threads = int(os.environ.get("OMP_NUM_THREADS", 1))
    assert (
        env["device"] == "cpu" and env["device_name"] and env["cpu_threads"] == metrics.settings["threads"] == threads
    )
    head = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert env["git_commit"] == (head.stdout.strip() if head.returncode == 0 else None)
    assert isinstance(env["git_dirty"], bool) or env["git_commit"] is None
    assert env["command"].endswith(shlex.join(sys.argv))
    assert metrics.train_data == "original+generated"
    original = run(_job(["dataset=digits", "method=original", *FAST]), tmp_path / "original")
    assert original.train_data == "original"


def test_results_csv_shows_environment_fields_that_differ(tmp_path):
    base = {
        "table": None,
        "dataset": "digits",
        "method": "cutout",
        "classifier": "small_cnn",
        "ratio": 1,
        "seed": 0,
        "test_acc_final": 90.0,
        "test_acc_best_val": 90.0,
        "train_data": "original+generated",
    }
    for i, (threads, method) in enumerate([(1, "cutout"), (2, "original")]):
        folder = tmp_path / f"{i}"
        folder.mkdir()
        env = {"torch": "2.0", "cpu_threads": threads, "git_dirty": False}
        (folder / "metrics.json").write_text(json.dumps({**base, "method": method, "environment": env}))
    csv_path, md_path = aggregate(tmp_path)
    header, *rows = csv_path.read_text().splitlines()
    assert header.endswith(",env_cpu_threads") and "env_torch" not in header
    assert rows[0].endswith(",2") or rows[0].endswith(",1")
    assert "no paper numbers in this table" in md_path.read_text()


def test_the_report_names_few_jobs_and_ranges_of_many():
    report = preflight.Report(jobs=[f"seed={i}" for i in range(10)])
    assert report.which([2, 5]) == "#2 seed=2, #5 seed=5"
    assert report.which([0, 1, 2, 3, 7, 9]) == "6 of 10 jobs: #0-3, #7, #9; the first is seed=0"
    assert report.which(list(range(10))) == "every job"
