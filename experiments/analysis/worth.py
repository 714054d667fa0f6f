"""What is a generated image worth? The real-image equivalent of every method's images, at equal epochs
and at equal optimizer steps, against the online-augmentation reference, beside what they cost.

    python -m experiments.analysis.worth <sweep dir | worth_runs.csv> [--metric headline] [--correction holm]
    make worth DIR=<sweep dir>

reads every ``metrics.json`` under a sweep such as ``experiment=worth_cpu`` (any partial sweep too), or the
per-run table a previous analysis wrote (``worth_runs.csv``: one row per run, every score; the committed
docs/worth_cpu_runs.csv regenerates docs/worth_cpu.md). Per dataset and n_base (original images per class):

* **the real arm**: ``method=original`` with n_real_plus = 0, 0.5, 1, 2, 4 x n_base extra real images per
  class (``exchange=real_*``), at equal epochs (``train.epochs``) and, per synthetic step budget S, trained
  exactly S optimizer steps (``train.steps_matched_to_ratio``);
* **the online reference**: the original images with a baseline applied on the fly (``train.online_augment``),
  trained S steps: what an offline expansion must beat to be worth its storage;
* **the synthetic arm**: every other method at ratio R, trained ``train.epochs`` epochs: S = its steps.

Every run has three random factors (experiments/analysis/intervals.py): the base-set draw
(``dataset.split_seed``), the expansion seed and the classifier seed. A gain is the paired difference to the
original of the same protocol, base draw and classifier seed; its 95 % interval is Student's t over the means
of the outermost factor with two or more levels (the base draws in experiment=worth_cpu), calibrated in
tests/test_intervals.py; with one base draw the table says the interval is conditional on it. The equivalent
extra real images per class are read per unit off that unit's monotone real curve (beyond the last real point:
censored there, shown as ">="), and averaged with the same t-interval. The p-values of all the gains of a
report (both protocols, and every difference to the online reference) are adjusted together (Holm by default,
or Benjamini-Hochberg); a claim survives when its adjusted p-value is below 0.05.

The closed-set paper's relation n_syn / n_base = c1^(n_base / k) (c2^(n_real_plus / n_base) - 1) is fitted
only where the data identify it: at least three ratios whose equivalents rise with the ratio (else "the
relation does not fit: equivalents fall with the ratio"); c2 and c1^(n_base/k) get intervals from refits on
equivalents redrawn from their t-distributions, and c2 is quoted only where its interval is bounded (inside
the search range). c1 itself is read only across three or more base sizes.

Cost: generation CPU seconds per image, every fit included and shared in equal parts by the methods that use
it (one ``fit_key``), and the CPU seconds of one point (generation of its set + its share of fits + one
classifier's training); real-image equivalents per CPU-hour of generation.

Writes ``worth.md``, ``worth.json``, ``worth.csv`` (one row per point), ``worth_runs.csv`` (one row per run),
``worth.png`` (every gain with its interval, per dataset) and ``worth_cost.png`` into the output folder.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.record import SCORES

from .equivalence import (
    LOG_C2_BOUNDS,
    EquivalenceError,
    _fmt,
    equivalent_real,
    fit_exchange_rate,
    isotonic,
)
from .equivalence import load_runs as load_arm_runs
from .intervals import (
    CORRECTIONS,
    FACTORS,
    Interval,
    adjust,
    interval,
    nested_mean,
    paired_differences,
    resampling_unit,
)

PROTOCOLS = ("epochs", "steps")
PROTOCOL_LABELS = {
    "epochs": "equal epochs (each arm trains train.epochs epochs)",
    "steps": "equal optimizer steps (the real arm trains as many steps as the expanded set)",
}
#: the score each dataset's worth table reads by default (``--metric headline``; docs/protocols.md, "Worth"):
#: MedMNIST's AUC where classes are imbalanced and a collapsed classifier keeps a high accuracy
HEADLINE_METRICS = {"breastmnist": "test_auc_final", "pneumoniamnist": "test_auc_final"}
METRICS = ("headline", *SCORES)
SCORE_LABELS = {
    "test_acc_final": "accuracy",
    "test_acc_best_val": "accuracy at the best val epoch",
    "test_acc_best_test": "best test epoch accuracy (optimistic)",
    "test_balanced_acc_final": "balanced accuracy",
    "test_auc_final": "AUC",
}
LEVEL = 0.95
#: refits per c2 / c1 interval
FIT_REPLICATES = 400


class WorthError(ValueError):
    """A sweep that gives no worth table (no runs, no real arm ...)."""


def headline_metric(dataset: str) -> str:
    return HEADLINE_METRICS.get(dataset, "test_acc_final")


@dataclass(frozen=True)
class WorthRun:
    """One run of a worth grid: where it sits in the design and what it measured (a row of worth_runs.csv).
    ``arm``: real (``method=original``), online (the original with ``train.online_augment``) or synthetic."""

    dataset: str
    n_base: int
    arm: str
    method: str
    ratio: int
    n_real_plus: int
    split: int
    expansion: int | None
    seed: int
    steps: int
    step_budget: bool
    scores: dict[str, float | None] = field(default_factory=dict)
    num_classes: int = 0
    generated_images: int = 0
    expansion_cpu_seconds: float = 0.0
    expansion_wall_seconds: float = 0.0
    fit_seconds: float = 0.0
    fit_key: str = ""
    store: str = ""
    generated_on_gpu: bool = False
    train_seconds: float = 0.0
    machine: str = ""
    config_hash: str = ""

    @property
    def key(self) -> tuple[int, int | None, int]:
        return (self.split, self.expansion, self.seed)

    def score(self, metric: str) -> float | None:
        return self.scores.get(metric)


def _setting(record: Any, key: str, default: Any) -> Any:
    return (record.settings or {}).get(key, default)


def runs_from_records(root: Path | str) -> tuple[list[WorthRun], dict[str, int]]:
    """The worth runs of a sweep folder (:func:`experiments.analysis.equivalence.load_runs` picks the
    few-shot runs of either arm) and the count of runs left out, by reason."""
    found, skipped = load_arm_runs(root, "test_acc_final", error=WorthError)
    runs = []
    for r in found:
        m, t = r.record, r.record.training
        if t.optimizer_steps is None:
            why = "no optimizer_steps recorded (a run from before train.steps)"
            skipped[why] = skipped.get(why, 0) + 1
            continue
        online = str(_setting(m, "train.online_augment", "none"))
        arm = "synthetic" if r.ratio else ("online" if online != "none" else "real")
        e = m.expansion
        runs.append(
            WorthRun(
                dataset=r.dataset,
                n_base=r.n_base,
                arm=arm,
                method=f"online {online}" if arm == "online" else r.method,
                ratio=r.ratio,
                n_real_plus=r.n_real_plus,
                split=int(_setting(m, "dataset.split_seed", 0)),
                expansion=int(m.expansion_seed if m.expansion_seed is not None else r.seed) if r.ratio else None,
                seed=r.seed,
                steps=int(t.optimizer_steps),
                step_budget=t.step_budget,
                scores={s: m.accuracy(s) for s in SCORES},
                num_classes=int(m.num_classes or 0),
                generated_images=int(e.generated_images) if e else 0,
                expansion_cpu_seconds=float(e.cpu_seconds or 0.0) if e else 0.0,
                expansion_wall_seconds=float(e.seconds) if e else 0.0,
                fit_seconds=float(e.fit_seconds) if e else 0.0,
                fit_key=(e.fit_key or "") if e else "",
                store=e.key if e else "",
                generated_on_gpu=str(m.environment.get("device") or "cpu") == "cuda",
                train_seconds=float(t.train_seconds or 0.0),
                machine=m.machine(),
                config_hash=m.config_hash or "",
            )
        )
    return runs, skipped


ARMS = ("real", "online", "synthetic")
RUN_COLUMNS = [f.name for f in dataclasses.fields(WorthRun) if f.name != "scores"] + list(SCORES)


def write_runs_csv(runs: Iterable[WorthRun], path: Path) -> None:
    """One row per run, every score: what any cell of the report is recomputed from."""
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=RUN_COLUMNS)
        writer.writeheader()
        for r in sorted(
            runs, key=lambda r: (r.dataset, r.n_base, r.arm, r.method, r.ratio, r.n_real_plus, r.steps, r.key)
        ):
            row = {k: v for k, v in dataclasses.asdict(r).items() if k != "scores"}
            row["expansion"] = "" if r.expansion is None else r.expansion
            row.update({s: "" if r.scores.get(s) is None else r.scores[s] for s in SCORES})
            writer.writerow(row)


def runs_from_csv(path: Path | str) -> list[WorthRun]:
    """The runs of a ``worth_runs.csv``; :class:`WorthError` naming the row and column that is wrong."""
    types = {f.name: f.type for f in dataclasses.fields(WorthRun)}
    runs = []
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in RUN_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise WorthError(f"{path}: not a worth_runs.csv, columns missing: {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                values: dict[str, Any] = {}
                for name, kind in types.items():
                    if name == "scores":
                        continue
                    text = row[name]
                    if name == "expansion":
                        values[name] = int(text) if text != "" else None
                    elif kind == "bool":
                        values[name] = text == "True"
                    elif kind == "int":
                        values[name] = int(text)
                    elif kind == "float":
                        values[name] = float(text)
                    else:
                        values[name] = text
                values["scores"] = {s: (float(row[s]) if row[s] != "" else None) for s in SCORES}
            except ValueError as exc:
                raise WorthError(f"{path}, line {line}: {exc}") from None
            if values["arm"] not in ARMS:
                raise WorthError(f"{path}, line {line}: arm {values['arm']!r} is not one of {', '.join(ARMS)}")
            runs.append(WorthRun(**values))
    if not runs:
        raise WorthError(f"{path} holds no run")
    return runs


# --------------------------------------------------------------------------- curves and points


def real_curve(runs: Iterable[WorthRun], metric: str, steps: int | None = None) -> dict[int, dict]:
    """``n_real_plus -> {run key: score}`` of the real arm: trained ``train.epochs`` epochs (``steps`` None) or
    exactly ``steps`` optimizer steps (an epoch run that took exactly that many steps is the same training,
    step for step, and counts when no step-budget run of that point and key exists)."""
    curve: dict[int, dict] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: r.step_budget):  # step-budget runs last: they win a tie
        if r.arm != "real" or r.score(metric) is None:
            continue
        if (steps is None and not r.step_budget) or (steps is not None and r.steps == steps):
            curve[r.n_real_plus][r.key] = r.score(metric)
    return dict(curve)


def _unit_equivalent(value: float, curve: Mapping[int, Mapping], match) -> tuple[float | None, str]:
    xs, ys = [], []
    for x in sorted(curve):
        values = [v for k, v in curve[x].items() if match(k)]
        if values:
            xs.append(float(x))
            ys.append(statistics.fmean(values))
    if not xs or xs[0] != 0.0:
        return None, "no_real_origin"
    equivalent, status = equivalent_real(value, xs, isotonic(ys))
    if status == "beyond_real_range":
        return xs[-1], status  # censored at the last real point
    return equivalent, status


def read_equivalent(values: Mapping, curve: Mapping[int, Mapping]) -> dict[str, Any]:
    """The equivalent extra real images per class of a point's runs (``key -> score``): one per unit of the
    resampling factor (:func:`intervals.resampling_unit`), each read off the real curve of its own base draw
    (and classifier seed, when the seed is the unit), then their mean and t-interval."""
    if not values:
        return {"status": "no_real_origin", "equivalent": None, "interval": None}
    unit = resampling_unit(values)
    depth = FACTORS.index(unit) + 1
    groups: dict[tuple, dict] = defaultdict(dict)
    for k, v in values.items():
        groups[k[:depth]][k] = v
    per_unit, statuses = {}, []
    for prefix, members in groups.items():
        value = nested_mean(members)

        def match(k, prefix=prefix):
            return k[0] == prefix[0] and (unit != "seed" or k[2] == prefix[2])

        equivalent, status = _unit_equivalent(value, curve, match)
        if equivalent is None:
            continue
        per_unit[prefix + (None,) * (3 - depth)] = equivalent
        statuses.append(status)
    if not per_unit:
        return {"status": "no_real_origin", "equivalent": None, "interval": None}
    ci = interval({(k[0], k[1], k[2] if k[2] is not None else 0): v for k, v in per_unit.items()}, LEVEL, unit)
    status = (
        "no_gain"
        if all(s == "no_gain" for s in statuses)
        else "beyond_real_range"
        if all(s == "beyond_real_range" for s in statuses)
        else "censored"
        if "beyond_real_range" in statuses
        else "ok"
    )
    return {
        "status": status,
        "equivalent": ci.estimate,
        "interval": _clipped(ci),
        "units_beyond_real_range": statuses.count("beyond_real_range"),
    }


def _clipped(ci: Interval) -> dict[str, Any]:
    out = ci.as_dict()
    if out["low"] is not None:
        out["low"] = max(0.0, out["low"])
    return out


def _difference(treated: Mapping, control: Mapping) -> dict[str, Any] | None:
    diffs = paired_differences(treated, control)
    if not diffs:
        return None
    ci = interval(diffs, LEVEL)
    return {**ci.as_dict(), "describe": ci.describe(), "runs": len(diffs)}


def _cell(runs: list[WorthRun], metric: str) -> dict[str, Any]:
    values = {r.key: r.score(metric) for r in runs if r.score(metric) is not None}
    ci = interval(values, LEVEL) if values else None
    spread = list(values.values())
    return {
        "mean": ci.estimate if ci else None,
        "std": statistics.stdev(spread) if len(spread) > 1 else 0.0,
        "runs": len(spread),
        "units": ci.n_units if ci else 0,
        "unit": ci.unit if ci else None,
        "interval": ci.as_dict() if ci else None,
        "other_scores": {
            s: statistics.fmean(v)
            for s in ("test_acc_final", "test_balanced_acc_final", "test_auc_final")
            if (v := [r.score(s) for r in runs if r.score(s) is not None])
        },
    }


# --------------------------------------------------------------------------- cost


def fit_cpu_seconds(run: WorthRun) -> float:
    """The CPU seconds of a job's fit: its wall seconds at the CPU-to-wall ratio of the job's whole expansion
    (the record times the fit on the wall clock only; on a loaded machine a fit waits too)."""
    if not run.fit_seconds or run.expansion_wall_seconds <= 0:
        return 0.0
    return run.fit_seconds * run.expansion_cpu_seconds / run.expansion_wall_seconds


def generation_cost(runs: Iterable[WorthRun]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """``(dataset, n_base, method) -> cost``: CPU seconds of making the method's stores (each store once:
    the seeds share it), the fits (:func:`fit_cpu_seconds`) taken out and charged back in equal parts to every
    method that uses the same fit (one ``fit_key``), over the images generated."""
    runs = [r for r in runs if r.arm == "synthetic"]
    fit_users: dict[str, set] = defaultdict(set)
    fit_cpu: dict[str, float] = defaultdict(float)
    fit_wall: dict[str, float] = defaultdict(float)
    for r in runs:
        if r.fit_key:
            fit_users[r.fit_key].add((r.dataset, r.n_base, r.method))
            fit_cpu[r.fit_key] += fit_cpu_seconds(r)
            fit_wall[r.fit_key] += r.fit_seconds
    totals: dict[tuple, dict[str, Any]] = defaultdict(
        lambda: {
            "cpu_seconds": 0.0,
            "wall_seconds": 0.0,
            "fit_cpu_seconds": 0.0,
            "images": 0,
            "stores": 0,
            "gpu": set(),
        }
    )
    for r in runs:
        if not (r.generated_images or r.fit_seconds):
            continue
        t = totals[(r.dataset, r.n_base, r.method)]
        own_fit = fit_cpu_seconds(r)
        t["cpu_seconds"] += r.expansion_cpu_seconds - (own_fit if r.fit_key else 0.0)
        t["wall_seconds"] += r.expansion_wall_seconds - (r.fit_seconds if r.fit_key else 0.0)
        t["fit_cpu_seconds"] += 0.0 if r.fit_key else own_fit
        t["images"] += r.generated_images
        t["stores"] += 1 if r.generated_images else 0
        t["gpu"].add(r.generated_on_gpu)
    for key, users in fit_users.items():
        for user in users:
            share = fit_cpu[key] / len(users)
            totals[user]["cpu_seconds"] += share
            totals[user]["fit_cpu_seconds"] += share
            totals[user]["wall_seconds"] += fit_wall[key] / len(users)
    out = {}
    for key, t in totals.items():
        images = t["images"]
        out[key] = {
            **{k: v for k, v in t.items() if k != "gpu"},
            "on_gpu": t["gpu"] == {True},
            "cpu_seconds_per_image": t["cpu_seconds"] / images if images else None,
            "wall_seconds_per_image": t["wall_seconds"] / images if images else None,
            "fit_shared_with": sorted(
                {u[2] for k2, users in fit_users.items() if key in users for u in users} - {key[2]}
            ),
        }
    return out


# --------------------------------------------------------------------------- fits


def _fit(points: list[dict[str, Any]], n_base: int, k: float, rng: np.random.Generator) -> dict[str, Any]:
    """c1^(n_base/k), c2 over one method's points of one protocol, only where the data identify them."""
    usable = sorted((p for p in points if p["status"] in ("ok", "no_gain")), key=lambda p: p["ratio"])
    ratios = [p["ratio"] for p in usable]
    means = [p["equivalent"] or 0.0 for p in usable]
    if not usable:
        return {"error": "no synthetic point inside the real curve's range", "points_used": 0}
    if all(m == 0.0 for m in means):
        return {"error": "no ratio gained over the original: worth no real image", "points_used": len(usable)}
    if len(set(ratios)) < 3:
        return {
            "error": f"{len(set(ratios))} ratio(s) inside the real range: c1 and c2 need at least three",
            "points_used": len(usable),
        }
    if any(b < a for a, b in itertools.pairwise(means)) or means[-1] <= means[0]:
        return {"error": "the relation does not fit: equivalents fall with the ratio", "points_used": len(usable)}
    try:
        best = fit_exchange_rate([n_base] * len(usable), [r * n_base for r in ratios], means, k)
    except EquivalenceError as exc:
        return {"error": str(exc), "points_used": len(usable)}
    from scipy import stats

    c2s, factors = [], []
    for _ in range(FIT_REPLICATES):
        drawn = []
        for p in usable:
            ci = p["interval"] or {}
            n = ci.get("n_units") or 0
            if n >= 2 and ci.get("high") is not None:
                se = (ci["high"] - ci["estimate"]) / stats.t.ppf(0.5 + LEVEL / 2, n - 1)
                drawn.append(max(0.0, p["equivalent"] + se * rng.standard_t(n - 1)))
            else:
                drawn.append(p["equivalent"] or 0.0)
        try:
            fit = fit_exchange_rate([n_base] * len(usable), [r * n_base for r in ratios], drawn, k)
        except EquivalenceError:
            continue
        c2s.append(fit.c2)
        factors.append(fit.factor(n_base))
    if not c2s:
        return {"error": "no refit of the redrawn equivalents converged", "points_used": len(usable)}
    lo_c2, hi_c2 = (float(v) for v in np.percentile(c2s, [2.5, 97.5]))
    lo_bound, hi_bound = (math.exp(b) for b in LOG_C2_BOUNDS)
    bounded = lo_c2 > lo_bound * 1.001 and hi_c2 < hi_bound / 1.001 and not best.at_bound
    return {
        "c1": best.c1,
        "c2": best.c2,
        "factor": best.factor(n_base),
        "rmse": best.rmse,
        "at_bound": best.at_bound,
        "c2_interval": [lo_c2, hi_c2],
        "factor_interval": [float(v) for v in np.percentile(factors, [2.5, 97.5])],
        "c2_bounded": bounded,
        "points_used": len(usable),
        "replicates": len(c2s),
    }


def c1_across_base_sizes(fits: Mapping[str, dict], k: float) -> dict[str, dict[str, Any]]:
    """c1 from the factors c1^(n_base/k) of one (dataset, method, protocol) at three or more base sizes
    (least squares of log factor on n_base / k through the origin); nothing where fewer are fitted."""
    grouped: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for key, fit in fits.items():
        dataset, n_base, method, protocol = key.split("|")
        if "factor" in fit and fit.get("c2_bounded"):
            grouped[(dataset, method, protocol)].append((int(n_base), fit["factor"]))
    out = {}
    for (dataset, method, protocol), pts in grouped.items():
        if len({n for n, _ in pts}) < 3:
            continue
        x = np.array([n / k for n, _ in pts])
        y = np.log([f for _, f in pts])
        out[f"{dataset}|{method}|{protocol}"] = {
            "c1": float(math.exp((x @ y) / (x @ x))),
            "base_sizes": sorted(n for n, _ in pts),
        }
    return out


# --------------------------------------------------------------------------- the analysis


def analyse(
    source: Path | str | list[WorthRun],
    *,
    metric: str = "headline",
    k: float = 100.0,
    seed: int = 0,
    correction: str = "holm",
) -> dict[str, Any]:
    """Everything the CLI writes, as one dict. ``source``: a sweep folder, a worth_runs.csv or the runs."""
    if metric not in METRICS:
        raise WorthError(f"metric must be one of {METRICS}, got {metric!r}")
    if correction not in CORRECTIONS:
        raise WorthError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    skipped: dict[str, int] = {}
    if isinstance(source, list):
        runs, root = source, "(runs)"
    elif Path(source).is_file():
        runs, root = runs_from_csv(source), str(source)
    else:
        runs, skipped = runs_from_records(source)
        root = str(source)
    if not runs:
        raise WorthError(f"no worth run under {root} (left out: {skipped})")
    rng = np.random.default_rng(seed)
    costs = generation_cost(runs)
    groups = sorted({(r.dataset, r.n_base) for r in runs})
    real_arms, references, points, fits, notes, metrics = [], [], [], {}, [], {}
    for dataset, n_base in groups:
        group = [r for r in runs if (r.dataset, r.n_base) == (dataset, n_base)]
        score = headline_metric(dataset) if metric == "headline" else metric
        metrics[dataset] = score
        classes = max(r.num_classes for r in group)
        epoch_curve = real_curve(group, score)
        if 0 not in epoch_curve:
            notes.append(f"{dataset}, n_base {n_base}: no original run at equal epochs (exchange=real_0)")
        budgets = sorted({r.steps for r in group if r.arm != "real" or r.step_budget})
        for steps in [None, *budgets]:
            for x in sorted({r.n_real_plus for r in group if r.arm == "real"}):
                mine = [
                    r
                    for r in group
                    if r.arm == "real"
                    and r.n_real_plus == x
                    and ((steps is None and not r.step_budget) or (steps is not None and r.steps == steps))
                ]
                if mine:
                    real_arms.append(
                        {
                            "dataset": dataset,
                            "n_base": n_base,
                            "protocol": "epochs" if steps is None else "steps",
                            "steps": steps,
                            "added_per_class": x,
                            **_cell(mine, score),
                        }
                    )
        curves = {steps: real_curve(group, score, steps) for steps in budgets}
        online = defaultdict(list)
        for r in group:
            if r.arm == "online" and r.n_real_plus == 0:
                online[(r.method, r.steps)].append(r)
        for (name, steps), mine in sorted(online.items()):
            values = {r.key: r.score(score) for r in mine if r.score(score) is not None}
            curve = curves.get(steps, {})
            references.append(
                {
                    "dataset": dataset,
                    "n_base": n_base,
                    "method": name,
                    "steps": steps,
                    **_cell(mine, score),
                    "gain": _difference(values, curve.get(0, {})),
                    "equivalent": read_equivalent(values, curve),
                }
            )
        synthetic: dict[tuple[str, int], list[WorthRun]] = defaultdict(list)
        for r in group:
            if r.arm == "synthetic":
                synthetic[(r.method, r.ratio)].append(r)
        for (method, ratio), mine in sorted(synthetic.items()):
            step_counts = sorted({r.steps for r in mine})
            if len(step_counts) > 1:
                raise WorthError(
                    f"{dataset}, n_base {n_base}, {method} x{ratio}: runs trained different step counts "
                    f"{step_counts}; one sweep's settings per folder"
                )
            steps = step_counts[0]
            values = {r.key: r.score(score) for r in mine if r.score(score) is not None}
            cost = costs.get((dataset, n_base, method)) or {}
            train_seconds = statistics.fmean(r.train_seconds for r in mine)
            per_image = cost.get("cpu_seconds_per_image")
            images = ratio * n_base * classes
            row: dict[str, Any] = {
                "dataset": dataset,
                "n_base": n_base,
                "method": method,
                "ratio": ratio,
                "steps": steps,
                **_cell(mine, score),
                "train_seconds": train_seconds,
                "cpu_seconds_per_image": per_image,
                "wall_seconds_per_image": cost.get("wall_seconds_per_image"),
                "cpu_seconds_per_point": (per_image * images + train_seconds) if per_image is not None else None,
                "generated_on_gpu": bool(cost.get("on_gpu")),
                "fit_shared_with": cost.get("fit_shared_with", []),
                "protocols": {},
                "versus_online": {},
            }
            for protocol in PROTOCOLS:
                curve = epoch_curve if protocol == "epochs" else curves.get(steps, {})
                gain = _difference(values, curve.get(0, {}))
                equivalent = read_equivalent(values, curve)
                eq = equivalent["equivalent"] if equivalent["status"] != "no_real_origin" else None
                per_hour = {"cpu": None, "gpu": None}
                if eq is not None:
                    for unit, seconds in (
                        ("cpu", per_image),
                        ("gpu", row["wall_seconds_per_image"] if row["generated_on_gpu"] else None),
                    ):
                        if seconds:
                            per_hour[unit] = eq * classes / (seconds * images / 3600)
                row["protocols"][protocol] = {
                    "gain": gain,
                    **equivalent,
                    "real_per_generated": eq / (ratio * n_base) if eq is not None else None,
                    "real_equivalents_per_cpu_hour": per_hour["cpu"],
                    "real_equivalents_per_gpu_hour": per_hour["gpu"],
                }
            for (name, ref_steps), ref in sorted(online.items()):
                if ref_steps == steps:
                    control = {r.key: r.score(score) for r in ref if r.score(score) is not None}
                    row["versus_online"][name] = _difference(values, control)
            points.append(row)
        for method in sorted({m for m, _ in synthetic}):
            for protocol in PROTOCOLS:
                mine = [
                    {"ratio": p["ratio"], **p["protocols"][protocol]}
                    for p in points
                    if (p["dataset"], p["n_base"], p["method"]) == (dataset, n_base, method)
                ]
                fits[f"{dataset}|{n_base}|{method}|{protocol}"] = _fit(mine, n_base, k, rng)
    claims = _claims(points, references)
    for claim, adjusted in zip(claims, adjust([c["p_value"] for c in claims], correction)):
        claim["p_adjusted"] = adjusted
        claim["survives"] = adjusted is not None and adjusted < 1 - LEVEL
    return {
        "root": root,
        "metric": metric,
        "metrics": metrics,
        "correction": correction,
        "k": k,
        "skipped_runs": skipped,
        "machines": sorted({r.machine for r in runs}),
        "runs": len(runs),
        "design": _design(runs),
        "real_arm": real_arms,
        "references": references,
        "points": points,
        "fits": fits,
        "c1": c1_across_base_sizes(fits, k),
        "costs": {"|".join(map(str, key)): value for key, value in sorted(costs.items())},
        "notes": notes,
    }


def _claims(points: list[dict], references: list[dict]) -> list[dict]:
    """Every difference a report claims or denies (the family its correction runs over); the dicts are the
    report's own, so that the adjusted p-value and the survivor mark land in place."""
    out = []
    for p in points:
        out += [p["protocols"][protocol]["gain"] for protocol in PROTOCOLS]
        out += list(p["versus_online"].values())
    out += [r["gain"] for r in references]
    return [c for c in out if c is not None]


def _design(runs: list[WorthRun]) -> dict[str, Any]:
    return {
        "splits": sorted({r.split for r in runs}),
        "expansion_seeds": sorted({r.expansion for r in runs if r.expansion is not None}),
        "seeds": sorted({r.seed for r in runs}),
    }


# --------------------------------------------------------------------------- outputs


def _score(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "-"
    return f"{cell['mean']:.2f} ± {cell['std']:.2f} [{cell['runs']}]"


def _diff(diff: dict[str, Any] | None) -> str:
    """+1.23 [+0.4, +2.0] ✓ (the mark: survives the correction)."""
    if diff is None:
        return "-"
    text = f"{diff['estimate']:+.2f}"
    if diff["low"] is not None:
        text += f" [{diff['low']:+.1f}, {diff['high']:+.1f}]"
    else:
        text += " (one unit: no interval)"
    return text + (" ✓" if diff.get("survives") else "")


def _equivalent(point: dict[str, Any]) -> str:
    status = point["status"]
    if status == "no_real_origin":
        return "no real arm"
    if status == "no_gain":
        return "0 (no gain)"
    ci = point.get("interval") or {}
    prefix = ">= " if status in ("beyond_real_range", "censored") else ""
    text = prefix + _fmt(point["equivalent"])
    if ci.get("high") is not None:
        text += f" [{_fmt(ci['low'])}, {_fmt(ci['high'])}]"
    return text


def _fit_text(fit: dict[str, Any]) -> str:
    if "error" in fit:
        return f"no fit: {fit['error']}"
    factor = (
        f"c1^(n_base/k) = {_fmt(fit['factor'])} [{_fmt(fit['factor_interval'][0])}, {_fmt(fit['factor_interval'][1])}]"
    )
    if fit["c2_bounded"]:
        lo, hi = fit["c2_interval"]
        return f"c2 = {_fmt(fit['c2'])} [{_fmt(lo)}, {_fmt(hi)}], {factor} ({fit['points_used']} points)"
    return (
        f"c2 not identified (its interval reaches a search bound, [{_fmt(fit['c2_interval'][0])}, "
        f"{_fmt(fit['c2_interval'][1])}]): read the equivalents ({fit['points_used']} points)"
    )


def render_markdown(result: dict[str, Any]) -> str:
    design = result["design"]
    correction = {"holm": "Holm", "bh": "Benjamini-Hochberg", "none": "no"}[result["correction"]]
    lines = [f"<!-- generated by: {result['command']} -->", ""] if result.get("command") else []
    lines += [
        "# What is a generated image worth?",
        "",
        f"Runs under `{result['root']}` ({result['runs']} runs: base-set draws (split seeds) "
        f"{design['splits']}, expansion seeds {design['expansion_seeds']}, classifier seeds {design['seeds']}). "
        "Scores in %, mean ± std over runs [runs]. Gain: the paired difference to the original of the same "
        "protocol, base draw and classifier seed, with its 95 % t-interval over the base draws (the interval's "
        "unit is named where fewer draws were run); ✓: the difference survives "
        f"{correction} correction across every difference of this report (adjusted p < 0.05). Equivalent: "
        "extra real images per class that give the same score on the monotone real curve of the same protocol, "
        "read per base draw and averaged (>=: some draws beyond the last real point, censored there). Equal "
        "steps: the real arm and the online reference trained exactly the optimizer steps of the expanded set. "
        "Cost: generation CPU seconds per image, every fit included and shared in equal parts by the methods "
        "that use it; per point: generation + fits + one classifier's training. "
        f"Machine(s): {', '.join(result['machines'])}.",
        "",
    ]
    for dataset, n_base in sorted({(p["dataset"], p["n_base"]) for p in result["real_arm"] + result["points"]}):
        score = result["metrics"][dataset]
        lines += [f"## {dataset}, n_base = {n_base} per class: {SCORE_LABELS[score]} (`{score}`)", "", "Real arm:", ""]
        mine = [c for c in result["real_arm"] if (c["dataset"], c["n_base"]) == (dataset, n_base)]
        budgets = sorted({c["steps"] for c in mine if c["steps"] is not None})
        lines.append(
            "| " + " | ".join(["extra real per class", "equal epochs", *(f"{s} steps" for s in budgets)]) + " |"
        )
        lines.append("|---|---|" + "---|" * len(budgets))
        for x in sorted({c["added_per_class"] for c in mine}):
            cells = {c["steps"]: c for c in mine if c["added_per_class"] == x}
            row = [_score(cells[s]) if s in cells else "-" for s in [None, *budgets]]
            lines.append(f"| {x} | " + " | ".join(row) + " |")
        originals = sorted((c for c in mine if c["added_per_class"] == 0), key=lambda c: c["steps"] or 0)
        if originals:
            lines += [
                "",
                "The original (no extra image), every score: "
                + "; ".join(
                    ("equal epochs" if c["steps"] is None else f"{c['steps']} steps")
                    + ": "
                    + ", ".join(f"{SCORE_LABELS[k]} {v:.1f}" for k, v in c["other_scores"].items())
                    for c in originals
                )
                + ".",
            ]
        refs = [r for r in result["references"] if (r["dataset"], r["n_base"]) == (dataset, n_base)]
        if refs:
            lines += ["", "Online reference (the original images, augmented on the fly):", ""]
            lines += [
                "| reference | steps | score | gain over the original, equal steps | equivalent |",
                "|---|---|---|---|---|",
            ]
            for r in refs:
                lines.append(
                    f"| {r['method']} | {r['steps']} | {_score(r)} | {_diff(r['gain'])} | {_equivalent(r['equivalent'])} |"
                )
        online_names = sorted({name for p in result["points"] for name in p["versus_online"]})
        lines += [
            "",
            "| method | ratio | steps | score | equal epochs: gain | equal epochs: equivalent | equal steps: gain | "
            "equal steps: equivalent | "
            + "".join(f"vs {name} | " for name in online_names)
            + "real per generated image (steps) | CPU s / image | CPU s / point | other scores (acc / bal. acc / AUC) |",
            "|---|---|---|---|---|---|---|---|" + "---|" * len(online_names) + "---|---|---|---|",
        ]
        for p in result["points"]:
            if (p["dataset"], p["n_base"]) != (dataset, n_base):
                continue
            versus = "".join(f"{_diff(p['versus_online'].get(name))} | " for name in online_names)
            others = " / ".join(
                f"{p['other_scores'][s]:.1f}" if s in p["other_scores"] else "-"
                for s in ("test_acc_final", "test_balanced_acc_final", "test_auc_final")
            )
            epochs, steps = p["protocols"]["epochs"], p["protocols"]["steps"]
            lines.append(
                f"| {p['method']} | {p['ratio']} | {p['steps']} | {_score(p)} | {_diff(epochs['gain'])} | "
                f"{_equivalent(epochs)} | {_diff(steps['gain'])} | {_equivalent(steps)} | {versus}"
                f"{_fmt(steps['real_per_generated'])} | {_fmt(p['cpu_seconds_per_image'])} | "
                f"{_fmt(p['cpu_seconds_per_point'])} | {others} |"
            )
        units = {
            d["describe"]
            for p in result["points"]
            if (p["dataset"], p["n_base"]) == (dataset, n_base)
            for d in [*(p["protocols"][q]["gain"] for q in PROTOCOLS), *p["versus_online"].values()]
            if d
        }
        if units:
            lines += ["", "Intervals: " + "; ".join(sorted(units)) + "."]
        lines += ["", "Fit of n_syn / n_base = c1^(n_base/k) (c2^(n_real_plus/n_base) - 1) per method:", ""]
        lines += ["| method | equal epochs | equal steps |", "|---|---|---|"]
        for method in sorted(
            {p["method"] for p in result["points"] if (p["dataset"], p["n_base"]) == (dataset, n_base)}
        ):
            cells = [
                _fit_text(result["fits"].get(f"{dataset}|{n_base}|{method}|{protocol}", {"error": "-"}))
                for protocol in PROTOCOLS
            ]
            lines.append(f"| {method} | {cells[0]} | {cells[1]} |")
        lines.append("")
    if result["c1"]:
        lines += [
            "c1 across base sizes: "
            + "; ".join(f"{k}: c1 = {_fmt(v['c1'])} (n_base {v['base_sizes']})" for k, v in result["c1"].items()),
            "",
        ]
    else:
        lines += [
            "c1 is not read: no method was fitted at three or more base sizes (c1^(n_base/k) per base size above).",
            "",
        ]
    cost_rows = [
        f"| {key.replace('|', ' | ')} | {c['images']} | {c['stores']} | {c['cpu_seconds']:.1f} | {c['fit_cpu_seconds']:.1f} | "
        f"{', '.join(c['fit_shared_with']) or '-'} | {_fmt(c['cpu_seconds_per_image'])} |"
        for key, c in result["costs"].items()
    ]
    if cost_rows:
        lines += [
            "## Generation cost",
            "",
            "| dataset | n_base | method | images generated | stores | CPU s (fits included) | of which fits (CPU s) | fit shared with | CPU s / image |",
            "|---|---|---|---|---|---|---|---|---|",
            *cost_rows,
            "",
        ]
    if result["notes"]:
        lines += ["Notes: " + "; ".join(result["notes"]) + ".", ""]
    if result["skipped_runs"]:
        lines += ["Runs left out: " + "; ".join(f"{v} {k}" for k, v in result["skipped_runs"].items()) + ".", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], worth_path: Path, cost_path: Path) -> None:
    """worth.png: every gain over the original with its 95 % interval (equal epochs and equal steps; the
    online reference and the differences to it), filled where it survives the correction, one panel per
    dataset; worth_cost.png: score against generation CPU seconds per image, with the runs' spread."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(p["dataset"], p["n_base"]) for p in result["points"] + result["references"]})
    if not groups:
        return
    fig, axes = plt.subplots(1, len(groups), figsize=(6.0 * len(groups), 5.0), squeeze=False)
    for ax, (dataset, n_base) in zip(axes[0], groups):
        rows = []
        for r in result["references"]:
            if (r["dataset"], r["n_base"]) == (dataset, n_base) and r["gain"]:
                rows.append((f"{r['method']} ({r['steps']} steps)", r["gain"], "C2"))
        for p in result["points"]:
            if (p["dataset"], p["n_base"]) != (dataset, n_base):
                continue
            for protocol, color in (("epochs", "C0"), ("steps", "C1")):
                if p["protocols"][protocol]["gain"]:
                    rows.append(
                        (f"{p['method']} x{p['ratio']}, equal {protocol}", p["protocols"][protocol]["gain"], color)
                    )
            for name, diff in p["versus_online"].items():
                if diff:
                    rows.append((f"{p['method']} x{p['ratio']} - {name}", diff, "C3"))
        for y, (_label, diff, color) in enumerate(rows):
            low = diff["low"] if diff["low"] is not None else diff["estimate"]
            high = diff["high"] if diff["high"] is not None else diff["estimate"]
            ax.errorbar(
                diff["estimate"],
                y,
                xerr=[[diff["estimate"] - low], [high - diff["estimate"]]],
                fmt="o",
                color=color,
                mfc=color if diff.get("survives") else "white",
                capsize=3,
            )
        ax.axvline(0.0, color="k", linewidth=0.8)
        ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set(
            title=f"{dataset}, n_base {n_base}",
            xlabel=f"difference in {SCORE_LABELS[result['metrics'][dataset]]} (points), 95 % interval",
        )
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("filled: survives the correction across the report; hollow: does not", fontsize=8)
    fig.tight_layout()
    fig.savefig(worth_path, dpi=120, bbox_inches="tight")
    plt.close(fig)

    methods = sorted({p["method"] for p in result["points"]})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
    for ax, (dataset, n_base) in zip(axes[0], groups):
        for p in result["points"]:
            if (p["dataset"], p["n_base"]) != (dataset, n_base) or not p["cpu_seconds_per_image"]:
                continue
            ax.errorbar(
                p["cpu_seconds_per_image"], p["mean"], yerr=p["std"], fmt="o", color=colors[p["method"]], capsize=3
            )
            ax.annotate(f"{p['method']} x{p['ratio']}", (p["cpu_seconds_per_image"], p["mean"]), fontsize=6)
        for cell in result["real_arm"]:
            if (cell["dataset"], cell["n_base"], cell["added_per_class"]) == (dataset, n_base, 0):
                style = ":" if cell["steps"] is None else "--"
                label = "original, equal epochs" if cell["steps"] is None else f"original, {cell['steps']} steps"
                ax.axhline(cell["mean"], color="k", linestyle=style, linewidth=0.8, label=label)
        ax.set_xscale("log")
        ax.set(
            title=f"{dataset}, n_base {n_base}",
            xlabel="generation CPU s per image (fits shared and included)",
            ylabel=f"{SCORE_LABELS[result['metrics'][dataset]]} (%), mean ± std",
        )
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(cost_path, dpi=120)
    plt.close(fig)


CSV_COLUMNS = [
    "dataset",
    "n_base",
    "method",
    "ratio",
    "steps",
    "metric",
    "mean",
    "std",
    "runs",
    "units",
    "gain_epochs",
    "gain_epochs_low",
    "gain_epochs_high",
    "gain_epochs_survives",
    "equivalent_epochs",
    "status_epochs",
    "gain_steps",
    "gain_steps_low",
    "gain_steps_high",
    "gain_steps_survives",
    "equivalent_steps",
    "status_steps",
    "cpu_seconds_per_image",
    "cpu_seconds_per_point",
]


def write_outputs(
    result: dict[str, Any], out_dir: Path, runs: list[WorthRun] | None = None, stem: str = "worth"
) -> list[Path]:
    """``<stem>.md``, ``.json``, ``.csv`` (one row per point), ``.png``, ``_cost.png`` and, given the runs,
    ``<stem>_runs.csv`` (one row per run) in ``out_dir``."""
    from expansion.files import atomic_write_text

    out_dir = Path(out_dir)
    names = (".md", ".json", ".csv", ".png", "_cost.png", "_runs.csv")
    paths = [out_dir / f"{stem}{n}" for n in names]
    atomic_write_text(paths[0], render_markdown(result))
    atomic_write_text(paths[1], json.dumps(result, indent=2) + "\n")
    rows = []
    for p in result["points"]:
        row = {k: p.get(k) for k in CSV_COLUMNS}
        row["metric"] = result["metrics"][p["dataset"]]
        for protocol in PROTOCOLS:
            point, gain = p["protocols"][protocol], p["protocols"][protocol]["gain"] or {}
            row[f"gain_{protocol}"] = gain.get("estimate")
            row[f"gain_{protocol}_low"] = gain.get("low")
            row[f"gain_{protocol}_high"] = gain.get("high")
            row[f"gain_{protocol}_survives"] = gain.get("survives")
            row[f"equivalent_{protocol}"] = point["equivalent"]
            row[f"status_{protocol}"] = point["status"]
        rows.append(row)
    with open(paths[2], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(result, paths[3], paths[4])
    if runs is not None:
        write_runs_csv(runs, paths[5])
    return [p for p in paths if p.exists()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "source", type=Path, help="a sweep folder (its metrics.json files, searched recursively) or a worth_runs.csv"
    )
    parser.add_argument(
        "--metric", choices=METRICS, default="headline", help="the score to read (headline: each dataset's own)"
    )
    parser.add_argument("--correction", choices=CORRECTIONS, default="holm", help="across the report's differences")
    parser.add_argument("--k", type=float, default=100.0, help="the n_base scale k of c1^(n_base/k) (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fits' redraws")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    parser.add_argument("--stem", default="worth", help="output file names: <stem>.md, <stem>_runs.csv ...")
    args = parser.parse_args(argv)
    try:
        if args.source.is_file():
            runs = runs_from_csv(args.source)
        else:
            runs, skipped = runs_from_records(args.source)
            if not runs:
                raise WorthError(f"no worth run under {args.source} (left out: {skipped})")
        result = analyse(runs, metric=args.metric, k=args.k, seed=args.seed, correction=args.correction)
        result["root"] = str(args.source)
        if not args.source.is_file():
            result["skipped_runs"] = skipped
        options = [
            f"--{name} {getattr(args, name)}"
            for name in ("metric", "correction")
            if getattr(args, name) != parser.get_default(name)
        ]
        result["command"] = " ".join(["python -m experiments.analysis.worth", str(args.source), *options])
    except (WorthError, EquivalenceError, OSError) as exc:
        parser.exit(2, f"error: {exc}\n")
    out = args.out or (args.source.parent if args.source.is_file() else args.source)
    out.mkdir(parents=True, exist_ok=True)
    for path in write_outputs(result, out, runs=None if args.source.is_file() else runs, stem=args.stem):
        print(path)


if __name__ == "__main__":
    main()
