"""A generation benchmark's ``main`` run on the tiny models: the script's logic end to end in seconds."""

from __future__ import annotations

import json
from pathlib import Path


def run_tiny(bench, data: Path, tmp_path: Path, *extra: str) -> tuple[dict, dict]:
    """``(the returned report, the --json file)`` of ``bench.main`` on the CPU, 2 seeds, one repeat."""
    out = tmp_path / "figures.json"
    args = ["--tiny", "--device", "cpu", "--seeds-per-pass", "2", "--repeats", "1", "--data", str(data)]
    report = bench.main([*args, "--json", str(out), *extra])
    return report, json.loads(out.read_text())


def tiny_modes(bench, data: Path, tmp_path: Path, capsys, *extra: str) -> dict[str, dict]:
    """:func:`run_tiny` of a benchmark that times a per-seed and a batched mode: its printed table and its
    speed-up checked; returns the report's rows by mode."""
    report, written = run_tiny(bench, data, tmp_path, *extra)
    printed = capsys.readouterr().out
    assert "img/s" in printed and "batched / per-seed" in printed and "TINY" in printed
    assert written["speedup"] > 0
    return {r["mode"]: r for r in report["results"]}
