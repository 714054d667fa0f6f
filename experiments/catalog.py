"""``python -m experiments.catalog`` (``make list``): every registered method, dataset, quality metric
and classifier, one line each: name, a one-line description and where it is defined.

The loaders and quality metrics are read from their registering decorators in the source
(:func:`registered_in_source`), so the list imports no torch; a test checks it against the registries."""

from __future__ import annotations

import argparse
import ast
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


#: the registries a catalog lists: (folder of the registering modules, decorator name)
LOADER_SOURCES = (PROJECT_ROOT / "experiments" / "data" / "datasets", "register_loader")
METRIC_SOURCES = (PROJECT_ROOT / "experiments" / "quality", "register_metric")


def registered_in_source(folder: Path, decorator: str) -> list[tuple[str, str, str]]:
    """``(name, first docstring line, module.function)`` of every function in ``folder``'s modules decorated
    ``@decorator("name", ...)``, in file then line order: what importing them would register."""
    found = []
    for path in sorted(folder.glob("*.py")):
        module = ".".join(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if not isinstance(node, ast.FunctionDef):
                continue
            for deco in node.decorator_list:
                if (
                    isinstance(deco, ast.Call)
                    and getattr(deco.func, "id", getattr(deco.func, "attr", None)) == decorator
                    and deco.args
                    and isinstance(deco.args[0], ast.Constant)
                ):
                    doc = (ast.get_docstring(node) or deco.args[0].value).strip()
                    found.append((str(deco.args[0].value), doc, f"{module}.{node.name}"))
    return found


def entries() -> dict[str, list[tuple[str, str, str]]]:
    """``{kind: [(name, description, defined in)]}`` over everything that is registered."""

    def configs(group: str, names: list[str] | None = None) -> list[tuple[str, str, str]]:
        paths = sorted((CONFIG_DIR / group).glob("*.yaml"))
        return [
            (p.stem, config_description(p), str(p.relative_to(PROJECT_ROOT)))
            for p in paths
            if names is None or p.stem in names
        ]

    return {
        "methods": configs("method", method_names()),
        "datasets": configs("dataset"),
        "dataset loaders": sorted((n, one_line(doc), where) for n, doc, where in registered_in_source(*LOADER_SOURCES)),
        "quality metrics": [(n, doc.splitlines()[0], where) for n, doc, where in registered_in_source(*METRIC_SOURCES)],
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
