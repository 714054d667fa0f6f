"""A job's folder and what it leaves there: one owner at a time (:func:`own_run_folder`), the job's own
copy of its config (:func:`save_job_config`), its record (``metrics.json``, valid only when complete:
:mod:`experiments.record`), and, when it fails, why (``error.json``), so that a sweep goes on with its other
jobs and its results and report list the failed ones with their error."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from experiments.record import RunRecord, iter_record_folders, read_finished

FAILURE_FILE = "error.json"
LOCK_FILE = ".run.lock"


class RunFolderBusy(Exception):
    """Another live process owns the run folder."""


#: run folders this process owns (path -> lock file descriptor): ownership is re-entrant in a process
_OWNED: dict[Path, int] = {}


def _try_lock(path: Path, block: bool) -> int | None:
    """A descriptor holding an exclusive flock on ``path``, or None when another process holds it. The
    lock counts only if ``path`` still names the locked file afterwards (an owner may remove a folder
    while another process waits on its lock file: that waiter then tries again on the new file)."""
    from expansion.files import UMASK

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
        path.parent.mkdir(parents=True, exist_ok=True)


def process_rank() -> int:
    """This process's rank in a multi-process job (``RANK``, else ``SLURM_PROCID``, else ``LOCAL_RANK``;
    0 for a plain process)."""
    for name in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        value = os.environ.get(name)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def lock_holder(job_dir: Path | str) -> str:
    """Who owns a run folder, as its owner wrote it into the lock file (``host pid N``)."""
    try:
        return (Path(job_dir) / LOCK_FILE).read_text().strip() or "holder unknown"
    except OSError:
        return "holder unknown"


@contextmanager
def own_run_folder(job_dir: Path | str, *, wait: bool, on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Own ``job_dir`` while the block runs: an exclusive lock on ``<job_dir>/.run.lock`` (released by
    the OS if the owner dies). Busy: wait for the owner to finish (``wait``; ``on_wait`` is told who
    owns it first) or raise :class:`RunFolderBusy`. Nothing in the folder is touched before the lock
    is held, and the lock file is never removed by anyone else than its owner."""
    job_dir = Path(job_dir).resolve()
    if job_dir in _OWNED:
        yield
        return
    if process_rank() != 0:  # a DDP rank of the job whose rank 0 owns the folder: it shares it
        _OWNED[job_dir] = -1
        try:
            yield
        finally:
            del _OWNED[job_dir]
        return
    job_dir.mkdir(parents=True, exist_ok=True)
    path = job_dir / LOCK_FILE
    fd = _try_lock(path, block=False)
    if fd is None:
        holder = lock_holder(job_dir)
        if not wait:
            raise RunFolderBusy(
                f"run folder {job_dir} is in use by another job ({holder}); give each job its own hydra.run.dir"
            )
        if on_wait is not None:
            on_wait(holder)
        fd = _try_lock(path, block=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}\n".encode(), 0)
    _OWNED[job_dir] = fd
    try:
        yield
    finally:
        del _OWNED[job_dir]
        os.close(fd)


def owns(job_dir: Path | str) -> bool:
    return Path(job_dir).resolve() in _OWNED


def save_job_config(job_dir: Path | str, task_cfg: Any) -> None:
    """``<job_dir>/.hydra/{config,hydra,overrides}.yaml`` as Hydra writes them, written by the folder's
    owner only (``hydra.output_subdir`` is null: Hydra itself would write them before any job could
    check that the folder is its own)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from expansion.files import atomic_write_text

    assert owns(job_dir), f"{job_dir} is not owned by this process"
    folder = Path(job_dir) / ".hydra"
    atomic_write_text(folder / "config.yaml", OmegaConf.to_yaml(task_cfg))
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.instance().cfg
        atomic_write_text(folder / "hydra.yaml", OmegaConf.to_yaml(hydra_cfg))
        atomic_write_text(folder / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task))


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (the first line of a multi-line message)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def record_failure(job_dir: Path | str, exc: BaseException, *, user_error: bool, overrides: list[str]) -> Path:
    """``<job_dir>/error.json``: the one-line error, its type, whether it is a user error (a bad setting
    or missing data: no traceback needed) and, otherwise, the traceback; the job's overrides."""
    from expansion.files import atomic_write_text

    assert owns(job_dir), f"{job_dir} is not owned by this process: a failure is filed by the folder's owner only"
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
BOOKKEEPING = frozenset({".hydra", FAILURE_FILE, LOCK_FILE})


def remove_if_bookkeeping_only(job_dir: Path | str, log_file: str) -> bool:
    """Remove ``job_dir``, which this process owns, when it holds only Hydra's record, the job's log and
    its failure record (a single run that failed before any work); returns whether it was removed."""
    import shutil

    job_dir = Path(job_dir)
    assert owns(job_dir), f"{job_dir} is not owned by this process: only its owner removes it"
    if not job_dir.is_dir() or any(p.name not in BOOKKEEPING | {log_file} for p in job_dir.iterdir()):
        return False
    shutil.rmtree(job_dir, ignore_errors=True)
    return True


def clear_failure(job_dir: Path | str) -> None:
    """A job that starts again in its folder (a rerun, a requeue), or finds its work done, forgets an
    earlier failure (its owner only)."""
    assert owns(job_dir), f"{job_dir} is not owned by this process"
    (Path(job_dir) / FAILURE_FILE).unlink(missing_ok=True)


def find_failures(root: Path | str) -> list[dict[str, Any]]:
    """Every failure recorded under ``root`` (with ``job``: the job folder relative to ``root``), in
    folder order; a failure beside a valid record is history (the job succeeded later) and not listed."""
    failures = []
    for path in sorted(Path(root).rglob(FAILURE_FILE)):
        if read_finished(path.parent)[0] is not None:
            continue
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError:
            record = {"error": f"unreadable {FAILURE_FILE}", "type": "?"}
        failures.append({"job": str(path.parent.relative_to(root)), **record})
    return failures


def finished_record(
    job_dir: Path | str, identity: str, data_fingerprint: Callable[[], str]
) -> tuple[RunRecord | None, str | None]:
    """``(record, None)`` when ``job_dir`` holds this job's finished record (same config hash and data),
    ``(record, what differs)`` when it holds another job's, ``(None, None)`` when it holds none (a cut
    or damaged metrics.json is no record: the job runs again)."""
    record, _ = read_finished(job_dir)
    if record is None:
        return None, None
    if record.config_hash != identity:
        return (
            record,
            f"holds another configuration's results (config hash {record.config_hash}, this job's {identity})",
        )
    if record.data_fingerprint != data_fingerprint():
        return record, (
            f"holds results for other data (data fingerprint {record.data_fingerprint}, the data now "
            f"{data_fingerprint()}: the dataset's files or labels changed)"
        )
    return record, None


def find_done(sweep_dir: Path | str, identity: str, data_fingerprint: Callable[[], str]) -> Path | None:
    """A ``metrics.json`` under ``sweep_dir`` of a finished job with this config hash and data
    (a cut or damaged record is not a finished job)."""
    for folder in iter_record_folders(sweep_dir):
        record, problem = finished_record(folder, identity, data_fingerprint)
        if record is not None and problem is None:
            return record.path
    return None
