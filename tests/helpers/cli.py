"""The project's commands run as a user runs them, for the end-to-end tests."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from experiments import PROJECT_ROOT


def user_env(cache: Path | str | None = None, **extra: str) -> dict[str, str]:
    """This environment with no progress bars and Hydra's short errors; ``cache``: EXPANSION_CACHE."""
    env = {**os.environ, "PROGRESS_BAR": "false", "HYDRA_FULL_ERROR": "0", **extra}
    if cache is not None:
        env["EXPANSION_CACHE"] = str(cache)
    return env


def run_py(
    args: Sequence[str],
    *,
    cache: Path | str | None = None,
    env: dict[str, str] | None = None,
    module: str | None = None,
    python: Sequence[str] = (),
    timeout: float = 600,
) -> subprocess.CompletedProcess:
    """``python run.py *args`` (``module``: ``python -m module *args``) in the project root, output captured;
    ``env`` replaces :func:`user_env` (``cache``: its expansion cache)."""
    target = ["-m", module] if module else ["run.py"]
    return subprocess.run(
        [sys.executable, *python, *target, *args],
        cwd=PROJECT_ROOT,
        env=env if env is not None else user_env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
