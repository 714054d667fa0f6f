"""Every GPU figure in one short command, for a GPU slot of about 10 minutes.

    make benchmark-gpu-quick OUT=<folder> [DATA=<data folder>]     # on a GPU node (README: "GPU node without network")
    make benchmark-gpu-quick OUT=<folder> SMOKE=1                   # = --device cpu --smoke: tiny sizes, on a CPU

Runs, each as a child process with its own time cap (so that one slow part cannot starve the
others) inside one overall budget (default 450 s, under the 8 minutes a 10-minute slot leaves):

1. ``gif_sd``: GIF-SD official-style loop vs batched (bf16 UNet, channels_last; SDPA attention,
   diffusers' default) at 512 px with the real SD v1.5 + CLIP ViT-B/32 sizes and random weights,
   20 DDIM steps at strength 0.9, k=4, 4 seeds, 2 timed repeats after a warm-up; MFU against the
   device's bf16 peak;
2. ``training``: ResNet-50 at 224 px on BreastMNIST + cutout x5, the framework's Lightning fit vs
   a bare loop on the same in-memory tensors (bf16 autocast, channels_last), 4 epochs x 2 repeats;
3. ``closed_set``: closed-set diffusion fit and sampling rates at the real UNet size;
4. ``gpu_tests``: the tests behind the ``gpu`` marker;
5. ``gif_mae`` and 6. ``gif_unclip`` rates, if the budget has time left.

Writes into ``--out`` each part's JSON (the benchmark's own report), ``parts.log`` (every part's
output) and ``summary.json``, and prints one summary line per part. The seed images and the
training set are BreastMNIST from ``--data`` (``breastmnist.npz`` under ``medmnist/``, shipped in
the offline bundle, experiments/tools/wheelhouse.py). Exit status 0 only when every part finished. ``--smoke`` gives every cap and the budget 5x slack:
it checks the script on a CPU that may be loaded, not speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from expansion.files import atomic_write_text

BENCHMARKS = ROOT / "benchmarks"
GPU_BUDGET_S = 450.0
SMOKE_SLACK = 5  # --smoke: caps and budget x5


@dataclass(frozen=True)
class Part:
    """One measurement: its command (full and smoke), its time cap and its summary line."""

    name: str
    cap_s: float
    full: list[str]
    smoke: list[str]
    summary: Callable[[dict[str, Any]], str]
    json_output: bool = True
    optional: bool = False  # run only if the budget has at least ``cap_s / 2`` left


def _ratio(report: dict[str, Any]) -> str:
    rows = {r["mode"]: r for r in report["results"]}
    batched, official = rows["batched"], rows["official"]
    mfu = f", MFU {100 * batched['mfu']:.1f} %" if batched.get("mfu") is not None else ""
    return (
        f"batched / official = {report['speedup']['gif_sd']:.2f}x; batched {batched['images_per_s']:.3g} img/s"
        f" ({batched['dtype']}{mfu}), official {official['images_per_s']:.3g} img/s ({official['dtype']})"
    )


def _training(report: dict[str, Any]) -> str:
    return (
        f"framework / bare epoch time = {report['ratio_framework_over_bare']:.3f}; framework "
        f"{report['framework']['images_per_s']:.4g} img/s, bare {report['bare']['images_per_s']:.4g} img/s"
    )


def _generation(report: dict[str, Any]) -> str:
    best = max(report["results"], key=lambda r: r["images_per_s"])
    mfu = f", MFU {100 * best['mfu']:.1f} %" if best.get("mfu") is not None else ""
    fit = report.get("fit")
    fit_text = f"; fit {fit['train_images_per_s']:.4g} train img/s" if isinstance(fit, dict) else ""
    return f"{best['images_per_s']:.3g} img/s ({best.get('mode', '')}{mfu}){fit_text}"


def parts(data: Path, compile_unet: bool, tests_tmp: Path) -> list[Part]:
    seeds = ["--dataset", "breastmnist", "--data", str(data)]
    # the gpu tests get a temporary folder of their own: in pytest's shared one, a new session deletes
    # the oldest sessions' folders, which may belong to a pytest that is still running (the one that
    # runs this smoke, say)
    gpu_tests = ["-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--basetemp={tests_tmp}"]
    return [
        Part(
            "gif_sd",
            210,
            [
                *["gif_sd_throughput.py", "--device", "cuda", "--method", "gif_sd", *seeds],
                *["--resolution", "512", "--steps", "20", "--ratio", "4", "--seeds-per-pass", "4", "--repeats", "2"],
                *["--dtype", "bfloat16", "--channels-last", *(["--compile"] if compile_unet else [])],
            ],
            [
                *["gif_sd_throughput.py", "--device", "cpu", "--tiny", "--method", "gif_sd", *seeds],
                *["--steps", "2", "--ratio", "2", "--seeds-per-pass", "2", "--repeats", "1"],
            ],
            _ratio,
        ),
        Part(
            "training",
            100,
            # BreastMNIST read by the npz loader (the medmnist package, which only names the classes, is not needed)
            [
                *["training_throughput.py", "--device", "cuda", "--epochs", "4", "--repeats", "2", "--dataset", "npz"],
                *["--batch-size", "256", f"dataset.path={data / 'medmnist' / 'breastmnist.npz'}"],
            ],
            [
                *["training_throughput.py", "--device", "cpu", "--epochs", "2", "--repeats", "1", "--dataset", "npz"],
                f"dataset.path={data / 'medmnist' / 'breastmnist.npz'}",
            ],
            _training,
        ),
        Part(
            "closed_set",
            60,
            ["closed_set_throughput.py", "--device", "cuda", "--steps", "50", "--fit-steps", "20", *seeds],
            [
                *["closed_set_throughput.py", "--device", "cpu", "--unet", "tiny", "--steps", "2", "--ratio", "1"],
                *["--seeds-per-pass", "2", "--fit-steps", "1", "--fit-batch", "4", "--resolution", "16", *seeds],
            ],
            _generation,
        ),
        Part(
            "gpu_tests",
            60,
            [*gpu_tests, str(ROOT / "tests" / "test_gpu.py")],
            [*gpu_tests, str(ROOT / "tests" / "test_gpu.py")],
            lambda report: report["tail"],
            json_output=False,
        ),
        Part(
            "gif_mae",
            50,
            ["gif_mae_throughput.py", "--device", "cuda", *seeds],
            ["gif_mae_throughput.py", "--device", "cpu", "--tiny", "--ratio", "1", "--repeats", "1", *seeds],
            _generation,
            optional=True,
        ),
        Part(
            "gif_unclip",
            90,
            ["gif_unclip_throughput.py", "--device", "cuda", "--resolution", "512", "--steps", "10", *seeds],
            [
                *["gif_unclip_throughput.py", "--device", "cpu", "--tiny", "--steps", "2", "--score-steps", "1"],
                *["--ratio", "1", "--repeats", "1", "--seeds-per-pass", "1", *seeds],
            ],
            _generation,
            optional=True,
        ),
    ]


def run_part(part: Part, argv: list[str], timeout: float, out: Path, log, env: dict[str, str]) -> dict[str, Any]:
    """Run one part as a child process group, killed at ``timeout``; its output goes to ``log``."""
    json_path = out / f"{part.name}.json"
    json_path.unlink(missing_ok=True)  # a figure from an earlier run is never read as this run's
    command = [sys.executable, *([str(BENCHMARKS / argv[0]), *argv[1:]] if argv[0].endswith(".py") else argv)]
    if part.json_output:
        command += ["--json", str(json_path)]
    log.write(f"\n===== {part.name}: {' '.join(command)} (cap {timeout:.0f} s)\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = f"timed out after {timeout:.0f} s"
    seconds = time.perf_counter() - start
    log.write(output or "")
    log.flush()
    lines = [line for line in (output or "").splitlines() if line.strip()]
    result: dict[str, Any] = {"part": part.name, "status": status, "seconds": round(seconds, 1), "command": command}
    if status == "ok" and part.json_output:
        result["summary"] = part.summary(json.loads(json_path.read_text()))
    elif status == "ok":
        result["summary"] = part.summary({"tail": lines[-1] if lines else ""})
    else:
        result["summary"] = " | ".join(lines[-3:])
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the JSON files, parts.log and summary.json")
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")),
        help="a folder with medmnist/breastmnist.npz (the shared data folder, or the bundle's data/)",
    )
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only with --smoke")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script and the install, not speed")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for all parts together (default {GPU_BUDGET_S:.0f}; with --smoke {SMOKE_SLACK}x that)",
    )
    p.add_argument("--compile", action="store_true", help="also torch.compile the GIF-SD UNet (compiled in warm-up)")
    p.add_argument("--only", nargs="+", default=None, help="run only these parts")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.smoke:
        p.error("--device cpu measures nothing at GPU sizes: add --smoke (or use make benchmark-generation-cpu)")
    if args.smoke and args.device != "cpu":
        p.error("--smoke runs the tiny sizes on the CPU: add --device cpu")
    breast = args.data / "medmnist" / "breastmnist.npz"
    if not breast.is_file():
        p.error(f"{breast} not found: pass --data <folder with medmnist/breastmnist.npz> (the bundle's data/)")
    if not args.smoke:
        import torch

        if not torch.cuda.is_available():
            p.error("no CUDA device; on a CPU run the script check: --device cpu --smoke")
    # the smoke checks the script on a CPU that may be loaded (CI), not speed: its caps get slack
    slack = SMOKE_SLACK if args.smoke else 1
    args.budget = args.budget if args.budget is not None else GPU_BUDGET_S * slack
    with tempfile.TemporaryDirectory(prefix="gpu_quick_tests_") as tests_tmp:
        known = parts(args.data.resolve(), args.compile, Path(tests_tmp))
        unknown = sorted(set(args.only or []) - {part.name for part in known})
        if unknown:
            p.error(f"--only {' '.join(unknown)}: no such part (parts: {' '.join(part.name for part in known)})")
        chosen = [part for part in known if not args.only or part.name in args.only]
        results = run_parts(chosen, args, slack)
    summary = {
        "mode": "smoke" if args.smoke else "gpu",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "command": [Path(sys.executable).name, *sys.argv],
        "budget_s": args.budget,
        "parts": results,
    }
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=2))
    return 0 if all(r["status"] == "ok" for r in results) else 1


def run_parts(chosen: list[Part], args: argparse.Namespace, slack: float) -> list[dict[str, Any]]:
    """Each part in turn within ``args.budget``, its cap times ``slack``; a summary line per part."""
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PROGRESS_BAR": "false", "WANDB_MODE": "disabled"}
    env["SHARED_DATA"] = str(args.data.resolve())  # the gpu tests' seed images
    if args.smoke:
        env["GPU_TESTS_DEVICE"] = "cpu"
    mode = "smoke (tiny sizes on the CPU: says nothing about speed)" if args.smoke else "GPU"
    print(f"benchmark-gpu-quick, {mode}: {len(chosen)} parts, budget {args.budget:.0f} s, into {args.out}", flush=True)
    deadline = time.perf_counter() + args.budget
    results = []
    with (args.out / "parts.log").open("w") as log:
        for part in chosen:
            cap, left = part.cap_s * slack, deadline - time.perf_counter()
            if left < 5 or (part.optional and left < cap / 2):
                results.append({"part": part.name, "status": "skipped (budget spent)", "seconds": 0.0, "summary": ""})
            else:
                results.append(
                    run_part(part, part.smoke if args.smoke else part.full, min(cap, left), args.out, log, env)
                )
            r = results[-1]
            print(f"  {r['part']:<10} {r['status']:<24} {r['seconds']:6.1f} s  {r['summary']}", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(main())
