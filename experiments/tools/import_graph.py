"""``python -m experiments.tools.import_graph``: the import graph of the project's packages, read from the
source (every import, those inside functions included), and its circles; exits 1 when there is one.

A module-level circle hidden in function-level imports still ties two modules together (neither can be
understood, tested or moved alone); the layering rule is that ``expansion`` imports nothing of the rest."""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("expansion", "baselines", "experiments")


def modules(root: Path = ROOT) -> dict[str, Path]:
    """``{dotted name: file}`` of every module of :data:`PACKAGES` (a package by its ``__init__``)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports (relative imports resolved; ``from a import b`` names ``a.b``
    when that is a module, else ``a``)."""
    targets: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            candidates = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for target in candidates:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                targets.add(target)
    return targets


def module_graph(root: Path = ROOT) -> nx.DiGraph:
    known = modules(root)
    graph = nx.DiGraph()
    for name, path in known.items():
        graph.add_node(name)
        graph.add_edges_from((name, target) for target in _imported(name, path, known))
    return graph


def package_of(module: str) -> str:
    """The package a module belongs to, two levels deep (``experiments.training``, ``expansion.gif``)."""
    return ".".join(module.split(".")[:2])


def package_graph(graph: nx.DiGraph) -> nx.DiGraph:
    packages = nx.DiGraph()
    for a, b in graph.edges:
        if package_of(a) != package_of(b):
            packages.add_edge(package_of(a), package_of(b))
    return packages


def circles(graph: nx.DiGraph) -> list[list[str]]:
    return sorted(nx.simple_cycles(graph), key=lambda c: (len(c), c))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    graph = module_graph()
    packages = package_graph(graph)
    for package in sorted(packages):
        print(f"{package} -> {', '.join(sorted(packages.successors(package))) or '(nothing)'}")
    found = circles(graph)
    for circle in found:
        print("circle: " + " -> ".join([*circle, circle[0]]), file=sys.stderr)
    print(f"{graph.number_of_nodes()} modules, {graph.number_of_edges()} imports, {len(found)} circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
