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
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from expansion.files import canonical_json, content_key
from experiments.jobs import FAILURE_FILE, find_failures
from experiments.record import BALANCED_SCORES, SCORES, RunRecord, load_records

log = logging.getLogger(__name__)

PAPER_NUMBERS_FILE = Path(__file__).with_name("paper_numbers.yaml")
METRICS = SCORES
#: each accuracy's table heading; the last is the official scripts' selection (runs with
#: ``train.test_every_epoch=true``), shown only when runs have it and never used for a claim
METRIC_LABELS = {
    "test_acc_final": "final-epoch test accuracy",
    "test_acc_best_val": "test accuracy at the best validation epoch",
    "test_acc_best_test": (
        "as the paper selects (optimistic): the best test accuracy over the epochs, the official scripts' "
        "selection, like for like with the paper's numbers; it selects on the test set, so it is never our claim"
    ),
    "test_balanced_acc_final": "final-epoch balanced accuracy (mean per-class recall)",
    "test_auc_final": "final-epoch AUC (macro one-vs-rest; MedMNIST's pair with accuracy)",
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
    """``(runs, damaged)`` under ``root``: every record (a copied job folder too: :func:`build_cells` keeps
    one run per experiment and seed and reports the rest) and, shaped as failures, the unreadable ones
    (named with what is wrong)."""
    runs, damaged = load_records(root, each_job_once=False)
    return runs, [
        {"job": str(folder.relative_to(root)), "type": "DamagedRecord", "error": f"{problem}; rerun the job"}
        for folder, problem in damaged
    ]


def sweep_failures(root: Path | str) -> list[dict[str, Any]]:
    """The failed jobs under ``root``: those that filed an error.json, and the damaged records."""
    return find_failures(root) + scan_runs(Path(root))[1]


def find_runs(root: Path) -> list[RunRecord]:
    """The readable records under ``root``, each job once (:func:`experiments.record.load_records`)."""
    return load_records(root)[0]


@dataclass
class Cell:
    """One table cell: the runs of one experiment (configurations that differ only in the seed) in one
    row and column. ``row`` is unique in its table: the method's label, plus the settings that tell its
    experiments apart (``settings``) where one label holds several."""

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
    label: str = ""  # the method's row label (the paper's row name); row without the settings
    settings: dict[str, str] = field(default_factory=dict)  # the settings that tell this row from its namesakes
    experiment: dict[str, str] = field(default_factory=dict)  # every setting of the experiment (display strings)
    runs: list[RunRecord] = field(default_factory=list)  # one per distinct seed, in seed order
    repeats: list[tuple[RunRecord, RunRecord]] = field(default_factory=list)  # (a repeated seed's run, the one counted)

    def __post_init__(self) -> None:
        self.label = self.label or self.row

    @property
    def seeds(self) -> list[int]:
        return [r.seed for r in self.runs]

    def stats(self, metric: str) -> tuple[float, float, int]:
        vals = self.values[metric]
        std = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return statistics.fmean(vals), std, len(vals)

    def by_seed(self, metric: str = "test_acc_final") -> dict[int, float]:
        return {r.seed: value for r in self.runs if (value := r.accuracy(metric)) is not None}


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


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return canonical_json(value)


def experiment_of(run: RunRecord) -> dict[str, str]:
    """What a results row holds fixed, as display strings: the run's recorded settings (its config identity
    less the seed, ``experiments.training.identity.experiment_settings``) and its data (``data``: the
    data fingerprint). A record written before settings were recorded: the fields of the record that
    tell experiments apart (method, ratio, training data, training length, steps budget, threads)."""
    if run.settings is not None:
        out = {key: _text(value) for key, value in run.settings.items()}
    else:
        t = run.training
        budget = t.optimizer_budget or {}
        fields = {
            "method.name": run.method,
            "method.ratio": run.ratio,
            "dataset.name": run.dataset,
            "dataset.train_per_class": run.train_per_class,
            "dataset.extra_real_per_class": run.extra_real_per_class,
            "classifier.name": run.classifier,
            "train_data": run.train_data,
            "epochs": t.epochs,
            "optimizer steps budget": budget.get("max_steps") if t.step_budget else None,
            "expansion_seed": "<seed>" if run.expansion_seed in (None, run.seed) else run.expansion_seed,
        }
        out = {key: _text(value) for key, value in fields.items()}
    if "threads" not in out and "cpu_threads" in run.environment:
        out["threads"] = _text(run.environment["cpu_threads"])
    out["data"] = (run.data_fingerprint or "unknown")[:12]
    return out


def experiment_key(settings: dict[str, str]) -> str:
    return content_key(settings)


def _distinct_seeds(runs: list[RunRecord]) -> tuple[list[RunRecord], list[tuple[RunRecord, RunRecord]]]:
    """One run per seed (the first in folder order), and ``(repeat, counted)`` for every other run of a seed."""
    kept: dict[int, RunRecord] = {}
    repeats = []
    for run in sorted(runs, key=lambda r: str(r.path)):
        if run.seed in kept:
            repeats.append((run, kept[run.seed]))
        else:
            kept[run.seed] = run
    return [kept[seed] for seed in sorted(kept)], repeats


def _varying(experiments: dict[str, dict[str, str]], groups: Iterable[list[str]]) -> list[str]:
    """The settings whose values differ between experiments of one group (one label in one column), in
    the order they first appear."""
    names: dict[str, None] = {}
    for keys in groups:
        if len(keys) < 2:
            continue
        for name in dict.fromkeys(n for key in keys for n in experiments[key]):
            if len({experiments[key].get(name) for key in keys}) > 1:
                names[name] = None
    return list(names)


def build_cells(runs: Iterable[RunRecord], paper: dict[str, Any]) -> list[Cell]:
    """The cells of every table: a row is one experiment (runs whose settings and data differ only in
    the seed, :func:`experiment_of`), never two; where one method label holds several experiments,
    the settings that differ become part of the row (``Cell.settings``). ``n`` counts distinct seeds; a
    repeated seed is kept once (``Cell.repeats``)."""
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
        experiments: dict[str, dict[str, str]] = {}
        members: dict[str, list[RunRecord]] = defaultdict(list)
        for run in table_runs:
            settings = experiment_of(run)
            key = experiment_key(settings)
            experiments[key] = settings
            members[key].append(run)
        place: dict[str, tuple[str, str]] = {}
        groups: dict[tuple[str, str], list[str]] = defaultdict(list)
        for key, group in members.items():
            first = group[0]
            place[key] = (_row_label(first, with_ratio), _column_label(first, column_key, with_shots))
            groups[place[key]].append(key)
        varying = _varying(experiments, groups.values())
        for key in sorted(members, key=lambda k: place[k]):
            label, column = place[key]
            distinct, repeats = _distinct_seeds(members[key])
            shown = {name: experiments[key].get(name, "–") for name in varying}
            row = label + (" [" + ", ".join(f"{n}={v}" for n, v in shown.items()) + "]" if shown else "")
            first = distinct[0]
            paper_value = spec.get("values", {}).get(label, {}).get(column) if spec else None
            cells.append(
                Cell(
                    table=table,
                    row=row,
                    column=column,
                    method=first.method,
                    dataset=first.dataset,
                    classifier=str(first.classifier),
                    ratio=first.ratio,
                    values={m: [r.accuracy(m) for r in distinct if r.accuracy(m) is not None] for m in METRICS},
                    paper=paper_value,
                    quality={
                        csv: [r.quality_value(col.key) for r in distinct if r.quality_value(col.key) is not None]
                        for csv, col in quality_columns().items()
                    },
                    extractors=sorted({r.quality_extractor for r in distinct if r.quality is not None}),
                    environment=environment_values(distinct),
                    label=label,
                    settings=shown,
                    experiment=experiments[key],
                    runs=distinct,
                    repeats=repeats,
                )
            )
    return sorted(cells, key=lambda c: (c.table, c.row, c.column))


# -- differences to the original --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """A row's difference to the original in one column (final-epoch accuracy, points): the mean and, with
    two or more seeds on both sides, a 95 % t-interval (paired over the shared seeds when there are two or
    more, else Welch's); ``why`` says why there is no interval or no difference."""

    mean: float | None
    low: float | None = None
    high: float | None = None
    n: int = 0
    kind: str = ""
    why: str = ""

    def text(self) -> str:
        if self.mean is None:
            return self.why
        if self.low is None:
            return f"{self.mean:+.1f} ({self.why})"
        return f"{self.mean:+.1f} [{self.low:+.1f}, {self.high:+.1f}] ({self.kind}, n = {self.n})"


CONFIDENCE = 0.95


def difference(cell: Cell, original: Cell, metric: str = "test_acc_final") -> Difference:
    """``cell`` minus ``original`` over seeds (see :class:`Difference`)."""
    from scipy import stats

    ours, theirs = cell.by_seed(metric), original.by_seed(metric)
    if not ours or not theirs:
        return Difference(None, why="no accuracy")
    shared = sorted(set(ours) & set(theirs))
    if len(shared) >= 2:
        diffs = [ours[s] - theirs[s] for s in shared]
        mean, sd, n = statistics.fmean(diffs), statistics.stdev(diffs), len(diffs)
        half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * sd / math.sqrt(n)
        return Difference(mean, mean - half, mean + half, n, "paired by seed")
    a, b = list(ours.values()), list(theirs.values())
    mean = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Difference(mean, why="n = 1: no spread known")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return Difference(mean, mean, mean, min(len(a), len(b)), "Welch; no spread in either")
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, dof) * math.sqrt(va + vb)
    return Difference(mean, mean - half, mean + half, min(len(a), len(b)), "Welch")


def matching_original(cell: Cell, cells: list[Cell]) -> tuple[Cell | None, str]:
    """The original (no expansion) of ``cell``'s table and column whose settings agree with ``cell``'s on
    every setting that tells rows apart, method settings aside; ``(None, why)`` when there is none or several."""
    originals = [c for c in cells if c.table == cell.table and c.column == cell.column and c.method == "original"]
    shared = [name for name in cell.settings if not name.startswith("method.")]
    matches = [o for o in originals if all(o.settings.get(n) == cell.settings.get(n) for n in shared)]
    if len(matches) == 1:
        return matches[0], ""
    return None, "no original run with these settings" if not matches else "several originals match"


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


def ordered_rows(cells: list[Cell], paper_rows: list[str]) -> list[Cell]:
    """One cell per row (its first column), rows in the paper's order (original first), then by settings."""
    first: dict[str, Cell] = {}
    for c in cells:
        first.setdefault(c.row, c)
    labels = {label: i for i, label in enumerate(_order({c.label for c in cells}, paper_rows))}
    return sorted(first.values(), key=lambda c: (labels[c.label], natural_key(c.row)))


def _row_cells(row: Cell, names: list[str]) -> str:
    return f"| {row.label} | " + "".join(f"{row.settings.get(n, '–')} | " for n in names)


def render_markdown(cells: list[Cell], paper: dict[str, Any], root: Path | None = None) -> str:
    out = io.StringIO()
    for table in sorted({c.table for c in cells}):
        tcells = [c for c in cells if c.table == table]
        spec = paper.get(table, {})
        out.write(f"## {spec.get('title', table)}\n\n")
        rows = ordered_rows(tcells, list(spec.get("values", {}).keys()))
        names = list(dict.fromkeys(n for c in tcells for n in c.settings))
        columns = sorted({c.column for c in tcells}, key=natural_key)
        index = {(c.row, c.column): c for c in tcells}
        if names:
            out.write(
                "A row is one experiment (runs that differ only in the seed); these settings differ between "
                f"rows of one method and are shown as columns: {', '.join(f'`{n}`' for n in names)}.\n\n"
            )
        head = "| method | " + "".join(f"{n} | " for n in names)
        rule = "|---" * (len(names) + 1)
        for metric, label in METRIC_LABELS.items():
            if metric in ("test_acc_best_test", *BALANCED_SCORES) and not any(c.values[metric] for c in tcells):
                continue
            legend = (
                "paper; ours − paper" if any(c.paper is not None for c in tcells) else "no paper numbers in this table"
            )
            out.write(f"**{label}** (ours mean ± std over [n] distinct seeds, n = 1: no spread known; {legend})\n\n")
            out.write(head + " | ".join(columns) + " | avg |\n")
            out.write(rule + "|---" * (len(columns) + 1) + "|\n")
            for row in rows:
                cells_text, means, paper_vals = [], [], []
                for col in columns:
                    cell = index.get((row.row, col))
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
                out.write(_row_cells(row, names) + " | ".join(cells_text) + f" | {avg} |\n")
            out.write("\n")
        out.write(render_differences(tcells, rows, names, columns))
        out.write(render_repeats(tcells, root))
    return out.getvalue()


def render_differences(tcells: list[Cell], rows: list[Cell], names: list[str], columns: list[str]) -> str:
    """Each row's difference to the original of its column (final epoch), with its 95 % interval over seeds."""
    index = {(c.row, c.column): c for c in tcells}
    lines = []
    for row in rows:
        if row.method == "original":
            continue
        texts = []
        for col in columns:
            cell = index.get((row.row, col))
            if cell is None:
                texts.append("–")
                continue
            original, why = matching_original(cell, tcells)
            texts.append(difference(cell, original).text() if original is not None else why)
        lines.append(_row_cells(row, names) + " | ".join(texts) + " |")
    if not lines:
        return ""
    return (
        "**difference to the original, final-epoch test accuracy** (points; 95 % t-interval over seeds: "
        "paired by seed where both sides share two or more seeds, else Welch; an interval that contains 0 "
        "shows no difference at this n; the original is the one with the same settings)\n\n"
        + "| method | "
        + "".join(f"{n} | " for n in names)
        + " | ".join(columns)
        + " |\n"
        + "|---" * (len(names) + 1 + len(columns))
        + "|\n"
        + "\n".join(lines)
        + "\n\n"
    )


def render_repeats(tcells: list[Cell], root: Path | None = None) -> str:
    """The runs that repeat a seed already counted in their row (kept out of the means)."""
    repeats = [(c, repeat, counted) for c in tcells for repeat, counted in c.repeats]
    if not repeats:
        return ""
    lines = [
        f"| {c.row} | {c.column} | {repeat.seed} | {_folder(repeat, root)} ({repeat.accuracy():.2f}) | "
        f"{_folder(counted, root)} ({counted.accuracy():.2f}) |"
        for c, repeat, counted in repeats
    ]
    return (
        f"**Repeated seeds** ({len(repeats)}): runs of the same experiment and seed as a run already counted; "
        "not averaged in (the first in folder order counts).\n\n"
        "| row | column | seed | repeat (final acc) | counted (final acc) |\n|---|---|---|---|---|\n"
        + "\n".join(lines)
        + "\n\n"
    )


def _folder(run: RunRecord, root: Path | None) -> str:
    """The run's folder, relative to the aggregated folder when it is inside."""
    if run.folder is None:
        return "?"
    if root is not None and run.folder.resolve().is_relative_to(Path(root).resolve()):
        return run.folder.resolve().relative_to(Path(root).resolve()).as_posix() or "."
    return str(run.folder)


def render_provenance(cells: list[Cell]) -> str:
    """Where the numbers came from: the code (git commits, uncommitted changes), the environment, and each
    row's experiment key and its runs' config hashes."""
    runs = [r for c in cells for r in c.runs]
    if not runs:
        return ""
    commits: dict[str, int] = defaultdict(int)
    for r in runs:
        commit = r.environment.get("git_commit")
        dirty = " (uncommitted changes)" if r.environment.get("git_dirty") else ""
        commits[f"{str(commit)[:12] if commit else 'unknown'}{dirty}"] += 1
    env = environment_values(runs)
    summary = ", ".join(
        f"{key} {env[key]}" for key in ("torch", "python", "device_name", "cpu_threads", "lightning") if key in env
    )
    out = io.StringIO()
    out.write("## Provenance\n\n")
    out.write("- code: " + "; ".join(f"commit {c} ({n} run(s))" for c, n in commits.items()) + "\n")
    out.write(f"- environment: {summary or 'not recorded (runs predate it)'}\n\n")
    out.write("| table | row | column | experiment key | seeds | config hashes |\n|---|---|---|---|---|---|\n")
    for c in cells:
        hashes = ", ".join(str(r.config_hash)[:12] for r in c.runs)
        key = experiment_key(c.experiment)[:12]
        out.write(f"| {c.table} | {c.row} | {c.column} | {key} | {', '.join(map(str, c.seeds))} | {hashes} |\n")
    return out.getvalue() + "\n"


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
        order = {c.row: i for i, c in enumerate(ordered_rows(tcells, list(spec.get("values", {}).keys())))}
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
    settings = list(dict.fromkeys(n for c in cells for n in c.settings))
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
                "balanced_acc_mean",
                "balanced_acc_std",
                "auc_mean",
                "auc_std",
                "paper",
                "final_minus_paper",
                "seeds",
                "repeated_runs",
                "minus_original",
                "minus_original_low",
                "minus_original_high",
                "interval",
                "experiment",
                "config_hashes",
            ]
            + [f"setting_{name}" for name in settings]
            + (list(quality_columns()) if quality else [])
            + [f"env_{key}" for key in env]
        )
        for c in cells:
            fm, fs, n = c.stats("test_acc_final")
            bm, bs, _ = c.stats("test_acc_best_val") if c.values["test_acc_best_val"] else (math.nan, math.nan, 0)
            best_test = ["", ""]  # runs without train.test_every_epoch
            if c.values["test_acc_best_test"]:
                best_test = [f"{v:.3f}" for v in c.stats("test_acc_best_test")[:2]]
            balanced = [
                x for m in BALANCED_SCORES for x in ([f"{v:.3f}" for v in c.stats(m)[:2]] if c.values[m] else ["", ""])
            ]
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
                    *balanced,
                    "" if c.paper is None else c.paper,
                    "" if c.paper is None else f"{fm - c.paper:.3f}",
                    " ".join(map(str, c.seeds)),
                    len(c.repeats),
                    *_difference_fields(c, cells),
                    experiment_key(c.experiment)[:12],
                    " ".join(str(r.config_hash) for r in c.runs),
                ]
                + [c.settings.get(name, "") for name in settings]
                + ([_fmt_quality(quality_mean(c, col)) for col in quality_columns()] if quality else [])
                + [c.environment.get(key, "") for key in env]
            )


def _difference_fields(cell: Cell, cells: list[Cell]) -> list[str]:
    if cell.method == "original":
        return ["", "", "", ""]
    original, why = matching_original(cell, cells)
    if original is None:
        return ["", "", "", why]
    d = difference(cell, original)
    return [_fmt_number(d.mean), _fmt_number(d.low), _fmt_number(d.high), d.kind or d.why]


def _fmt_number(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


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
        + (render_markdown(cells, paper, root) if cells else "")
        + (render_quality_markdown(cells, paper) if has_quality(cells) else "")
        + render_provenance(cells),
    )
    return csv_path, md_path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a sweep folder (searched recursively for metrics.json)")
    args = parser.parse_args(argv)
    csv_path, md_path = aggregate(args.root)
    print(md_path.read_text())
    print(f"wrote {csv_path} and {md_path}")


if __name__ == "__main__":
    main()
