"""Hydra/OmegaConf set-up shared by run.py, the tests and the scripts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """``${project_root:}``: the checkout's root, wherever the job runs from.
    ``${mul:a,b}``: the product a * b, rounded to an int (e.g. extra real images = 2 x n_base)."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("mul"):
        OmegaConf.register_new_resolver("mul", _int_product)


def _int_product(a, b) -> int:
    if a is None or b is None:
        raise ValueError(f"${{mul:a,b}} needs two numbers, got {a!r} and {b!r} (e.g. set dataset.train_per_class)")
    return int(round(float(a) * float(b)))


register_resolvers()
