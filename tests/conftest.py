"""Shared fixtures: the real offline data in ../shared/data, Hydra composition, a tmp cache."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests never touch the network: hub clients fail at once instead of waiting for a time-out
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_ROOT))

from experiments import config  # noqa: E402

config.setup()  # the resolvers and the sweeper, as run.py sets them up

SHARED_DATA = Path(os.environ.get("SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets. CI always has them; a missing folder is an error, never a skip."""
    if not (SHARED_DATA / "medmnist" / "breastmnist.npz").is_file():
        raise FileNotFoundError(
            f"real test data not found under {SHARED_DATA}: the tests need ../shared/data beside the "
            "checkout (or SHARED_DATA=/path/to/data)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_sd_models(tmp_path_factory):
    """A tiny Stable Diffusion folder and a tiny open_clip guide spec, built in code (tests/helpers)."""
    from expansion.architectures import save_sd, save_tiny_clip

    root = tmp_path_factory.mktemp("tiny_sd_models")
    return save_sd("tiny", root), save_tiny_clip(root / "clip")


@pytest.fixture(scope="session")
def breast_seeds(shared_data):
    """The first 4 BreastMNIST training images (uint8 [4, 1, 28, 28]) and their labels."""
    import numpy as np
    import torch

    data = np.load(shared_data / "medmnist" / "breastmnist.npz")
    images = torch.from_numpy(data["train_images"][:4])[:, None]
    return images, torch.from_numpy(data["train_labels"][:4, 0].astype(np.int64))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Every test writes stores and run outputs under its own tmp folder."""
    monkeypatch.setenv("EXPANSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PROGRESS_BAR", "false")
    monkeypatch.setenv("WANDB_MODE", "disabled")


def compose(overrides: list[str] | None = None, config_name: str = "config"):
    """Compose the project's Hydra config as run.py would (without running it), ``hydra`` node included."""
    return config.compose(overrides, with_hydra=True, config_name=config_name)


def job_config(overrides: list[str] | None = None):
    """A job's config as run.py hands it to the pipeline: composed, without the ``hydra`` node."""
    return config.compose(overrides)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on shared cores: one intra-op thread is faster and bitwise reproducible (a module opts in
    with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
