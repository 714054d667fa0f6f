"""Collect every ``metrics.json`` under a sweep folder into paper-style tables.

    python -m experiments.analysis.aggregate multirun/2026-11-21/12-00-00

writes ``results.csv`` (one line per cell) and ``results.md`` (rows = method,
columns = dataset or classifier; mean +- std over seeds, the paper's number
beside ours and the difference). A multirun does this by itself when it ends.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.jobs import FAILURE_FILE, find_failures
from experiments.record import ACCURACIES, RunRecord, load_records

log = logging.getLogger(__name__)

PAPER_NUMBERS_FILE = Path(__file__).with_name("paper_numbers.yaml")
METRICS = ACCURACIES
#: each accuracy's table heading; the last is the official scripts' selection (runs with
#: ``train.test_every_epoch=true``), shown only when runs have it and never used for a claim
METRIC_LABELS = {
    "test_acc_final": "final-epoch test accuracy",
    "test_acc_best_val": "test accuracy at the best validation epoch",
    "test_acc_best_test": (
        "as the paper selects (optimistic): the best test accuracy over the epochs, the official scripts' "
        "selection, like for like with the paper's numbers; it selects on the test set, so it is never our claim"
    ),
}


def quality_columns() -> dict[str, Any]:
    """results.csv column -> :class:`~experiments.quality.Column` of every registered quality metric."""
    from experiments.quality import quality_columns as registered

    return registered()


def load_paper_numbers(path: Path = PAPER_NUMBERS_FILE) -> dict[str, Any]:
    tables = yaml.safe_load(path.read_text())
    for spec in tables.values():
        if "same_values_as" in spec:
            spec["values"] = tables[spec["same_values_as"]]["values"]
    return tables


def scan_runs(root: Path) -> tuple[list[RunRecord], list[dict[str, Any]]]:
    """``(runs, damaged)`` under ``root``: the records of :func:`experiments.record.load_records` and, shaped
    as failures, the unreadable ones (named with what is wrong)."""
    runs, damaged = load_records(root)
    return runs, [
        {"job": str(folder.relative_to(root)), "type": "DamagedRecord", "error": f"{problem}; rerun the job"}
        for folder, problem in damaged
    ]


def sweep_failures(root: Path | str) -> list[dict[str, Any]]:
    """The failed jobs under ``root``: those that filed an error.json, and the damaged records."""
    return find_failures(root) + scan_runs(Path(root))[1]


def find_runs(root: Path) -> list[RunRecord]:
    """The runs of :func:`scan_runs` (the damaged records left out)."""
    return scan_runs(root)[0]


@dataclass
class Cell:
    table: str
    row: str
    column: str
    method: str
    dataset: str
    classifier: str
    ratio: int
    values: dict[str, list[float]]
    paper: float | None
    quality: dict[str, list[float]] = field(default_factory=dict)  # results.csv quality column -> one value per run
    extractors: list[str] = field(default_factory=list)  # the quality feature extractors named by the runs
    environment: dict[str, str] = field(default_factory=dict)  # each metrics.json environment field -> its value(s)

    def stats(self, metric: str) -> tuple[float, float, int]:
        vals = self.values[metric]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return statistics.fmean(vals), std, len(vals)


def _column_key(table_spec: dict[str, Any] | None, runs: list[RunRecord]) -> str:
    if table_spec:
        return table_spec.get("column", "dataset")
    datasets = {r.dataset for r in runs}
    classifiers = {r.classifier for r in runs}
    return "classifier" if len(datasets) == 1 and len(classifiers) > 1 else "dataset"


def _row_label(run: RunRecord, with_ratio: bool) -> str:
    method = run.paper_method or run.method
    label = f"{method}@{run.ratio}" if with_ratio and run.method != "original" else method
    if run.generated_only:
        label += f" ({run.train_data})"
    if run.extra_real:  # the exchange-rate sweep's real arm (experiments/analysis/equivalence.py)
        label += f" +{run.extra_real} real/class"
    return label


def _column_label(run: RunRecord, column_key: str, with_shots: bool) -> str:
    """The column value; with several few-shot sizes of one dataset in a table, ``mnist 10/class``."""
    value = str(getattr(run, column_key))
    if with_shots and run.train_per_class is not None:
        value += f" {run.train_per_class}/class"
    return value


def build_cells(runs: Iterable[RunRecord], paper: dict[str, Any]) -> list[Cell]:
    by_table: dict[str, list[RunRecord]] = defaultdict(list)
    for run in runs:
        by_table[run.table or "adhoc"].append(run)
    cells: list[Cell] = []
    for table, table_runs in by_table.items():
        spec = paper.get(table)
        column_key = _column_key(spec, table_runs)
        ratios_per_method: dict[str, set] = defaultdict(set)
        for run in table_runs:
            ratios_per_method[run.method].add(run.ratio)
        with_ratio = bool(spec and spec.get("row_includes_ratio")) or any(
            len(r) > 1 for r in ratios_per_method.values()
        )
        shots_per_dataset: dict[str, set] = defaultdict(set)
        for run in table_runs:
            shots_per_dataset[run.dataset].add(run.train_per_class)
        with_shots = any(len(s) > 1 for s in shots_per_dataset.values())
        grouped: dict[tuple[str, str], list[RunRecord]] = defaultdict(list)
        for run in table_runs:
            grouped[(_row_label(run, with_ratio), _column_label(run, column_key, with_shots))].append(run)
        for (row, column), group in sorted(grouped.items()):
            first = group[0]
            paper_value = None
            if spec:
                paper_value = spec.get("values", {}).get(row, {}).get(column)
            cells.append(
                Cell(
                    table=table,
                    row=row,
                    column=column,
                    method=first.method,
                    dataset=first.dataset,
                    classifier=str(first.classifier),
                    ratio=first.ratio,
                    values={m: [r.accuracy(m) for r in group if r.accuracy(m) is not None] for m in METRICS},
                    paper=paper_value,
                    quality={
                        csv: [r.quality_value(col.key) for r in group if r.quality_value(col.key) is not None]
                        for csv, col in quality_columns().items()
                    },
                    extractors=sorted({r.quality_extractor for r in group if r.quality is not None}),
                    environment=environment_values(group),
                )
            )
    return cells


def environment_values(runs: list[RunRecord]) -> dict[str, str]:
    """Each field of the runs' ``environment`` -> its value, or its distinct values joined by " | " (runs
    recorded before environments were: no fields)."""
    values: dict[str, list[str]] = defaultdict(list)
    for run in runs:
        for key, value in run.environment.items():
            if str(value) not in values[key]:
                values[key].append(str(value))
    return {key: " | ".join(v) for key, v in values.items()}


def varying_environment(cells: list[Cell]) -> list[str]:
    """The environment fields whose value differs within the sweep (shown as ``env_<field>`` columns)."""
    keys = dict.fromkeys(k for c in cells for k in c.environment)
    return [
        k
        for k in keys
        if len({c.environment.get(k) for c in cells}) > 1 or any(" | " in c.environment.get(k, "") for c in cells)
    ]


def _fmt(mean: float, std: float, n: int) -> str:
    return f"{mean:.1f} ± {std:.1f}" if n > 1 else f"{mean:.1f}"


def natural_key(text: str) -> list:
    """Sort key that orders embedded numbers by value (``mnist 10/class`` before ``mnist 100/class``)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _order(rows: Iterable[str], paper_rows: list[str]) -> list[str]:
    rows = set(rows)
    known = [r for r in ["original", *paper_rows] if r in rows]
    return list(dict.fromkeys(known)) + sorted(r for r in rows if r not in known)


def render_markdown(cells: list[Cell], paper: dict[str, Any]) -> str:
    out = io.StringIO()
    for table in sorted({c.table for c in cells}):
        tcells = [c for c in cells if c.table == table]
        spec = paper.get(table, {})
        out.write(f"## {spec.get('title', table)}\n\n")
        paper_rows = list(spec.get("values", {}).keys())
        rows = _order({c.row for c in tcells}, paper_rows)
        columns = sorted({c.column for c in tcells}, key=natural_key)
        for metric, label in METRIC_LABELS.items():
            if metric == "test_acc_best_test" and not any(c.values[metric] for c in tcells):
                continue
            legend = (
                "paper; ours − paper" if any(c.paper is not None for c in tcells) else "no paper numbers in this table"
            )
            out.write(f"**{label}** (ours mean ± std over seeds [n]; {legend})\n\n")
            out.write("| method | " + " | ".join(columns) + " | avg |\n")
            out.write("|---" * (len(columns) + 2) + "|\n")
            index = {(c.row, c.column): c for c in tcells}
            for row in rows:
                cells_text, means, paper_vals = [], [], []
                for col in columns:
                    cell = index.get((row, col))
                    if cell is None or not cell.values[metric]:
                        cells_text.append("–")
                        continue
                    mean, std, n = cell.stats(metric)
                    means.append(mean)
                    text = f"{_fmt(mean, std, n)} [{n}]"
                    if cell.paper is not None:
                        paper_vals.append(cell.paper)
                        text += f"; {cell.paper:.1f}; {mean - cell.paper:+.1f}"
                    cells_text.append(text)
                avg = "–"
                if means and len(means) == len(columns):
                    avg = f"{statistics.fmean(means):.1f}"
                    if len(paper_vals) == len(columns):
                        avg += f"; {statistics.fmean(paper_vals):.1f}"
                out.write(f"| {row} | " + " | ".join(cells_text) + f" | {avg} |\n")
            out.write("\n")
    return out.getvalue()


def has_quality(cells: list[Cell]) -> bool:
    return any(any(v for v in c.quality.values()) for c in cells)


def quality_mean(cell: Cell, column: str) -> float | None:
    vals = cell.quality.get(column) or []
    return statistics.fmean(vals) if vals else None


def render_quality_markdown(cells: list[Cell], paper: dict[str, Any]) -> str:
    """One table per paper table: the expanded sets' quality (experiments/quality/), mean over runs."""
    out = io.StringIO()
    for table in sorted({c.table for c in cells}):
        tcells = [c for c in cells if c.table == table and any(c.quality.values())]
        if not tcells:
            continue
        spec = paper.get(table, {})
        out.write(f"## Quality of the expanded sets: {spec.get('title', table)}\n\n")
        extractors = sorted({e for c in tcells for e in c.extractors})
        out.write(
            "Feature extractor: "
            + "; ".join(extractors)
            + ". "
            + " ".join(f"{m.name}: {m.description}" for m in _quality_metrics())
            + " Mean over runs [n].\n\n"
        )
        columns = quality_columns()
        out.write("| method | column | " + " | ".join(c.title for c in columns.values()) + " | n |\n")
        out.write("|---|---|" + "---|" * (len(columns) + 1) + "\n")
        paper_rows = list(spec.get("values", {}).keys())
        order = {r: i for i, r in enumerate(_order({c.row for c in tcells}, paper_rows))}
        for c in sorted(tcells, key=lambda c: (order[c.row], c.column)):
            n = max(len(v) for v in c.quality.values())
            values = [_fmt_column(quality_mean(c, csv), col.fmt) for csv, col in columns.items()]
            out.write(f"| {c.row} | {c.column} | " + " | ".join(values) + f" | {n} |\n")
        out.write("\n")
    return out.getvalue()


def write_csv(cells: list[Cell], path: Path) -> None:
    """One line per cell; the quality columns when the runs computed them, an ``env_<field>`` column for
    every environment field that differs within the sweep (e.g. CPU threads, a dirty tree, the device)."""
    quality = has_quality(cells)
    env = varying_environment(cells)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "table",
                "row",
                "column",
                "method",
                "dataset",
                "classifier",
                "ratio",
                "n_seeds",
                "final_mean",
                "final_std",
                "best_val_mean",
                "best_val_std",
                "best_test_mean",
                "best_test_std",
                "paper",
                "final_minus_paper",
            ]
            + (list(quality_columns()) if quality else [])
            + [f"env_{key}" for key in env]
        )
        for c in cells:
            fm, fs, n = c.stats("test_acc_final")
            bm, bs, _ = c.stats("test_acc_best_val") if c.values["test_acc_best_val"] else (math.nan, math.nan, 0)
            best_test = ["", ""]  # runs without train.test_every_epoch
            if c.values["test_acc_best_test"]:
                best_test = [f"{v:.3f}" for v in c.stats("test_acc_best_test")[:2]]
            writer.writerow(
                [
                    c.table,
                    c.row,
                    c.column,
                    c.method,
                    c.dataset,
                    c.classifier,
                    c.ratio,
                    n,
                    f"{fm:.3f}",
                    f"{fs:.3f}",
                    f"{bm:.3f}",
                    f"{bs:.3f}",
                    *best_test,
                    "" if c.paper is None else c.paper,
                    "" if c.paper is None else f"{fm - c.paper:.3f}",
                ]
                + ([_fmt_quality(quality_mean(c, col)) for col in quality_columns()] if quality else [])
                + [c.environment.get(key, "") for key in env]
            )


def _fmt_quality(value: float | None) -> str:
    return "" if value is None else f"{value:.6g}"


def _fmt_column(value: float | None, fmt: str) -> str:
    if value is None:
        return "–"
    return f"{100 * value:.1f}%" if fmt == "%" else format(value, fmt)


def _quality_metrics() -> list:
    from experiments.quality.metrics import METRICS

    return list(METRICS.values())


def render_failures(failures: list[dict[str, Any]]) -> str:
    """The failed jobs of a sweep with their one-line error (their traceback, if any, is in error.json)."""
    if not failures:
        return ""
    out = io.StringIO()
    out.write(
        f"## Failed jobs ({len(failures)})\n\nEach job folder holds its `{FAILURE_FILE}` (a DamagedRecord: its "
        "unusable metrics.json; a job refused in another configuration's folder: under `refused/`).\n\n"
    )
    out.write("| job | overrides | error |\n|---|---|---|\n")
    for f in failures:
        error = f"{f.get('type', '?')}: {f.get('error', '')}".replace("|", "\\|")
        out.write(f"| {f['job']} | {' '.join(f.get('overrides', [])).replace('|', '/')} | {error} |\n")
    return out.getvalue() + "\n"


def aggregate(root: Path | str) -> tuple[Path, Path]:
    """Write ``results.csv`` and ``results.md`` into ``root`` (results.md also lists the failed jobs);
    returns their paths."""
    from expansion.files import atomic_write_text

    root = Path(root)
    runs, damaged = scan_runs(root)
    failures = find_failures(root) + damaged  # sweep_failures, with the runs scanned once
    if not runs and not failures:
        raise FileNotFoundError(f"no metrics.json under {root}")
    paper = load_paper_numbers()
    cells = build_cells(runs, paper)
    csv_path, md_path = root / "results.csv", root / "results.md"
    write_csv(cells, csv_path)
    failed = f", {len(failures)} failed" if failures else ""
    atomic_write_text(
        md_path,
        f"# Results ({len(runs)} runs under {root}{failed})\n\n"
        + render_failures(failures)
        + (render_markdown(cells, paper) if cells else "")
        + (render_quality_markdown(cells, paper) if has_quality(cells) else ""),
    )
    return csv_path, md_path


try:  # the Hydra callback that aggregates a multirun when it ends
    from hydra.experimental.callback import Callback

    class AggregateOnMultirunEnd(Callback):
        """Writes the sweep's results when it ends; a sweep with failed jobs then exits with status 1."""

        def on_multirun_end(self, config, **kwargs: Any) -> None:
            # Hydra turns a callback's exception into a warning: a failed aggregation exits here, non-zero
            try:
                _, md_path = aggregate(config.hydra.sweep.dir)
            except FileNotFoundError as exc:
                print(f"aggregate: {exc}")
                return
            except Exception as exc:
                print(
                    f"error: the sweep's results could not be aggregated: {type(exc).__name__}: {exc}", file=sys.stderr
                )
                raise SystemExit(1) from None
            print(f"results: {md_path}\n" + md_path.read_text())
            failures = sweep_failures(config.hydra.sweep.dir)
            if failures:
                print(f"{len(failures)} job(s) of the sweep failed (listed in {md_path})", file=sys.stderr)
                raise SystemExit(1)
except ImportError:  # pragma: no cover
    pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a sweep folder (searched recursively for metrics.json)")
    args = parser.parse_args(argv)
    csv_path, md_path = aggregate(args.root)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
