"""How long a bad command line takes to be answered: ``python run.py <bad override>`` until its error line,
for checkouts side by side, beside a plain reference (``python -c "import hydra"``: the interpreter and
Hydra, what any answer costs).

    git worktree add /tmp/before <commit>
    python benchmarks/error_latency.py --trees before=/tmp/before after=. --repeats 5
"""

from __future__ import annotations

import os
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

#: bad command lines: a misspelt setting, a misspelt method, a bad value, a bad thread count, a missing folder
BAD = (
    ["method.ratoi=2"],
    ["method=cutot"],
    ["train.epochs=-1"],
    ["threads=0"],
    ["dataset=imagefolder", "dataset.path=/nonexistent/my_set"],
)


def seconds(command: list[str], cwd: Path) -> tuple[float, str]:
    env = {**os.environ, "PROGRESS_BAR": "false"}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return elapsed, f"exit {proc.returncode}: {last[:110]}"


def main(argv: list[str] | None = None) -> None:
    args = checkout_parser(__doc__, repeats=5).parse_args(argv)
    trees = checkouts(args)
    times: dict[tuple[str, str], list[float]] = {}
    answers: dict[tuple[str, str], str] = {}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(args.repeats):
            elapsed, _ = seconds([sys.executable, "-c", "import hydra"], Path.cwd())
            times.setdefault(("reference", "python -c 'import hydra'"), []).append(elapsed)
            for name, tree in trees.items():
                for bad in BAD:
                    command = [sys.executable, "run.py", *bad, f"hydra.run.dir={scratch}/{name}"]
                    elapsed, answer = seconds(command, tree)
                    times.setdefault((name, " ".join(bad)), []).append(elapsed)
                    answers[(name, " ".join(bad))] = answer
    print(
        f"{os.cpu_count()} cores; medians of {args.repeats}; {os.getloadavg()[0]:.2f} load average (1 min) at the end"
    )
    for (name, bad), values in times.items():
        answer = answers.get((name, bad), "")
        print(f"{name:10s} {bad:28s} {statistics.median(values):6.2f} s  {answer}")


if __name__ == "__main__":
    main()
