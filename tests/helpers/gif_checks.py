"""Checks every GIF prior's tests share: a guided expansion raises the guide's score, and run.py runs the
prior end to end on BreastMNIST with tiny weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from expansion.seeding import image_seeds
from experiments.record import RunRecord, read_record

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def assert_guidance_raises_the_score(exp, images, labels, k: int = 3) -> None:
    """score_after (guided, projected, decoded) vs score_before (the random perturbation) on the same seeds:
    higher for at least 3 seeds in 4 and on average."""
    n = images.shape[0]
    out = exp.expand(images, labels, image_seeds(11, range(n), k))
    before = torch.tensor(out.fields["score_before"]).reshape(n, k).mean(1)
    after = torch.tensor(out.fields["score_after"]).reshape(n, k).mean(1)
    assert (after > before).float().mean() >= 0.75, (before, after)
    assert after.mean() > before.mean()


def run_tiny_job(tmp_path: Path, method: str, clip_spec: dict, *overrides: str) -> RunRecord:
    """``python run.py`` on 3 BreastMNIST images per class, ratio 2, the tiny CLIP guide, one epoch, one
    thread; returns the job's record (the run folder is ``tmp_path/run``)."""
    args = [
        "dataset=breastmnist",
        "dataset.train_per_class=3",
        f"method={method}",
        f"method.guide.arch={clip_spec['arch']}",
        f"method.guide.pretrained={clip_spec['pretrained']}",
        f"method.guide.model_config={clip_spec['model_config']}",
        "method.output_size=32",
        "method.ratio=2",
        *overrides,
        "train.epochs=1",
        "logger=none",
        "quality.enabled=false",
        "train.compare_original=false",
        f"hydra.run.dir={tmp_path}/run",
    ]
    env = {**os.environ, "PROGRESS_BAR": "false", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env["EXPANSION_CACHE"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "run.py", *args], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record, problem = read_record(tmp_path / "run")
    assert record is not None, problem
    return record
