"""Per-class expander graphs over the encoded samples (Expansive Synthesis, arXiv 2406.17238, step 4).

New latent points are made by combining a sample with its neighbours along the edges of a
d-regular expander graph over the samples of its class. An expander spreads those
combinations over the whole class: every small set of samples has many edges leaving it, so
the new points do not pile up around a few samples or a few pairs.

Quality of an expander is read off the adjacency spectrum ``d = l1 >= l2 >= ... >= ln``:
the spectral gap ``d - l2`` (> 0 iff the graph is connected; larger = better mixing), and
``lambda = max(|l2|, |ln|)`` against the Ramanujan bound ``2 sqrt(d - 1)`` (the best
possible for large d-regular graphs; random regular graphs come close, Friedman 2008).

Families (``family``):

* ``random_regular`` (default): ``networkx.random_regular_graph(d, n, seed)``; draws are
  repeated (seeded) until the graph is connected and Ramanujan (``lambda <= 2 sqrt(d-1)``),
  and the draw with the largest gap is kept if none of ``tries`` draws is.
* ``complete``: every pair of samples (degree n - 1): the best possible expander, O(n^2)
  edges; the choice for tiny classes.

A class with ``n <= degree`` samples gets the complete graph (degree n - 1). ``n * d`` odd
admits no d-regular graph: that is an error asking for an even degree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import networkx as nx
import numpy as np

from ..base import ExpansionError

FAMILIES = ("random_regular", "complete")


@dataclass
class ExpanderGraph:
    """One class's graph: ``neighbours[i]`` are the (sorted) local indices adjacent to node i."""

    graph: nx.Graph
    degree: int
    spectral_gap: float
    second_eigenvalue: float  # lambda = max(|l2|, |ln|)
    ramanujan: bool

    @property
    def neighbours(self) -> list[list[int]]:
        return [sorted(self.graph.neighbors(i)) for i in range(self.graph.number_of_nodes())]


def spectrum(graph: nx.Graph) -> np.ndarray:
    """Adjacency eigenvalues, largest first."""
    adjacency = nx.to_numpy_array(graph, nodelist=range(graph.number_of_nodes()))
    return np.sort(np.linalg.eigvalsh(adjacency))[::-1]


def ramanujan_bound(degree: int) -> float:
    return 2.0 * math.sqrt(max(degree - 1, 0))


def describe(graph: nx.Graph, degree: int) -> ExpanderGraph:
    eig = spectrum(graph)
    if len(eig) < 2:
        return ExpanderGraph(graph, degree, 0.0, 0.0, True)
    lam = float(max(abs(eig[1]), abs(eig[-1])))
    return ExpanderGraph(graph, degree, float(eig[0] - eig[1]), lam, lam <= ramanujan_bound(degree) + 1e-9)


def build_expander_graph(
    n: int, degree: int, seed: int, family: str = "random_regular", tries: int = 20
) -> ExpanderGraph:
    """A d-regular expander on ``n`` nodes (module doc); deterministic given ``seed``."""
    if family not in FAMILIES:
        raise ExpansionError(f"expander graph family must be one of {FAMILIES}, got {family!r}")
    if n < 2:
        raise ExpansionError(f"an expander graph needs at least 2 samples of a class, got {n}")
    if degree < 2:
        raise ExpansionError(f"expander graph degree must be >= 2, got {degree}")
    if family == "complete" or n <= degree:
        return describe(nx.complete_graph(n), n - 1)
    if (n * degree) % 2:
        raise ExpansionError(f"no {degree}-regular graph has {n} nodes (n * degree is odd): use an even degree")
    best = None
    for attempt in range(max(1, tries)):
        candidate = describe(nx.random_regular_graph(degree, n, seed=seed * 1000 + attempt), degree)
        if best is None or candidate.spectral_gap > best.spectral_gap:
            best = candidate
        if candidate.spectral_gap > 1e-9 and candidate.ramanujan:
            return candidate
    if best.spectral_gap <= 1e-9:
        raise ExpansionError(f"no connected {degree}-regular graph on {n} nodes in {tries} draws")
    return best
