"""What a dataset loader that reads a user's ``dataset.path`` expects there, and the one line for a path that
does not exist. Light (no torch): run.py checks a single run's path with it before the heavy imports; the
loaders (experiments/data/datasets) raise the same line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: loader -> what its ``dataset.path`` must point at (the fix a missing path's error gives)
PATH_HINTS = {
    "imagefolder": (
        "Point dataset.path at a folder of class folders (<class>/*.jpg), or with train/<class>/ and test/<class>/."
    ),
    "npz": "Point dataset.path at a .npz with train_images, train_labels, test_images, test_labels (+ val_*).",
}
#: the loaders whose ``dataset.path`` is a folder (the others': a file)
FOLDER_LOADERS = ("imagefolder",)


def missing_message(name: str, expected: Path | str, how: str) -> str:
    return f"dataset {name!r}: expected {expected} but it is missing. {how}"


def missing_path(dataset: Any) -> str | None:
    """The missing-data line when ``dataset`` (a dataset config) reads a user's ``dataset.path`` that does not
    exist; None otherwise (the loader checks the rest)."""
    from omegaconf import OmegaConf

    how = PATH_HINTS.get(str(dataset.get("loader")))
    path = dataset.get("path") if how and not OmegaConf.is_missing(dataset, "path") else None
    if path is None:
        return None
    path = Path(str(path)).expanduser()
    if path.is_dir() if dataset.get("loader") in FOLDER_LOADERS else path.is_file():
        return None
    return missing_message(str(dataset.get("name")), path, how)
