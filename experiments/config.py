"""Hydra/OmegaConf set-up shared by run.py, the tests and the scripts."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"


def register_resolvers() -> None:
    """``${project_root:}``: the checkout's root, wherever the job runs from."""
    if not OmegaConf.has_resolver("project_root"):
        OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT))


register_resolvers()
