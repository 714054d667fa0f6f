"""The default job (``python run.py``) timed for two checkouts, alternating: wall time, the job inside
Python, the expansion and the quality step (its share), on a fresh cache (first) and again on it (reuse).

    git worktree add /tmp/before <commit>
    python benchmarks/default_job_timing.py --trees before=/tmp/before after=. --repeats 3
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.checkouts import checkout_parser, checkouts
from experiments.record import RunRecord, read_record


def time_job(tree: Path, cache: Path, run_dir: Path) -> tuple[float, RunRecord]:
    env = {**os.environ, "EXPANSION_CACHE": str(cache), "PROGRESS_BAR": "false"}
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(tree / "run.py"), f"hydra.run.dir={run_dir}"], env=env, capture_output=True, check=True
    )
    record, problem = read_record(run_dir)
    if record is None:
        raise SystemExit(f"{run_dir}: {problem}")
    return time.perf_counter() - start, record


def main(argv: list[str] | None = None) -> None:
    args = checkout_parser(__doc__, repeats=3).parse_args(argv)
    trees = checkouts(args)
    rows: dict[tuple[str, str], list[tuple[float, RunRecord]]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for rep in range(args.repeats):
            for name, tree in trees.items():
                cache = Path(scratch) / f"cache_{name}_{rep}"
                for phase in ("first", "reuse"):
                    run_dir = Path(scratch) / f"run_{name}_{rep}_{phase}"
                    rows.setdefault((name, phase), []).append(time_job(tree, cache, run_dir))
                shutil.rmtree(cache, ignore_errors=True)
    print(f"{os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; medians of {args.repeats}")
    for (name, phase), runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        job = statistics.median(m.total_seconds for _, m in runs)
        expansion = statistics.median(m.expansion.seconds for _, m in runs)
        quality = statistics.median(m.quality_value("seconds") for _, m in runs)
        accuracy = sorted({(m.training.test_acc_final, m.original.test_acc_final) for _, m in runs})
        print(
            f"{name:10s} {phase:6s} wall {wall:6.2f} s | job {job:6.2f} s | expansion {expansion:5.2f} s | "
            f"quality {quality:5.2f} s ({100 * quality / job:4.1f} % of the job) | accuracies {accuracy}"
        )


if __name__ == "__main__":
    main()
