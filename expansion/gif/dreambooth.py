"""DreamBooth fine-tuning (Ruiz et al., CVPR 2023) of Stable Diffusion components.

GIF (Zhang et al., NeurIPS 2023) fine-tunes Stable Diffusion with DreamBooth before
expanding the medical datasets, using the ShivamShrirao fork of diffusers'
``train_dreambooth.py`` (``GIF_SD/dreambooth_*/*_launch.sh``).

Official, and our defaults: 400 steps, learning rate 2e-6, constant schedule without warm-up,
text encoder trained, fp16 mixed precision (on GPU), resolution 512 with centre crop and no flip,
seed 2023, one instance prompt per class, ``prior_loss_weight`` 1.0.

Where the official run differs, ``method.fidelity=official`` sets it (conf/method/gif_sd.yaml):
batch size 4 for PathMNIST (ours 2 for every set); PathMNIST's prior preservation used the real
training images as its "class images" (``class_data_dir == instance_data_dir``,
``num_class_images 0``: ``class_images: real``; ours: ``generated``, the base model's own
samples of the class prompt, :func:`generate_class_images`, as DreamBooth intends); 8-bit
AdamW from bitsandbytes (``optimizer: adamw_8bit``, CUDA only; ours ``adamw``, full precision);
the VAE ``stabilityai/sd-vae-ft-mse`` (``method.vae_id``); the BreastMNIST instance prompt
"benign", not the class name "normal, benign" (``class_names``).

The training step is the one of diffusers' script: VAE latents (``latent_dist.sample``
times ``scaling_factor``), Gaussian noise, uniform timesteps, ``add_noise``, text
hidden states ``text_encoder(input_ids)[0]``, epsilon (or v) target, MSE loss, AdamW
(betas (0.9, 0.999), weight decay 1e-2, eps 1e-8), grad-norm clipping at 1.0.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..files import atomic_directory, atomic_write_text
from ..progress import ProgressLog
from ..settings import check_ranges, keyed_when_set

log = logging.getLogger(__name__)

DONE_MARKER = "DONE"


OPTIMIZERS = ("adamw", "adamw_8bit")
CLASS_IMAGES = ("generated", "real")


@dataclass(frozen=True)
class DreamBoothSettings:
    """Hyper-parameters (the module doc says which are the official run's).

    steps 400, lr 2e-6 (constant, no warm-up), batch size 2, text encoder trained,
    resolution 512, seed 2023; prior preservation off (on for PathMNIST, with
    ``prior_loss_weight`` 1.0); class_images: ``generated`` (``num_class_images`` per class from
    the base model) or ``real`` (the training images themselves, as the official PathMNIST run);
    optimizer: ``adamw`` or ``adamw_8bit`` (bitsandbytes, CUDA; the official run's).
    """

    steps: int = 400
    lr: float = 2e-6
    batch_size: int = 2
    train_text_encoder: bool = True
    resolution: int = 512
    seed: int = 2023
    prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 0  # per class, for prior preservation
    class_images: str = keyed_when_set("generated")
    optimizer: str = keyed_when_set("adamw")
    gradient_checkpointing: bool = False
    max_grad_norm: float = 1.0

    def __post_init__(self) -> None:
        check_ranges(
            self,
            [
                (self.class_images in CLASS_IMAGES, "class_images", f"one of {CLASS_IMAGES}"),
                (
                    self.class_images == "generated" or self.prior_preservation,
                    "class_images",
                    "'generated' without prior_preservation (class images serve only the prior loss)",
                ),
                (self.optimizer in OPTIMIZERS, "optimizer", f"one of {OPTIMIZERS}"),
                (self.steps >= 0, "steps", ">= 0"),
                (self.batch_size >= 1, "batch_size", ">= 1"),
                (self.lr > 0, "lr", "> 0"),
                (self.resolution >= 8 and self.resolution % 8 == 0, "resolution", "a positive multiple of 8"),
                (self.prior_loss_weight >= 0, "prior_loss_weight", ">= 0"),
                (self.num_class_images >= 0, "num_class_images", ">= 0"),
                (self.max_grad_norm > 0, "max_grad_norm", "> 0"),
            ],
        )


# --------------------------------------------------------------------------- inputs


def _check_images(images: torch.Tensor, prompts: Sequence[str], what: str) -> None:
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what} must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"{what} must be uint8 in [0, 255], got dtype {images.dtype}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{what} must have shape [N, C, H, W] with C in {{1, 3}}, got {tuple(images.shape)}")
    if images.shape[0] < 1:
        raise ValueError(f"{what} is empty: DreamBooth needs at least one image")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        n = "a single string" if isinstance(prompts, str) else len(prompts)
        raise ValueError(f"{what}: need one prompt per image ({images.shape[0]} images), got {n}")
    if not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{what}: prompts must be strings")


def preprocess(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 [B, C, H, W] (C 1 or 3) -> float [B, 3, res, res] in [-1, 1].

    As the script: resize the shorter side to ``resolution`` (bilinear, antialiased),
    centre crop, no flip, normalise to [-1, 1].
    """
    x = images.float() / 127.5 - 1.0
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    h, w = x.shape[-2:]
    if (h, w) != (resolution, resolution):
        scale = resolution / min(h, w)
        nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - resolution) // 2, (nw - resolution) // 2
        x = x[..., top : top + resolution, left : left + resolution]
    return x.clamp(-1.0, 1.0).contiguous()


def _epoch_indices(n: int, generator: torch.Generator) -> Iterator[int]:
    """Endless stream of indices: one seeded permutation per epoch (no replacement within an epoch)."""
    while True:
        yield from torch.randperm(n, generator=generator).tolist()


def _tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _check_fp32(module: torch.nn.Module, name: str) -> None:
    dtypes = {p.dtype for p in module.parameters()}
    if dtypes - {torch.float32}:
        raise ValueError(
            f"{name} has {sorted(map(str, dtypes))} weights: DreamBooth trains full-precision (float32) "
            "weights; use mixed_precision='fp16'/'bf16' for half-precision compute instead"
        )


def _te_checkpointing(text_encoder, on: bool) -> None:
    """transformers >= 5 renamed gradient_checkpointing_* to activation_checkpointing_*."""
    prefix = "activation" if hasattr(text_encoder, "activation_checkpointing_enable") else "gradient"
    getattr(text_encoder, f"{prefix}_checkpointing_{'enable' if on else 'disable'}")()


# --------------------------------------------------------------------------- training


def check_optimizer(settings: DreamBoothSettings, device: torch.device | str) -> None:
    """``adamw_8bit`` needs bitsandbytes and a CUDA device: a clear error before any work otherwise."""
    if settings.optimizer != "adamw_8bit":
        return
    import importlib.util

    missing = []
    if torch.device(device).type != "cuda":
        missing.append("a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package (pip install bitsandbytes)")
    if missing:
        raise ValueError(
            "method.dreambooth.optimizer=adamw_8bit (the official run's 8-bit AdamW) needs "
            + " and ".join(missing)
            + "; set method.dreambooth.optimizer=adamw for full-precision AdamW"
        )


def make_optimizer(params: list, settings: DreamBoothSettings, device: torch.device | str):
    """AdamW (betas (0.9, 0.999), weight decay 1e-2, eps 1e-8), 8-bit with ``optimizer: adamw_8bit``."""
    kwargs = dict(lr=settings.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    check_optimizer(settings, device)
    if settings.optimizer == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def dreambooth_finetune(
    unet,
    text_encoder,
    vae,
    tokenizer,
    noise_scheduler,
    images: torch.Tensor,
    prompts: list[str],
    settings: DreamBoothSettings,
    *,
    class_images: torch.Tensor | None = None,
    class_prompts: list[str] | None = None,
    device: torch.device | str = "cpu",
    mixed_precision: str | None = None,
    progress: bool = False,
) -> dict:
    """Fine-tune ``unet`` (and ``text_encoder`` if ``settings.train_text_encoder``) in place.

    images: uint8 [N, C, H, W], C in {1, 3}; prompts: one instance prompt per image
    (GIF: one per class, e.g. "Ultrasound image of malignant breast"). With
    ``settings.prior_preservation`` the class images/prompts (generated by the model,
    see :func:`generate_class_images`) are mixed into every batch (``batch_size`` of
    each) and loss = instance MSE + ``prior_loss_weight`` * class MSE.

    The models are moved to ``device`` (in place) and are left there in eval mode with
    ``requires_grad`` False. ``mixed_precision`` ("fp16"/"bf16") enables autocast (with
    a grad scaler for fp16) on CUDA only; the trained weights stay float32. All
    randomness (batch order, VAE sampling, noise, timesteps) comes from one generator
    seeded with ``settings.seed``, so a run is reproducible.

    Returns {"losses": [per-step total loss], "steps": n, "seconds": wall time}
    (plus "instance_losses"/"prior_losses" with prior preservation).
    """
    if not isinstance(settings, DreamBoothSettings):
        raise ValueError(f"settings must be a DreamBoothSettings, got {type(settings).__name__}")
    _check_images(images, prompts, "images")
    if settings.prior_preservation:
        if class_images is None or class_prompts is None:
            raise ValueError(
                "prior preservation is on but no class images were given: pass class_images (uint8 "
                "[M, C, H, W], e.g. from generate_class_images) and class_prompts (one per class image)"
            )
        _check_images(class_images, class_prompts, "class_images")
    elif class_images is not None or class_prompts is not None:
        raise ValueError("class_images/class_prompts were given but settings.prior_preservation is False")
    if mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ValueError(f"mixed_precision must be None, 'fp16' or 'bf16', got {mixed_precision!r}")

    device = torch.device(device)
    use_amp = device.type == "cuda" and mixed_precision in ("fp16", "bf16")
    amp_dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    train_te = settings.train_text_encoder

    _check_fp32(unet, "unet")
    if train_te:
        _check_fp32(text_encoder, "text_encoder")

    unet.to(device)
    text_encoder.to(device)
    vae.to(device)
    vae.eval().requires_grad_(False)
    text_encoder.requires_grad_(train_te)
    text_encoder.train(train_te)
    unet.requires_grad_(True)
    unet.train()

    instance_ids = _tokenize(tokenizer, prompts)
    class_ids = _tokenize(tokenizer, class_prompts) if settings.prior_preservation else None

    losses: list[float] = []
    inst_losses: list[float] = []
    prior_losses: list[float] = []
    t0 = time.perf_counter()
    gc_enabled = False
    try:
        if settings.steps == 0:
            return {"losses": losses, "steps": 0, "seconds": time.perf_counter() - t0}
        if settings.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            if train_te:
                _te_checkpointing(text_encoder, True)
            gc_enabled = True

        params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_te else [])
        optimizer = make_optimizer(params, settings, device)
        scaler = torch.amp.GradScaler("cuda") if use_amp and amp_dtype == torch.float16 else None

        gen = torch.Generator().manual_seed(settings.seed)
        inst_stream = _epoch_indices(images.shape[0], gen)
        class_stream = _epoch_indices(class_images.shape[0], gen) if settings.prior_preservation else None
        scaling = vae.config.scaling_factor
        num_t = noise_scheduler.config.num_train_timesteps
        pred_type = noise_scheduler.config.prediction_type
        bs = settings.batch_size

        cuda_devices = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
        )
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=settings.steps, desc="dreambooth", leave=False)
        lines = ProgressLog("DreamBooth fine-tuning", settings.steps, "steps", log)
        with torch.random.fork_rng(devices=cuda_devices):  # dropout, if any, is seeded too
            torch.manual_seed(settings.seed)
            for _ in range(settings.steps):
                idx = list(itertools.islice(inst_stream, bs))
                pixels = preprocess(images[idx], settings.resolution)
                ids = instance_ids[idx]
                if class_stream is not None:
                    cidx = list(itertools.islice(class_stream, bs))
                    pixels = torch.cat([pixels, preprocess(class_images[cidx], settings.resolution)])
                    ids = torch.cat([ids, class_ids[cidx]])
                pixels = pixels.to(device)
                ids = ids.to(device)

                with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                    with torch.no_grad():
                        pixels = pixels.to(dtype=vae.dtype)
                        latents = vae.encode(pixels).latent_dist.sample(generator=gen) * scaling
                    latents = latents.float()
                    noise = torch.randn(latents.shape, generator=gen).to(device)
                    timesteps = torch.randint(0, num_t, (latents.shape[0],), generator=gen).to(device)
                    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                    with torch.set_grad_enabled(train_te):
                        hidden = text_encoder(ids)[0]
                    pred = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
                if pred_type == "epsilon":
                    target = noise
                elif pred_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    raise ValueError(f"unsupported prediction_type {pred_type!r}")

                if class_stream is not None:
                    pred_i, pred_c = pred.float().chunk(2)
                    tgt_i, tgt_c = target.float().chunk(2)
                    loss_i = F.mse_loss(pred_i, tgt_i)
                    loss_c = F.mse_loss(pred_c, tgt_c)
                    loss = loss_i + settings.prior_loss_weight * loss_c
                    inst_losses.append(loss_i.item())
                    prior_losses.append(loss_c.item())
                else:
                    loss = F.mse_loss(pred.float(), target.float())

                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                    optimizer.step()
                losses.append(loss.item())
                lines.update(len(losses), f"loss {losses[-1]:.4f}")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        del optimizer
    finally:
        if gc_enabled:
            unet.disable_gradient_checkpointing()
            if train_te:
                _te_checkpointing(text_encoder, False)
        for m in (unet, text_encoder, vae):
            m.eval().requires_grad_(False)

    out = {"losses": losses, "steps": len(losses), "seconds": time.perf_counter() - t0}
    if settings.prior_preservation:
        out["instance_losses"] = inst_losses
        out["prior_losses"] = prior_losses
    return out


# --------------------------------------------------------------------------- prior preservation


@torch.no_grad()
def generate_class_images(
    unet,
    text_encoder,
    vae,
    tokenizer,
    scheduler,
    prompt: str,
    num_images: int,
    *,
    resolution: int = 512,
    seed: int = 2023,
    batch_size: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> torch.Tensor:
    """Class images for prior preservation: the (not yet fine-tuned) model's own samples of ``prompt``.

    As the DreamBooth script: a StableDiffusionPipeline on the same components (no
    safety checker), default 50 inference steps and guidance 7.5. Returns uint8
    [num_images, 3, resolution, resolution]; batch ``b`` uses generator seed ``seed + b``.
    The scheduler's timesteps are (re)set by the pipeline.
    """
    from diffusers import StableDiffusionPipeline

    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_images == 0:
        return torch.zeros(0, 3, resolution, resolution, dtype=torch.uint8)
    components = dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
    pipe = StableDiffusionPipeline(
        **components, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress)
    sampling = dict(height=resolution, width=resolution, num_inference_steps=num_inference_steps, output_type="pt")
    chunks = []
    for b, start in enumerate(range(0, num_images, batch_size)):
        n = min(batch_size, num_images - start)
        gen = torch.Generator().manual_seed(seed + b)
        out = pipe(prompt, num_images_per_prompt=n, guidance_scale=guidance_scale, generator=gen, **sampling).images
        chunks.append((out.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu())
    return torch.cat(chunks)


# --------------------------------------------------------------------------- persistence


def finetuned_available(out_dir: Path) -> bool:
    """True once :func:`save_finetuned` completed for ``out_dir`` (the DONE marker is written last)."""
    out_dir = Path(out_dir)
    return (out_dir / DONE_MARKER).is_file() and (out_dir / "unet").is_dir()


def save_finetuned(unet, text_encoder, out_dir: Path) -> None:
    """Save ``out_dir/unet`` and ``out_dir/text_encoder`` (safetensors) and the ``DONE`` marker, the
    whole folder built aside and moved into place (:func:`~expansion.files.atomic_directory`), so a
    crash never leaves a half-written model that :func:`finetuned_available` would accept.
    ``text_encoder`` may be None (a frozen text encoder is not saved). Not safe against two writers
    of the same ``out_dir`` at once: lock outside."""
    parts = {"unet": unet} if text_encoder is None else {"unet": unet, "text_encoder": text_encoder}
    with atomic_directory(Path(out_dir)) as tmp:
        for name, model in parts.items():
            model.save_pretrained(str(tmp / name), safe_serialization=True)
        atomic_write_text(tmp / DONE_MARKER, json.dumps({"components": sorted(parts)}) + "\n")


def load_finetuned(out_dir: Path, dtype: torch.dtype | None = None):
    """(unet, text_encoder) saved by :func:`save_finetuned`, in eval mode without grad.

    ``text_encoder`` is None if none was saved (text encoder not trained: use the base one).
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    out_dir = Path(out_dir)
    if not finetuned_available(out_dir):
        raise FileNotFoundError(f"no complete DreamBooth checkpoint in {out_dir} (missing {DONE_MARKER} marker)")
    unet = UNet2DConditionModel.from_pretrained(str(out_dir / "unet"), use_safetensors=True)
    text_encoder = None
    if (out_dir / "text_encoder").is_dir():
        text_encoder = CLIPTextModel.from_pretrained(str(out_dir / "text_encoder"), use_safetensors=True)
    for m in (unet, text_encoder):
        if m is None:
            continue
        if dtype is not None:
            m.to(dtype=dtype)
        m.eval().requires_grad_(False)
    return unet, text_encoder
