"""Aggregation of metrics.json files into results.csv / results.md with the paper's numbers."""

from __future__ import annotations

import csv
import json
import shutil

import pytest

from experiments.analysis.aggregate import aggregate, load_paper_numbers


def _write(root, i, **m):
    d = root / f"job{i}"
    d.mkdir(parents=True)
    base = {
        "table": "medical",
        "classifier": "resnet50",
        "ratio": 5,
        "seed": i,
        "test_acc_best_val": m["test_acc_final"] - 1,
    }
    (d / "metrics.json").write_text(json.dumps({**base, **m}))


def test_mean_std_paper_and_difference(tmp_path):
    for i, acc in enumerate([70.0, 72.0, 74.0]):
        _write(tmp_path, i, dataset="breastmnist", method="cutout", test_acc_final=acc)
    _write(tmp_path, 3, dataset="breastmnist", method="original", ratio=0, test_acc_final=60.0)
    _write(tmp_path, 4, dataset="pathmnist", method="original", ratio=0, test_acc_final=80.0)
    csv_path, md_path = aggregate(tmp_path)
    rows = {(r["row"], r["column"]): r for r in csv.DictReader(csv_path.open())}
    cut = rows[("cutout", "breastmnist")]
    assert float(cut["final_mean"]) == pytest.approx(72.0) and float(cut["final_std"]) == pytest.approx(2.0)
    assert cut["n_seeds"] == "3" and float(cut["paper"]) == 66.7
    assert float(cut["final_minus_paper"]) == pytest.approx(72.0 - 66.7)
    assert float(cut["best_val_mean"]) == pytest.approx(71.0)
    md = md_path.read_text()
    assert "72.0 ± 2.0 [3]; 66.7; +5.3" in md
    assert "| original | 60.0 [1]; 55.8; +4.2 | 80.0 [1]; 72.4; +7.6 | 70.0; 64.1 |" in md
    assert md.index("| original") < md.index("| cutout")


def test_balanced_accuracy_and_auc_tables_only_where_runs_have_them(tmp_path):
    for i, (acc, balanced, auc) in enumerate([(70.0, 50.0, 60.0), (72.0, 54.0, 64.0)]):
        extra = {"test_balanced_acc_final": balanced, "test_auc_final": auc}
        _write(tmp_path, i, dataset="breastmnist", method="cutout", test_acc_final=acc, **extra)
    _write(tmp_path, 2, dataset="breastmnist", method="original", ratio=0, test_acc_final=60.0)  # an older record
    csv_path, md_path = aggregate(tmp_path)
    rows = {r["row"]: r for r in csv.DictReader(csv_path.open())}
    assert float(rows["cutout"]["balanced_acc_mean"]) == pytest.approx(52.0)
    assert float(rows["cutout"]["auc_std"]) == pytest.approx(2.828, abs=1e-3)
    assert rows["original"]["auc_mean"] == "" and rows["original"]["final_mean"] == "60.000"
    md = md_path.read_text()
    assert "**final-epoch balanced accuracy (mean per-class recall)**" in md and "| cutout | 52.0 ± 2.8 [2]" in md
    assert "**final-epoch AUC" in md
    shutil.rmtree(tmp_path)
    _write(tmp_path, 0, dataset="breastmnist", method="cutout", test_acc_final=70.0)
    assert "balanced accuracy" not in aggregate(tmp_path)[1].read_text()


def test_ratio_rows_and_classifier_columns(tmp_path):
    for i, (ratio, acc) in enumerate([(5, 30.0), (10, 31.0)]):
        _write(tmp_path, i, table="efficiency", dataset="cars", method="cutout", ratio=ratio, test_acc_final=acc)
    _write(
        tmp_path,
        2,
        table="architectures",
        dataset="cars",
        method="original",
        ratio=0,
        classifier="mobilenet_v2",
        test_acc_final=20.0,
    )
    _, md_path = aggregate(tmp_path)
    md = md_path.read_text()
    assert "| cutout@5 | 30.0 [1]; 24.1; +5.9 |" in md and "| cutout@10 | 31.0 [1]; 25.7; +5.3 |" in md
    assert "| method | mobilenet_v2 | avg |" in md and "20.0 [1]; 26.2; -6.2" in md


def test_generated_only_rows_and_few_shot_columns(tmp_path):
    runs = [
        ("expansive_synthesis", "generated only", 10, 80.0),
        ("expansive_synthesis", "original+generated", 10, 85.0),
        ("original", "original+generated", 10, 82.0),
        ("original", "original+generated", 100, 95.0),
    ]
    for i, (method, data, shots, acc) in enumerate(runs):
        _write(
            tmp_path,
            i,
            table="expansive_synthesis",
            dataset="mnist",
            method=method,
            train_data=data,
            train_per_class=shots,
            test_acc_final=acc,
        )
    md = aggregate(tmp_path)[1].read_text()
    assert "| method | mnist 10/class | mnist 100/class | avg |" in md
    assert "| expansive_synthesis (generated only) | 80.0 [1] | – | – |" in md
    assert "| expansive_synthesis | 85.0 [1] | – | – |" in md and "| original | 82.0 [1] | 95.0 [1] | 88.5 |" in md


def test_paper_numbers_match_benchmarks_spec():
    paper = load_paper_numbers()
    assert paper["natural"]["values"]["gif_sd"]["cars"] == 75.7
    assert paper["medical"]["values"]["randaugment"]["organsmnist"] == 79.6
    assert paper["medical_cpu"]["values"] == paper["medical"]["values"]
    assert len(paper["natural"]["values"]) == 7 and all(len(v) == 6 for v in paper["natural"]["values"].values())


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no metrics.json"):
        aggregate(tmp_path)


def test_the_papers_selection_is_a_column_of_its_own_only_when_runs_have_it(tmp_path):
    for i, acc in enumerate([70.0, 72.0]):
        _write(tmp_path, i, dataset="breastmnist", method="cutout", test_acc_final=acc)
    csv_path, md_path = aggregate(tmp_path)
    assert "as the paper selects" not in md_path.read_text()
    assert next(csv.DictReader(csv_path.open()))["best_test_mean"] == ""
    for i, acc in enumerate([70.0, 72.0], start=2):
        _write(tmp_path, i, dataset="pathmnist", method="cutout", test_acc_final=acc, test_acc_best_test=acc + 3)
    csv_path, md_path = aggregate(tmp_path)
    rows = {r["column"]: r for r in csv.DictReader(csv_path.open())}
    assert float(rows["pathmnist"]["best_test_mean"]) == pytest.approx(74.0)
    assert rows["breastmnist"]["best_test_mean"] == ""
    md = md_path.read_text()
    optimistic = md[md.index("**as the paper selects (optimistic)") :]
    # the like-for-like table compares with the paper's numbers; the final-epoch table comes first
    assert md.index("**final-epoch test accuracy") < md.index("**as the paper selects (optimistic)")
    assert "| cutout | – | 74.0 ± 1.4 [2]; 78.8; -4.8 | – |" in optimistic


def _experiment_record(root, folder, overrides, *, seed, acc, threads=1):
    """A finished job's record as the pipeline writes it, for the composed job ``overrides``."""
    from experiments.record import RunRecord, TrainingResult
    from experiments.training.identity import config_hash, experiment_settings
    from tests.conftest import compose

    cfg = compose(["dataset=digits", "method=original", f"seed={seed}", f"threads={threads}", *overrides])
    steps = cfg.train.steps
    budget = {"epochs": cfg.train.epochs, "max_steps": steps or -1, "val_every": 1, "steps": steps or 0}
    training = TrainingResult(acc, acc - 1.0, epochs=cfg.train.epochs, optimizer_budget=budget)
    RunRecord(
        dataset="digits",
        method="original",
        seed=seed,
        training=training,
        classifier="small_cnn",
        config_hash=config_hash(cfg),
        data_fingerprint="d" * 20,
        settings=experiment_settings(cfg),
        total_seconds=1.0,
        environment={"cpu_threads": threads, "git_commit": "abc123", "git_dirty": False},
    ).write(root / folder)


def test_rows_are_experiments_never_two_configurations(tmp_path):
    """Runs that differ in more than the seed (epochs 2 vs 30, a step budget, 1 vs 2 threads) are separate
    rows, each with the setting that tells it apart as a column; n counts distinct seeds; a copied job
    folder (the same seed again) is reported, not averaged."""
    for seed, acc in ((0, 50.0), (1, 54.0)):
        _experiment_record(tmp_path, f"e2_s{seed}", ["train.epochs=2"], seed=seed, acc=acc)
    for seed, acc in ((0, 90.0), (1, 92.0), (2, 94.0)):
        _experiment_record(tmp_path, f"e30_s{seed}", ["train.epochs=30"], seed=seed, acc=acc)
    _experiment_record(tmp_path, "steps_s0", ["train.epochs=30", "train.steps=40"], seed=0, acc=70.0)
    _experiment_record(tmp_path, "threads2_s0", ["train.epochs=30"], seed=0, acc=91.0, threads=2)
    shutil.copytree(tmp_path / "e30_s0", tmp_path / "zz_copy_of_e30_s0")  # a copied job folder: seed 0 again
    csv_path, md_path = aggregate(tmp_path)
    rows = list(csv.DictReader(csv_path.open()))
    by_settings = {(r["setting_train.epochs"], r["setting_train.steps"], r["setting_threads"]): r for r in rows}
    assert set(by_settings) == {("2", "null", "1"), ("30", "null", "1"), ("30", "40", "1"), ("30", "null", "2")}
    short = by_settings[("2", "null", "1")]
    assert short["n_seeds"] == "2" and float(short["final_mean"]) == pytest.approx(52.0)
    full = by_settings[("30", "null", "1")]
    assert full["n_seeds"] == "3" and full["seeds"] == "0 1 2" and float(full["final_mean"]) == pytest.approx(92.0)
    assert full["repeated_runs"] == "1"
    assert by_settings[("30", "40", "1")]["n_seeds"] == "1" and by_settings[("30", "null", "2")]["n_seeds"] == "1"
    md = md_path.read_text()
    assert "| method | threads | train.epochs | train.steps | digits | avg |" in md
    assert (
        "| original | 1 | 30 | null | 92.0 ± 2.0 [3] |" in md and "| original | 1 | 2 | null | 52.0 ± 2.8 [2] |" in md
    )
    assert "**Repeated seeds** (1)" in md and "| 0 | zz_copy_of_e30_s0 (90.00) | e30_s0 (90.00) |" in md
    assert "## Provenance" in md and "commit abc123" in md


def test_old_records_without_settings_are_told_apart_by_their_fields(tmp_path):
    """Records written before the experiment settings: the training length and the thread count still
    separate rows."""
    for i, (epochs, threads, acc) in enumerate([(2, 1, 50.0), (30, 1, 90.0), (30, 2, 91.0), (30, 1, 93.0)]):
        d = tmp_path / f"job{i}"
        d.mkdir()
        record = {"dataset": "digits", "method": "original", "seed": 0 if i < 3 else 1, "test_acc_final": acc}
        record |= {"test_acc_best_val": acc, "epochs": epochs, "environment": {"cpu_threads": threads}}
        (d / "metrics.json").write_text(json.dumps(record))
    rows = {(r["setting_epochs"], r["setting_threads"]): r for r in csv.DictReader(aggregate(tmp_path)[0].open())}
    assert set(rows) == {("2", "1"), ("30", "1"), ("30", "2")}
    assert rows[("30", "1")]["n_seeds"] == "2" and rows[("30", "2")]["n_seeds"] == "1"


def test_differences_to_the_original_carry_an_interval_over_seeds(tmp_path):
    for seed, (orig, cut) in enumerate([(80.0, 83.0), (82.0, 84.0), (81.0, 85.0)]):
        _write(tmp_path, f"o{seed}", dataset="digits", method="original", ratio=0, seed=seed, test_acc_final=orig)
        _write(tmp_path, f"c{seed}", dataset="digits", method="cutout", seed=seed, test_acc_final=cut)
    _write(tmp_path, "g0", dataset="digits", method="gridmask", seed=0, test_acc_final=90.0)
    csv_path, md_path = aggregate(tmp_path)
    rows = {r["row"]: r for r in csv.DictReader(csv_path.open())}
    cut = rows["cutout"]
    # paired differences 3, 2, 4: mean 3, sd 1, t(0.975, 2) = 4.303 -> half-width 2.484
    assert float(cut["minus_original"]) == pytest.approx(3.0)
    assert float(cut["minus_original_low"]) == pytest.approx(3.0 - 2.484, abs=1e-3)
    assert float(cut["minus_original_high"]) == pytest.approx(3.0 + 2.484, abs=1e-3)
    assert cut["interval"] == "paired by seed"
    assert rows["gridmask"]["interval"] == "n = 1: no spread known" and rows["gridmask"]["minus_original_low"] == ""
    md = md_path.read_text()
    assert "+3.0 [+0.5, +5.5] (paired by seed, n = 3)" in md and "+9.0 (n = 1: no spread known)" in md
