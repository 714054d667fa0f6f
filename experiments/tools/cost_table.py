"""What each paper table costs: measured rates multiplied out over the table's sweep grid.

For every experiment config (``conf/experiment/*.yaml``) the sweep grid
(``hydra.sweeper.params``) is expanded and each cell composed as ``run.py -m`` would, which
gives its training set size, expansion method and ratio, classifier, input size, epochs
and device. The cost of a table is then

* training: sum over jobs of (training images per epoch x epochs) / the classifier's training
  rate (images/s, validation included);
* generation: the images each distinct expansion generates (one per dataset x method x ratio,
  times the seeds unless ``expansion_seed`` is fixed) / the method's generation rate;
* generator fits that have a measured rate (closed-set diffusion: steps x seconds per step).

Every rate is labelled with its source. **measured**: from a benchmark JSON (``--measurements``;
its machine and date are listed) or timed here (the classic baselines' generation, which runs
on the CPU). **estimate**: counted FLOPs divided by (the reference GPU's peak x an assumed MFU,
``--gpu-peak-tflops``, ``--assumed-mfu``), or a measured CPU rate scaled by counted FLOPs; the
basis is printed next to it. **not measured**: no rate, the cost is left out of the total and
the total says so. Training set sizes of the datasets that are not available offline are the
official split sizes (less the seeded validation carve-out where the config carves one).

Usage (from the repository root)::

    python experiments/tools/cost_table.py --measurements benchmarks/results --out docs/cost.md
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from omegaconf import DictConfig, OmegaConf

from benchmarks.common import count_flops
from experiments.config import compose

#: the paper tables (GPU) and the CPU experiments, in the order of docs/cost.md
TABLES = (
    "table1_natural",
    "table2_medical",
    "table3_architectures",
    "efficiency",
    "exchange_rate",
    "medical_cpu",
    "digits_baselines",
    "exchange_rate_cpu",
    "expansive_synthesis",
    "gif_ae",
    "worth",
    "worth_cpu",
)
#: official training split sizes of the datasets that are not in ../shared/data (before any carve-out)
OFFICIAL_TRAIN = {
    "caltech101": 30 * 102,
    "cars": 8144,
    "flowers102": 1020,
    "dtd": 1880,
    "pets": 3680,
    "cifar100_subset": 100 * 100,
    "pathmnist": 89996,
    "organsmnist": 13932,
    "bloodmnist": 11959,
    "cifar10": 50000,
}
#: grey-scale datasets among those (the rest are RGB)
GREY = ("breastmnist", "organsmnist")
#: datasets read from ../shared/data: their sizes and channels are computed by loading them
OFFLINE = ("breastmnist", "cifar10_subset", "mnist", "digits")
CLASSIC = ("cutout", "gridmask", "randaugment")
#: GPU training is estimated from FLOPs only for inputs this large (compute-bound convolutions)
MIN_ESTIMATE_SIZE = 224


@dataclass
class Job:
    """One cell of a sweep, for all its seeds."""

    table: str
    seeds: int
    device: str  # "gpu" or "cpu" (the trainer's accelerator)
    dataset: str
    channels: int
    stored_size: int
    n_train: int  # images the expansion sees (the classifier's original part)
    n_extra: int  # extra real images (classifier only)
    size_exact: bool
    method: str
    ratio: int
    include_original: bool
    arch: str
    input_size: int
    epochs: int
    batch_size: int
    expansion_per_seed: bool  # expansion_seed follows seed: one expansion per seed
    fit: dict[str, Any] | None  # closed-set fit settings (steps, batch)
    sampling: dict[str, Any] | None
    steps_matched_to_ratio: int | None = None  # train.steps_matched_to_ratio: a step budget, not epochs

    @property
    def train_images(self) -> int:
        return (self.n_train if self.include_original else 0) + self.n_extra + self.n_train * self.ratio

    @property
    def image_epochs(self) -> int:
        """Images the classifier processes: epochs x its set, or a step budget's (1 + R) x n_train x epochs."""
        if self.steps_matched_to_ratio:
            return self.n_train * (1 + self.steps_matched_to_ratio) * self.epochs
        return self.train_images * self.epochs

    @property
    def generated_images(self) -> int:
        return self.n_train * self.ratio if self.method != "original" else 0


# --------------------------------------------------------------------------- the grids


def _compose(overrides: list[str]) -> DictConfig:
    return compose(overrides, with_hydra=True)


def sweep_cells(experiment: str) -> tuple[list[dict[str, str]], int]:
    """The sweep's cells without the seed (its parameters, crossed with each of its grids if it has
    some), and the number of seeds."""
    from experiments.sweeps import job_overrides

    sweeper = _compose([f"experiment={experiment}"]).hydra.sweeper
    params = {k: str(v) for k, v in sweeper.params.items()}
    seeds = len(params.pop("seed", "0").split(","))
    grids = OmegaConf.to_container(sweeper.grids) if "grids" in sweeper else None
    cells = [dict(o.split("=", 1) for o in job) for job in job_overrides(params, grids, [], None)]
    return cells, seeds


_SIZES: dict[tuple, tuple[int, int, bool, int]] = {}


def training_set_size(dataset_cfg: DictConfig) -> tuple[int, int, bool, int]:
    """(images the expansion sees, extra real images, exact?, channels) for a dataset config."""
    name = str(dataset_cfg.name)
    per_class, extra = dataset_cfg.get("train_per_class"), dataset_cfg.get("extra_real_per_class") or 0
    num_classes = dataset_cfg.get("num_classes")
    key = (name, per_class, extra)
    if key not in _SIZES:
        channels = 1 if name in GREY else 3
        if name in OFFLINE:
            from experiments.data.datasets import build_dataset

            data = build_dataset(dataset_cfg)
            extra_n = len(data.extra_train) if data.extra_train is not None else 0
            _SIZES[key] = (len(data.train), extra_n, True, data.channels)
        elif per_class is not None:
            _SIZES[key] = (int(per_class) * int(num_classes), int(extra) * int(num_classes), True, channels)
        else:
            n = OFFICIAL_TRAIN[name]
            carved = name in ("caltech101", "cars", "pets", "cifar100_subset", "cifar10")  # no official val split
            _SIZES[key] = (round(n * (1 - float(dataset_cfg.val_fraction))) if carved else n, 0, not carved, channels)
    return _SIZES[key]


def jobs_of(experiment: str) -> list[Job]:
    cells, seeds = sweep_cells(experiment)
    jobs = []
    for cell in cells:
        cfg = _compose([f"experiment={experiment}", *(f"{k}={v}" for k, v in cell.items())])
        n_train, n_extra, exact, channels = training_set_size(cfg.dataset)
        method = cfg.method
        ratio = int(method.get("ratio") or 0) if method.get("_target_") else 0
        raw_seed = OmegaConf.to_container(cfg, resolve=False)["expansion_seed"]
        closed_set = str(method.get("_target_", "")).endswith("ClosedSetDiffusion")
        input_size = int(cfg.classifier.get("input_size") or cfg.dataset.image_size)
        jobs.append(
            Job(
                table=experiment,
                seeds=seeds,
                device="gpu" if cfg.trainer.accelerator == "gpu" else "cpu",
                dataset=str(cfg.dataset.name),
                channels=channels,
                stored_size=int(cfg.dataset.image_size),
                n_train=n_train,
                n_extra=n_extra,
                size_exact=exact,
                method=str(method.name),
                ratio=ratio,
                include_original=bool(cfg.train.get("include_original", True)),
                arch=str(cfg.classifier.arch),
                input_size=input_size,
                epochs=int(cfg.train.epochs),
                steps_matched_to_ratio=cfg.train.get("steps_matched_to_ratio"),
                batch_size=int(cfg.train.batch_size),
                expansion_per_seed=raw_seed == "${seed}",
                fit={"steps": int(method.fit.steps), "batch_size": int(method.fit.batch_size)} if closed_set else None,
                sampling={
                    "steps": int(method.num_inference_steps),
                    "unet": str(method.unet),
                    "resolution": method.get("resolution"),
                }
                if closed_set
                else None,
            )
        )
    return jobs


# --------------------------------------------------------------------------- rates


def training_flops_per_image(arch: str, channels: int, input_size: int) -> int:
    """Forward + backward FLOPs of one training image (counted on the meta device: no memory)."""
    from experiments.training.classifier import create_network

    with torch.device("meta"):
        net = create_network(arch, 10, channels, input_size)
        x = torch.zeros(2, channels, input_size, input_size)  # 2: BatchNorm refuses one value per channel
    _, flops = count_flops(lambda: net(x).sum().backward())
    return flops // 2


@dataclass
class Rate:
    """Seconds per unit (image, or fit step), with where the number comes from."""

    seconds: float | None
    kind: str  # measured | estimate | not measured
    basis: str


def load_measurements(folder: Path | None) -> list[dict[str, Any]]:
    if folder is None:
        return []
    reports = []
    for path in sorted(Path(folder).glob("*.json")):
        report = json.loads(path.read_text())
        if isinstance(report, dict) and "benchmark" in report:
            report["_file"] = path.name
            reports.append(report)
    return reports


def _origin(report: dict[str, Any]) -> str:
    return f"{report['_file']}: {report['machine']}, {report.get('date', 'date not recorded')}"


class Rates:
    """Training and generation rates for the jobs, from measurements or labelled estimates."""

    def __init__(self, measurements: list[dict[str, Any]], gpu_peak_tflops: float, assumed_mfu: float):
        self.measurements = measurements
        self.gpu_peak, self.assumed_mfu = gpu_peak_tflops, assumed_mfu
        self._flops: dict[tuple, int] = {}
        self._classic: dict[tuple, Rate] = {}

    def flops(self, arch: str, channels: int, size: int) -> int:
        key = (arch, channels, size)
        if key not in self._flops:
            self._flops[key] = training_flops_per_image(arch, channels, size)
        return self._flops[key]

    def _measured_training(self, device: str) -> list[dict[str, Any]]:
        want = "cuda" if device == "gpu" else "cpu"
        return [m for m in self.measurements if m["benchmark"] == "training" and m["device"].startswith(want)]

    def training(self, job: Job) -> Rate:
        for m in self._measured_training(job.device):
            s = m["settings"]
            if s["arch"] == job.arch and s["input_size"] == job.input_size and s["channels"] == job.channels:
                rate = m["framework"]["images_per_s"]
                if s["batch_size"] == job.batch_size:
                    return Rate(
                        1 / rate,
                        "measured",
                        f"{job.arch} {job.input_size} px {s['precision']} batch "
                        f"{job.batch_size}: {rate:.0f} img/s [{_origin(m)}]",
                    )
                return Rate(
                    1 / rate,
                    "estimate",
                    f"{job.arch} {job.input_size} px {s['precision']}: {rate:.0f} img/s "
                    f"measured at batch {s['batch_size']}, applied to batch {job.batch_size} [{_origin(m)}]",
                )
        flops = self.flops(job.arch, job.channels, job.input_size)
        if job.device == "gpu" and job.input_size < MIN_ESTIMATE_SIZE:
            return Rate(
                None,
                "not measured",
                f"{job.arch} {job.input_size} px on gpu (no FLOP estimate below "
                f"{MIN_ESTIMATE_SIZE} px: such small inputs leave a GPU bound by per-step overheads, not FLOPs)",
            )
        if job.device == "gpu":
            rate = self.gpu_peak * 1e12 * self.assumed_mfu / flops
            return Rate(
                1 / rate,
                "estimate",
                f"{job.arch} {job.input_size} px: {flops / 1e9:.2f} GFLOP/img counted / "
                f"({self.gpu_peak:.0f} TFLOP/s x assumed MFU {self.assumed_mfu:.0%}) = {rate:.0f} img/s",
            )
        for m in self._measured_training("cpu"):  # scale a measured CPU rate by counted FLOPs
            s = m["settings"]
            if s["arch"] == job.arch:
                ref_flops = self.flops(job.arch, s["channels"], s["input_size"])
                rate = m["framework"]["images_per_s"] * ref_flops / flops
                return Rate(
                    1 / rate,
                    "estimate",
                    f"{job.arch} {job.input_size} px {job.channels}-ch: measured "
                    f"{m['framework']['images_per_s']:.0f} img/s at {s['input_size']} px x counted FLOP ratio "
                    f"{ref_flops / flops:.2f} [{_origin(m)}]",
                )
        return Rate(None, "not measured", f"{job.arch} {job.input_size} px on {job.device}")

    def generation(self, job: Job) -> Rate:
        if job.method in CLASSIC:
            return self.classic(job.method, job.channels, job.stored_size, job.ratio)
        want = "cuda" if job.device == "gpu" else "cpu"
        for m in self.measurements:
            if not m["device"].startswith(want) or m.get("tiny"):
                continue
            for row in m.get("results", []):
                name = row.get("method", m["benchmark"])
                if name == job.method and row["mode"] == "batched" and self._same_sampler(m, job):
                    rate = row["images_per_s"]
                    return Rate(
                        1 / rate,
                        "measured",
                        f"{job.method} batched {row['dtype']}: {rate:.3f} img/s ({_settings_text(m)}) [{_origin(m)}]",
                    )
        return Rate(None, "not measured", f"{job.method} on {job.device}")

    @staticmethod
    def _same_sampler(report: dict[str, Any], job: Job) -> bool:
        """A closed-set measurement counts only for the job's UNet preset and sampling steps."""
        if job.sampling is None:
            return True
        s = report["settings"]
        return (
            s.get("unet") == job.sampling["unet"]
            and s.get("steps") == job.sampling["steps"]
            and s.get("resolution") == job.sampling["resolution"]
        )

    def fit_step(self, job: Job) -> Rate | None:
        if job.fit is None:
            return None
        want = "cuda" if job.device == "gpu" else "cpu"
        for m in self.measurements:
            fit = m.get("fit")
            if (
                m["benchmark"] == "closed_set_diffusion"
                and m["device"].startswith(want)
                and fit
                and self._same_sampler(m, job)
                and fit["batch_size"] == job.fit["batch_size"]
            ):
                return Rate(
                    fit["seconds_per_step"],
                    "measured",
                    f"closed-set fit, {m['settings']['unet']} UNet, "
                    f"batch {fit['batch_size']}: {fit['seconds_per_step']:.3f} s/step [{_origin(m)}]",
                )
        return Rate(
            None,
            "not measured",
            f"closed-set fit, {job.sampling['unet']} UNet, batch {job.fit['batch_size']} on {job.device}",
        )

    def classic(self, method: str, channels: int, size: int, ratio: int) -> Rate:
        """The classic baselines are timed here: they run on the CPU in the framework's store writer."""
        key = (method, channels, size)
        if key not in self._classic:
            self._classic[key] = _time_classic(method, channels, size, max(ratio, 1))
        return self._classic[key]


def _time_classic(method: str, channels: int, size: int, ratio: int, n: int = 32) -> Rate:
    from expansion.base import ExpansionContext
    from expansion.seeding import image_seeds
    from experiments.training.job import build_expander

    expander = build_expander(compose([f"method={method}", f"method.ratio={ratio}"]).method)
    expander.prepare(ExpansionContext(dataset_name="cost", class_names=["a", "b"], channels=channels, image_size=size))
    images = torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8)
    labels = torch.zeros(n, dtype=torch.long)
    seeds = image_seeds(0, range(n), ratio)
    expander.expand(images[:2], labels[:2], seeds[:2])  # warm-up
    start = time.perf_counter()
    expander.expand(images, labels, seeds)
    seconds = (time.perf_counter() - start) / (n * ratio)
    return Rate(
        seconds,
        "measured",
        f"{method} {channels}x{size}x{size}: {1 / seconds:.0f} img/s on this CPU, "
        f"timed here ({time.strftime('%Y-%m-%d')})",
    )


def _settings_text(report: dict[str, Any]) -> str:
    s = report["settings"]
    parts = [f"{k} {s[k]}" for k in ("resolution", "steps", "ratio", "seeds_per_pass", "unet") if s.get(k) is not None]
    return ", ".join(parts)


# --------------------------------------------------------------------------- the table


def table_cost(jobs: list[Job], rates: Rates) -> dict[str, Any]:
    """Hours by part, split into measured, estimated and not measured."""
    parts = {"training": {}, "generation": {}, "fit": {}}
    image_epochs = generated = 0
    expansions: set[tuple] = set()
    fits: set[tuple] = set()
    for job in jobs:
        work = job.image_epochs * job.seeds
        image_epochs += work
        _add(parts["training"], rates.training(job), work)
        copies = job.seeds if job.expansion_per_seed else 1
        key = (job.dataset, job.n_train, job.method, job.ratio)
        if job.generated_images and key not in expansions:
            expansions.add(key)
            generated += job.generated_images * copies
            _add(parts["generation"], rates.generation(job), job.generated_images * copies)
        fit = rates.fit_step(job)
        fit_key = (job.dataset, job.n_train, job.method)
        if fit is not None and fit_key not in fits:
            fits.add(fit_key)
            _add(parts["fit"], fit, job.fit["steps"])
    return {
        "jobs": len(jobs) * jobs[0].seeds,
        "cells": len(jobs),
        "device": jobs[0].device,
        "image_epochs": image_epochs,
        "generated_images": generated,
        "fits": len(fits),
        "parts": parts,
        "exact_sizes": all(j.size_exact for j in jobs),
    }


def _add(part: dict[str, Any], rate: Rate, units: int) -> None:
    entry = part.setdefault(rate.basis, {"kind": rate.kind, "units": 0, "hours": 0.0 if rate.seconds else None})
    entry["units"] += units
    if rate.seconds is not None:
        entry["hours"] += units * rate.seconds / 3600


def _hours(part: dict[str, Any]) -> str:
    """'12.3 h measured + 4.5 h estimate; not measured: 1,000 units'"""
    by_kind: dict[str, float] = {}
    missing = 0
    for entry in part.values():
        if entry["hours"] is None:
            missing += entry["units"]
        else:
            by_kind[entry["kind"]] = by_kind.get(entry["kind"], 0.0) + entry["hours"]
    text = " + ".join(f"{_fmt_hours(h)} {kind}" for kind, h in sorted(by_kind.items()))
    if missing:
        text += ("; " if text else "") + f"not measured: {missing:,} units"
    return text or "none"


def _fmt_hours(hours: float) -> str:
    return f"{hours:,.1f} h" if hours >= 0.1 else f"{hours * 60:,.1f} min"


def render(costs: dict[str, dict[str, Any]], rates: Rates, args: argparse.Namespace) -> str:
    lines = [
        "# What the paper tables cost",
        "",
        f"Generated by `{_command(args)}` on {time.strftime('%Y-%m-%d')}. Hours are device-hours of one job at a time (one GPU for a GPU "
        "table, this CPU for a CPU table); a sweep spread over N GPUs takes about 1/N of it.",
        "",
        "Each figure is labelled: **measured** (from a benchmark run, machine and date in its basis, or "
        "timed by this script), **estimate** (the basis says how it is derived; never a measurement) or "
        "**not measured** (left out of the hours; the units it would multiply are given: images for "
        "generation, steps for fits).",
        "",
    ] + ([args.note, ""] if args.note else [])
    if not any(m["device"].startswith("cuda") for m in rates.measurements):
        lines += [
            "**No GPU measurement was available** when this file was written: every GPU training figure is "
            f"an estimate at an assumed MFU of {rates.assumed_mfu:.0%} of {rates.gpu_peak:.0f} TFLOP/s "
            "(an H100's dense bf16 peak; at 100 % MFU, a hard lower bound, divide those hours by "
            f"{1 / rates.assumed_mfu:.1f}), and GPU generation is not measured. `make benchmark-gpu` on a GPU "
            "writes the measurements; rerun this script with them.",
            "",
        ]
    lines += [
        "| table | device | jobs (cells x seeds) | training image-epochs | training | generated images | "
        "generation | generator fits | fit steps |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, c in costs.items():
        approx = "" if c["exact_sizes"] else "~"
        lines.append(
            f"| {name} | {c['device']} | {c['jobs']} ({c['cells']} x {c['jobs'] // c['cells']}) | "
            f"{approx}{c['image_epochs']:,} | {_hours(c['parts']['training'])} | "
            f"{approx}{c['generated_images']:,} | {_hours(c['parts']['generation'])} | {c['fits']} | "
            f"{_hours(c['parts']['fit']) if c['fits'] else '-'} |"
        )
    lines += [
        "",
        "`~`: the training set size of a dataset without an offline copy is its official split size less "
        "the seeded validation carve-out (10 %), rounded; the exact number depends on the per-class rounding.",
        "",
        "## Rates used",
        "",
    ]
    for name, c in costs.items():
        lines += [f"### {name}", ""]
        for part_name, part in c["parts"].items():
            for basis, entry in part.items():
                hours = _fmt_hours(entry["hours"]) if entry["hours"] is not None else "-"
                lines.append(f"- {part_name}, {entry['kind']}: {basis}; {entry['units']:,} units -> {hours}")
        lines.append("")
    return "\n".join(lines)


def _command(args: argparse.Namespace) -> str:
    parts = ["python experiments/tools/cost_table.py"]
    if args.measurements:
        parts.append(f"--measurements {args.measurements}")
    if list(args.tables) != list(TABLES):
        parts.append("--tables " + " ".join(args.tables))
    if args.note:
        parts.append("--note '<the paragraph below>'")
    return " ".join(parts)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--measurements", type=Path, default=None, help="folder of benchmark --json outputs")
    p.add_argument("--tables", nargs="*", default=list(TABLES), help="experiment configs to cost")
    p.add_argument("--gpu-peak-tflops", type=float, default=989.4, help="reference GPU peak for estimates (H100)")
    p.add_argument(
        "--assumed-mfu",
        type=float,
        default=0.15,
        help="MFU assumed for GPU training estimates "
        "(well-tuned ResNet-50 bf16 training reaches roughly 15-20 %% of an H100's peak; depthwise "
        "networks such as MobileNetV2 far less)",
    )
    p.add_argument("--note", default=None, help="a paragraph for the top of the file (e.g. the machine's load)")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here (else print it)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    rates = Rates(load_measurements(args.measurements), args.gpu_peak_tflops, args.assumed_mfu)
    costs = {name: table_cost(jobs_of(name), rates) for name in args.tables}
    text = render(costs, rates, args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
        print(f"written to {args.out}")
    else:
        print(text)
    return costs


if __name__ == "__main__":
    main()
