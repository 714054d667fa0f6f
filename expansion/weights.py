"""Pretrained weights a method needs, and whether this machine has them: a local folder or file, a
Hugging Face hub repository already in the local cache, or a hub that can be reached to fetch it.
Checked before any work (``preflight``), so that every missing piece is named at once, and a machine
without network is told so at once instead of after the hub client's retries."""

from __future__ import annotations

import functools
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .errors import ExpansionError


@dataclass(frozen=True)
class Weights:
    """A pretrained model: ``what`` it is, its ``source`` (hub id, or a local folder or file), the
    config key that sets it, and the files of which a cached copy of the hub repo has one (to find it)."""

    what: str
    source: str
    setting: str
    revision: str | None = None
    hub_files: tuple[str, ...] = ("config.json",)
    repo_type: str = "model"

    @property
    def is_local(self) -> bool:
        return is_local_path(self.source)


def is_local_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists()


def hub_offline_requested() -> bool:
    """HF_HUB_OFFLINE=1 (read now: huggingface_hub reads it only when it is imported)."""
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers a TCP connection within ``timeout``
    seconds; False at once under HF_HUB_OFFLINE=1. Asked once per process."""
    if hub_offline_requested():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname or "", endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def in_hub_cache(
    repo_id: str, filenames: tuple[str, ...], revision: str | None = None, repo_type: str = "model"
) -> bool:
    """Whether the local hub cache holds one of ``filenames`` of ``repo_id`` (an invalid id: no)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision, repo_type=repo_type), str):
                return True
        except ValueError:  # not a valid repo id (huggingface_hub's HFValidationError)
            return False
    return False


def no_network_reason() -> str:
    if hub_offline_requested():
        return "HF_HUB_OFFLINE=1 is set"
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return f"no network: {host} cannot be reached"


def missing(weights: Weights) -> str | None:
    """None when ``weights`` can be loaded here; else one line: what is missing and how to get it."""
    if weights.is_local:
        path = Path(weights.source).expanduser()
        if path.exists():
            return None
        return f"{weights.what}: {path} does not exist; set {weights.setting} to an existing folder or a hub id"
    if in_hub_cache(weights.source, weights.hub_files, weights.revision, weights.repo_type):
        return None
    if hub_reachable():
        return None  # fetched into the cache when the job loads it
    return (
        f"{weights.what} {weights.source!r} is not in the Hugging Face cache ({hub_cache_dir()}) and "
        f"{no_network_reason()}. Fix: on a machine with network run `huggingface-cli download "
        f"{'--repo-type dataset ' if weights.repo_type == 'dataset' else ''}{weights.source}` "
        f"and copy the cache here (HF_HOME), or set {weights.setting} to a local copy"
    )


def unavailable_error(weights: Weights, exc: BaseException, saved_as: str) -> ExpansionError:
    """The error of a loader that could not read ``weights``: "no network" when that is the cause
    (rather than the hub client's misleading inner message), else the inner error's first line;
    ``saved_as`` says what a local folder must hold."""
    if not weights.is_local and not hub_reachable():
        cause = f"it is not in the Hugging Face cache ({hub_cache_dir()}) and {no_network_reason()}"
    else:
        first = str(exc).splitlines()[0] if str(exc) else ""
        cause = f"{type(exc).__name__}: {first}"
    return ExpansionError(
        f"{weights.what} weights {weights.source!r} are not available here ({cause}). Provide them: download once "
        f"on a machine with network (`huggingface-cli download {weights.source}`, cached under HF_HOME), or set "
        f"{weights.setting} to a local folder {saved_as}."
    )
