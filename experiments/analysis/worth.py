"""What is a generated image worth? The real-image equivalent of every method's images, at equal epochs
and at equal optimizer steps, beside what they cost.

    python -m experiments.analysis.worth <sweep dir> [--metric test_acc_final] [--bootstrap 1000] [--k 100]
    make worth DIR=<sweep dir>

reads every ``metrics.json`` under a sweep such as ``experiment=worth_cpu`` (any partial sweep too).
Per dataset and n_base (original images per class):

* **the real arm**: ``method=original`` with n_real_plus = 0, 0.5, 1, 2, 4 x n_base extra real images
  per class (``exchange=real_*``); at equal epochs (``train.epochs``) and, per synthetic step budget S, the
  same points trained exactly S optimizer steps (``train.steps_matched_to_ratio``);
* **the synthetic arm**: every other method at ratio R (R x n_base generated images per class, with the
  originals), trained ``train.epochs`` epochs: S = its optimizer steps.

Per synthetic point and protocol: the accuracy gain over the original (n_real_plus = 0) and the
equivalent n_real_plus, read off the monotone (isotonic) real curve of the same protocol as in
:mod:`experiments.analysis.equivalence`: at **equal epochs** the real runs trained ``train.epochs``
epochs, at **equal steps** the real runs that took exactly S optimizer steps (compute-matched: a gain that
is only "more steps" is gone there). A 95 % percentile interval comes from a bootstrap over seeds (the
same seeds drawn for both arms). Per method and protocol, the closed-set paper's relation
n_syn / n_base = c1^(n_base / k) (c2^(n_real_plus / n_base) - 1) is fitted where it can be, with the
reason where it cannot. Cost: CPU and wall seconds of generation per image, the fits included and
amortised over every image they served (the jobs that generated or fitted; a job that waited for another
job's store costs nothing), and real-image equivalents per CPU-hour of generation. CPU seconds are the
cost; wall seconds include a job's wait for a fit that another job was making beside it. A fit that several
methods share (gif_ae and gif_ae_unguided reuse expansive_synthesis's autoencoder) is charged to the
method whose job made it.

Writes ``worth.md``, ``worth.json``, ``worth.csv``, ``worth.png`` (equivalent real images per class vs
ratio per method, one panel per dataset, both protocols) and ``worth_cost.png`` (accuracy vs generation
cost) into the sweep folder (or ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .equivalence import (
    LOG_C2_BOUNDS_TEXT,
    METRICS,
    EquivalenceError,
    Run,
    _fmt,
    equivalent_real,
    fit_exchange_rate,
    isotonic,
)
from .equivalence import load_runs as load_arm_runs

PROTOCOLS = ("epochs", "steps")
PROTOCOL_LABELS = {
    "epochs": "equal epochs (each arm trains train.epochs epochs)",
    "steps": "equal optimizer steps (the real arm trains as many steps as the expanded set)",
}


#: a fitted c2 outside this range says the points fix the relation's slope only (see _fit)
DEGENERATE_C2 = (1.01, 1e5)


class WorthError(ValueError):
    """A sweep that gives no worth table (no runs, no real arm ...)."""


def load_runs(root: Path | str, metric: str = "test_acc_final") -> tuple[list[Run], dict[str, int]]:
    """The worth runs under ``root`` (:func:`~experiments.analysis.equivalence.load_runs`, each with its
    optimizer steps) and the count of runs left out, by reason."""
    found, skipped = load_arm_runs(root, metric, error=WorthError)
    runs = [r for r in found if r.steps is not None]
    if len(runs) < len(found):
        skipped["no optimizer_steps recorded (a run from before train.steps)"] = len(found) - len(runs)
    return runs, skipped


# --------------------------------------------------------------------------- the two real curves


def real_curve(runs: Iterable[Run], protocol: str, steps: int | None = None) -> dict[int, dict[int, float]]:
    """``n_real_plus -> {seed: accuracy}`` of the real arm: trained ``train.epochs`` epochs (``epochs``) or
    exactly ``steps`` optimizer steps (``steps``; an epoch run that took exactly that many steps is the same
    training, step for step, and counts when no step-budget run of that point and seed exists)."""
    curve: dict[int, dict[int, float]] = defaultdict(dict)
    for r in sorted(runs, key=lambda r: r.step_budget):  # step-budget runs last: they win a tie
        if r.ratio:
            continue
        if (protocol == "epochs" and not r.step_budget) or (protocol == "steps" and r.steps == steps):
            curve[r.n_real_plus][r.seed] = r.accuracy
    return dict(curve)


def _mean_curve(curve: dict[int, dict[int, float]], seeds: tuple[int, ...] | None) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for x in sorted(curve):
        values = [curve[x][s] for s in seeds if s in curve[x]] if seeds is not None else list(curve[x].values())
        if values:
            xs.append(float(x))
            ys.append(statistics.fmean(values))
    return xs, ys


def _seed_values(values: dict[int, float], seeds: tuple[int, ...] | None) -> list[float]:
    return [values[s] for s in seeds if s in values] if seeds is not None else list(values.values())


def read_point(
    synthetic: dict[int, float], curve: dict[int, dict[int, float]], seeds: tuple[int, ...] | None = None
) -> dict[str, Any]:
    """Gain over the original and the equivalent n_real_plus of one synthetic point (``seed -> accuracy``) on
    one real curve; ``seeds``: a bootstrap draw (repeats allowed)."""
    xs, ys = _mean_curve(curve, seeds)
    values = _seed_values(synthetic, seeds)
    if not values or not xs or xs[0] != 0.0:
        return {"status": "no_real_origin", "equivalent": None, "gain": None}
    accuracy = statistics.fmean(values)
    equivalent, status = equivalent_real(accuracy, xs, isotonic(ys))
    return {"status": status, "equivalent": equivalent, "gain": accuracy - ys[0]}


def bootstrap_point(
    synthetic: dict[int, float], curve: dict[int, dict[int, float]], replicates: int, rng: np.random.Generator
) -> dict[str, Any]:
    """Percentile intervals (95 %) of the equivalent and the gain over seed resamples."""
    seeds = sorted(set(synthetic) & set().union(*(set(v) for v in curve.values())) if curve else set())
    if len(seeds) < 2:
        return {"replicates": 0, "seeds": seeds}
    equivalents, gains, beyond = [], [], 0
    for _ in range(replicates):
        draw = tuple(rng.choice(seeds, size=len(seeds), replace=True).tolist())
        point = read_point(synthetic, curve, draw)
        if point["gain"] is None:
            continue
        gains.append(point["gain"])
        if point["equivalent"] is None:
            beyond += 1
        else:
            equivalents.append(point["equivalent"])
    out: dict[str, Any] = {"replicates": replicates, "seeds": seeds, "beyond_real_range": beyond}
    for name, values in (("equivalent", equivalents), ("gain", gains)):
        if values:
            lo, hi = np.percentile(values, [2.5, 97.5])
            out[name] = [float(lo), float(hi)]
    return out


# --------------------------------------------------------------------------- cost


def generation_cost(runs: Iterable[Run]) -> dict[tuple[str, int, str], dict[str, Any]]:
    """``(dataset, n_base, method) -> cost``: CPU and wall seconds of the jobs that generated images or
    fitted the generator, over the images they generated (each store counted once: the seeds share it)."""
    totals: dict[tuple, dict[str, Any]] = defaultdict(
        lambda: {
            "cpu_seconds": 0.0,
            "wall_seconds": 0.0,
            "fit_seconds": 0.0,
            "images": 0,
            "jobs": 0,
            "machines": set(),
            "devices": set(),
        }
    )
    for r in runs:
        e = r.record.expansion
        if not r.ratio or not e or not (e.generated_images or e.fit_seconds):
            continue
        t = totals[(r.dataset, r.n_base, r.method)]
        t["cpu_seconds"] += float(e.cpu_seconds or 0.0)
        t["wall_seconds"] += e.seconds
        t["fit_seconds"] += e.fit_seconds
        t["images"] += e.generated_images
        t["jobs"] += 1
        t["machines"].add(r.record.machine())
        t["devices"].add(str(r.record.environment.get("device") or "cpu"))
    out = {}
    for key, t in totals.items():
        images = max(t["images"], 1)
        out[key] = {
            **{k: v for k, v in t.items() if k not in ("machines", "devices")},
            "machines": sorted(t["machines"]),
            "on_gpu": t["devices"] == {"cuda"},
            "cpu_seconds_per_image": t["cpu_seconds"] / images if t["images"] else None,
            "wall_seconds_per_image": t["wall_seconds"] / images if t["images"] else None,
        }
    return out


# --------------------------------------------------------------------------- the analysis


def _fit(points: list[dict[str, Any]], n_base: int, k: float) -> dict[str, Any]:
    """c1, c2 over one method's points of one protocol (no-gain points as 0, beyond-range points out)."""
    usable = [p for p in points if p["status"] in ("ok", "no_gain")]
    reason = None
    if not usable:
        reason = "no synthetic point inside the real curve's range"
    elif all(p["status"] == "no_gain" for p in usable):
        reason = "no ratio gained accuracy over the original: worth no real image, c2 unbounded"
    elif len(usable) < 2:
        reason = "one point inside the real curve's range; c1 and c2 need two"
    if reason:
        return {"error": reason, "points_used": len(usable)}
    try:
        fit = fit_exchange_rate(
            [n_base] * len(usable),
            [p["ratio"] * n_base for p in usable],
            [p["equivalent"] or 0.0 for p in usable],
            k,
        )
    except EquivalenceError as exc:
        return {"error": str(exc), "points_used": len(usable)}
    return {
        "c1": fit.c1,
        "c2": fit.c2,
        "factor": fit.factor(n_base),
        "rmse": fit.rmse,
        "at_bound": fit.at_bound,
        # c2 -> 1 with c1 -> infinity (or the reverse) fits points that are proportional: only their slope
        # is determined, not c1 and c2 apart
        "degenerate": fit.at_bound or not DEGENERATE_C2[0] < fit.c2 < DEGENERATE_C2[1],
        "points_used": len(usable),
    }


def analyse(
    root: Path | str, *, metric: str = "test_acc_final", replicates: int = 1000, k: float = 100.0, seed: int = 0
) -> dict[str, Any]:
    """Everything the CLI writes, as one dict."""
    runs, skipped = load_runs(root, metric)
    if not runs:
        raise WorthError(f"no worth run under {root} (left out: {skipped})")
    rng = np.random.default_rng(seed)
    costs = generation_cost(runs)
    groups = sorted({(r.dataset, r.n_base) for r in runs})
    points, fits, real_arms, notes = [], {}, [], []
    for dataset, n_base in groups:
        group = [r for r in runs if (r.dataset, r.n_base) == (dataset, n_base)]
        classes = max(r.record.num_classes or 0 for r in group)
        epoch_curve = real_curve(group, "epochs")
        if 0 not in epoch_curve:
            notes.append(f"{dataset}, n_base {n_base}: no original run at equal epochs (exchange=real_0)")
        for x, values in sorted(epoch_curve.items()):
            real_arms.append(_cell(dataset, n_base, "epochs", x, values, None))
        synthetic: dict[tuple[str, int], dict[int, Run]] = defaultdict(dict)
        for r in group:
            if r.ratio:
                synthetic[(r.method, r.ratio)][r.seed] = r
        budgets = {rs.steps for cell in synthetic.values() for rs in cell.values()}
        budgets |= {r.steps for r in group if not r.ratio and r.step_budget}
        for steps in sorted(budgets):
            curve = real_curve(group, "steps", steps)
            for x, values in sorted(curve.items()):
                real_arms.append(_cell(dataset, n_base, "steps", x, values, steps))
        for (method, ratio), by_seed in sorted(synthetic.items()):
            accuracies = {s: r.accuracy for s, r in by_seed.items()}
            step_counts = sorted({r.steps for r in by_seed.values()})
            if len(step_counts) > 1:
                raise WorthError(
                    f"{dataset}, n_base {n_base}, {method} x{ratio}: seeds trained different step counts "
                    f"{step_counts}; one sweep's settings per folder"
                )
            steps = step_counts[0]
            cost = costs.get((dataset, n_base, method)) or {}
            records = [r.record for r in by_seed.values()]
            fids = [f for f in (q.quality_value("fid") for q in records) if f is not None]
            agreements = [a for a in (q.quality_value("label_agreement") for q in records) if a is not None]
            row: dict[str, Any] = {
                **_cell(dataset, n_base, "synthetic", ratio * n_base, accuracies, steps),
                "method": method,
                "ratio": ratio,
                "train_seconds": statistics.fmean(q.training.train_seconds or 0.0 for q in records),
                "fid": statistics.fmean(fids) if fids else None,
                "label_agreement": statistics.fmean(agreements) if agreements else None,
                "cpu_seconds_per_image": cost.get("cpu_seconds_per_image"),
                "wall_seconds_per_image": cost.get("wall_seconds_per_image"),
                "generated_on_gpu": bool(cost.get("on_gpu")),
                "protocols": {},  # epochs / steps -> gain, equivalent, status, interval
            }
            for protocol in PROTOCOLS:
                curve = epoch_curve if protocol == "epochs" else real_curve(group, "steps", steps)
                point = read_point(accuracies, curve)
                boot = bootstrap_point(accuracies, curve, replicates, rng) if point["gain"] is not None else {}
                per_hour = {"cpu": None, "gpu": None}
                images = ratio * n_base * classes
                if point["equivalent"] is not None:
                    # per GPU-hour: the generation's wall time where it ran on a GPU (CPU seconds never are GPU time)
                    for unit, seconds in (
                        ("cpu", row["cpu_seconds_per_image"]),
                        ("gpu", row["wall_seconds_per_image"] if row["generated_on_gpu"] else None),
                    ):
                        if seconds:
                            per_hour[unit] = point["equivalent"] * classes / (seconds * images / 3600)
                row["protocols"][protocol] = {
                    **point,
                    # the plain exchange rate: real images one generated image is worth
                    "real_per_generated": (
                        point["equivalent"] / (ratio * n_base) if point["equivalent"] is not None else None
                    ),
                    "interval": boot,
                    "real_equivalents_per_cpu_hour": per_hour["cpu"],
                    "real_equivalents_per_gpu_hour": per_hour["gpu"],
                }
            points.append(row)
        for method in sorted({m for m, _ in synthetic}):
            for protocol in PROTOCOLS:
                mine = [
                    {"ratio": p["ratio"], **p["protocols"][protocol]}
                    for p in points
                    if (p["dataset"], p["n_base"], p["method"]) == (dataset, n_base, method)
                ]
                fits[f"{dataset}|{n_base}|{method}|{protocol}"] = _fit(mine, n_base, k)
    machines = sorted({r.record.machine() for r in runs})
    return {
        "root": str(root),
        "metric": metric,
        "k": k,
        "skipped_runs": skipped,
        "machines": machines,
        "real_arm": real_arms,
        "points": points,
        "fits": fits,
        "costs": {"|".join(map(str, key)): value for key, value in sorted(costs.items())},
        "notes": notes,
    }


def _cell(dataset: str, n_base: int, arm: str, added: int, values: dict[int, float], steps: int | None) -> dict:
    accs = list(values.values())
    return {
        "dataset": dataset,
        "n_base": n_base,
        "arm": arm,
        "added_per_class": added,
        "steps": steps,
        "accuracy_mean": statistics.fmean(accs),
        "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
        "n": len(accs),
    }


# --------------------------------------------------------------------------- outputs


def _acc(cell: dict[str, Any]) -> str:
    return f"{cell['accuracy_mean']:.2f} ± {cell['accuracy_std']:.2f} [{cell['n']}]"


def _equivalent(point: dict[str, Any]) -> str:
    if point["status"] == "no_real_origin":
        return "no real arm"
    if point["status"] == "beyond_real_range":
        return "> every real point"
    text = "0 (no gain)" if point["status"] == "no_gain" else _fmt(point["equivalent"])
    ci = point["interval"].get("equivalent")
    if ci:
        text += f" [{_fmt(ci[0])}, {_fmt(ci[1])}]"
    return text


def _gain(point: dict[str, Any]) -> str:
    if point["gain"] is None:
        return "-"
    ci = point["interval"].get("gain")
    return f"{point['gain']:+.2f}" + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# What is a generated image worth?",
        "",
        f"Runs under `{result['root']}`; accuracy = `{result['metric']}` (%), mean ± std over seeds [n]. "
        "Equivalent: extra real images per class (n_real_plus) that give the same accuracy on the monotone real "
        "curve of the same protocol, with a 95 % bootstrap interval over seeds; gain: points over the original "
        "(n_real_plus = 0) of the same protocol. Equal steps: the real arm trained exactly the optimizer steps of "
        "the expanded set (train.steps_matched_to_ratio). Cost: generation CPU seconds per image, fits amortised "
        "(a fit shared by several methods is charged to the one whose job made it; wall seconds include waits "
        "for a fit another job was making). "
        f"Machine(s): {', '.join(result['machines'])}.",
        "",
    ]
    for dataset, n_base in sorted({(p["dataset"], p["n_base"]) for p in result["real_arm"] + result["points"]}):
        lines += [f"## {dataset}, n_base = {n_base} per class", "", "Real arm:", ""]
        step_budgets = sorted(
            {
                c["steps"]
                for c in result["real_arm"]
                if c["arm"] == "steps" and (c["dataset"], c["n_base"]) == (dataset, n_base)
            }
        )
        lines.append("| extra real per class | equal epochs | " + " | ".join(f"{s} steps" for s in step_budgets) + " |")
        lines.append("|---|---|" + "---|" * len(step_budgets))
        for x in sorted(
            {c["added_per_class"] for c in result["real_arm"] if (c["dataset"], c["n_base"]) == (dataset, n_base)}
        ):
            cells = {
                (c["arm"], c["steps"]): c
                for c in result["real_arm"]
                if (c["dataset"], c["n_base"], c["added_per_class"]) == (dataset, n_base, x)
            }
            epochs = _acc(cells[("epochs", None)]) if ("epochs", None) in cells else "-"
            steps = [(_acc(cells[("steps", s)]) if ("steps", s) in cells else "-") for s in step_budgets]
            lines.append(f"| {x} | {epochs} | " + " | ".join(steps) + " |")
        lines += [
            "",
            "| method | ratio | steps | accuracy | equal epochs: gain | equal epochs: equivalent | "
            "equal steps: gain | equal steps: equivalent | real per generated image (epochs / steps) | "
            "CPU s / image | real equivalents per CPU-hour (epochs / steps) | FID | label agreement |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for p in result["points"]:
            if (p["dataset"], p["n_base"]) != (dataset, n_base):
                continue
            per_hour = " / ".join(_fmt(p["protocols"][proto]["real_equivalents_per_cpu_hour"]) for proto in PROTOCOLS)
            if p["generated_on_gpu"]:
                per_gpu_hour = (_fmt(p["protocols"][proto]["real_equivalents_per_gpu_hour"]) for proto in PROTOCOLS)
                per_hour += " (per GPU-hour: " + " / ".join(per_gpu_hour) + ")"
            per_generated = " / ".join(_fmt(p["protocols"][proto]["real_per_generated"]) for proto in PROTOCOLS)
            lines.append(
                f"| {p['method']} | {p['ratio']} | {p['steps']} | {_acc(p)} | {_gain(p['protocols']['epochs'])} | "
                f"{_equivalent(p['protocols']['epochs'])} | {_gain(p['protocols']['steps'])} | {_equivalent(p['protocols']['steps'])} | {per_generated} | "
                f"{_fmt(p['cpu_seconds_per_image'])} | {per_hour} | {_fmt(p['fid'])} | "
                f"{_fmt(p['label_agreement'])} |"
            )
        lines += ["", "Fit of n_syn / n_base = c1^(n_base/k) (c2^(n_real_plus/n_base) - 1) per method:", ""]
        lines += ["| method | equal epochs | equal steps |", "|---|---|---|"]
        for method in sorted(
            {p["method"] for p in result["points"] if (p["dataset"], p["n_base"]) == (dataset, n_base)}
        ):
            cells = []
            for protocol in PROTOCOLS:
                fit = result["fits"].get(f"{dataset}|{n_base}|{method}|{protocol}", {})
                if "error" in fit:
                    cells.append(f"no fit: {fit['error']}")
                else:
                    bound = f", c2 at a search bound {LOG_C2_BOUNDS_TEXT}" if fit["at_bound"] else ""
                    if fit["degenerate"]:
                        bound += "; degenerate: c1 and c2 are not determined apart, read the equivalents"
                    cells.append(
                        f"c2 = {_fmt(fit['c2'])}, c1^(n_base/k) = {_fmt(fit['factor'])} "
                        f"({fit['points_used']} points, rmse {fit['rmse']:.3f}{bound})"
                    )
            lines.append(f"| {method} | {cells[0]} | {cells[1]} |")
        lines.append("")
    cost_rows = [
        f"| {key.replace('|', ' | ')} | {c['images']} | {c['jobs']} | {c['cpu_seconds']:.1f} | {c['wall_seconds']:.1f} | "
        f"{c['fit_seconds']:.1f} | {_fmt(c['cpu_seconds_per_image'])} | {_fmt(c['wall_seconds_per_image'])} |"
        for key, c in result["costs"].items()
    ]
    if cost_rows:
        lines += [
            "## Generation cost",
            "",
            "| dataset | n_base | method | images generated | jobs | CPU s | wall s | of which fit (wall s) | CPU s / image | wall s / image |",
            "|---|---|---|---|---|---|---|---|---|---|",
            *cost_rows,
            "",
        ]
    if result["notes"]:
        lines += ["Notes: " + "; ".join(result["notes"]) + ".", ""]
    if result["skipped_runs"]:
        lines += ["Runs left out: " + "; ".join(f"{v} {k}" for k, v in result["skipped_runs"].items()) + ".", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], worth_path: Path, cost_path: Path) -> None:
    """worth.png: equivalent real images per class vs ratio, per method (solid: equal epochs, dashed: equal
    steps), one panel per dataset; worth_cost.png: accuracy vs generation CPU seconds per image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(p["dataset"], p["n_base"]) for p in result["points"]})
    if not groups:
        return
    methods = sorted({p["method"] for p in result["points"]})
    colors = {m: f"C{i % 10}" for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
    for ax, (dataset, n_base) in zip(axes[0], groups):
        for method in methods:
            mine = sorted(
                (p for p in result["points"] if (p["dataset"], p["n_base"], p["method"]) == (dataset, n_base, method)),
                key=lambda p: p["ratio"],
            )
            for protocol, style in (("epochs", "-"), ("steps", "--")):
                pts = [
                    (p["ratio"], p["protocols"][protocol]["equivalent"])
                    for p in mine
                    if p["protocols"][protocol]["equivalent"] is not None
                ]
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=colors[method], label=f"{method} ({protocol})")
        ax.set(
            title=f"{dataset}, n_base {n_base}",
            xlabel="ratio (generated images per original)",
            ylabel="equivalent extra real images per class",
        )
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(
            handles, labels, fontsize=7, loc="lower center", ncol=min(4, len(labels)), bbox_to_anchor=(0.5, -0.02)
        )
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(worth_path, dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, axes = plt.subplots(1, len(groups), figsize=(5.2 * len(groups), 4.2), squeeze=False)
    for ax, (dataset, n_base) in zip(axes[0], groups):
        for p in result["points"]:
            if (p["dataset"], p["n_base"]) != (dataset, n_base) or not p["cpu_seconds_per_image"]:
                continue
            ax.scatter(p["cpu_seconds_per_image"], p["accuracy_mean"], color=colors[p["method"]], s=12 + 8 * p["ratio"])
            ax.annotate(f"{p['method']} x{p['ratio']}", (p["cpu_seconds_per_image"], p["accuracy_mean"]), fontsize=6)
        for cell in result["real_arm"]:
            if (cell["dataset"], cell["n_base"], cell["arm"], cell["added_per_class"]) == (
                dataset,
                n_base,
                "epochs",
                0,
            ):
                ax.axhline(cell["accuracy_mean"], color="k", linestyle=":", label="original (equal epochs)")
        ax.set_xscale("log")
        ax.set(
            title=f"{dataset}, n_base {n_base}",
            xlabel="generation CPU s per image (fits amortised)",
            ylabel=f"{result['metric']} (%)",
        )
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
    "accuracy_mean",
    "accuracy_std",
    "n",
    "gain_epochs",
    "equivalent_epochs",
    "status_epochs",
    "gain_steps",
    "equivalent_steps",
    "status_steps",
    "cpu_seconds_per_image",
    "wall_seconds_per_image",
    "fid",
    "label_agreement",
]


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
    from expansion.files import atomic_write_text

    out_dir = Path(out_dir)
    paths = [out_dir / n for n in ("worth.md", "worth.json", "worth.csv", "worth.png", "worth_cost.png")]
    atomic_write_text(paths[0], render_markdown(result))
    atomic_write_text(paths[1], json.dumps(result, indent=2) + "\n")
    rows = []
    for p in result["points"]:
        row = {k: p.get(k) for k in CSV_COLUMNS}
        for protocol in PROTOCOLS:
            row[f"gain_{protocol}"] = p["protocols"][protocol]["gain"]
            row[f"equivalent_{protocol}"] = p["protocols"][protocol]["equivalent"]
            row[f"status_{protocol}"] = p["protocols"][protocol]["status"]
        rows.append(row)
    with open(paths[2], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(result, paths[3], paths[4])
    return [p for p in paths if p.exists()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="folder with the sweep's metrics.json files (searched recursively)")
    parser.add_argument("--metric", choices=METRICS, default="test_acc_final")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over seeds")
    parser.add_argument("--k", type=float, default=100.0, help="the n_base scale k of c1^(n_base/k) (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    args = parser.parse_args(argv)
    try:
        result = analyse(args.sweep, metric=args.metric, replicates=args.bootstrap, k=args.k, seed=args.seed)
    except (WorthError, EquivalenceError) as exc:
        parser.exit(2, f"error: {exc}\n")
    out = args.out or args.sweep
    out.mkdir(parents=True, exist_ok=True)
    for path in write_outputs(result, out):
        print(path)


if __name__ == "__main__":
    main()
