"""The real-vs-synthetic exchange rate of closed-set generative augmentation (arXiv 2508.09550).

    python -m experiments.analysis.equivalence <sweep dir> [--k 100] [--metric test_acc_final] [--bootstrap 1000]

reads every ``metrics.json`` under a sweep of ``experiment=exchange_rate`` (or ``exchange_rate_cpu``):
runs with n_base real images per class (``train_per_class``) plus either n_real_plus extra real
images per class (``method=original``, ``extra_real_per_class``) or n_syn = ratio x n_base
synthetic images per class (the generator). Per dataset and n_base:

1. the real curve acc(n_real_plus) (mean over seeds), made non-decreasing (isotonic regression);
2. every synthetic point acc(n_syn) gets its equivalent n_real_plus: the number of extra real
   images per class the (piecewise linear) real curve needs to reach the same accuracy; 0 if the
   synthetic images gained nothing over n_base alone, none (left out) if they beat every real point;
3. the paper's relation  n_syn / n_base = c1^(n_base / k) * (c2^(n_real_plus / n_base) - 1)
   is fitted by nonlinear least squares (scipy) in the measured quantity, n_real_plus / n_base;
4. a bootstrap over seeds (resampled with replacement, curves and fit redone) gives intervals.

c2 is the exchange rate: with c2 = 2.53, doubling the real set (n_real_plus = n_base) is worth
n_syn = c1^(n_base/k) * 1.53 * n_base synthetic images. ``k`` is not given in the paper summary we
follow, so it is a parameter: c2 does not depend on it, c1 does (c1 for k' = c1^(k'/k)); the k-free
factor c1^(n_base/k) is reported per n_base. n_base counts images per class here.

Writes into the sweep folder (or ``--out``): ``exchange_points.csv`` (one row per curve point), ``exchange_points.json``
(the same plus per-seed accuracies), ``exchange_fit.json``, ``exchange_rate.md`` and ``exchange_rate.png``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from experiments.record import RunRecord

from .aggregate import find_runs

#: closed-set exchange rates c2 reported by the paper (specs/methods.md section 4, benchmarks.md)
PAPER_C2 = {"cifar10": 2.53, "bloodmnist": 3.88}
#: our offline stand-ins -> the paper's dataset they are compared with
PAPER_DATASET = {"cifar10_subset": "cifar10"}
METRICS = ("test_acc_final", "test_acc_best_val")
NO_GAIN_POLICIES = ("zero", "drop")


class EquivalenceError(ValueError):
    """Input that cannot give an exchange rate (no real curve, too few points, ...)."""


@dataclass(frozen=True)
class Run:
    """A few-shot run on one arm: real (``n_real_plus`` extra real images per class; the n_base-only runs are
    its 0) or synthetic (``ratio`` generated images per original one)."""

    dataset: str
    n_base: int
    method: str  # "original" for the real arm
    ratio: int  # 0 for the real arm
    n_real_plus: int
    seed: int
    accuracy: float
    record: RunRecord = field(compare=False, repr=False)

    @property
    def n_syn(self) -> int:
        return self.ratio * self.n_base

    @property
    def steps(self) -> int | None:
        """Optimizer steps taken (None for a run from before train.steps)."""
        return self.record.training.optimizer_steps

    @property
    def step_budget(self) -> bool:
        return self.record.training.step_budget


def load_runs(
    root: Path | str, metric: str = "test_acc_final", error: type[ValueError] | None = None
) -> tuple[list[Run], dict[str, int]]:
    """The few-shot runs under ``root`` on one of the two arms, and counts of the runs left out (with the
    reason); ``error``: the exception type to raise (default :class:`EquivalenceError`)."""
    error = error or EquivalenceError
    if metric not in METRICS:
        raise error(f"metric must be one of {METRICS}, got {metric!r}")
    runs, skipped = [], defaultdict(int)
    found = find_runs(Path(root))
    if not found:
        raise error(f"no metrics.json under {root}")
    for m in found:
        if m.train_per_class is None:
            skipped["no few-shot n_base (dataset.train_per_class)"] += 1
            continue
        if m.generated_only:
            skipped["trained on generated images only"] += 1
            continue
        if m.extra_real and m.ratio:
            skipped["synthetic and extra real images together (on neither arm)"] += 1
            continue
        method = "original" if not m.ratio else m.method
        accuracy = float(m.accuracy(metric))
        runs.append(Run(m.dataset, m.train_per_class, method, m.ratio, m.extra_real, m.seed, accuracy, m))
    return runs, dict(skipped)


def one_generator_per_dataset(runs: list[Run]) -> None:
    for dataset in {r.dataset for r in runs}:
        generators = {r.method for r in runs if r.dataset == dataset and r.n_syn}
        if len(generators) > 1:
            raise EquivalenceError(
                f"{dataset}: synthetic runs of several methods {sorted(generators)}; "
                "analyse one generator per sweep folder"
            )


# --------------------------------------------------------------------------- curves


def cell_accuracies(runs: Iterable[Run], seeds: Sequence[int] | None = None) -> dict[tuple, list[float]]:
    """``(dataset, n_base, arm, added per class) -> accuracies`` with arm "real" (n_real_plus; the
    n_base-only runs are its 0) or "synthetic" (n_syn). ``seeds`` (a bootstrap draw, repeats allowed)
    selects and weights the runs of each seed; None keeps every run once."""
    by_seed: dict[tuple, dict[int, float]] = defaultdict(dict)
    for r in runs:
        arm, added = ("synthetic", r.n_syn) if r.n_syn else ("real", r.n_real_plus)
        by_seed[(r.dataset, r.n_base, arm, added)][r.seed] = r.accuracy
    cells = {}
    for key, accs in by_seed.items():
        values = list(accs.values()) if seeds is None else [accs[s] for s in seeds if s in accs]
        if values:
            cells[key] = values
    return cells


def isotonic(values: Sequence[float]) -> list[float]:
    """Least-squares non-decreasing fit (pool adjacent violators), equal weights."""
    blocks: list[list[float]] = []  # [mean, size]
    for v in values:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, n2), (m1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * n1 + m2 * n2) / (n1 + n2), n1 + n2])
    return [m for m, n in blocks for _ in range(int(n))]


def equivalent_real(
    accuracy: float, real_added: Sequence[float], real_accuracy: Sequence[float]
) -> tuple[float | None, str]:
    """The n_real_plus at which the monotone, piecewise linear real curve reaches ``accuracy``.

    ``real_added`` ascending from 0, ``real_accuracy`` non-decreasing. Returns (0, "no_gain") at or
    below the n_base-only accuracy and (None, "beyond_real_range") above the last real point."""
    if accuracy <= real_accuracy[0]:
        return 0.0, "no_gain"
    if accuracy > real_accuracy[-1]:
        return None, "beyond_real_range"
    i = next(i for i in range(len(real_accuracy) - 1) if real_accuracy[i + 1] >= accuracy)
    a0, a1 = real_accuracy[i], real_accuracy[i + 1]
    x0, x1 = real_added[i], real_added[i + 1]
    return x0 + (accuracy - a0) / (a1 - a0) * (x1 - x0), "ok"


def exchange_points(cells: dict[tuple, list[float]]) -> list[dict[str, Any]]:
    """One row per curve point; synthetic rows carry their equivalent n_real_plus and status."""
    rows = []
    for dataset, n_base in sorted({(k[0], k[1]) for k in cells}):
        real = sorted((k[3], statistics.fmean(v)) for k, v in cells.items() if k[:3] == (dataset, n_base, "real"))
        if not real or real[0][0] != 0:
            raise EquivalenceError(
                f"{dataset}, n_base={n_base}: no run with n_base images alone (real_0); the real curve needs it"
            )
        real_added = [float(x) for x, _ in real]
        real_mono = isotonic([a for _, a in real])
        for arm in ("real", "synthetic"):
            for key in sorted(k for k in cells if k[:3] == (dataset, n_base, arm)):
                values = cells[key]
                row = {
                    "dataset": dataset,
                    "n_base": n_base,
                    "arm": arm,
                    "added_per_class": key[3],
                    "accuracy_mean": statistics.fmean(values),
                    "accuracy_std": statistics.stdev(values) if len(values) > 1 else 0.0,
                    "n": len(values),
                }
                if arm == "synthetic":
                    equiv, status = equivalent_real(row["accuracy_mean"], real_added, real_mono)
                    row.update(n_syn=key[3], n_real_plus_equivalent=equiv, status=status)
                else:
                    row.update(real_curve_monotone=real_mono[real_added.index(float(key[3]))])
                rows.append(row)
    return rows


# --------------------------------------------------------------------------- the fit


@dataclass(frozen=True)
class ExchangeFit:
    c1: float
    c2: float
    k: float
    n_points: int
    rmse: float  # of n_real_plus / n_base
    at_bound: bool  # c2 stopped at a bound of the search: the data do not pin it down

    def factor(self, n_base: float) -> float:
        """c1^(n_base / k): the k-free multiplier of (c2^x - 1) at this n_base."""
        return self.c1 ** (n_base / self.k)


LOG_C2_BOUNDS = (1e-4, math.log(1e6))  # c2 in (1.0001, 1e6)
LOG_C2_BOUNDS_TEXT = "(c2 in [1.0001, 1e6])"


def predicted_real_fraction(n_syn_over_base, n_base, c1: float, c2: float, k: float):
    """The relation solved for x = n_real_plus / n_base:  x = log(1 + (n_syn/n_base) c1^(-n_base/k)) / log c2."""
    y, nb = np.asarray(n_syn_over_base, float), np.asarray(n_base, float)
    return np.log1p(y * np.exp(-nb / k * math.log(c1))) / math.log(c2)


def fit_exchange_rate(
    n_base: Sequence[float], n_syn: Sequence[float], n_real_plus: Sequence[float], k: float = 100.0
) -> ExchangeFit:
    """Fit c1, c2 of  n_syn / n_base = c1^(n_base / k) * (c2^(n_real_plus / n_base) - 1)  by least squares
    on x = n_real_plus / n_base (the measured side; n_syn is set by the experiment), started from the
    best point of a coarse grid."""
    from scipy.optimize import least_squares

    nb, ns, nr = (np.asarray(v, float) for v in (n_base, n_syn, n_real_plus))
    if not (len(nb) == len(ns) == len(nr)) or len(nb) < 2:
        raise EquivalenceError(f"the fit of c1, c2 needs at least 2 points, got {len(nb)}")
    if k <= 0 or np.any(nb <= 0) or np.any(ns <= 0) or np.any(nr < 0):
        raise EquivalenceError("need k > 0, n_base > 0, n_syn > 0 and n_real_plus >= 0")
    if len({(a, b) for a, b in zip(nb, ns)}) < 2:
        raise EquivalenceError("the fit of c1, c2 needs at least 2 distinct (n_base, n_syn) points")
    y, x = ns / nb, nr / nb

    def residuals(p):
        log_c1, log_log_c2 = p
        return np.log1p(y * np.exp(-nb / k * log_c1)) / math.exp(log_log_c2) - x

    lo, hi = (math.log(b) for b in LOG_C2_BOUNDS)
    # start from the best point of a coarse grid: c1^(n_base/k) at the mean n_base x c2
    grid_c1 = np.log(np.geomspace(0.02, 50, 41))[:, None] * k / nb.mean()
    grid_c2 = np.log(np.log(np.geomspace(1.02, 500, 41)))[:, None]
    a = np.log1p(y[None, :] * np.exp(-nb[None, :] / k * grid_c1))  # [41, n]
    costs = (((a[:, None, :] / np.exp(grid_c2)[None, :, :]) - x) ** 2).sum(-1)  # [41 c1, 41 c2]
    i, j = np.unravel_index(np.argmin(costs), costs.shape)
    best = least_squares(
        residuals, [grid_c1[i, 0], grid_c2[j, 0]], bounds=([-np.inf, lo], [np.inf, hi]), method="trf", x_scale="jac"
    )
    log_c1, log_log_c2 = best.x
    at_bound = bool(np.isclose(log_log_c2, lo, atol=1e-3) or np.isclose(log_log_c2, hi, atol=1e-3))
    rmse = float(np.sqrt(np.mean(best.fun**2)))
    return ExchangeFit(
        c1=float(math.exp(log_c1)),
        c2=float(math.exp(math.exp(log_log_c2))),
        k=float(k),
        n_points=len(x),
        rmse=rmse,
        at_bound=at_bound,
    )


def fit_points(rows: Iterable[dict[str, Any]], dataset: str, no_gain: str = "zero") -> list[tuple[int, int, float]]:
    """(n_base, n_syn, n_real_plus equivalent) of a dataset's synthetic points that enter the fit:
    beyond-range points never (censored), no-gain points as 0 (``zero``) or not (``drop``)."""
    if no_gain not in NO_GAIN_POLICIES:
        raise EquivalenceError(f"no_gain must be one of {NO_GAIN_POLICIES}, got {no_gain!r}")
    out = []
    for r in rows:
        if r["dataset"] != dataset or r["arm"] != "synthetic" or r["status"] == "beyond_real_range":
            continue
        if r["status"] == "no_gain" and no_gain == "drop":
            continue
        out.append((r["n_base"], r["n_syn"], float(r["n_real_plus_equivalent"])))
    return out


def fit_dataset(rows: list[dict[str, Any]], dataset: str, k: float, no_gain: str) -> ExchangeFit:
    points = fit_points(rows, dataset, no_gain)
    if points and all(p[2] == 0 for p in points):
        raise EquivalenceError(
            f"{dataset}: no synthetic point gained accuracy over n_base alone; the synthetic "
            "images are worth no real image here and c2 is unbounded"
        )
    if not points:
        raise EquivalenceError(f"{dataset}: no synthetic point inside the real curve's range")
    nb, ns, nr = zip(*points)
    return fit_exchange_rate(nb, ns, nr, k)


def bootstrap(runs: list[Run], dataset: str, k: float, no_gain: str, replicates: int, seed: int = 0) -> dict[str, Any]:
    """Resample the dataset's seeds with replacement, redo curves, equivalents and fit; percentile intervals."""
    runs = [r for r in runs if r.dataset == dataset]
    seeds = sorted({r.seed for r in runs})
    rng = np.random.default_rng(seed)
    c1s, c2s, failed, at_bound = [], [], 0, 0
    fits: dict[tuple[int, ...], ExchangeFit | None] = {}  # a draw's fit depends on its multiset of seeds only
    for _ in range(replicates):
        draw = tuple(sorted(rng.choice(seeds, size=len(seeds), replace=True).tolist()))
        if draw not in fits:
            try:
                fits[draw] = fit_dataset(exchange_points(cell_accuracies(runs, draw)), dataset, k, no_gain)
            except EquivalenceError:
                fits[draw] = None
        if fits[draw] is None:
            failed += 1
            continue
        c1s.append(fits[draw].c1)
        c2s.append(fits[draw].c2)
        at_bound += fits[draw].at_bound
    out: dict[str, Any] = {"replicates": replicates, "failed": failed, "at_bound": at_bound, "seeds": seeds}
    for name, values in (("c1", c1s), ("c2", c2s)):
        if values:
            lo, med, hi = np.percentile(values, [2.5, 50, 97.5])
            out[name] = {"low": float(lo), "median": float(med), "high": float(hi)}
    return out


# --------------------------------------------------------------------------- outputs


def analyse(
    root: Path | str,
    *,
    k: float = 100.0,
    metric: str = "test_acc_final",
    replicates: int = 1000,
    no_gain: str = "zero",
    seed: int = 0,
) -> dict[str, Any]:
    """Everything the CLI writes, as one dict: points, per-dataset fits, bootstrap intervals."""
    runs, skipped = load_runs(root, metric)
    if not runs:
        raise EquivalenceError(f"no exchange-rate run under {root} (skipped: {skipped})")
    one_generator_per_dataset(runs)
    rows = exchange_points(cell_accuracies(runs))
    fits: dict[str, Any] = {}
    for dataset in sorted({r.dataset for r in runs}):
        paper_dataset = PAPER_DATASET.get(dataset, dataset)
        entry: dict[str, Any] = {
            "paper_dataset": paper_dataset,
            "paper_c2": PAPER_C2.get(paper_dataset),
            "points_used": len(fit_points(rows, dataset, no_gain)),
        }
        try:
            fit = fit_dataset(rows, dataset, k, no_gain)
        except EquivalenceError as exc:
            entry["error"] = str(exc)
        else:
            entry.update(asdict(fit))
            n_bases = sorted({r.n_base for r in runs if r.dataset == dataset})
            entry["factor_per_n_base"] = {str(n): fit.factor(n) for n in n_bases}
            entry["bootstrap"] = bootstrap(runs, dataset, k, no_gain, replicates, seed)
        fits[dataset] = entry
    per_seed = defaultdict(dict)
    for r in runs:
        arm, added = ("synthetic", r.n_syn) if r.n_syn else ("real", r.n_real_plus)
        per_seed[(r.dataset, r.n_base, arm, added)][str(r.seed)] = r.accuracy
    for row in rows:
        row["per_seed"] = per_seed[(row["dataset"], row["n_base"], row["arm"], row["added_per_class"])]
    return {
        "root": str(root),
        "metric": metric,
        "k": k,
        "no_gain": no_gain,
        "skipped_runs": skipped,
        "points": rows,
        "fits": fits,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.3e}"


def render_markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Exchange rate of closed-set synthetic vs real images (arXiv 2508.09550)",
        "",
        f"Runs under `{result['root']}`; accuracy = `{result['metric']}` (%), mean ± std over seeds [n]. "
        "Added images are per class: extra real images (real arm) or synthetic samples (synthetic arm). "
        "Equivalent n_real_plus: extra real images per class with the same accuracy on the monotone real "
        f"curve (no-gain points enter the fit as 0: `{result['no_gain']}`; beyond-range points are left out).",
        "",
    ]
    for dataset, fit in result["fits"].items():
        lines += [
            f"## {dataset}",
            "",
            "| n_base | arm | added per class | accuracy (%) | equivalent n_real_plus | status |",
            "|---|---|---|---|---|---|",
        ]
        for r in result["points"]:
            if r["dataset"] != dataset:
                continue
            acc = f"{r['accuracy_mean']:.2f} ± {r['accuracy_std']:.2f} [{r['n']}]"
            equiv = _fmt(r.get("n_real_plus_equivalent")) if r["arm"] == "synthetic" else ""
            lines.append(
                f"| {r['n_base']} | {r['arm']} | {r['added_per_class']} | {acc} | {equiv} | {r.get('status', '')} |"
            )
        lines.append("")
        paper = fit["paper_c2"]
        paper_txt = f"paper c2 ({fit['paper_dataset']}, closed-set): {paper}" if paper else "no paper value"
        if "error" in fit:
            lines += [f"**No fit:** {fit['error']}. {paper_txt}.", ""]
            continue
        boot = fit["bootstrap"]
        ci = {
            n: (f" [{_fmt(boot[n]['low'])}, {_fmt(boot[n]['high'])}]" if n in boot else " [no interval]")
            for n in ("c1", "c2")
        }
        factors = ", ".join(f"n_base {n}: {_fmt(v)}" for n, v in fit["factor_per_n_base"].items())
        lines += [
            f"**Fit** ({fit['n_points']} points, rmse of n_real_plus/n_base {fit['rmse']:.3f}"
            f"{', c2 at a search bound' if fit['at_bound'] else ''}): "
            f"**c2 = {_fmt(fit['c2'])}**{ci['c2']}, c1 = {_fmt(fit['c1'])}{ci['c1']} (k = {fit['k']:g}); "
            f"c1^(n_base/k): {factors}. 95 % percentile intervals from {boot['replicates']} bootstrap "
            f"replicates over seeds {boot['seeds']} ({boot['failed']} without a fit, {boot['at_bound']} with "
            f"c2 at a search bound {LOG_C2_BOUNDS_TEXT}). {paper_txt}.",
            "",
        ]
    if result["skipped_runs"]:
        lines += ["Runs left out: " + "; ".join(f"{v} {k}" for k, v in result["skipped_runs"].items()) + ".", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Accuracy vs added images per class: real (solid) and synthetic (dashed) curves per n_base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(result["fits"])
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        rows = [r for r in result["points"] if r["dataset"] == dataset]
        for i, n_base in enumerate(sorted({r["n_base"] for r in rows})):
            color = f"C{i}"
            base = [r for r in rows if r["n_base"] == n_base and r["arm"] == "real" and r["added_per_class"] == 0]
            for arm, style, marker in (("real", "-", "o"), ("synthetic", "--", "^")):
                pts = sorted(
                    (
                        [r for r in rows if r["n_base"] == n_base and r["arm"] == arm]
                        + (base if arm == "synthetic" else [])
                    ),
                    key=lambda r: r["added_per_class"],
                )
                ax.errorbar(
                    [r["added_per_class"] for r in pts],
                    [r["accuracy_mean"] for r in pts],
                    yerr=[r["accuracy_std"] for r in pts],
                    color=color,
                    linestyle=style,
                    marker=marker,
                    capsize=3,
                    label=f"n_base {n_base}, {arm}",
                )
        fit = result["fits"][dataset]
        title = dataset + (f": c2 = {_fmt(fit['c2'])}" if "c2" in fit else "")
        ax.set(title=title, xlabel="added images per class", ylabel=f"{result['metric']} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    paths = [
        out_dir / n
        for n in (
            "exchange_points.csv",
            "exchange_points.json",
            "exchange_fit.json",
            "exchange_rate.md",
            "exchange_rate.png",
        )
    ]
    columns = [
        "dataset",
        "n_base",
        "arm",
        "added_per_class",
        "accuracy_mean",
        "accuracy_std",
        "n",
        "n_real_plus_equivalent",
        "status",
    ]
    with open(paths[0], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["points"])
    paths[1].write_text(json.dumps(result["points"], indent=2) + "\n")
    paths[2].write_text(json.dumps({k: v for k, v in result.items() if k != "points"}, indent=2) + "\n")
    paths[3].write_text(render_markdown(result))
    plot(result, paths[4])
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", type=Path, help="folder with the sweep's metrics.json files (searched recursively)")
    parser.add_argument("--k", type=float, default=100.0, help="the n_base scale k of c1^(n_base/k) (default 100)")
    parser.add_argument("--metric", choices=METRICS, default="test_acc_final")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates over seeds")
    parser.add_argument(
        "--no-gain",
        choices=NO_GAIN_POLICIES,
        default="zero",
        help="synthetic points without gain enter the fit as n_real_plus 0 (zero) or not (drop)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap draws")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the sweep folder)")
    args = parser.parse_args(argv)
    try:
        result = analyse(
            args.sweep, k=args.k, metric=args.metric, replicates=args.bootstrap, no_gain=args.no_gain, seed=args.seed
        )
    except EquivalenceError as exc:
        parser.exit(2, f"error: {exc}\n")
    out = args.out or args.sweep
    out.mkdir(parents=True, exist_ok=True)
    for path in write_outputs(result, out):
        print(path)
    for dataset, fit in result["fits"].items():
        if "error" in fit:
            print(f"{dataset}: no fit ({fit['error']})")
        else:
            ci = fit["bootstrap"].get("c2")
            interval = f" [{_fmt(ci['low'])}, {_fmt(ci['high'])}]" if ci else ""
            paper = f"paper c2 {fit['paper_c2']}" if fit["paper_c2"] else "no paper value"
            print(f"{dataset}: c2 = {_fmt(fit['c2'])}{interval}, c1 = {_fmt(fit['c1'])} (k = {fit['k']:g}), {paper}")


if __name__ == "__main__":
    main()
