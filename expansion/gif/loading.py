"""Where a prior's weights come from, and the precision it runs in."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ExpansionError
from ..weights import hub_reachable, is_local_path

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def check_dtype(key: str, value: str) -> None:
    """A prior's dtype setting is ``auto`` or a name in :data:`DTYPES`; anything else is an error now."""
    if value != "auto" and value not in DTYPES:
        raise ExpansionError(f"{key} must be auto or one of {sorted(DTYPES)}, got {value!r}")


def resolve_dtype(value: str, device: torch.device, cuda_auto: str | None = None) -> torch.dtype:
    """The dtype a prior runs in: ``auto`` is float32 on the CPU and, on CUDA, ``cuda_auto`` if given
    (SD's UNet: float16, as released) else bfloat16 where supported, float16 otherwise."""
    if value == "auto":
        if device.type != "cuda":
            value = "float32"
        else:
            value = cuda_auto or ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    return DTYPES[value]


def pretrained_source(
    what: str, model_id: str, revision: str | None, local_files_only: bool | None, missing_folder_hint: str
) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` should read a model: ``(source, kwargs)``. A path-like id must
    be an existing folder (else an error with ``missing_folder_hint``). Under HF_HUB_OFFLINE=1 (read
    now) or when the hub cannot be reached, only the local cache is read, so an offline run fails at
    once instead of after the hub client's retries."""
    path = Path(model_id).expanduser()
    looks_local = is_local_path(model_id)
    if looks_local and not path.is_dir():
        raise ExpansionError(f"{what} folder {path} does not exist; {missing_folder_hint}")
    kwargs: dict[str, Any] = {"revision": revision} if revision and not looks_local else {}
    if local_files_only is None and not looks_local and not hub_reachable():
        local_files_only = True
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    return (str(path) if looks_local else model_id), kwargs
