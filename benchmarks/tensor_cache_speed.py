"""Decoded-tensor cache: decoding image files vs loading the cached uint8 tensor, in one run.

Two real sources, each timed ``--repeats`` times, interleaved (decode, load, decode, ...):

* the offline CIFAR-10 subset (JPEG files; train, val and test splits as a run decodes them);
* an expansion store: BreastMNIST expanded by cutout x``--ratio`` (PNG files; expanded once
  into ``--cache-dir`` if it is not there yet).

Usage (from the repository root)::

    python benchmarks/tensor_cache_speed.py
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch

from benchmarks.common import machine
from benchmarks.training_throughput import compose_config
from experiments.data.datamodule import load_expanded_images
from experiments.data.datasets import build_dataset


def _time(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(name: str, images: int, decode: Callable[[], Any], load: Callable[[], Any], repeats: int) -> dict:
    load()  # writes the cache file (not timed)
    times: dict[str, list[float]] = {"decode": [], "cached": []}
    for _ in range(repeats):
        times["decode"].append(_time(decode))
        times["cached"].append(_time(load))
    medians = {k: statistics.median(v) for k, v in times.items()}
    row = {
        "source": name,
        "images": images,
        "seconds": times,
        "median_seconds": medians,
        "speedup": medians["decode"] / medians["cached"],
    }
    print(
        f"  {name}: {images} images, decode {medians['decode'] * 1000:.1f} ms, cached {medians['cached'] * 1000:.1f} ms "
        f"(medians of {repeats}), {row['speedup']:.1f}x",
        flush=True,
    )
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--ratio", type=int, default=5, help="cutout copies per BreastMNIST image in the store")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("EXPANSION_CACHE", ROOT / ".cache")),
        help="where the store lives (the tensor caches go to a temporary folder)",
    )
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from experiments.training.job import build_expander
    from experiments.training.pipeline import run_expansion

    args = parse_args(argv)
    print(f"Decoded-tensor cache: decode vs cached load\n  machine: {machine(torch.device('cpu'))}")
    rows = []
    with tempfile.TemporaryDirectory() as tensors:
        cifar = compose_config(parse_training_args(["--dataset", "cifar10_subset", "--cache-dir", str(args.cache_dir)]))
        dataset = build_dataset(cifar.dataset)
        n = len(dataset.train) + len(dataset.val) + len(dataset.test)
        rows.append(
            compare(
                "cifar10_subset train+val+test (JPEG, 32 px)",
                n,
                lambda: dataset.in_memory(),
                lambda: dataset.in_memory(tensor_dir=tensors),
                args.repeats,
            )
        )
        breast = compose_config(
            parse_training_args(
                [
                    "--dataset",
                    "breastmnist",
                    "--method",
                    "cutout",
                    "--ratio",
                    str(args.ratio),
                    "--cache-dir",
                    str(args.cache_dir),
                ]
            )
        )
        data = build_dataset(breast.dataset).in_memory()
        expanded = run_expansion(breast, data, build_expander(breast.method)).expanded
        rows.append(
            compare(
                f"expansion store breastmnist cutout x{args.ratio} (PNG, 28 px)",
                len(expanded),
                lambda: load_expanded_images(expanded, data.channels, data.image_size),
                lambda: load_expanded_images(expanded, data.channels, data.image_size, tensor_dir=tensors),
                args.repeats,
            )
        )
    report = {
        "benchmark": "tensor_cache",
        "machine": machine(torch.device("cpu")),
        "device": "cpu",
        "date": time.strftime("%Y-%m-%d"),
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"  written to {args.json}")
    return report


def parse_training_args(argv: list[str]) -> argparse.Namespace:
    from benchmarks.training_throughput import parse_args as training_args

    return training_args([*argv, "--device", "cpu"])


if __name__ == "__main__":
    main()
