"""A subprocess that fits a tiny closed-set diffusion model on BreastMNIST through the engine's
fit stage (killed by tests). ``delay`` seconds of sleep per UNet forward make it slow enough to kill.

    python closed_set_fit_job.py SHARED CACHE DELAY STEPS
prints ``DONE <artifact dir>`` when the fit finished.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
from omegaconf import OmegaConf

import expansion.closed_set_diffusion as csd
from expansion.base import ExpansionContext
from expansion.engine import fit_expander
from experiments.data.datasets import build_dataset

TINY_UNET = {
    "block_out_channels": [16, 32],
    "attention": [False, True],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "attention_head_dim": 8,
}


def tiny_expander(steps: int) -> csd.ClosedSetDiffusion:
    return csd.ClosedSetDiffusion(
        ratio=2,
        resolution=16,
        unet=TINY_UNET,
        num_inference_steps=2,
        fit={"steps": steps, "batch_size": 4, "lr": 2e-3, "warmup_steps": 2, "checkpoint_every": 2},
    )


def breast_few_shot(shared: str, per_class: int = 4):
    cfg = OmegaConf.create(
        {
            "name": "breastmnist",
            "loader": "medmnist",
            "root": f"{shared}/medmnist",
            "image_size": 28,
            "train_per_class": per_class,
        }
    )
    return build_dataset(cfg).in_memory()


def main(shared: str, cache: str, delay: float, steps: int) -> None:
    torch.set_num_threads(1)
    if delay > 0:
        build = csd.build_unet

        def slow_unet(*args, **kwargs):
            unet = build(*args, **kwargs)
            unet.register_forward_pre_hook(lambda module, inputs: time.sleep(delay))
            return unet

        csd.build_unet = slow_unet
    data = breast_few_shot(shared)
    expander = tiny_expander(steps)
    expander.prepare(
        ExpansionContext(
            dataset_name=data.name, class_names=data.class_names, channels=data.channels, image_size=data.image_size
        )
    )
    fit_expander(expander, data.train, data.identity, f"{cache}/fits")
    artifact = next(Path(cache, "fits").iterdir())
    print("DONE", artifact, flush=True)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]))
