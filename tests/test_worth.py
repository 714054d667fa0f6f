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
SPLIT_OFFSET = {0: -1.0, 1: 0.0, 2: 2.0}  # a base draw moves both arms alike: the paired gain does not see it
SEED_NOISE = {0: -0.4, 1: 0.0, 2: 0.4}


def _true_equivalent(ratio: float) -> float:
    """n_real_plus that the relation gives for n_syn = ratio x n_base."""
    return N_BASE * math.log1p(ratio * C1 ** (-N_BASE / K)) / math.log(C2)


def _real_accuracy(extra: float, offset: float) -> float:
    return 50.0 + offset + 10.0 * extra / N_BASE  # linear: interpolation between real points is exact


def _write(
    root,
    name,
    *,
    method="original",
    ratio=0,
    extra=0,
    seed=0,
    split=0,
    expansion_seed=None,
    online="none",
    accuracy,
    steps,
    budget=False,
    dataset="toy",
    **more,
):
    run_dir = root / name
    run_dir.mkdir(parents=True)
    metrics = {
        "dataset": dataset,
        "method": method,
        "ratio": ratio,
        "train_data": "original" if not ratio else "original+generated",
        "train_per_class": N_BASE,
        "extra_real_per_class": extra,
        "seed": seed,
        "expansion_seed": expansion_seed,
        "settings": {"dataset.split_seed": split, "train.online_augment": online},
        "num_classes": CLASSES,
        "test_acc_final": accuracy,
        "test_acc_best_val": accuracy,
        "test_balanced_acc_final": accuracy - 5.0,
        "test_auc_final": accuracy + 5.0,
        "optimizer_steps": steps,
        "optimizer_budget": {"max_steps": steps if budget else -1},
        "train_seconds": 1.0,
        "environment": {"device_name": "test CPU", "cpu_threads": 1},
        **more,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def _steps(images_per_class: float) -> int:
    return 10 * int(images_per_class * CLASSES // 8)


def _toy_sweep(
    root,
    *,
    ratios=(1, 2, 5),
    method_offset=0.0,
    seeds=(0, 1, 2),
    splits=(0, 1, 2),
    expansions=(0, 1),
    steps_offset=3.0,
    device="cpu",
    method="gen",
    equivalent=_true_equivalent,
    fit_key="",
):
    """Real arm at equal epochs (offset 0) and at each ratio's step budget (offset ``steps_offset``: more
    steps help the original); synthetic points exactly on the relation's equivalents at equal epochs; every
    base draw shifts both arms alike, every classifier seed too."""
    for split in splits:
        for seed in seeds:
            shift = SPLIT_OFFSET[split] + SEED_NOISE[seed]
            for extra in (0, 10, 20, 40, 80):
                acc = _real_accuracy(extra, 0.0) + shift
                name = f"real_{extra}_d{split}_s{seed}"
                if not (root / name).exists():
                    _write(root, name, extra=extra, seed=seed, split=split, accuracy=acc, steps=_steps(N_BASE + extra))
                for ratio in ratios:
                    name = f"real_{extra}_r{ratio}_d{split}_s{seed}"
                    if not (root / name).exists():
                        acc = _real_accuracy(extra, steps_offset) + shift
                        budget = {"steps": _steps(N_BASE * (1 + ratio)), "budget": True}
                        _write(root, name, extra=extra, seed=seed, split=split, accuracy=acc, **budget)
            for ratio in ratios:
                for e in expansions:
                    acc = _real_accuracy(equivalent(ratio), method_offset) + shift
                    first = seed == seeds[0]
                    expansion = {
                        "store": f"stores/{method}_r{ratio}_d{split}_e{e}",
                        "key": f"{method}_r{ratio}_d{split}_e{e}",
                        "num_images": ratio * N_BASE * CLASSES,
                        "generated_images": ratio * N_BASE * CLASSES if first else 0,
                        "cpu_seconds": 4.0 * ratio if first else 0.0,
                        "seconds": 5.0 * ratio if first else 0.0,
                        "fit_seconds": 2.0 if first and fit_key else 0.0,
                        "fit_key": fit_key or None,
                    }
                    design = {"method": method, "ratio": ratio, "seed": seed, "split": split, "expansion_seed": e}
                    machine = {"device_name": "test device", "device": device, "cpu_threads": 1}
                    name = f"{method}_r{ratio}_d{split}_e{e}_s{seed}"
                    steps = _steps(N_BASE * (1 + ratio))
                    _write(root, name, accuracy=acc, steps=steps, expansion=expansion, environment=machine, **design)


def _points(result, method="gen"):
    return {p["ratio"]: p for p in result["points"] if p["method"] == method}


def test_worth_recovers_known_equivalents_and_exchange_rate(tmp_path):
    _toy_sweep(tmp_path)
    result = worth.analyse(tmp_path, metric="test_acc_final")
    assert result["design"] == {"splits": [0, 1, 2], "expansion_seeds": [0, 1], "seeds": [0, 1, 2]}
    for ratio, p in _points(result).items():
        epochs, steps = p["protocols"]["epochs"], p["protocols"]["steps"]
        assert epochs["status"] == "ok"
        assert epochs["equivalent"] == pytest.approx(_true_equivalent(ratio), rel=1e-6)
        gain = 10.0 * _true_equivalent(ratio) / N_BASE
        assert epochs["gain"]["estimate"] == pytest.approx(gain, rel=1e-6)
        # every base draw's paired gain is the same: the interval is a point, over the 3 draws
        assert epochs["gain"]["unit"] == "split" and epochs["gain"]["n_units"] == 3
        assert epochs["gain"]["low"] == pytest.approx(gain) and epochs["gain"]["survives"]
        # at equal steps the original had 3 more points: the gain shrinks by 3, so does the equivalent
        assert steps["gain"]["estimate"] == pytest.approx(gain - 3.0, rel=1e-6)
        expected = max(0.0, _true_equivalent(ratio) - 3.0 * N_BASE / 10.0)
        assert (steps["equivalent"] or 0.0) == pytest.approx(expected, rel=1e-6, abs=1e-9)
        # generation cost: 4 x ratio CPU s per store of ratio x 40 images (one store per draw and expansion seed)
        assert p["cpu_seconds_per_image"] == pytest.approx(
            sum(4.0 * r for r in (1, 2, 5)) / sum(40 * r for r in (1, 2, 5))
        )
        assert p["runs"] == 18 and p["units"] == 3
        assert epochs["real_per_generated"] == pytest.approx(_true_equivalent(ratio) / (ratio * N_BASE))
    fit = result["fits"]["toy|20|gen|epochs"]
    assert fit["c2"] == pytest.approx(C2, rel=1e-3) and fit["factor"] == pytest.approx(C1 ** (N_BASE / K), rel=1e-3)
    assert fit["c2_bounded"] and fit["c2_interval"][0] <= C2 * 1.001 and fit["c2_interval"][1] >= C2 / 1.001
    text = worth.render_markdown(result)
    assert f"| gen | 5 | {_steps(N_BASE * 6)} | " in text and "c2 = 2.5 [2.5, 2.5]" in text
    assert "c1 is not read" in text  # one base size
    # the original's every score, where a collapse to one class shows (balanced accuracy here: acc - 5)
    assert (
        "The original (no extra image), every score: equal epochs: accuracy 50.3, balanced accuracy 45.3, AUC 55.3;"
        in text
    )


def test_worth_intervals_come_from_base_draws_and_widen_when_they_disagree(tmp_path):
    """The gain's interval is over base draws: draws that disagree on the gain widen it (and the
    correction then withholds the survivor mark), draws that agree do not."""
    offset = 4.0 - 10.0 * _true_equivalent(5) / N_BASE  # a gain of 1 point at equal steps (3 go to the steps)
    _toy_sweep(tmp_path / "agree", ratios=(5,), method_offset=offset)
    _toy_sweep(tmp_path / "disagree", ratios=(5,), method_offset=offset)
    for draw, change in ((0, -6.0), (2, 6.0)):  # the method gains 6 points less on draw 0, 6 more on draw 2
        for folder in (tmp_path / "disagree").glob(f"gen_r5_d{draw}_*"):
            m = json.loads((folder / "metrics.json").read_text())
            m["test_acc_final"] += change
            (folder / "metrics.json").write_text(json.dumps(m))
    agree = _points(worth.analyse(tmp_path / "agree", metric="test_acc_final"))[5]["protocols"]["steps"]["gain"]
    disagree = _points(worth.analyse(tmp_path / "disagree", metric="test_acc_final"))[5]["protocols"]["steps"]["gain"]
    assert agree["estimate"] == pytest.approx(1.0) and disagree["estimate"] == pytest.approx(1.0)
    assert agree["high"] - agree["low"] < 1e-9 and agree["survives"]
    assert disagree["high"] - disagree["low"] > 20.0 and disagree["low"] < 0.0 and not disagree["survives"]


def test_worth_one_base_draw_says_its_intervals_are_conditional(tmp_path):
    _toy_sweep(tmp_path, splits=(0,), ratios=(2,))
    result = worth.analyse(tmp_path, metric="test_acc_final")
    gain = _points(result)[2]["protocols"]["epochs"]["gain"]
    assert gain["unit"] == "expansion" and gain["n_units"] == 2
    assert "t over 2 expansion seeds, conditional on one base-set draw" in worth.render_markdown(result)


def test_worth_online_reference_is_a_row_and_every_point_is_compared_with_it(tmp_path):
    _toy_sweep(tmp_path, ratios=(5,))
    steps = _steps(N_BASE * 6)
    for split in (0, 1, 2):
        for seed in (0, 1, 2):  # online RandAugment: 4 points over the original at the same steps
            acc = _real_accuracy(0, 3.0 + 4.0) + SPLIT_OFFSET[split] + SEED_NOISE[seed]
            _write(
                tmp_path,
                f"online_d{split}_s{seed}",
                seed=seed,
                split=split,
                online="randaugment",
                accuracy=acc,
                steps=steps,
                budget=True,
            )
    result = worth.analyse(tmp_path, metric="test_acc_final")
    (reference,) = result["references"]
    assert reference["method"] == "online randaugment" and reference["gain"]["estimate"] == pytest.approx(4.0)
    assert reference["equivalent"]["equivalent"] == pytest.approx(4.0 * N_BASE / 10.0)
    point = _points(result)[5]
    expected = 10.0 * _true_equivalent(5) / N_BASE - 3.0 - 4.0
    assert point["versus_online"]["online randaugment"]["estimate"] == pytest.approx(expected)
    assert "vs online randaugment" in worth.render_markdown(result)
    # the online runs never enter the real curve
    assert all(c["added_per_class"] != 0 or c["mean"] < reference["mean"] for c in result["real_arm"])


def test_worth_reads_each_datasets_headline_score(tmp_path):
    _toy_sweep(tmp_path / "toy", ratios=(5,))
    result = worth.analyse(tmp_path / "toy")
    assert result["metrics"] == {"toy": "test_acc_final"}
    _toy_sweep(tmp_path / "breast", ratios=(5,))
    for path in (tmp_path / "breast").rglob("metrics.json"):
        m = json.loads(path.read_text())
        path.write_text(json.dumps({**m, "dataset": "breastmnist"}))
    result = worth.analyse(tmp_path / "breast")
    assert result["metrics"] == {"breastmnist": "test_auc_final"}
    assert _points(result)[5]["mean"] == pytest.approx(_real_accuracy(_true_equivalent(5), 0.0) + 5.0 + 1 / 3)
    assert "AUC (`test_auc_final`)" in worth.render_markdown(result)


def test_worth_fits_only_what_the_data_identify(tmp_path):
    below = tmp_path / "below"
    _toy_sweep(below, method_offset=-20.0)  # every ratio below the original
    result = worth.analyse(below, metric="test_acc_final")
    assert {p["protocols"]["epochs"]["status"] for p in result["points"]} == {"no_gain"}
    assert "no ratio gained" in result["fits"]["toy|20|gen|epochs"]["error"]
    above = tmp_path / "above"
    _toy_sweep(above, method_offset=40.0)  # every ratio beyond the last real point
    result = worth.analyse(above, metric="test_acc_final")
    assert {p["protocols"]["epochs"]["status"] for p in result["points"]} == {"beyond_real_range"}
    assert "no synthetic point inside" in result["fits"]["toy|20|gen|epochs"]["error"]
    assert ">= 80" in worth.render_markdown(result)
    falling = tmp_path / "falling"  # more generated images, fewer real equivalents (closed_set on BreastMNIST)
    _toy_sweep(falling, equivalent=lambda ratio: {1: 12.0, 2: 10.0, 5: 8.0}[ratio])
    fit = worth.analyse(falling, metric="test_acc_final")["fits"]["toy|20|gen|epochs"]
    assert fit["error"] == "the relation does not fit: equivalents fall with the ratio"
    proportional = tmp_path / "proportional"  # equivalent = 0.2 x n_syn: the slope is all the points say
    _toy_sweep(proportional, equivalent=lambda ratio: 0.2 * ratio * N_BASE)
    result = worth.analyse(proportional, metric="test_acc_final")
    fit = result["fits"]["toy|20|gen|epochs"]
    assert not fit["c2_bounded"] and "c2 not identified" in worth.render_markdown(result)
    assert "c2 = " not in worth.render_markdown(result).split("equal steps |")[-1].split("\n")[2]
    two = tmp_path / "two"
    _toy_sweep(two, ratios=(1, 5))
    assert "need at least three" in worth.analyse(two, metric="test_acc_final")["fits"]["toy|20|gen|epochs"]["error"]


def test_c1_is_read_only_across_three_base_sizes():
    fits = {f"toy|{n}|gen|steps": {"factor": C1 ** (n / K), "c2": C2, "c2_bounded": True} for n in (10, 20, 40)}
    fits["toy|20|other|steps"] = {"factor": 2.0, "c2": C2, "c2_bounded": True}
    fits["toy|10|other|steps"] = {"factor": 1.5, "c2": C2, "c2_bounded": True}
    fits["toy|40|other|steps"] = {"factor": 2.5, "c2": 9.0, "c2_bounded": False}  # c2 unidentified: not used
    c1 = worth.c1_across_base_sizes(fits, K)
    assert set(c1) == {"toy|gen|steps"}
    assert c1["toy|gen|steps"]["c1"] == pytest.approx(C1) and c1["toy|gen|steps"]["base_sizes"] == [10, 20, 40]


def test_worth_shares_a_fit_between_the_methods_that_use_it(tmp_path):
    _toy_sweep(tmp_path, ratios=(5,), method="ae_a", fit_key="ae")
    _toy_sweep(tmp_path, ratios=(5,), method="ae_b", fit_key="ae", splits=(0, 1, 2))
    costs = worth.analyse(tmp_path, metric="test_acc_final")["costs"]
    # 6 stores per method, each made by a job that also fitted: 2 wall s at the job's 20 CPU s / 25 wall s,
    # 1.6 CPU s; the 12 fits of one fit key are charged half to each method
    fit_cpu = 2.0 * 20.0 / 25.0
    for method, other in (("ae_a", "ae_b"), ("ae_b", "ae_a")):
        cost = costs[f"toy|20|{method}"]
        assert cost["fit_cpu_seconds"] == pytest.approx(12 * fit_cpu / 2) and cost["fit_shared_with"] == [other]
        assert cost["cpu_seconds"] == pytest.approx(6 * (20.0 - fit_cpu) + 12 * fit_cpu / 2)
        assert cost["wall_seconds"] == pytest.approx(6 * (25.0 - 2.0) + 12 * 2.0 / 2)
    _toy_sweep(tmp_path / "alone", ratios=(5,), method="ae_a", fit_key="ae")
    alone = worth.analyse(tmp_path / "alone", metric="test_acc_final")["costs"]["toy|20|ae_a"]
    assert alone["cpu_seconds"] == pytest.approx(6 * 20.0)  # one user: charged the whole fit


def test_worth_per_gpu_hour_only_for_images_generated_on_a_gpu(tmp_path):
    _toy_sweep(tmp_path / "cpu", ratios=(5,))
    _toy_sweep(tmp_path / "gpu", ratios=(5,), device="cuda")
    on_cpu = worth.analyse(tmp_path / "cpu")["points"][0]["protocols"]["epochs"]
    on_gpu = worth.analyse(tmp_path / "gpu")["points"][0]["protocols"]["epochs"]
    assert on_cpu["real_equivalents_per_gpu_hour"] is None and on_cpu["real_equivalents_per_cpu_hour"] > 0
    wall_per_image = 25.0 / 200
    expected = on_gpu["equivalent"] * CLASSES / (wall_per_image * 5 * N_BASE * CLASSES / 3600)
    assert on_gpu["real_equivalents_per_gpu_hour"] == pytest.approx(expected)


def test_worth_recomputes_from_its_per_run_table(tmp_path):
    """worth_runs.csv (one row per run) gives the same report as the records it came from."""
    _toy_sweep(tmp_path / "sweep", ratios=(1, 5))
    for name in ("gen_r5_d2_e1_s2", "real_0_r5_d0_s0"):  # a partial sweep
        (tmp_path / "sweep" / name / "metrics.json").unlink()
    from_records = worth.analyse(tmp_path / "sweep", metric="test_acc_final")
    runs, _ = worth.runs_from_records(tmp_path / "sweep")
    worth.write_runs_csv(runs, tmp_path / "runs.csv")
    from_csv = worth.analyse(tmp_path / "runs.csv", metric="test_acc_final")
    assert from_csv["points"] == from_records["points"] and from_csv["real_arm"] == from_records["real_arm"]
    paths = worth.write_outputs(from_records, tmp_path / "out", runs=runs) if (tmp_path / "out").mkdir() is None else []
    assert {p.name for p in paths} == {
        "worth.md",
        "worth.json",
        "worth.csv",
        "worth.png",
        "worth_cost.png",
        "worth_runs.csv",
    }
    (tmp_path / "bad.csv").write_text("dataset,n_base\ntoy,20\n")
    with pytest.raises(worth.WorthError, match="not a worth_runs.csv, columns missing: arm"):
        worth.analyse(tmp_path / "bad.csv")


def test_worth_cli_fails_in_one_line_without_runs(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.analysis.worth", str(tmp_path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and proc.stderr.strip() == f"error: no metrics.json under {tmp_path}"
