"""Chaos drill for the expansion store: kill -9 at random moments, then compare with a clean run.

    python -m experiments.drills.chaos --kills 20                  # BreastMNIST (546 seeds), RandAugment x5
    python -m experiments.drills.chaos --kills 3 --train-per-class 20 --json chaos.json

1. reference: one uninterrupted expansion into its own cache;
2. kills: an expansion process is started, SIGKILLed after a random (seeded) delay once it is
   inside the expansion, and started again, ``--kills`` times; then it runs to the end;
3. concurrency: ``--concurrent`` processes expand the same key at once (one must generate, the
   others wait on the store lock and reuse), then the lock holder is killed mid-way while
   another process waits (the waiter must take over and finish).

Every finished store is checked (:meth:`ExpansionStore.verify`: each manifest row names one
decodable image, no leftover or temporary file) and its content hash compared with the
reference's. "files lost" counts reference images missing from, or different in, the store.
Exit status 0 only if every store equals the reference.

Each expansion runs in its own process (``--start-method fork``: forked from this process
after the imports, so a restart costs milliseconds; ``spawn``: a fresh interpreter each time).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from expansion.store import ExpansionStore
from experiments.config import PROJECT_ROOT, compose
from experiments.data.datasets import build_dataset
from experiments.training.job import Job
from experiments.training.pipeline import run_expansion

DEFAULT_DATA = Path(os.environ.get("SHARED_DATA", PROJECT_ROOT.parent / "shared" / "data"))


def compose_job(overrides: list[str]) -> DictConfig:
    """The job config run.py would see for ``overrides`` (without Hydra's own node)."""
    return compose(overrides)


def job_overrides(args: argparse.Namespace, cache: Path) -> list[str]:
    overrides = [
        f"dataset={args.dataset}",
        f"dataset.root={Path(args.data) / 'medmnist'}",
        f"method={args.method}",
        f"method.ratio={args.ratio}",
        f"method.batch_size={args.batch_size}",
        f"expansion_seed={args.expansion_seed}",
        f"paths.cache_dir={cache}",
        "progress_bar=false",
    ]
    if args.train_per_class:
        overrides.append(f"dataset.train_per_class={args.train_per_class}")
    return overrides


def expand_worker(overrides: list[str], result_path: str, started: Any) -> None:
    """One expansion process: the production path (``pipeline.run_expansion``) on the job config."""
    torch.set_num_threads(1)
    cfg = compose_job(overrides)
    data = build_dataset(cfg.dataset)
    job = Job.from_config(cfg)
    started.set()
    start = time.perf_counter()
    result = run_expansion(job, data)
    report = {
        "pid": os.getpid(),
        "store": str(result.store.root),
        "generated": result.generated_images,
        "reused": result.reused,
        "seconds": round(time.perf_counter() - start, 3),
    }
    Path(result_path).write_text(json.dumps(report))


class Launcher:
    """Starts expansion processes and collects their reports."""

    def __init__(self, start_method: str, workdir: Path):
        self.ctx = mp.get_context(start_method)
        self.workdir = workdir
        self.count = 0

    def start(self, overrides: list[str]) -> tuple[Any, Any, Path]:
        self.count += 1
        report = self.workdir / "reports" / f"{self.count:04d}.json"
        report.parent.mkdir(parents=True, exist_ok=True)
        started = self.ctx.Event()
        proc = self.ctx.Process(target=expand_worker, args=(overrides, str(report), started), daemon=True)
        proc.start()
        return proc, started, report

    def run(self, overrides: list[str], timeout: float, cache: Path | None = None) -> dict[str, Any]:
        """Run one expansion to the end; with ``cache``, also time its set-up (start of the
        expansion to its first manifest chunk)."""
        proc, started, report = self.start(overrides)
        setup = None
        if cache is not None and started.wait(timeout):
            begin = time.perf_counter()
            while chunks_written(cache) == 0 and proc.is_alive():
                time.sleep(0.002)
            setup = time.perf_counter() - begin
        proc.join(timeout)
        if proc.is_alive():
            proc.kill()
            raise RuntimeError(f"expansion did not finish in {timeout}s")
        if proc.exitcode != 0 or not report.is_file():
            raise RuntimeError(f"expansion process failed with exit code {proc.exitcode}")
        return {**json.loads(report.read_text()), "setup_seconds": setup}


def compare(store_root: Path, reference_root: Path) -> dict[str, Any]:
    """Soundness of ``store_root`` and its difference from the reference store."""
    store, reference = ExpansionStore(store_root, "", {}), ExpansionStore(reference_root, "", {})
    problems = store.verify()
    lost = 0
    if store.is_complete():
        rows = {r["file"]: r for r in store.read_rows()}
        for row in reference.read_rows():
            mine = rows.get(row["file"])
            path = store.images_dir / row["file"]
            if (
                mine != row
                or not path.is_file()
                or path.read_bytes() != (reference.images_dir / row["file"]).read_bytes()
            ):
                lost += 1
    else:
        lost = len(reference.read_rows())
    equal = not problems and store.content_hash() == reference.content_hash()
    return {"problems": problems, "files_lost": lost, "hash_equal": equal}


def chunks_written(cache: Path) -> int:
    return len(list((cache / "stores").glob("*/chunks/*.jsonl"))) if (cache / "stores").is_dir() else 0


def kill_drill(launcher: Launcher, args: argparse.Namespace, reference: dict[str, Any], rng: random.Random) -> dict:
    """Start, SIGKILL after a random delay inside the expansion, repeat; then finish.

    Each delay is uniform in [0, set-up + (estimated time of the remaining work) / (kills left + 1)],
    so the kills spread over the whole expansion (set-up, generation, writes) and the store is
    still unfinished at the last one. The generation rate starts at the reference's and is
    raised whenever an attempt turns out faster (the machine's load changes)."""
    cache = launcher.workdir / "killed"
    overrides = job_overrides(args, cache)
    setup = min(reference["setup_seconds"] or 0.0, reference["seconds"])
    parents = reference["generated"] // args.ratio
    batches = -(-parents // args.batch_size)
    rate = batches / max(reference["seconds"] - setup, 1e-3)  # chunks per second
    kills = []
    for i in range(args.kills):
        before = chunks_written(cache)
        window = args.window or setup + (batches - before) / rate / (args.kills - i + 1)
        proc, started, _ = launcher.start(overrides)
        if not started.wait(args.timeout):
            proc.kill()
            raise RuntimeError("the expansion process did not start")
        delay = rng.uniform(0.0, window)
        time.sleep(delay)
        landed = proc.is_alive()  # still expanding when killed (not finished early)
        proc.kill()
        proc.join()
        after = chunks_written(cache)
        if delay > setup and after > before:
            rate = max(rate, (after - before) / (delay - setup))
        kills.append(
            {"delay_s": round(delay, 3), "window_s": round(window, 3), "landed_mid_expansion": landed, "chunks": after}
        )
    final = launcher.run(overrides, args.timeout)
    return {"kills": kills, "final": final, **compare(Path(final["store"]), Path(reference["store"]))}


def concurrency_drill(
    launcher: Launcher, args: argparse.Namespace, reference: dict[str, Any], rng: random.Random
) -> dict:
    """N processes expand the same key at once; then the lock holder is killed while another waits."""
    overrides = job_overrides(args, launcher.workdir / "concurrent")
    procs = [launcher.start(overrides) for _ in range(args.concurrent)]
    reports = []
    for proc, _, report in procs:
        proc.join(args.timeout)
        if proc.exitcode != 0 or not report.is_file():
            raise RuntimeError(f"a concurrent expansion failed with exit code {proc.exitcode}")
        reports.append(json.loads(report.read_text()))
    together = {
        "reports": reports,
        **compare(Path(reports[0]["store"]), Path(reference["store"])),
        "one_generated": sorted(r["generated"] for r in reports) == [0] * (len(reports) - 1) + [reference["generated"]],
        "same_store": len({r["store"] for r in reports}) == 1,
    }

    # the holder dies mid-way: the waiting process gets the (OS-released) lock and finishes the store
    cache = launcher.workdir / "holder_killed"
    overrides = job_overrides(args, cache)
    holder, started, _ = launcher.start(overrides)
    started.wait(args.timeout)
    deadline = time.time() + args.timeout
    while chunks_written(cache) < 1 and holder.is_alive() and time.time() < deadline:
        time.sleep(0.01)
    waiter, _, waiter_report = launcher.start(overrides)
    time.sleep(rng.uniform(0.1, max(0.2, reference["seconds"] / 4)))
    holder_alive = holder.is_alive()
    holder.kill()
    holder.join()
    waiter.join(args.timeout)
    if waiter.exitcode != 0 or not waiter_report.is_file():
        raise RuntimeError(f"the waiting expansion failed with exit code {waiter.exitcode}")
    took_over = json.loads(waiter_report.read_text())
    holder_killed = {
        "holder_killed_mid_expansion": holder_alive,
        "waiter": took_over,
        **compare(Path(took_over["store"]), Path(reference["store"])),
    }
    return {"simultaneous": together, "holder_killed": holder_killed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=2, help="processes expanding one key at once (0: skip)")
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="the shared data folder (holds medmnist/)")
    parser.add_argument("--method", default="randaugment")
    parser.add_argument("--ratio", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16, help="seeds per batch (one manifest chunk each)")
    parser.add_argument("--train-per-class", type=int, default=0, help="few-shot size (0: the whole train split)")
    parser.add_argument("--expansion-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill times")
    parser.add_argument(
        "--window",
        type=float,
        default=0.0,
        help="kill delays are uniform in [0, window] s after the expansion starts (0: adaptive, see kill_drill)",
    )
    parser.add_argument("--start-method", choices=("fork", "spawn"), default="fork")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--workdir", default=None, help="kept when given; a temporary folder otherwise")
    parser.add_argument("--json", default=None, help="write the full report here")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a forking parent must not have started an OpenMP pool
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="chaos-"))
    rng = random.Random(args.seed)
    launcher = Launcher(args.start_method, workdir)
    wall = time.perf_counter()
    try:
        reference = launcher.run(job_overrides(args, workdir / "reference"), args.timeout, workdir / "reference")
        report: dict[str, Any] = {
            "setup": {k: v for k, v in vars(args).items() if k not in ("json", "workdir")},
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "reference": reference,
        }
        report["kill"] = kill_drill(launcher, args, reference, rng)
        if args.concurrent:
            report["concurrency"] = concurrency_drill(launcher, args, reference, rng)
        report["wall_s"] = round(time.perf_counter() - wall, 1)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    kill = report["kill"]
    survived = sum(k["landed_mid_expansion"] for k in kill["kills"])
    delays = [k["delay_s"] for k in kill["kills"]] or [0.0]
    ok = kill["hash_equal"] and kill["files_lost"] == 0
    print(
        f"reference: {reference['generated']} images in {reference['seconds']:.1f} s "
        f"(set-up to the first chunk {reference['setup_seconds']:.2f} s)"
    )
    print(
        f"kill -9: {len(kill['kills'])} kills, {survived} mid-expansion (delays {min(delays):.2f}-{max(delays):.2f} s "
        f"after the expansion started); finished by a last run that generated {kill['final']['generated']} "
        f"images; files lost: "
        f"{kill['files_lost']}; problems: {kill['problems'] or 'none'}; content hash equal: {kill['hash_equal']}"
    )
    if args.concurrent:
        together, holder = report["concurrency"]["simultaneous"], report["concurrency"]["holder_killed"]
        ok = ok and together["hash_equal"] and together["one_generated"] and together["same_store"]
        ok = ok and holder["hash_equal"] and holder["files_lost"] == 0
        print(
            f"{args.concurrent} processes on one key: generated {[r['generated'] for r in together['reports']]}, "
            f"waited/reused {[r['seconds'] for r in together['reports']]} s; problems: "
            f"{together['problems'] or 'none'}; content hash equal: {together['hash_equal']}"
        )
        print(
            f"lock holder killed (mid-expansion: {holder['holder_killed_mid_expansion']}): the waiter generated "
            f"{holder['waiter']['generated']} images to finish; files lost: {holder['files_lost']}; "
            f"content hash equal: {holder['hash_equal']}"
        )
    print(f"wall {report['wall_s']} s; {'OK' if ok else 'FAILED'}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
