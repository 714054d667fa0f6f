"""Aggregation of metrics.json files into results.csv / results.md with the paper's numbers."""

from __future__ import annotations

import csv
import json

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
