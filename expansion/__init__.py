"""Expansion methods behind one interface, and the machinery they share."""

from .base import Expander, ExpansionError, ExpansionOutput, to_uint8

__all__ = ["Expander", "ExpansionError", "ExpansionOutput", "to_uint8"]
