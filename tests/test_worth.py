"""What is a generated image worth: compute-matched training, the grids sweeper, resumable sweeps by
config hash, and the worth analysis recovering known equivalents and exchange rates."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from experiments.analysis import worth
from experiments.sweeps import job_overrides
from experiments.training.checkpoints import CheckpointError
from experiments.training.identity import config_hash
from experiments.training.job import data_fingerprint_of
from experiments.training.pipeline import run
from experiments.training.settings import TrainSettings, optimizer_budget, steps_per_epoch
from tests.conftest import PROJECT_ROOT, compose, job_config


def _cfg(overrides):
    return job_config(overrides)


# --------------------------------------------------------------------------- compute-matched training


def test_steps_matched_training_takes_exactly_the_expanded_sets_steps(tmp_path):
    common = ["dataset=digits", "dataset.train_per_class=10", "train.epochs=3", "train.batch_size=16", "logger=none"]
    common += ["quality.enabled=false", "train.compare_original=false"]
    expanded = run(_cfg([*common, "method=cutout", "method.ratio=2"]), tmp_path / "expanded")
    matched = run(_cfg([*common, "method=original", "train.steps_matched_to_ratio=2"]), tmp_path / "matched")
    explicit = run(
        _cfg([*common, "method=original", f"train.steps={expanded.training.optimizer_steps}"]), tmp_path / "n"
    )
    epochs = run(_cfg([*common, "method=original"]), tmp_path / "epochs")
    n = expanded.sizes["train"]  # 100 digits
    assert (
        expanded.training.optimizer_steps
        == 3 * ((3 * n) // 16)
        == matched.training.optimizer_steps
        == explicit.training.optimizer_steps
    )
    assert epochs.training.optimizer_steps == 3 * (n // 16) < matched.training.optimizer_steps
    # the original reaches the budget in more epochs; the cosine spans them, validation about train.epochs times
    budget = matched.training.optimizer_budget
    assert budget["epochs"] == math.ceil(matched.training.optimizer_steps / (n // 16)) and budget["max_steps"] > 0
    assert budget["val_every"] == math.ceil(budget["epochs"] / 3)
    assert expanded.training.optimizer_budget == {"epochs": 3, "max_steps": -1, "val_every": 1, "steps": 54}
    assert explicit.training.test_acc_final == pytest.approx(matched.training.test_acc_final, abs=1e-9)


def test_real_arm_points_never_resume_each_others_checkpoints(tmp_path):
    common = ["dataset=digits", "dataset.train_per_class=10", "train.epochs=1", "logger=none"]
    origin = run(_cfg([*common, "exchange=real_0"]), tmp_path / "run")  # 0 extra real images: the origin
    assert origin.extra_real_per_class == 0 and origin.training.resumed_from is None
    # another real-arm point in the same folder is refused: its training set differs (it used to resume
    # the origin's finished checkpoint and report the origin's accuracy)
    with pytest.raises(CheckpointError, match="belongs to a run with other settings"):
        run(_cfg([*common, "exchange=real_1"]), tmp_path / "run")


def test_optimizer_budget_rules():
    def settings(**kw):
        base = dict(epochs=10, batch_size=16, lr=0.1, momentum=0.9, weight_decay=0.0, warmup_epochs=0)
        base.update(label_smoothing=0.0, include_original=True, eval_batch_size=64, num_workers=0)
        base.update(compile=False, compare_original=False, test_every_epoch=False)
        return TrainSettings(**{**base, **kw})

    assert steps_per_epoch(100, 16) == 6 and steps_per_epoch(10, 16) == 1 and steps_per_epoch(16, 16) == 1
    # an epoch run whose step count the budget names is the epoch run: same epochs, no cut, same validation
    natural = optimizer_budget(settings(), 300, 100)
    assert optimizer_budget(settings(steps=natural.steps), 300, 100).epochs == natural.epochs == 10
    matched = optimizer_budget(settings(steps_matched_to_ratio=2), 100, 100)
    assert (matched.steps, matched.epochs, matched.val_every) == (180, 30, 3)
    with pytest.raises(Exception, match="one step budget"):
        settings(steps=10, steps_matched_to_ratio=2)
    with pytest.raises(Exception, match="steps"):
        settings(steps=0)
    with pytest.raises(Exception, match="warmup_epochs"):
        optimizer_budget(settings(steps=6, warmup_epochs=5), 100, 100)


# --------------------------------------------------------------------------- sweeps


def test_grids_sweeper_is_a_union_of_grids_with_the_command_line_last():
    params = {"seed": "0,1"}
    grids = [
        {"exchange": "real_0,real_1"},
        {"method": "cutout,gridmask", "method.ratio": "1,2"},
        {"exchange": "real_0"},
    ]
    jobs = job_overrides(params, grids, ["seed=5", "train.epochs=2"], None)
    assert len(jobs) == 2 + 4  # seed=5 wins over the swept seeds; the third grid repeats the first's real_0
    assert all("seed=5" in job and "train.epochs=2" in job for job in jobs)
    assert ["seed=5", "method=gridmask", "method.ratio=2", "train.epochs=2"] in jobs
    assert len(job_overrides(params, None, [], None)) == 2  # no grids: the basic sweeper's product


def test_config_hash_is_the_result_identity():
    base = ["dataset=digits", "method=cutout"]
    h = config_hash(_cfg(base))
    assert h == config_hash(compose(base))  # the hydra node is not part of it
    assert h == config_hash(_cfg([*base, "progress_bar=false", "train.num_workers=2", "preflight=off"]))
    assert h != config_hash(_cfg([*base, "train.lr=0.2"]))
    assert h != config_hash(_cfg([*base, "seed=1"]))
    assert h != config_hash(_cfg(["dataset=digits", "method=gridmask"]))


@pytest.mark.integration
def test_a_sweep_run_again_skips_finished_jobs_and_finishes_the_rest(tmp_path):
    sweep = tmp_path / "sweep"
    job = ["dataset=digits", "train.epochs=1", "logger=none", "quality.enabled=false"]
    # a finished job of the interrupted sweep: its metrics.json carries the hash and the data fingerprint the
    # job computes for itself
    done = sweep / "finished_before" / "metrics.json"
    done.parent.mkdir(parents=True)
    original = _cfg([*job, "method=original"])
    record = json.dumps(
        {
            "config_hash": config_hash(original),
            "data_fingerprint": data_fingerprint_of(original)(),
            **{"table": None, "dataset": "digits", "method": "original", "classifier": "small_cnn", "ratio": 0},
            **{"train_data": "original", "seed": 0, "test_acc_final": 50.0, "test_acc_best_val": 50.0},
            "total_seconds": 1.0,
        }
    )
    done.write_text(record)
    command = [sys.executable, "run.py", "-m", *job, "hydra/sweeper=grids", f"hydra.sweep.dir={sweep}"]
    command += ["hydra.sweep.subdir=${dataset.name}_${method.name}_${config_hash:}"]
    command += ["hydra.sweeper.grids=[{method: cutout}, {method: original}]"]
    proc = subprocess.run(command, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "job 1: done before, skipped" in proc.stderr + proc.stdout and "raised" not in proc.stderr
    assert done.read_text() == record  # not rerun
    (ran,) = [p for p in sweep.rglob("metrics.json") if p != done]
    metrics = json.loads(ran.read_text())
    assert metrics["method"] == "cutout" and ran.parent.name == f"digits_cutout_{metrics['config_hash']}"
    assert metrics["config_hash"] == config_hash(_cfg([*job, "method=cutout"]))
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "digits_cutout_" + metrics["config_hash"],
        "finished_before",
    ]


# --------------------------------------------------------------------------- the analysis

N_BASE, K, CLASSES = 20, 100.0, 2
C1, C2 = 3.0, 2.5


def _true_equivalent(ratio: float) -> float:
    """n_real_plus that the relation gives for n_syn = ratio x n_base."""
    return N_BASE * math.log1p(ratio * C1 ** (-N_BASE / K)) / math.log(C2)


def _real_accuracy(extra: float, offset: float) -> float:
    return 50.0 + offset + 10.0 * extra / N_BASE  # linear: interpolation between real points is exact


def _write(root, name, *, method="original", ratio=0, extra=0, seed=0, accuracy, steps, budget=False, **more):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    metrics = {
        "dataset": "toy",
        "method": method,
        "ratio": ratio,
        "train_data": "original" if not ratio else "original+generated",
        "train_per_class": N_BASE,
        "extra_real_per_class": extra,
        "seed": seed,
        "num_classes": CLASSES,
        "test_acc_final": accuracy,
        "test_acc_best_val": accuracy,
        "optimizer_steps": steps,
        "optimizer_budget": {"max_steps": steps if budget else -1},
        "train_seconds": 1.0,
        "environment": {"device_name": "test CPU", "cpu_threads": 1},
        **more,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def _steps(images_per_class: float) -> int:
    return 10 * int(images_per_class * CLASSES // 8)


def _toy_sweep(root, *, ratios=(1, 2, 5), method_offset=0.0, seeds=(0, 1, 2), steps_offset=3.0, device="cpu"):
    """Real arm at equal epochs (offset 0) and at each ratio's step budget (offset ``steps_offset``: more
    steps help the original); synthetic points exactly on the relation's equivalents at equal epochs."""
    noise = {0: -0.4, 1: 0.0, 2: 0.4}
    for seed in seeds:
        for extra in (0, 10, 20, 40, 80):
            acc = _real_accuracy(extra, 0.0) + noise[seed]
            _write(root, f"real_{extra}_s{seed}", extra=extra, seed=seed, accuracy=acc, steps=_steps(N_BASE + extra))
            for ratio in ratios:
                budget = _steps(N_BASE * (1 + ratio))
                acc = _real_accuracy(extra, steps_offset) + noise[seed]
                _write(
                    root,
                    f"real_{extra}_r{ratio}_s{seed}",
                    extra=extra,
                    seed=seed,
                    accuracy=acc,
                    steps=budget,
                    budget=True,
                )
        for ratio in ratios:
            acc = _real_accuracy(_true_equivalent(ratio), method_offset) + noise[seed]
            expansion = {
                "store": f"stores/gen_r{ratio}",
                "key": f"gen_r{ratio}",
                "num_images": ratio * N_BASE * CLASSES,
                "generated_images": ratio * N_BASE * CLASSES if seed == 0 else 0,
                "cpu_seconds": 4.0 * ratio,
                "seconds": 5.0 * ratio,
                "fit_seconds": 0.0,
            }
            _write(
                root,
                f"gen_r{ratio}_s{seed}",
                method="gen",
                ratio=ratio,
                seed=seed,
                accuracy=acc,
                steps=_steps(N_BASE * (1 + ratio)),
                expansion=expansion,
                quality={"fid": 1.5, "label_agreement": 90.0},
                environment={"device_name": "test device", "device": device, "cpu_threads": 1},
            )


def test_worth_recovers_known_equivalents_and_exchange_rate(tmp_path):
    _toy_sweep(tmp_path)
    result = worth.analyse(tmp_path, replicates=200)
    points = {p["ratio"]: p for p in result["points"]}
    for ratio, p in points.items():
        assert p["protocols"]["epochs"]["status"] == "ok"
        assert p["protocols"]["epochs"]["equivalent"] == pytest.approx(_true_equivalent(ratio), rel=1e-6)
        lo, hi = p["protocols"]["epochs"]["interval"]["equivalent"]
        assert lo <= p["protocols"]["epochs"]["equivalent"] <= hi
        assert p["protocols"]["epochs"]["gain"] == pytest.approx(10.0 * _true_equivalent(ratio) / N_BASE, rel=1e-6)
        # at equal steps the original had 3 more points: the gain shrinks by 3, so does the equivalent
        assert p["protocols"]["steps"]["gain"] == pytest.approx(p["protocols"]["epochs"]["gain"] - 3.0, rel=1e-6)
        expected = max(0.0, _true_equivalent(ratio) - 3.0 * N_BASE / 10.0)
        assert (p["protocols"]["steps"]["equivalent"] or 0.0) == pytest.approx(expected, rel=1e-6, abs=1e-9)
        # generation cost: CPU 4 x ratio s for ratio x 40 images, seeds share the store
        assert p["cpu_seconds_per_image"] == pytest.approx(
            sum(4.0 * r for r in (1, 2, 5)) / sum(40 * r for r in (1, 2, 5))
        )
        assert p["fid"] == 1.5 and p["n"] == 3
        assert p["protocols"]["epochs"]["real_per_generated"] == pytest.approx(
            _true_equivalent(ratio) / (ratio * N_BASE)
        )
    fit = result["fits"]["toy|20|gen|epochs"]
    assert fit["c2"] == pytest.approx(C2, rel=1e-3) and fit["factor"] == pytest.approx(C1 ** (N_BASE / K), rel=1e-3)
    assert not fit["at_bound"] and not fit["degenerate"] and fit["points_used"] == 3
    text = worth.render_markdown(result)
    assert f"| gen | 5 | {_steps(N_BASE * 6)} | " in text and "c2 = 2.5" in text


def test_worth_per_gpu_hour_only_for_images_generated_on_a_gpu(tmp_path):
    _toy_sweep(tmp_path / "cpu")
    _toy_sweep(tmp_path / "gpu", device="cuda")
    on_cpu = worth.analyse(tmp_path / "cpu", replicates=20)["points"][0]["protocols"]["epochs"]
    on_gpu = worth.analyse(tmp_path / "gpu", replicates=20)["points"][0]["protocols"]["epochs"]
    assert on_cpu["real_equivalents_per_gpu_hour"] is None and on_cpu["real_equivalents_per_cpu_hour"] > 0
    wall_per_image = sum(5.0 * r for r in (1, 2, 5)) / sum(40 * r for r in (1, 2, 5))
    expected = on_gpu["equivalent"] * CLASSES / (wall_per_image * 1 * N_BASE * CLASSES / 3600)
    assert on_gpu["real_equivalents_per_gpu_hour"] == pytest.approx(expected)
    assert "per GPU-hour" in worth.render_markdown(worth.analyse(tmp_path / "gpu", replicates=20))


def test_worth_no_fit_cases_say_why(tmp_path):
    below = tmp_path / "below"
    _toy_sweep(below, method_offset=-20.0)  # every ratio below the original
    result = worth.analyse(below, replicates=50)
    assert {p["protocols"]["epochs"]["status"] for p in result["points"]} == {"no_gain"}
    assert "no ratio gained accuracy" in result["fits"]["toy|20|gen|epochs"]["error"]
    above = tmp_path / "above"
    _toy_sweep(above, method_offset=40.0)  # every ratio beyond the last real point
    result = worth.analyse(above, replicates=50)
    assert {p["protocols"]["epochs"]["status"] for p in result["points"]} == {"beyond_real_range"}
    assert "no synthetic point inside" in result["fits"]["toy|20|gen|epochs"]["error"]
    assert "> every real point" in worth.render_markdown(result)
    proportional = tmp_path / "proportional"  # equivalent = 0.2 x n_syn: the slope is all the points say
    _toy_sweep(proportional)
    for seed in (0, 1, 2):
        for ratio in (1, 2, 5):
            path = proportional / f"gen_r{ratio}_s{seed}" / "metrics.json"
            m = json.loads(path.read_text())
            m["test_acc_final"] = _real_accuracy(0.2 * ratio * N_BASE, 0.0) + {0: -0.4, 1: 0.0, 2: 0.4}[seed]
            path.write_text(json.dumps(m))
    result = worth.analyse(proportional, replicates=50)
    assert result["fits"]["toy|20|gen|epochs"]["degenerate"]
    assert "degenerate" in worth.render_markdown(result)
    assert {round(p["protocols"]["epochs"]["real_per_generated"], 6) for p in result["points"]} == {0.2}
    one = tmp_path / "one"
    _toy_sweep(one, ratios=(2,))
    assert "one point" in worth.analyse(one, replicates=50)["fits"]["toy|20|gen|epochs"]["error"]


def test_worth_reads_a_partial_sweep(tmp_path):
    _toy_sweep(tmp_path)
    for name in ("gen_r5_s2", "real_0_r5_s0", "real_0_r5_s1", "real_0_r5_s2"):
        (tmp_path / name / "metrics.json").unlink()  # a seed not run yet; the ratio-5 original not run at all
    result = worth.analyse(tmp_path, replicates=50)
    points = {p["ratio"]: p for p in result["points"]}
    assert points[5]["n"] == 2 and points[5]["protocols"]["epochs"]["status"] == "ok"
    assert (
        points[5]["protocols"]["steps"]["status"] == "no_real_origin"
        and points[5]["protocols"]["steps"]["gain"] is None
    )
    assert points[1]["protocols"]["steps"]["status"] == "ok"
    paths = worth.write_outputs(result, tmp_path / "out") if (tmp_path / "out").mkdir() is None else []
    assert {p.name for p in paths} == {"worth.md", "worth.json", "worth.csv", "worth.png", "worth_cost.png"}
    assert "no real arm" in (tmp_path / "out" / "worth.md").read_text()


def test_worth_cli_fails_in_one_line_without_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.analysis.worth", str(tmp_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: no metrics.json under {tmp_path}"
