"""Experiments around the expansion package: :mod:`.data` and :mod:`.training` are the run path
(``run.py`` -> :func:`experiments.training.pipeline.run`), :mod:`.analysis` the tools that read finished
runs, :mod:`.drills` the reliability drills, :mod:`.tools` the project's own tools; :mod:`.config` sets up Hydra,
:mod:`.catalog` is ``make list``."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = PROJECT_ROOT / "conf"
