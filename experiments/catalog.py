"""``python -m experiments.catalog`` (``make list``): every registered method, dataset, quality metric
and classifier, one line each: name, a one-line description and where it is defined."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from .config import CONFIG_DIR, PROJECT_ROOT, method_names


def one_line(text: str, limit: int = 110) -> str:
    """The first sentence of ``text`` on one line, cut at a word boundary past ``limit`` characters."""
    text = " ".join(text.replace("``", "").split())
    end = next(
        (m.start() for m in re.finditer(r"\. ", text) if not re.search(r"\b(al|e\.g|i\.e|vs|etc)$", text[: m.start()])),
        -1,
    )
    sentence = text if end < 0 else text[: end + 1]
    if len(sentence) <= limit:
        return sentence
    return sentence[:limit].rsplit(" ", 1)[0].rstrip(",;:(") + " ..."


def config_description(path: Path) -> str:
    """The first sentence of a config file's leading comment."""
    comment = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            comment.append(line.lstrip("#").strip())
    return one_line(" ".join(comment)) if comment else "(no description)"


def entries() -> dict[str, list[tuple[str, str, str]]]:
    """``{kind: [(name, description, defined in)]}`` over everything that is registered."""
    from .analysis.quality import METRICS
    from .data.datasets import loaders

    def configs(group: str, names: list[str] | None = None) -> list[tuple[str, str, str]]:
        paths = sorted((CONFIG_DIR / group).glob("*.yaml"))
        return [
            (p.stem, config_description(p), str(p.relative_to(PROJECT_ROOT)))
            for p in paths
            if names is None or p.stem in names
        ]

    known_loaders = loaders()
    return {
        "methods": configs("method", method_names()),
        "datasets": configs("dataset"),
        "dataset loaders": [
            (name, one_line(fn.__doc__ or "(no description)"), f"{fn.__module__}.{fn.__qualname__}")
            for name, fn in sorted(known_loaders.items())
        ],
        "quality metrics": [
            (m.name, m.description, f"{m.fn.__module__}.{m.fn.__qualname__}") for m in METRICS.values()
        ],
        "classifiers": configs("classifier"),
    }


def render(catalog: dict[str, list[tuple[str, str, str]]]) -> str:
    lines = []
    for kind, rows in catalog.items():
        lines.append(f"{kind} ({len(rows)}):")
        width = max((len(name) for name, _, _ in rows), default=0)
        lines += [f"  {name:<{width}}  {description}  [{where}]" for name, description, where in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(description=__doc__).parse_args(argv)
    print(render(entries()))


if __name__ == "__main__":
    main()
