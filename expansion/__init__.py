"""Expansion methods behind one interface, and the machinery they share. The names below load on first
use: importing a light module of this package (settings, files, errors) imports no torch."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Expander", "ExpansionError", "ExpansionOutput", "to_uint8"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".base", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
