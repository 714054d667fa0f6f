"""Expansive Synthesis (arXiv 2406.17238): autoencoder + spatial attention, per-class expander
graphs, a Koopman operator and an optimal-transport regulariser. See :mod:`.expander`."""

from .expander import AutoencoderMethod, ExpansiveSynthesis

__all__ = ["AutoencoderMethod", "ExpansiveSynthesis"]
