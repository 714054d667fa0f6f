"""GIF-SD throughput: images per second at the real architecture sizes, random weights.

Speed does not depend on weight values, so the Stable Diffusion v1.5 components
(UNet ~860M, VAE ~84M, ViT-L/14 text encoder ~123M parameters, CLIP BPE
tokenizer, DDIM scheduler) and the CLIP ViT-B/32 guide (~151M) are built from
their configs in code, with random weights: nothing is downloaded. The same
components are timed in one run in two modes:

* official-style: float32, one seed per call, criteria over passes of two
  (``group_size=2``), each seed's k images as ceil(k/2) ``expand`` calls of two
  copies (seeds ``[1, 2]``) -- the shape of the official GIF loop;
* batched: ``--seeds-per-pass`` seeds x k images in one ``expand`` call,
  ``--dtype`` (auto: float16 UNet/text encoder on CUDA, float32 on CPU), each
  seed's k samples scored together (``group_size=None``).

Usage (from the repository root)::

    python benchmarks/gif_sd_throughput.py                      # CUDA: 512 px, 50 DDIM steps, k=5, 8 seeds/pass
    OMP_NUM_THREADS=1 python benchmarks/gif_sd_throughput.py --device cpu --resolution 64 --steps 2 \\
        --ratio 2 --seeds-per-pass 2 --repeats 1                 # the smallest meaningful CPU run
    python benchmarks/gif_sd_throughput.py --method both --json gif_sd_throughput.json

``--tiny`` swaps in the tiny test components (tests/helpers) to check the
script end to end in seconds; its figures say nothing about real speed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np
import torch

from benchmarks.expansion_timing import result_line, time_expand_calls
from benchmarks.flops import gpu_peak_tflops
from expansion.base import ExpansionContext
from expansion.gif.guides import ClipGuide, build_guide
from expansion.gif.sd import GifSD
from expansion.seeding import image_seeds

# -- the real architectures (Stable Diffusion v1.x / v1.5 model_index configs) ---------------------
SD_V1_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD_V1_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
VIT_L14_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)
SD_V1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
GUIDE_ARCH = "ViT-B-32"
#: parameter counts of the released models, for the sanity check printed with the figures
EXPECTED_PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480, "guide": 151_277_313}

DATASETS = {
    # name: (context kwargs, where the seeds are under --data)
    "cifar10": {"channels": 3, "prompt_prefix": None},
    "breastmnist": {
        "channels": 1,
        "prompt_prefix": "Ultrasound image of",
        "class_names": ["malignant", "normal, benign"],
    },
}


# -- components --------------------------------------------------------------------------------
def clip_bpe_tokenizer(tmp_dir: Path | str, model_max_length: int = 77):
    """The real CLIP BPE tokenizer (49408 tokens, 48894 merges) as a transformers CLIPTokenizer,
    written offline from the vocabulary open_clip ships (bpe_simple_vocab_16e6.txt.gz)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    folder = Path(tmp_dir) / "clip_bpe_tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    # open_clip names the special tokens <start_of_text>/<end_of_text>; OpenAI's (and SD's) vocab.json
    # calls the same ids 49406/49407 <|startoftext|>/<|endoftext|>, the names CLIPTokenizer expects
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(tok, tok): i for tok, i in simple.encoder.items()}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merges = sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "\n".join(" ".join(pair) for pair, _ in merges) + "\n", encoding="utf-8"
    )
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=model_max_length)
    if len(tokenizer) != len(vocab) or tokenizer.eos_token_id != 49407:
        raise RuntimeError(
            f"CLIP tokenizer built from open_clip's vocabulary has {len(tokenizer)} tokens and "
            f"<|endoftext|> = {tokenizer.eos_token_id}; expected {len(vocab)} and 49407"
        )
    return tokenizer


def build_real_sd(tmp_dir: Path | str, seed: int = 0) -> dict[str, Any]:
    """SD v1.5's vae, unet, text_encoder, tokenizer and DDIM scheduler with random weights."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = clip_bpe_tokenizer(tmp_dir)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD_V1_UNET)
        vae = AutoencoderKL(**SD_V1_VAE)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **VIT_L14_TEXT,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    return {
        "vae": vae,
        "unet": unet,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**SD_V1_SCHEDULER),
    }


def build_real_guide(class_names: list[str], seed: int = 0) -> ClipGuide:
    """The zero-shot CLIP guide: open_clip ViT-B/32 with random weights."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(GUIDE_ARCH, pretrained=None)
    return ClipGuide(model, open_clip.get_tokenizer(GUIDE_ARCH), class_names)


def build_tiny(tmp_dir: Path | str, class_names: list[str]) -> tuple[dict[str, Any], ClipGuide]:
    """The tiny test components (tests/helpers): checks the script's logic, not speed."""
    from tests.helpers.tiny_clip import save_tiny_clip
    from tests.helpers.tiny_sd import build_tiny_sd

    comps = build_tiny_sd(Path(tmp_dir))
    guide = build_guide(save_tiny_clip(Path(tmp_dir) / "clip"), class_names)
    return comps, guide


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- seed images ---------------------------------------------------------------------------------
def load_seeds(data_root: Path, dataset: str, n: int) -> tuple[torch.Tensor, torch.Tensor, ExpansionContext]:
    """``n`` real training images (uint8 [n, C, H, W]), their labels, and the dataset context."""
    spec = DATASETS[dataset]
    if dataset == "cifar10":
        from PIL import Image

        folder = data_root / "cifar10_subset" / "train"
        if not folder.is_dir():
            raise SystemExit(f"CIFAR-10 subset not found at {folder}; pass --data (the shared data folder)")
        class_names = sorted(p.name for p in folder.iterdir() if p.is_dir())
        files = {c: sorted((folder / c).glob("*.jpg")) for c in class_names}
        images, labels = [], []
        for i in range(n):  # round-robin over the classes
            c = i % len(class_names)
            with Image.open(files[class_names[c]][i // len(class_names)]) as im:
                images.append(torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1))
            labels.append(c)
        x, y = torch.stack(images), torch.tensor(labels, dtype=torch.long)
    else:
        path = data_root / "medmnist" / "breastmnist.npz"
        if not path.is_file():
            raise SystemExit(f"BreastMNIST not found at {path}; pass --data (the shared data folder)")
        data = np.load(path)
        idx = np.arange(n) % len(data["train_images"])
        x = torch.from_numpy(data["train_images"][idx])[:, None]
        y = torch.from_numpy(data["train_labels"][idx, 0].astype(np.int64))
        class_names = spec["class_names"]
    context = ExpansionContext(
        dataset_name=dataset,
        class_names=list(class_names),
        channels=spec["channels"],
        image_size=int(x.shape[-1]),
        prompt_prefix=spec["prompt_prefix"],
    )
    return x, y, context


# -- measurement ---------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        name += f", {torch.get_num_threads()} torch thread(s) of {os.cpu_count()} CPUs"
    return f"{name}; torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")


def make_expander(
    method: str,
    mode: str,
    comps: dict[str, Any],
    guide: ClipGuide | None,
    context: ExpansionContext,
    args: argparse.Namespace,
) -> GifSD:
    official = mode == "official"
    unguided = {"guided": False, "radius": 0.0} if method == "sd_img2img" else {"radius": args.radius}
    exp = GifSD(
        ratio=args.ratio,
        model_id="unused (random weights)",
        guidance_scale=args.guidance_scale,
        strength=args.strength,
        num_inference_steps=args.steps,
        resolution=args.resolution,
        output_size=None,
        dtype="float32" if official else args.dtype,
        group_size=2 if official else None,
        **unguided,
    )
    exp.context = context  # prepare() would load weights from model_id: set the context and components instead
    exp.set_components(comps)  # also resets the cached dtypes
    if exp.settings.guided:
        exp.use_guide(guide)
    return exp


def calls_for(mode: str, images: torch.Tensor, labels: torch.Tensor, k: int) -> list[tuple]:
    """The expand calls of one repeat: (images, labels, seeds)."""
    n = images.shape[0]
    if mode == "batched":
        return [(images, labels, image_seeds(0, range(n), k))]
    passes = math.ceil(k / 2)
    calls = []
    for b in range(n):
        seeds = image_seeds(0, [b], 2 * passes)
        calls += [(images[b : b + 1], labels[b : b + 1], seeds[:, 2 * j : 2 * j + 2]) for j in range(passes)]
    return calls


def measure(
    method: str,
    mode: str,
    comps: dict[str, Any],
    guide: ClipGuide | None,
    images: torch.Tensor,
    labels: torch.Tensor,
    context: ExpansionContext,
    args: argparse.Namespace,
) -> dict[str, Any]:
    exp = make_expander(method, mode, comps, guide, context, args)
    calls = calls_for(mode, images, labels, args.ratio)
    # k kept per seed (official: ceil(k/2) passes of 2, so an odd k generates one more than it keeps)
    timing = time_expand_calls(exp, calls, images.device, args.repeats, images.shape[0] * args.ratio, args.peak_tflops)
    return {
        "method": method,
        "mode": mode,
        "dtype": str(exp.unet_dtype).replace("torch.", ""),
        "group_size": exp.settings.group_size,
        **timing,
    }


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options every generation benchmark shares: repeats, where the seeds come from, the GPU
    peak for MFU and the JSON report."""
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per mode (default 2 on cuda, 1 on cpu)")
    p.add_argument("--dataset", default="cifar10", choices=sorted(DATASETS), help="where the seed images come from")
    p.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SHARED_DATA", ROOT.parent / "shared" / "data")),
        help="the shared data folder (cifar10_subset/, medmnist/)",
    )
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the GPU's dense bf16 peak for MFU (default: looked up by device name, benchmarks/flops.py)",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--resolution", type=int, default=None, help="img2img resolution (default 512 on cuda, 64 on cpu)")
    p.add_argument("--steps", type=int, default=None, help="DDIM inference steps (default 50 on cuda, 2 on cpu)")
    p.add_argument("--strength", type=float, default=0.9)
    p.add_argument("--guidance-scale", type=float, default=50.0, help="classifier-free guidance (1 = no CFG)")
    p.add_argument("--radius", type=float, default=0.8)
    p.add_argument(
        "--seeds-per-pass",
        type=int,
        default=None,
        help="batched mode (default 8 on cuda, 2 on cpu); also the number of seeds the official loop goes through",
    )
    p.add_argument("--ratio", type=int, default=None, help="k images per seed (default 5 on cuda, 2 on cpu)")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="batched mode's UNet/text-encoder dtype (auto: float16 on cuda, float32 on cpu)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="UNet and VAE in channels_last memory format (both modes)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (both modes; compiled in warm-up)")
    add_run_arguments(p)
    p.add_argument("--method", default="gif_sd", choices=["gif_sd", "sd_img2img", "both"])
    p.add_argument("--tiny", action="store_true", help="tiny test components (script check only; default 16 px)")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    defaults = {
        "resolution": 512 if on_cuda else (16 if args.tiny else 64),
        "steps": 50 if on_cuda else 2,
        "seeds_per_pass": 8 if on_cuda else 2,
        "ratio": 5 if on_cuda else 2,
        "repeats": 2 if on_cuda else 1,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def write_report(
    args, device, params, build_s: float, results: list, speedup, benchmark: str, extra: dict | None = None
) -> dict:
    """The figures of one benchmark run as a dict, also written to ``--json`` when given."""
    peak, peak_source = gpu_peak_tflops(device, getattr(args, "peak_tflops", None))
    report = {
        "benchmark": benchmark,
        "machine": machine(device),
        "device": str(device),
        "torch": torch.__version__,
        "tiny": args.tiny,
        "date": time.strftime("%Y-%m-%d"),
        "peak_tflops": peak,
        "peak_source": peak_source,
        "parameters": params,
        "build_seconds": build_s,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"},
        "results": results,
        "speedup": speedup,
        **(extra or {}),
    }
    print(f"  MFU against: {peak_source}" + (f" = {peak:.1f} TFLOP/s" if peak else ""))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"  written to {args.json}")
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.repeats < 1 or args.seeds_per_pass < 1 or args.ratio < 1:
        raise SystemExit("--repeats, --seeds-per-pass and --ratio must be >= 1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # one "kept in float32" warning per dtype cast otherwise
    device = torch.device(args.device)
    methods = ["gif_sd", "sd_img2img"] if args.method == "both" else [args.method]
    images, labels, context = load_seeds(args.data.expanduser(), args.dataset, args.seeds_per_pass)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            comps, guide = build_tiny(tmp, context.class_names)
        else:
            comps = build_real_sd(tmp)
            guide = build_real_guide(context.class_names)
    build_s = time.perf_counter() - start
    params = {key: n_params(comps[key]) for key in ("unet", "vae", "text_encoder")}
    params["guide"] = n_params(guide.model)
    for key in ("unet", "vae", "text_encoder"):
        comps[key].to(device)
    if args.channels_last:
        for key in ("unet", "vae"):
            comps[key].to(memory_format=torch.channels_last)
    if args.compile:
        comps["unet"].compile()
    attention = sorted({type(p).__name__ for p in comps["unet"].attn_processors.values()})
    guide.to(device)
    images, labels = images.to(device), labels.to(device)

    what = (
        "TINY test components: figures say nothing about speed"
        if args.tiny
        else "real SD v1.5 + CLIP ViT-B/32 sizes, random weights"
    )
    print(f"GIF-SD throughput ({what})")
    print(f"  machine: {machine(device)}")
    counts = [
        f"{k} {v / 1e6:.1f}M" + ("" if args.tiny else f" (expected {EXPECTED_PARAMS[k] / 1e6:.1f}M)")
        for k, v in params.items()
    ]
    print(f"  parameters: {', '.join(counts)}; built in {build_s:.1f} s")
    print(f"  UNet attention: {', '.join(attention)}; channels_last {args.channels_last}; torch.compile {args.compile}")
    print(
        f"  seeds: {args.dataset} {tuple(images.shape)} uint8 -> {args.resolution} px, {args.steps} DDIM steps x "
        f"strength {args.strength} = {min(int(args.steps * args.strength), args.steps)} denoising step(s), "
        f"CFG {args.guidance_scale}, k={args.ratio}, {args.seeds_per_pass} seeds, {args.repeats} timed repeat(s), "
        "warm-up excluded"
    )

    results, speedups = [], {}
    for method in methods:
        rows = {}
        for mode in ("official", "batched"):
            rows[mode] = measure(method, mode, comps, guide, images, labels, context, args)
            print(result_line(method, rows[mode]), flush=True)
            results.append(rows[mode])
        speedups[method] = rows["batched"]["images_per_s"] / rows["official"]["images_per_s"]
        print(f"  {method}: batched / official = {speedups[method]:.2f}x")

    return write_report(
        args, device, params, build_s, results, speedups, benchmark="gif_sd", extra={"unet_attention": attention}
    )


if __name__ == "__main__":
    main()
