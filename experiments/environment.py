"""Where a result came from: library versions, the device and its name, CPU threads, the project's git
commit (and whether the tree had uncommitted changes) and the command line, recorded in every
metrics.json under ``environment`` (the same seed gives slightly different numbers on other thread
counts and machines, so a result is only comparable with its environment)."""

from __future__ import annotations

import functools
import importlib.metadata
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
#: the distributions whose versions are recorded (None: not installed)
LIBRARIES = ("torch", "lightning", "diffusers", "timm", "open_clip_torch", "numpy")


def version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def git_state(root: Path = PROJECT_ROOT) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the checkout (tracked files changed = dirty); nulls outside a git checkout."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit, "dirty": dirty}


def environment(device: str) -> dict[str, Any]:
    """The run's environment; ``device`` is where it trained (``cpu`` or ``cuda``)."""
    on_gpu = device == "cuda" and torch.cuda.is_available()
    return {
        **{name: version(name) for name in LIBRARIES},
        "python": platform.python_version(),
        "device": "cuda" if on_gpu else "cpu",
        "device_name": torch.cuda.get_device_name() if on_gpu else cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "git_commit": git_state()["commit"],
        "git_dirty": git_state()["dirty"],
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
    }
