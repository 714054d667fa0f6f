"""`python -m experiments.analysis.report DIR` on a real small sweep (digits, original vs Cutout):
every promised file exists and report.md links it; backfill and ratio curves."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
from PIL import Image

from experiments.analysis.report import build_report
from tests.helpers.cli import run_py


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    args = [
        "-m",
        "dataset=digits",
        "method=original,cutout",
        "train.epochs=2",
        "logger=none",
        f"hydra.sweep.dir={root}",
    ]
    proc = run_py(args, cache=root / "cache", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _listed_files(report: Path) -> list[Path]:
    section = report.read_text().split("## Files written by this report")[1]
    return [(report.parent / rel).resolve() for rel in re.findall(r"^- \[[^\]]+\]\(([^)]+)\)", section, flags=re.M)]


@pytest.mark.integration
def test_report_command_writes_every_promised_file(sweep):
    cutout = json.loads(next(sweep.glob("*_cutout_*/metrics.json")).read_text())
    quality = cutout["quality"]
    assert quality["feature_extractor"].startswith("classifier(small_cnn")
    assert quality["seconds"] < 30 and (next(sweep.glob("*_cutout_*")) / "expansion_grid.png").is_file()
    proc = run_py([str(sweep)], module="experiments.analysis.report", cache=sweep / "cache", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = sweep / "report" / "report.md"
    printed = [Path(line.strip()).resolve() for line in proc.stdout.splitlines() if line.startswith("  ")]
    listed = _listed_files(report)
    assert sorted(printed) == sorted(listed) and len(listed) >= 5
    assert all(p.is_file() for p in listed)
    text = report.read_text()
    names = {p.name for p in listed}
    assert {"results.csv", "results.md", "report.md", "fig_adhoc.png"} <= names
    grids = [p for p in listed if p.parent.name == "grids"]
    assert [g.name for g in grids] == [f"{next(sweep.glob('*_cutout_*')).name}.png"]
    for png in [p for p in listed if p.suffix == ".png"]:
        assert f"]({os.path.relpath(png, report.parent)})" in text  # embedded in the report
        with Image.open(png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    sections = ("## Results", "## Figures", "## Quality of the expanded sets", "## Expansion grids", "## Settings")
    for section in (*sections, "## Provenance"):
        assert section in text
    commit = json.loads(next(sweep.glob("*_cutout_*/metrics.json")).read_text())["environment"]["git_commit"]
    assert f"commit {commit[:12]}" in text and "| experiment key | seeds | config hashes |" in text
    assert "| cutout | digits |" in text and "`method=original,cutout`" in text
    header = (sweep / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-6:] == ["fid", "kid", "label_agreement", "vendi", "vendi_original", "near_duplicate_fraction"]


def test_report_backfills_runs_that_predate_quality(sweep, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(sweep, old, ignore=shutil.ignore_patterns("report", "cache"))
    run_dir = next(old.glob("*_cutout_*"))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    del metrics["quality"]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "expansion_grid.png").unlink()
    report, written = build_report(old, tmp_path / "out")
    backfilled = json.loads((tmp_path / "out" / "backfill" / run_dir.name / "quality.json").read_text())
    assert backfilled["backfilled"] and backfilled["fid"] > 0
    assert (tmp_path / "out" / "grids" / f"{run_dir.name}.png") in written
    assert "backfilled" in report.read_text() and all(p.is_file() for p in written)
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics  # run folders are never modified


def test_ratio_sweep_gets_accuracy_vs_ratio_curves(tmp_path):
    root = tmp_path / "sweep"
    for i, (method, ratio, acc) in enumerate(
        [
            ("original", 0, 20.0),
            ("cutout", 5, 30.0),
            ("cutout", 10, 31.0),
            ("cutout", 10, 33.0),
            ("randaugment", 5, 35.0),
            ("randaugment", 10, 38.0),
        ]
    ):
        d = root / f"job{i}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(
            json.dumps(
                {
                    "table": "efficiency",
                    "dataset": "cars",
                    "method": method,
                    "classifier": "resnet50",
                    "ratio": ratio,
                    "seed": i,
                    "test_acc_final": acc,
                    "test_acc_best_val": acc - 1,
                    "test_acc_best_test": acc + 2 if method == "randaugment" else None,
                }
            )
        )
    report, written = build_report(root, backfill=False)
    assert {p.name for p in written} >= {"fig_efficiency.png", "fig_efficiency_ratio.png", "report.md"}
    text = report.read_text()
    assert "accuracy vs expansion ratio" in text and "](fig_efficiency_ratio.png)" in text
    assert "No run has an expansion grid" in text
    # the paper's own selection: a table of its own and a column of the run list, for the runs that have it
    assert "**as the paper selects (optimistic)" in text and "| 40.00 |" in text


def test_the_bar_figure_starts_its_axis_at_zero_and_marks_single_seeds():
    from experiments.analysis.aggregate import Cell
    from experiments.analysis.report import _plt, draw_table

    def cell(row, values, paper=None):
        return Cell("adhoc", row, "c", row, "d", "k", 1, {"test_acc_final": values, "test_acc_best_val": []}, paper)

    fig = draw_table([cell("a", [90.0, 90.8]), cell("b", [89.2])], {}, "adhoc")
    ax = fig.axes[0]
    assert ax.get_ylim()[0] == 0.0 and ax.get_ylim()[1] >= 100  # a 1-point gap is not blown up
    labels = [t.get_text() for t in ax.texts]
    assert "90.4 [2]" in labels and "89.2 [1: no spread]" in labels
    assert "axis from 0" in ax.get_title()
    _plt().close(fig)
