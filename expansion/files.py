"""Files written whole or not at all, and the keys that name what they hold.

Every file and folder the framework writes for later runs (stores, fitted generators, guides,
decoded-tensor caches, checkpoints, metrics) goes through :func:`atomic_file` or
:func:`atomic_directory`: it is built under a temporary name beside its destination, flushed to
disk and moved into place with ``os.replace``, so a reader finds it absent, old or complete,
never half-written, whenever the writer is killed. What is written gets the permissions of an
ordinary file (``0666 & ~umask``, folders ``0777 & ~umask``), not ``mkstemp``'s private ``0600``,
so a shared cache or results folder stays readable to colleagues.

Cached things are found by :func:`content_key`: the hash of a JSON payload that names
everything the content depends on.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: marks temporary names: ``<name>.tmp-<random>``; a reader ignores them, a resumed writer removes them
TMP_MARK = ".tmp-"
#: hex characters of a content key (80 bits: no collision among the keys one cache ever holds)
KEY_LENGTH = 20


def canonical_json(payload: Any) -> str:
    """JSON with sorted keys and no spaces: equal payloads give equal text."""
    return json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


def content_key(payload: Any) -> str:
    """``sha256(canonical_json(payload))``, :data:`KEY_LENGTH` hex characters."""
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LENGTH]


def file_stats_digest(paths: Iterable[Path | str]) -> str:
    """sha256 of every file's path, size, modification time, inode and change time: what keys a cache of
    something computed from the files' bytes. A rewritten or replaced file changes it even when its size
    and mtime are put back (no user can set ctime). Raises OSError (with ``filename``) for a missing file."""
    h = hashlib.sha256()
    for path in paths:
        st = os.stat(path)
        h.update(f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ino}:{st.st_ctime_ns};".encode())
    return h.hexdigest()


def _read_umask() -> int:
    """The process's umask (reading it means setting it: done once, at import, before any thread runs;
    a thread that read it later would give every file another thread creates meanwhile mode 0666)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: the umask the files and folders written here follow (read once, at import)
UMASK = _read_umask()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


@contextmanager
def atomic_file(path: Path | str) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (``save_file``,
    ``torch.save``, ``Path.write_bytes``); on success it is fsynced, given the umask's
    permissions and moved onto ``path``; on any failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + TMP_MARK)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent, old or complete."""
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_directory(path: Path | str) -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; on success it replaces ``path`` (an existing
    folder there is moved aside first and deleted after), on any failure it is removed. A reader
    that checks a marker file written last (e.g. ``DONE``) never sees a partial folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + TMP_MARK))
    old = None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~UMASK)
        if path.exists():  # os.replace cannot overwrite a non-empty folder: move it aside first
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + TMP_MARK + "old-"))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def remove_temporaries(folder: Path | str) -> None:
    """Delete what a killed writer left under temporary names directly in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for tmp in folder.glob(f"*{TMP_MARK}*"):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
