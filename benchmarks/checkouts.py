"""Command-line arguments of the benchmarks that time whole commands of several checkouts side by side
(``git worktree add /tmp/before <commit>``, then ``--trees before=/tmp/before after=.``)."""

from __future__ import annotations

import argparse
from pathlib import Path


def checkout_parser(doc: str | None, repeats: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trees", nargs="+", default=["this=."], help="name=checkout pairs, timed in turn")
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser


def checkouts(args: argparse.Namespace) -> dict[str, Path]:
    """``--trees`` as name -> resolved checkout folder."""
    return {name: Path(path).resolve() for name, path in (t.split("=", 1) for t in args.trees)}
