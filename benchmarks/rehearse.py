"""The real-size rehearsal on the CPU: every Stable Diffusion method generates one image at SD v1.x sizes (the
real UNet, VAE and text-encoder configurations with random weights, expansion/architectures.py; DistDiff's guide
a probe CNN) with a reduced step count, each method in its own process so its peak memory is its own. Prints one
line per method: seconds, UNet calls, seconds per UNet call, peak resident memory. The first GPU run must not be
where a shape, dtype or memory bug is found.

    python -m benchmarks.rehearse [--methods gif_sd,sd_img2img,...] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time

METHODS = ("gif_sd", "sd_img2img", "sd_txt2img", "real_guidance", "diffusemix", "distdiff")


def rehearse_one(name: str, steps: int) -> dict:
    import torch

    from expansion.architectures import build_sd
    from expansion.base import ExpansionContext

    torch.manual_seed(0)
    classes = ["cat", "dog"]
    context = ExpansionContext("rehearsal", classes, channels=3, shots_per_class=1)
    with tempfile.TemporaryDirectory() as tmp:
        parts = build_sd("real", tmp, unet_in_channels=8 if name == "diffusemix" else 4)
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    labels = torch.tensor([0])
    common = dict(num_inference_steps=steps, output_size=256)
    if name in ("gif_sd", "sd_img2img"):
        from expansion.gif.sd import GifSD

        guided = name == "gif_sd"
        exp = GifSD(ratio=1, guided=guided, radius=0.8 if guided else 0.0, strength=1.0, **common)
        exp.context = context
        if guided:
            from expansion.architectures import build_clip_guide

            with tempfile.TemporaryDirectory() as tmp:
                exp.use_guide(build_clip_guide("real", classes, tmp))
    else:
        from expansion.field.diffusemix import DiffuseMix
        from expansion.field.distdiff import DistDiff
        from expansion.field.real_guidance import RealGuidance
        from expansion.field.txt2img import SDTxt2Img

        cls = {"sd_txt2img": SDTxt2Img, "real_guidance": RealGuidance, "diffusemix": DiffuseMix, "distdiff": DistDiff}
        settings = dict(common)
        if name == "real_guidance":
            settings["strength"] = 1.0
        if name == "distdiff":
            settings.update(strength=1.0, guidance_step=steps, guidance_period=min(2, steps))
        exp = cls[name](ratio=1, **settings)
        exp.context = context
        if name == "real_guidance":
            exp.strength, exp.clip = 1.0, None
        if name == "diffusemix":
            exp.fractals = None
    exp.set_components(parts)
    if name == "distdiff":
        from expansion.field.distdiff import class_prototypes
        from expansion.gif.guides import ProbeGuide
        from expansion.probe import train_probe

        seeds_images = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)
        seed_labels = torch.tensor([0, 0, 1, 1])
        exp.guide = ProbeGuide(train_probe(seeds_images, seed_labels, 2, epochs=1, min_steps=1))
        with torch.no_grad():
            feats = exp.guide.probe.embed(seeds_images.float() / 255)
        exp.global_protos, exp.local_protos = class_prototypes(feats, seed_labels, 2, 3)
    calls = []
    exp.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    seeds = torch.tensor([[7]])
    start = time.perf_counter()
    grad = name in ("gif_sd", "distdiff")
    with torch.set_grad_enabled(grad) if grad else torch.inference_mode():
        out = exp.expand(images, labels, seeds)
    seconds = time.perf_counter() - start
    assert out.images.shape == (1, 1, 3, 256, 256), out.images.shape
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {
        "method": name,
        "seconds": round(seconds, 1),
        "unet_calls": len(calls),
        "seconds_per_unet_call": round(seconds / max(1, len(calls)), 1),
        "peak_rss_gib": round(peak_gib, 2),
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(rehearse_one(args.one, args.steps)))
        return
    print(f"{'method':14} {'seconds':>8} {'UNet calls':>10} {'s/call':>7} {'peak RSS GiB':>12}")
    for name in args.methods.split(","):
        run = subprocess.run(
            [sys.executable, "-m", "benchmarks.rehearse", "--one", name, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
        )
        if run.returncode:
            print(f"{name:14} FAILED: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode}")
            continue
        r = json.loads(run.stdout.strip().splitlines()[-1])
        print(
            f"{name:14} {r['seconds']:>8} {r['unet_calls']:>10} {r['seconds_per_unet_call']:>7} {r['peak_rss_gib']:>12}"
        )


if __name__ == "__main__":
    main()
