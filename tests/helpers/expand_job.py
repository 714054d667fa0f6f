"""A subprocess that expands BreastMNIST's train split with a slow expander (killed by tests)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from omegaconf import OmegaConf

from expansion.engine import expand_dataset
from experiments.data.datasets import build_dataset
from tests.helpers.expanders import NoiseShift


def main(shared: str, cache: str, delay: float, batch_size: int, limit: int) -> None:
    cfg = OmegaConf.create(
        {
            "name": "breastmnist",
            "loader": "medmnist",
            "root": f"{shared}/medmnist",
            "image_size": 28,
            "train_per_class": limit,
        }
    )
    data = build_dataset(cfg)
    result = expand_dataset(
        NoiseShift(3, delay=delay),
        data.train,
        data.identity,
        store_dir=f"{cache}/stores",
        fit_dir=f"{cache}/fits",
        seed=5,
        batch_size=batch_size,
    )
    print("DONE", result.store.root, result.generated_images, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
