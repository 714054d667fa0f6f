"""Training throughput: the framework's Lightning fit vs a bare PyTorch loop, in one run.

Both train the same network (same class, same seed, so the same initial weights) on the same
in-memory uint8 tensors (the framework's own :class:`~experiments.data.datamodule.ExpansionDataModule`
builds them once), with the same optimizer and cosine schedule
(``ImageClassifier.configure_optimizers``), the same batched augmentation
(:func:`experiments.data.augment.augment_batch`), batch size, ``drop_last`` rule, epochs and, on CUDA,
the same bf16 autocast and channels_last layout.

* framework: :func:`experiments.training.pipeline.train_and_evaluate`, exactly as a run calls it: a
  Lightning ``fit`` with validation every epoch, the best and last checkpoints, the CSV logger,
  the preemption callback; its epoch times come from the framework's own
  :class:`~experiments.training.timing.EpochTimer`. (The two test passes after ``fit`` are not timed.)
* bare: a ``for`` loop: shuffle with ``randperm``, slice, augment, forward, loss, backward,
  SGD step; the data sit on the device once; then a validation pass over the same val images
  (top-1 accuracy). No checkpoints, no logging.

Validation is included in both. Runs are interleaved (framework, bare, framework, bare, ...)
so that a busy machine slows both alike; each run's figure is its mean epoch time without the
first epoch (warm-up); the report gives the median over repeats and the ratio
framework / bare (1.0 = no framework cost).

Usage (from the repository root)::

    python benchmarks/training_throughput.py                   # CPU: BreastMNIST 28 px, small_cnn, fp32
    python benchmarks/training_throughput.py --device cuda     # GPU: BreastMNIST + cutout x5 at 224 px, resnet50, bf16
    python benchmarks/training_throughput.py --method cutout --ratio 5   # + 5 expanded copies per image
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from benchmarks.common import machine
from experiments.config import compose
from experiments.data.augment import augment_batch, normalize, prepare_eval
from experiments.data.datamodule import ExpansionDataModule, load_expanded_images
from experiments.data.datasets import DatasetSplits, build_dataset
from experiments.training.job import Job
from experiments.training.pipeline import build_classifier, build_datamodule
from experiments.training.timing import steady_epoch_seconds


def compose_config(args: argparse.Namespace) -> DictConfig:
    """The run's config, composed as ``run.py`` would with the benchmark's overrides."""
    overrides = [
        f"dataset={args.dataset}",
        f"classifier={args.classifier}",
        f"method={args.method}",
        f"trainer={'gpu' if args.device == 'cuda' else 'cpu'}",
        "logger=csv",
        "progress_bar=false",
        f"train.epochs={args.epochs}",
        "train.compare_original=false",
        "quality.enabled=false",
        f"paths.cache_dir={args.cache_dir}",
        *args.override,
    ]
    if args.data is not None:
        overrides.append(f"paths.shared_data={args.data}")
    if args.ratio is not None and args.method != "original":
        overrides.append(f"method.ratio={args.ratio}")
    if args.batch_size is not None:
        overrides.append(f"train.batch_size={args.batch_size}")
    if args.input_size is not None:
        overrides.append(f"classifier.input_size={args.input_size}")
    return compose(overrides)


def load_training_data(cfg: DictConfig) -> tuple[DatasetSplits, torch.Tensor | None, Any]:
    """The dataset decoded once, and the expanded images of ``cfg.method`` (expanded now or reused)."""
    from experiments.training.job import build_expander
    from experiments.training.pipeline import run_expansion

    data = build_dataset(cfg.dataset).in_memory(tensor_dir=cfg.paths.tensor_dir)
    expander = build_expander(cfg.method)
    if expander is None:
        return data, None, None
    result = run_expansion(Job.from_config(cfg), data, expander)
    images = load_expanded_images(result.expanded, data.channels, data.image_size, tensor_dir=cfg.paths.tensor_dir)
    return data, images, result.expanded.labels


def framework_run(
    cfg: DictConfig, data: DatasetSplits, expanded_images, expanded_labels, seed: int, work_dir: Path
) -> dict[str, Any]:
    """One ``train_and_evaluate`` call in a fresh run dir (nothing to resume)."""
    from experiments.training.pipeline import make_logger, train_and_evaluate

    cfg = cfg.copy()
    cfg.seed = seed
    run_dir = Path(tempfile.mkdtemp(prefix=f"framework_s{seed}_", dir=work_dir))
    L.seed_everything(seed, workers=True, verbose=False)
    metrics = train_and_evaluate(
        Job.from_config(cfg), data, expanded_images, expanded_labels, run_dir / "train", make_logger(cfg, run_dir)
    )
    return {
        "epoch_seconds": metrics.epoch_seconds,
        "fit_seconds": metrics.train_seconds,
        "train_images": metrics.num_train_images,
        "val_acc_last": None,
        "test_acc_final": metrics.test_acc_final,
    }


def bare_run(
    cfg: DictConfig, data: DatasetSplits, datamodule: ExpansionDataModule, seed: int, device: torch.device
) -> dict[str, Any]:
    """The reference: the same work as a plain PyTorch loop (see the module docstring)."""
    L.seed_everything(seed, workers=True, verbose=False)
    model = build_classifier(
        Job.from_config(cfg), data
    )  # the same initial weights as the framework's run with this seed
    net = model.net.to(device)
    optimizers = model.configure_optimizers()
    optimizer, scheduler = optimizers["optimizer"], optimizers["lr_scheduler"]["scheduler"]
    channels_last = bool(model.hparams.channels_last)
    recipe, size = datamodule.recipe, datamodule.input_size
    amp = device.type == "cuda" and str(cfg.trainer.precision).startswith("bf16")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = bool(cfg.trainer.get("benchmark", False))
    train_x = datamodule.train_set.images.to(device)
    train_y = datamodule.train_set.labels.to(device)
    val_x, val_y = datamodule.val_set.images.to(device), datamodule.val_set.labels.to(device)
    n, batch = len(train_y), min(int(cfg.train.batch_size), len(train_y))
    steps = n // batch if n > batch else 1  # the DataLoader's drop_last rule
    label_smoothing = float(cfg.train.label_smoothing)

    def forward(x: torch.Tensor) -> torch.Tensor:
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            return net(x)

    epoch_seconds, val_acc = [], 0.0
    fit_start = time.perf_counter()
    for _ in range(int(cfg.train.epochs)):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(n, device=device)
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            logits = forward(augment_batch(train_x[index], recipe, size))
            loss = F.cross_entropy(logits.float(), train_y[index], label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        net.eval()
        correct = torch.zeros((), dtype=torch.long, device=device)
        with torch.no_grad():
            for i in range(0, len(val_y), int(cfg.train.eval_batch_size)):
                x = normalize(prepare_eval(val_x[i : i + int(cfg.train.eval_batch_size)], recipe, size))
                correct += (forward(x).argmax(1) == val_y[i : i + len(x)]).sum()
        val_acc = correct.item() / len(val_y)  # one device sync per epoch, as the framework's val metric
        scheduler.step()
        epoch_seconds.append(time.perf_counter() - start)
    return {
        "epoch_seconds": epoch_seconds,
        "fit_seconds": time.perf_counter() - fit_start,
        "train_images": n,
        "val_acc_last": val_acc,
        "test_acc_final": None,
    }


def summarize(runs: list[dict[str, Any]], images_per_epoch: int) -> dict[str, Any]:
    steady = [steady_epoch_seconds(r["epoch_seconds"]) for r in runs]
    median = statistics.median(steady)
    return {
        "steady_epoch_seconds": steady,
        "median_epoch_seconds": median,
        "images_per_s": images_per_epoch / median,
        "median_fit_seconds": statistics.median(r["fit_seconds"] for r in runs),
        "runs": runs,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dataset", default="breastmnist", help="a conf/dataset name")
    p.add_argument(
        "--classifier", default=None, help="a conf/classifier name (default small_cnn on cpu, resnet50 on cuda)"
    )
    p.add_argument(
        "--input-size",
        type=int,
        default=None,
        help="classifier input side (default: the classifier "
        "config's, i.e. the dataset's for small_cnn and 224 for resnet50)",
    )
    p.add_argument(
        "--method",
        default=None,
        help="expansion method whose images join the training set (default "
        "original on cpu; cutout x5 on cuda, where the 546 originals make 2-step epochs that measure "
        "per-epoch costs more than training)",
    )
    p.add_argument(
        "--ratio",
        type=int,
        default=None,
        help="expansion ratio (with --method; default the method's, 5 for the cuda default)",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default 6 on cpu, 8 on cuda)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the dataset recipe's")
    p.add_argument("--repeats", type=int, default=3, help="runs of each, interleaved")
    p.add_argument("--data", type=Path, default=None, help="the shared data folder (default: paths.shared_data)")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=Path(os.environ.get("EXPANSION_CACHE", ROOT / ".cache")),
        help="stores and decoded-tensor caches",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    p.add_argument("override", nargs="*", help="more Hydra overrides, e.g. train.compile=true")
    args = p.parse_args(argv)
    on_cuda = args.device == "cuda"
    args.classifier = args.classifier or ("resnet50" if on_cuda else "small_cnn")
    if args.method is None:
        args.method = "cutout" if on_cuda else "original"
        args.ratio = args.ratio or (5 if on_cuda else None)
    args.epochs = args.epochs or (8 if on_cuda else 6)
    if args.epochs < 2 or args.repeats < 1:
        raise SystemExit("--epochs must be >= 2 (the first epoch is warm-up) and --repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but no CUDA device is available")
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = compose_config(args)
    data, expanded_images, expanded_labels = load_training_data(cfg)
    datamodule = build_datamodule(Job.from_config(cfg), data, expanded_images, expanded_labels)
    n, batch = datamodule.num_train, min(int(cfg.train.batch_size), datamodule.num_train)
    images_per_epoch = (n // batch) * batch if n > batch else n
    precision = str(cfg.trainer.precision)
    print(f"Training throughput: framework (Lightning fit) vs bare PyTorch loop, {args.repeats} x each, interleaved")
    print(f"  machine: {machine(device)}")
    print(
        f"  {data.name} {datamodule.num_train} training images ({args.method}"
        f"{' x' + str(cfg.method.ratio) if args.method != 'original' else ''}) stored at "
        f"{tuple(datamodule.train_set.images.shape[1:])} uint8, {args.classifier} at {datamodule.input_size} px, "
        f"{precision}, channels_last {bool(cfg.classifier.get('channels_last', False))}, batch {batch} "
        f"({images_per_epoch} images/epoch), {args.epochs} epochs/run, recipe {datamodule.recipe}; "
        "validation every epoch in both; figures: mean epoch time without the first epoch"
    )

    runs: dict[str, list[dict[str, Any]]] = {"framework": [], "bare": []}
    with tempfile.TemporaryDirectory(prefix="training_throughput_") as work:
        for repeat in range(args.repeats):
            for kind in ("framework", "bare"):
                if kind == "framework":
                    result = framework_run(cfg, data, expanded_images, expanded_labels, repeat, Path(work))
                else:
                    result = bare_run(cfg, data, datamodule, repeat, device)
                runs[kind].append(result)
                steady = steady_epoch_seconds(result["epoch_seconds"])
                print(
                    f"  repeat {repeat} {kind:<9}: {steady * 1000:8.1f} ms/epoch ({images_per_epoch / steady:8.1f} "
                    f"img/s), fit {result['fit_seconds']:.2f} s",
                    flush=True,
                )
    summary = {kind: summarize(r, images_per_epoch) for kind, r in runs.items()}
    ratio = summary["framework"]["median_epoch_seconds"] / summary["bare"]["median_epoch_seconds"]
    # each repeat's two runs are neighbours in time: their ratio is the least disturbed by a drifting load
    paired = [
        f / b for f, b in zip(summary["framework"]["steady_epoch_seconds"], summary["bare"]["steady_epoch_seconds"])
    ]
    for kind in ("framework", "bare"):
        s = summary[kind]
        print(f"  {kind:<9} median {s['median_epoch_seconds'] * 1000:8.1f} ms/epoch = {s['images_per_s']:8.1f} img/s")
    print(
        f"  framework / bare epoch time = {ratio:.3f}x (ratio of the medians; bare / framework throughput = "
        f"{1 / ratio:.3f}); per repeat: {', '.join(f'{r:.3f}' for r in paired)}, median "
        f"{statistics.median(paired):.3f}x"
    )
    report = {
        "benchmark": "training",
        "machine": machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            "dataset": data.name,
            "classifier": args.classifier,
            "arch": str(cfg.classifier.arch),
            "channels": data.channels,
            "input_size": datamodule.input_size,
            "method": args.method,
            "train_images": n,
            "batch_size": batch,
            "images_per_epoch": images_per_epoch,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "precision": precision,
            "recipe": datamodule.recipe,
            "overrides": list(args.override),
            "torch_threads": torch.get_num_threads(),
        },
        "framework": summary["framework"],
        "bare": summary["bare"],
        "ratio_framework_over_bare": ratio,
        "paired_ratios": paired,
        "median_paired_ratio": statistics.median(paired),
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"  written to {args.json}")
    return report


if __name__ == "__main__":
    main()
