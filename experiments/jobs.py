"""A job that fails records why in its own folder (``error.json``), so that a sweep goes on with its
other jobs and its results and report list the failed ones with their error."""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

FAILURE_FILE = "error.json"


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (the first line of a multi-line message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def record_failure(job_dir: Path | str, exc: BaseException, *, user_error: bool, overrides: list[str]) -> Path:
    """``<job_dir>/error.json``: the one-line error, its type, whether it is a user error (a bad setting
    or missing data: no traceback needed) and, otherwise, the traceback; the job's overrides."""
    from expansion.files import atomic_write_text

    record: dict[str, Any] = {
        "error": one_line(exc),
        "type": type(exc).__name__,
        "user_error": user_error,
        "overrides": list(overrides),
    }
    if not user_error:
        record["traceback"] = "".join(traceback.format_exception(exc))
    path = Path(job_dir) / FAILURE_FILE
    atomic_write_text(path, json.dumps(record, indent=2))
    return path


#: what Hydra and a failed start leave in a run folder (nothing a user made or a job produced)
BOOKKEEPING = frozenset({".hydra", FAILURE_FILE, ".run.lock"})


def remove_if_bookkeeping_only(job_dir: Path | str, log_file: str) -> bool:
    """Remove ``job_dir`` when it holds only Hydra's record, the job's log and its failure record (a
    single run that failed before any work); returns whether it was removed."""
    import shutil

    job_dir = Path(job_dir)
    if not job_dir.is_dir() or any(p.name not in BOOKKEEPING | {log_file} for p in job_dir.iterdir()):
        return False
    shutil.rmtree(job_dir, ignore_errors=True)
    return True


def clear_failure(job_dir: Path | str) -> None:
    """A job that starts again in its folder (a rerun, a requeue) forgets an earlier failure."""
    (Path(job_dir) / FAILURE_FILE).unlink(missing_ok=True)


def find_failures(root: Path | str) -> list[dict[str, Any]]:
    """Every failure recorded under ``root`` (with ``job``: the job folder relative to ``root``), in
    folder order."""
    failures = []
    for path in sorted(Path(root).rglob(FAILURE_FILE)):
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            record = {"error": f"unreadable {FAILURE_FILE}", "type": "?"}
        failures.append({"job": str(path.parent.relative_to(root)), **record})
    return failures
