"""A sweep's report: tables, figures, expansion grids and settings in one folder.

    python -m experiments.analysis.report multirun/2026-11-21/12-00-00 [--out DIR]

(re)writes ``results.csv`` / ``results.md`` in the sweep folder
(:func:`experiments.analysis.aggregate.aggregate`) and, in ``DIR`` (default ``<sweep>/report``):

* ``report.md``: the results tables, the figures, the quality of the expanded sets,
  one expansion grid per cell, the sweep's settings and one line per run, and the list
  of every file the command wrote;
* ``fig_<table>.png``: per table, grouped bars of our final-epoch test accuracy
  (mean ± std over seeds) per method and column, the paper's number beside each bar;
* ``fig_<table>_ratio.png``: for tables that sweep the expansion ratio, accuracy vs ratio
  per method (ours with error bars, the paper's dashed);
* ``grids/<run>.png``: the expansion grid of one run per cell (seed images, then their
  expansions), copied from the run folder;
* ``backfill/<run>/``: for runs written before quality metrics existed (an expansion,
  but no ``quality`` in metrics.json) whose store is still on disk, ``quality.json`` and
  ``expansion_grid.png`` computed now (``--no-backfill`` skips this; run folders are
  never modified).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import yaml

from experiments.record import RunRecord

from .aggregate import (
    Cell,
    aggregate,
    build_cells,
    find_runs,
    has_quality,
    load_paper_numbers,
    natural_key,
    ordered_rows,
    render_provenance,
    render_quality_markdown,
)

log = logging.getLogger(__name__)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.@-]+", "_", name).strip("_") or "x"


def _run_dir(run: RunRecord) -> Path:
    assert run.folder is not None, "a record read from disk"
    return run.folder


def _run_name(run: RunRecord, root: Path) -> str:
    """The run folder relative to the sweep, as one file-name-safe word."""
    run_dir, root = _run_dir(run).resolve(), root.resolve()
    rel = run_dir.relative_to(root) if run_dir.is_relative_to(root) else Path(run_dir.name)
    return _safe("__".join(rel.parts) or run_dir.name)


def _rel(path: Path, start: Path) -> str:
    return Path(os.path.relpath(path, start)).as_posix()


# -- backfill: quality + grid for runs that predate them -------------------------------------------------


def current_quality_section() -> dict[str, Any]:
    """The ``quality:`` section of today's conf/config.yaml (for runs whose config predates some keys)."""
    import yaml

    from experiments.config import CONFIG_DIR

    return dict(yaml.safe_load((CONFIG_DIR / "config.yaml").read_text())["quality"])


def backfill_run(run: RunRecord, out_dir: Path, probe_cache: dict, *, progress: bool = False) -> dict[str, Any]:
    """Quality metrics + expansion grid of a finished run from its store and its
    ``.hydra/config.yaml``, written under ``out_dir``; returns the quality dict (with
    ``backfilled: true``) or ``{"skipped": reason}``."""
    import numpy as np
    from omegaconf import OmegaConf

    from experiments.config import setup

    setup()  # the resolvers a saved config may name
    from expansion.files import canonical_json
    from expansion.store import ExpandedSet
    from experiments.data.datamodule import load_expanded_images
    from experiments.data.datasets import build_dataset
    from experiments.quality import build_extractor, quality_metrics, quality_settings, save_expansion_grid

    run_dir = _run_dir(run)
    store = Path(run.expansion.store if run.expansion else "")
    config_path = run_dir / ".hydra" / "config.yaml"
    if not (store / "manifest.jsonl").is_file():
        return {"skipped": f"expansion store {store} is not on this machine"}
    if not config_path.is_file():
        return {"skipped": f"no {config_path}"}
    cfg = OmegaConf.load(config_path)
    data = build_dataset(cfg.dataset).in_memory()
    meta = json.loads((store / "meta.json").read_text()) if (store / "meta.json").is_file() else {}
    stored = meta.get("payload", {}).get("dataset") or {}
    # the training images' fingerprint decides (identity fields may have been added since the store was written)
    if stored.get("train_fingerprint") != data.identity.get("train_fingerprint"):
        return {"skipped": f"store {store} was expanded from other training images than the run's dataset"}
    rows = [json.loads(line) for line in (store / "manifest.jsonl").read_text().splitlines() if line]
    expanded = ExpandedSet(store, rows)
    images = load_expanded_images(expanded, data.channels, data.image_size)
    original = data.train.to_tensor()
    labels = np.asarray(data.train.labels)
    settings = quality_settings({**current_quality_section(), **OmegaConf.to_container(cfg.get("quality") or {})})
    seed = int(cfg.get("expansion_seed", cfg.get("seed", 0)))
    key = (canonical_json(data.identity), seed, settings.extractor, settings.epochs, settings.probe_size)
    if key not in probe_cache:  # one probe per dataset and seed, shared by the runs that use them
        probe_cache[key] = build_extractor(
            settings.extractor,
            original,
            labels,
            data.num_classes,
            class_names=data.class_names,
            epochs=settings.epochs,
            probe_size=settings.probe_size,
            seed=seed,
            progress=progress,
            clip_arch=settings.clip_arch,
            clip_pretrained=settings.clip_pretrained,
        )
    quality = quality_metrics(
        original,
        labels,
        images,
        expanded.labels,
        data.num_classes,
        probe_cache[key],
        class_names=data.class_names,
        seed=seed,
        progress=progress,
        max_images=settings.max_images,
        dup_factor=settings.dup_factor,
        kid_subsets=settings.kid_subsets,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    grid = save_expansion_grid(
        out_dir / "expansion_grid.png",
        original,
        labels,
        images,
        [r["parent"] for r in rows],
        [r["copy"] for r in rows],
        rows=settings.grid_seeds,
        class_names=data.class_names,
        title=f"{data.name} | {run.method} x{run.ratio} | expansion seed {seed}",
    )
    quality.update(backfilled=True, grid=grid.name)
    (out_dir / "quality.json").write_text(json.dumps(quality, indent=2))
    return quality


# -- figures ---------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _wrap(text: str, width: int = 70) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


#: the bar figure's accuracy axis: from 0 (a bar's length is its value; a zoomed axis makes one-point
#: gaps between single seeds look large), with room above 100 for the labels
ACCURACY_AXIS = (0.0, 109.0)


def figure_table(cells: list[Cell], spec: dict[str, Any], path: Path, table: str) -> Path:
    """:func:`draw_table` saved to ``path``."""
    plt = _plt()
    fig = draw_table(cells, spec, table)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def draw_table(cells: list[Cell], spec: dict[str, Any], table: str) -> Any:
    """Grouped bars from 0: x = columns, one bar per row (ours mean ± std over seeds; n = 1 has no error bar and
    says so), the paper's number as a marker."""
    plt = _plt()
    columns = sorted({c.column for c in cells}, key=natural_key)
    rows = [c.row for c in ordered_rows(cells, list(spec.get("values", {}).keys()))]
    index = {(c.row, c.column): c for c in cells}
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 2.8 + len(columns) * len(rows) * 0.5), 4.2))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        for j, col in enumerate(columns):
            cell = index.get((row, col))
            if cell is None or not cell.values["test_acc_final"]:
                continue
            mean, std, n = cell.stats("test_acc_final")
            x = j - 0.4 + width * (i + 0.5)
            ax.bar(
                x,
                mean,
                width * 0.9,
                yerr=std if n > 1 else None,
                capsize=3,
                color=colors(i % 10),
                label=row if j == next(jj for jj, cc in enumerate(columns) if (row, cc) in index) else None,
            )
            note = f"{mean:.1f} [{n}]" if n > 1 else f"{mean:.1f} [1: no spread]"
            ax.text(x, mean + (std if n > 1 else 0) + 0.4, note, ha="center", va="bottom", fontsize=7, rotation=90)
            if cell.paper is not None:
                ax.plot(
                    [x],
                    [cell.paper],
                    marker="D",
                    color="black",
                    markersize=5,
                    linestyle="none",
                    label="paper" if "paper" not in ax.get_legend_handles_labels()[1] else None,
                )
    ax.set_xticks(range(len(columns)), columns)
    ax.set_ylabel("final-epoch test accuracy (%)")
    ax.set_ylim(*ACCURACY_AXIS)
    ax.set_yticks(range(0, 101, 10))
    has_paper = any(c.paper is not None for c in cells)
    legend = "◆ = the paper's number" if has_paper else "no paper numbers for this table"
    ax.set_title(
        _wrap(spec.get("title", table)) + f"\nours: mean ± std over [n] seeds; axis from 0; {legend}", fontsize=9
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def has_ratio_sweep(cells: list[Cell]) -> bool:
    ratios: dict[tuple[str, str], set[int]] = defaultdict(set)
    for c in cells:
        if c.method != "original":
            ratios[(c.method, c.column)].add(int(c.ratio))
    return any(len(r) > 1 for r in ratios.values())


def figure_ratio(cells: list[Cell], spec: dict[str, Any], path: Path, table: str) -> Path:
    """Accuracy vs expansion ratio, one panel per column, one line per method."""
    plt = _plt()
    columns = sorted({c.column for c in cells}, key=natural_key)
    methods = sorted({c.method for c in cells if c.method != "original"})
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(columns), figsize=(4.2 * len(columns), 3.8), squeeze=False)
    for ax, col in zip(axes[0], columns):
        for i, method in enumerate(methods):
            pts = sorted(
                (c.ratio, c) for c in cells if c.method == method and c.column == col and c.values["test_acc_final"]
            )
            if not pts:
                continue
            stats = [c.stats("test_acc_final") for _, c in pts]
            ax.errorbar(
                [r for r, _ in pts],
                [s[0] for s in stats],
                yerr=[s[1] for s in stats],
                marker="o",
                capsize=3,
                color=colors(i % 10),
                label=f"{method} (ours)",
            )
            paper = [(r, c.paper) for r, c in pts if c.paper is not None]
            if paper:
                ax.plot(
                    [r for r, _ in paper],
                    [p for _, p in paper],
                    linestyle="--",
                    marker="x",
                    color=colors(i % 10),
                    alpha=0.7,
                    label=f"{method} (paper)",
                )
        for c in cells:
            if c.method == "original" and c.column == col and c.values["test_acc_final"]:
                ax.axhline(c.stats("test_acc_final")[0], color="gray", linestyle=":", label="original (ours)")
        ax.set_title(col, fontsize=9)
        ax.set_xlabel("expansion ratio (new images per seed)")
        ax.set_ylabel("final-epoch test accuracy (%; axis zoomed, not from 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(_wrap(spec.get("title", table), 40 * len(columns) + 30), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# -- settings --------------------------------------------------------------------------------------------------


def sweep_settings(root: Path, runs: list[RunRecord]) -> str:
    lines = []
    multirun = root / "multirun.yaml"
    if multirun.is_file():
        hydra = (yaml.safe_load(multirun.read_text()) or {}).get("hydra", {})
        task = hydra.get("overrides", {}).get("task") or []
        params = (hydra.get("sweeper") or {}).get("params") or {}
        lines.append(
            f"Sweep command overrides ({_rel(multirun, root)}): " + (" ".join(f"`{t}`" for t in task) or "none")
        )
        if params:
            lines.append("Sweeper parameters from the config: " + ", ".join(f"`{k}={v}`" for k, v in params.items()))
    first = next(
        (_run_dir(r) / ".hydra" / "config.yaml" for r in runs if (_run_dir(r) / ".hydra" / "config.yaml").is_file()),
        None,
    )
    if first is not None:
        cfg = _load_config(first)
        train = cfg.get("train", {})
        dataset = cfg.get("dataset", {})
        lines.append(
            f"Shared settings (from {_rel(first, root)}): dataset recipe `{dataset.get('recipe', {})}`, "
            f"image size {dataset.get('image_size')}, train_per_class {dataset.get('train_per_class')}, "
            f"classifier `{cfg.get('classifier', {}).get('arch')}`, epochs `{train.get('epochs')}`, "
            f"batch `{train.get('batch_size')}`, SGD momentum {train.get('momentum')}, "
            f"weight decay {train.get('weight_decay')}, trainer `{cfg.get('trainer', {})}`, "
            f"quality `{cfg.get('quality', 'n/a (run predates quality metrics)')}`"
        )
    return "\n\n".join(f"- {line}" for line in lines) + "\n"


def _load_config(path: Path) -> dict[str, Any]:
    """A run's saved config, interpolations resolved where possible."""
    from omegaconf import OmegaConf

    from experiments.config import setup

    setup()  # the resolvers a saved config may name

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]
    except Exception:  # e.g. an environment variable of the machine that ran it
        return yaml.safe_load(path.read_text()) or {}


def _overrides(run: RunRecord) -> str:
    path = _run_dir(run) / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    return " ".join(f"`{o}`" for o in (yaml.safe_load(path.read_text()) or []))


# -- the report ----------------------------------------------------------------------------------------------


def build_report(
    root: Path | str, out: Path | str | None = None, *, backfill: bool = True, progress: bool = False
) -> tuple[Path, list[Path]]:
    """Write the report of sweep ``root`` into ``out``; returns ``(report.md, every file written)``."""
    root = Path(root)
    out = Path(out) if out is not None else root / "report"
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    csv_path, md_path = aggregate(root)
    written += [csv_path, md_path]
    runs = find_runs(root)
    paper = load_paper_numbers()

    # quality + grids of runs that predate them
    grids: dict[str, Path] = {}  # run name -> its grid
    notes: dict[str, str] = {}
    probe_cache: dict = {}
    for i, run in enumerate(runs):
        name = _run_name(run, root)
        own = _run_dir(run) / "expansion_grid.png"
        if own.is_file():
            grids[name] = own
        if run.expansion is None or run.quality is not None:
            continue
        if not backfill:
            notes[name] = "no quality metrics (run predates them; backfill disabled)"
            continue
        started = time.perf_counter()
        try:
            quality = backfill_run(run, out / "backfill" / name, probe_cache, progress=progress)
        except Exception as exc:  # a report never fails on one run's history
            quality = {"skipped": f"{type(exc).__name__}: {exc}"}
        if "skipped" in quality:
            notes[name] = "no quality metrics: " + quality["skipped"]
            continue
        runs[i] = dataclasses.replace(run, quality=quality)
        grids.setdefault(name, out / "backfill" / name / "expansion_grid.png")
        written += [out / "backfill" / name / "quality.json", out / "backfill" / name / "expansion_grid.png"]
        print(f"report: backfilled quality of {name} in {time.perf_counter() - started:.1f}s", file=sys.stderr)

    cells = build_cells(runs, paper)
    tables = sorted({c.table for c in cells})

    # figures
    figures: list[tuple[str, Path]] = []
    for table in tables:
        tcells = [c for c in cells if c.table == table]
        spec = paper.get(table, {})
        path = figure_table(tcells, spec, out / f"fig_{_safe(table)}.png", table)
        versus = (
            ": ours (final epoch) vs the paper (its best test epoch, optimistic)"
            if any(c.paper is not None for c in tcells)
            else ": ours (no paper numbers)"
        )
        figures.append((f"{spec.get('title', table)}{versus}", path))
        if has_ratio_sweep(tcells):
            path = figure_ratio(tcells, spec, out / f"fig_{_safe(table)}_ratio.png", table)
            figures.append((f"{spec.get('title', table)}: accuracy vs expansion ratio", path))
    written += [p for _, p in figures]

    # one grid per cell, i.e. per experiment and column (its first seed's run), copied beside the report
    grid_files: list[tuple[str, Path]] = []
    (out / "grids").mkdir(exist_ok=True)
    for cell in cells:
        run = next((r for r in cell.runs if _run_name(r, root) in grids), None)
        if run is None:
            continue
        name = _run_name(run, root)
        dest = out / "grids" / f"{name}.png"
        shutil.copyfile(grids[name], dest)
        grid_files.append(
            (f"{cell.row} x{cell.ratio} on {cell.column} ({cell.classifier}), seed {run.seed}: {name}", dest)
        )
    written += [p for _, p in grid_files]

    # report.md
    report = out / "report.md"
    written.append(report)
    text = [
        f"# Report: {root}\n",
        f"{len(runs)} finished runs (folders with a metrics.json) in {len(tables)} table(s). Written by "
        f"`python -m experiments.analysis.report {root}`.\n",
    ]
    text.append("## Results\n")
    text.append(
        f"From [{_rel(md_path, out)}]({_rel(md_path, out)}) and [{_rel(csv_path, out)}]({_rel(csv_path, out)}).\n"
    )
    body = md_path.read_text().split("\n", 2)[-1]  # without its '# Results' title
    body = body.split("## Quality of the expanded sets")[0].split("## Provenance")[0]  # both come below
    text.append(re.sub(r"^## ", "### ", body, flags=re.M))
    text.append("## Figures\n")
    for caption, path in figures:
        text.append(f"**{caption}** ({_rel(path, out)})\n\n![{caption}]({_rel(path, out)})\n")
    text.append("## Quality of the expanded sets\n")
    if has_quality(cells):
        text.append(re.sub(r"^## ", "### ", render_quality_markdown(cells, paper), flags=re.M))
        if any((r.quality or {}).get("backfilled") for r in runs):
            text.append(
                "Runs marked backfilled had no quality metrics; they were computed by this report from "
                "their expansion store (`backfill/<run>/quality.json`).\n"
            )
    else:
        text.append(
            "No run of this sweep has quality metrics (they are computed after expansion when "
            "`quality.enabled=true`; runs without an expansion have none).\n"
        )
    if notes:
        text.append("\n".join(f"- {name}: {note}" for name, note in sorted(notes.items())) + "\n")
    text.append("## Expansion grids\n")
    if grid_files:
        text.append("One run per table cell: each row is a seed image (left) followed by its k expansions.\n")
        for caption, path in grid_files:
            text.append(f"**{caption}**\n\n![{caption}]({_rel(path, out)})\n")
    else:
        text.append("No run has an expansion grid (no expansion, or quality disabled).\n")
    text.append("## Settings\n")
    text.append(sweep_settings(root, runs))
    table_lines = [
        "| run | method | ratio | dataset | classifier | seed | final acc | best-val acc "
        "| best-test acc (as the paper selects; optimistic) | FID | overrides |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        fid = run.quality_value("fid")
        fid_text = f"{fid:.3g}" if fid is not None else "–"
        t = run.training
        best_test = f"{t.test_acc_best_test:.2f}" if t.test_acc_best_test is not None else "–"
        table_lines.append(
            f"| {_rel(_run_dir(run), root)} | {run.method} | {run.ratio} | {run.dataset} | "
            f"{run.classifier} | {run.seed} | {t.test_acc_final:.2f} | "
            f"{t.test_acc_best_val:.2f} | {best_test} | {fid_text} | {_overrides(run)} |"
        )
    text.append("\n".join(table_lines) + "\n")
    text.append(re.sub(r"^## ", "\n## ", render_provenance(cells), flags=re.M))
    text.append("\n## Files written by this report\n")
    text.append("\n".join(f"- [{_rel(p, out)}]({_rel(p, out)})" for p in written) + "\n")
    report.write_text("\n".join(text))
    missing = [p for p in written if not p.is_file()]
    if missing:
        raise RuntimeError(f"report: promised files were not written: {missing}")
    return report, written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="a sweep folder (searched recursively for metrics.json)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default: ROOT/report)")
    parser.add_argument(
        "--no-backfill", action="store_true", help="do not compute quality metrics/grids for runs that predate them"
    )
    args = parser.parse_args(argv)
    progress = os.environ.get("PROGRESS_BAR", "true").lower() not in ("0", "false", "no")
    report, written = build_report(args.root, args.out, backfill=not args.no_backfill, progress=progress)
    print(f"wrote {len(written)} files:")
    for path in written:
        print(f"  {path}")
    print(f"report: {report}")


if __name__ == "__main__":
    main()
