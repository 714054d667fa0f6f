"""Closed-set generative augmentation (Wang et al., arXiv 2508.09550).

A class-conditional diffusion model is trained on the training split itself (no outside
data or weights: "closed set"), then sampled per class and its samples are added to the
training set. The paper trains class-conditional EDM on CIFAR-10 and BloodMNIST; here the
generator is a diffusers ``UNet2DModel`` with a learned class embedding, trained with the
DDPM objective (Ho et al. 2020: epsilon or v prediction, MSE, uniform timesteps over a
1000-step linear or cosine beta schedule), with EMA weights (the sampled model), and
sampled deterministically with DDIM (eta 0) or DPM-Solver++ (2nd order multistep).
Classifier-free guidance (Ho & Salimans 2022) is optional: train with ``label_dropout`` > 0
(a "null" class), sample with ``guidance_scale`` w != 1: eps = eps_null + w (eps_c - eps_null).

As an :class:`~expansion.base.Expander`, the parent image only supplies a label: the k outputs
of parent b are k samples of class ``labels[b]``, so n_syn per class = ratio * n_base.

Fit stage (:func:`train_diffusion`): every random draw of training step s (batch order,
flips, timesteps, noise, label drop-out) comes from a generator seeded with (seed, s), so a
run killed at any moment and resumed from its last checkpoint reaches the same weights as an
uninterrupted one. A checkpoint (one safetensors file, written to a temporary name and moved
into place with ``os.replace``) holds the model, the EMA weights, the optimizer state, the
step, the loss history and torch's RNG state (dropout). No pickle is ever loaded.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .base import Expander, ExpansionContext, ExpansionError, ExpansionOutput, ImageSet, to_uint8, train_tensors
from .files import atomic_directory, atomic_file
from .progress import ProgressLog
from .seeding import derive, image_seeds, per_image_rand
from .settings import from_mapping, signature_of, speed_only

log = logging.getLogger(__name__)

DONE_MARKER = "DONE"
CHECKPOINT_NAME = "checkpoint.safetensors"
CHECKPOINT_FORMAT = 1
SAMPLERS = ("ddim", "dpm_solver")
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
MIXED_PRECISION = ("bf16", "no")

#: named UNet sizes (parameters at 32 px, 10 classes): ``ddpm_cifar10`` is DDPM's CIFAR-10 network (35.7 M,
#: attention at 16 px), ``small`` 1.7 M, ``tiny`` 0.28 M (the CPU setting)
UNET_PRESETS: dict[str, dict[str, Any]] = {
    "ddpm_cifar10": {
        "block_out_channels": [128, 256, 256, 256],
        "layers_per_block": 2,
        "attention": [False, True, False, False],
        "norm_num_groups": 32,
        "attention_head_dim": None,
        "dropout": 0.1,
    },
    "small": {
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 2,
        "attention": [False, True, True],
        "norm_num_groups": 16,
        "attention_head_dim": 32,
        "dropout": 0.0,
    },
    "tiny": {
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "attention": [False, False, True],
        "norm_num_groups": 8,
        "attention_head_dim": 16,
        "dropout": 0.0,
    },
}


@dataclass(frozen=True)
class UNetSpec:
    """Architecture of the class-conditional ``UNet2DModel``: one entry of ``block_out_channels`` and
    ``attention`` per resolution level (len - 1 downsamplings by 2)."""

    block_out_channels: tuple[int, ...] = (16, 32, 32)
    layers_per_block: int = 1
    attention: tuple[bool, ...] = (False, False, True)
    norm_num_groups: int = 8
    attention_head_dim: int | None = 16
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        object.__setattr__(self, "attention", tuple(bool(a) for a in self.attention))
        if not self.block_out_channels or len(self.attention) != len(self.block_out_channels):
            raise ExpansionError(
                f"closed_set_diffusion: unet.attention needs one flag per level of block_out_channels "
                f"({len(self.block_out_channels)}), got {len(self.attention)}"
            )
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if self.norm_num_groups < 1 or bad:
            raise ExpansionError(
                f"closed_set_diffusion: unet.norm_num_groups={self.norm_num_groups} must divide every "
                f"block_out_channels entry {list(self.block_out_channels)}"
            )
        if self.layers_per_block < 1 or not 0.0 <= self.dropout < 1.0:
            raise ExpansionError("closed_set_diffusion: need unet.layers_per_block >= 1 and 0 <= unet.dropout < 1")

    @property
    def downsampling(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def unet_spec(unet: str | Mapping[str, Any] | UNetSpec) -> UNetSpec:
    """A preset name (:data:`UNET_PRESETS`) or a mapping of :class:`UNetSpec` fields."""
    if isinstance(unet, UNetSpec):
        return unet
    if isinstance(unet, str):
        if unet not in UNET_PRESETS:
            raise ExpansionError(
                f"closed_set_diffusion: unknown unet preset {unet!r}; known: {sorted(UNET_PRESETS)} "
                "(or give a mapping of UNet settings)"
            )
        unet = UNET_PRESETS[unet]
    return from_mapping(UNetSpec, unet, "closed_set_diffusion: unet")


@dataclass(frozen=True)
class ScheduleSpec:
    """The forward process (DDPM): ``num_train_timesteps`` steps of a linear (beta_start..beta_end)
    or cosine (``squaredcos_cap_v2``) beta schedule; the network predicts epsilon or v."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ExpansionError(
                f"closed_set_diffusion: schedule.beta_schedule must be one of {BETA_SCHEDULES}, "
                f"got {self.beta_schedule!r}"
            )
        if self.prediction_type not in PREDICTION_TYPES:
            raise ExpansionError(
                f"closed_set_diffusion: schedule.prediction_type must be one of {PREDICTION_TYPES}, "
                f"got {self.prediction_type!r}"
            )
        if self.num_train_timesteps < 2 or not 0 < self.beta_start < self.beta_end < 1:
            raise ExpansionError(
                "closed_set_diffusion: need schedule.num_train_timesteps >= 2 and 0 < beta_start < beta_end < 1"
            )

    def training_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
            clip_sample=True,
        )


@dataclass(frozen=True)
class FitSettings:
    """Training of the generator on the training split (AdamW, linear warm-up then constant lr,
    grad-norm clipping, EMA with diffusers' warm-up ``decay = min(ema_max_decay, 1 - (1 + step) ** -ema_power)``).

    ``checkpoint_every`` only decides how much work a crash can lose; it never changes the result.
    """

    steps: int = 20000
    batch_size: int = 128
    lr: float = 2e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    ema_max_decay: float = 0.9999
    ema_power: float = 0.75
    hflip: bool = True
    label_dropout: float = 0.0
    seed: int = 0
    checkpoint_every: int = speed_only(1000)

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1 or self.warmup_steps < 0:
            raise ExpansionError(
                "closed_set_diffusion: need fit.steps >= 1, fit.batch_size >= 1, "
                "fit.checkpoint_every >= 1 and fit.warmup_steps >= 0"
            )
        if self.lr <= 0 or self.max_grad_norm <= 0 or self.weight_decay < 0:
            raise ExpansionError("closed_set_diffusion: need fit.lr > 0, fit.max_grad_norm > 0, fit.weight_decay >= 0")
        if not 0.0 <= self.label_dropout < 1.0 or not 0.0 <= self.ema_max_decay < 1.0 or self.ema_power <= 0:
            raise ExpansionError(
                "closed_set_diffusion: need 0 <= fit.label_dropout < 1, 0 <= fit.ema_max_decay < 1 "
                "and fit.ema_power > 0"
            )


# --------------------------------------------------------------------------- the network


def build_unet(
    spec: UNetSpec, *, channels: int, resolution: int, num_classes: int, null_class: bool, seed: int | None = None
):
    """``UNet2DModel`` with an ``nn.Embedding`` class embedding added to the time embedding;
    with ``null_class`` one more embedding (index ``num_classes``) is the unconditional label.
    With ``seed`` the initial weights come from it alone (not from torch's global RNG state)."""
    from diffusers import UNet2DModel

    check_resolution(spec, resolution)
    if seed is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_unet(
                spec, channels=channels, resolution=resolution, num_classes=num_classes, null_class=null_class
            )
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in spec.attention)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(spec.attention))
    return UNet2DModel(
        sample_size=resolution,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=spec.block_out_channels,
        layers_per_block=spec.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        norm_num_groups=spec.norm_num_groups,
        attention_head_dim=spec.attention_head_dim,
        dropout=spec.dropout,
        num_class_embeds=num_classes + int(null_class),
    )


def check_resolution(spec: UNetSpec, resolution: int) -> None:
    if resolution < spec.downsampling or resolution % spec.downsampling:
        raise ExpansionError(
            f"closed_set_diffusion: resolution {resolution} is not divisible by {spec.downsampling} "
            f"({len(spec.block_out_channels) - 1} downsamplings of the UNet); set method.resolution to a "
            f"multiple of {spec.downsampling} (e.g. {math.ceil(resolution / spec.downsampling) * spec.downsampling})"
        )


def model_resolution(spec: UNetSpec, image_size: int, resolution: int | None) -> int:
    """The side the UNet runs at: ``resolution`` if given (must divide by the UNet's downsampling), else
    the dataset's ``image_size`` rounded up to a multiple of it (28 px -> 32 px for 3 downsamplings)."""
    if resolution is not None:
        check_resolution(spec, int(resolution))
        return int(resolution)
    return max(spec.downsampling, math.ceil(int(image_size) / spec.downsampling) * spec.downsampling)


def to_model_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float ``[N, C, res, res]`` in [-1, 1] (bilinear, antialiased resize)."""
    x = images.float() / 127.5 - 1.0
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x.clamp(-1.0, 1.0).contiguous()


# --------------------------------------------------------------------------- training


def _stream_seed(seed: int, stream: str, index: int) -> int:
    """A well-mixed seed for item ``index`` of a named random stream (SplitMix64, as the image seeds)."""
    return int(derive(image_seeds(int(seed), [int(index)], 1), stream)[0, 0])


def batch_indices(step: int, batch_size: int, n: int, seed: int) -> torch.Tensor:
    """Images of training step ``step``: positions ``[step*B, (step+1)*B)`` of an endless sequence of
    seeded permutations of ``range(n)`` (one per epoch), computable for any step without replay."""
    positions = torch.arange(step * batch_size, (step + 1) * batch_size)
    epochs = positions // n
    out = torch.empty(batch_size, dtype=torch.long)
    for epoch in torch.unique(epochs).tolist():
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(_stream_seed(seed, "epoch", epoch)))
        rows = epochs == epoch
        out[rows] = perm[positions[rows] % n]
    return out


def _rng_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def save_checkpoint(
    path: Path, *, unet, ema, optimizer, step: int, losses: list[float], fit_key: dict[str, Any], device: torch.device
) -> None:
    """Everything a resumed fit needs, in one safetensors file written atomically (temp + ``os.replace``)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().cpu().contiguous() for k, v in unet.state_dict().items()
    }
    ema_state = ema.state_dict()
    for i, shadow in enumerate(ema_state.pop("shadow_params")):
        tensors[f"ema.{i}"] = shadow.detach().cpu().contiguous()
    opt_state = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for pid, state in opt_state["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                opt_scalars.setdefault(str(pid), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    for i in _rng_devices(device):
        tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
    tensors["losses"] = torch.tensor(losses, dtype=torch.float32)
    metadata = {
        "format": str(CHECKPOINT_FORMAT),
        "step": str(int(step)),
        "fit_key": json.dumps(fit_key, sort_keys=True, default=str),
        "ema": json.dumps(ema_state),
        "optim_param_groups": json.dumps(opt_state["param_groups"]),
        "optim_scalars": json.dumps(opt_scalars),
        "num_shadow": str(len(ema.shadow_params)),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_checkpoint(
    path: Path, *, unet, ema, optimizer, fit_key: dict[str, Any], device: torch.device
) -> tuple[int, list[float], dict[str, torch.Tensor]]:
    """Restore a :func:`save_checkpoint` file in place; returns (step, losses, RNG states)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        metadata = fh.metadata() or {}
    if metadata.get("format") != str(CHECKPOINT_FORMAT):
        raise ExpansionError(
            f"closed_set_diffusion: {path} is not a checkpoint of format {CHECKPOINT_FORMAT}; "
            "delete it to train from scratch"
        )
    saved_key = json.loads(metadata["fit_key"])
    if saved_key != json.loads(json.dumps(fit_key, sort_keys=True, default=str)):
        raise ExpansionError(
            f"closed_set_diffusion: checkpoint {path} was written by a fit with other settings; "
            "delete it to train from scratch"
        )
    tensors = load_file(str(path))
    unet.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    ema_state = json.loads(metadata["ema"])
    ema_state["shadow_params"] = [tensors[f"ema.{i}"].to(device) for i in range(int(metadata["num_shadow"]))]
    ema.load_state_dict(ema_state)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, scalars in json.loads(metadata["optim_scalars"]).items():
        state.setdefault(int(pid), {}).update(scalars)
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(metadata["optim_param_groups"])})
    rng = {k: v for k, v in tensors.items() if k.startswith("rng.")}
    return int(metadata["step"]), tensors["losses"].tolist(), rng


def train_diffusion(
    unet,
    schedule: ScheduleSpec,
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: FitSettings,
    *,
    checkpoint_path: Path,
    fit_key: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    mixed_precision: str = "bf16",
    null_class: int | None = None,
) -> dict[str, Any]:
    """Train ``unet`` in place with the DDPM objective on ``images`` (uint8 ``[N, C, H, W]`` at the
    model's resolution or resized to it) and ``labels``; resumes from ``checkpoint_path`` if it exists.

    Loss of step s: E || f(x_t, t, y) - target ||^2 with x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,
    t ~ U{0..T-1}, target eps (or v); y is replaced by ``null_class`` with probability
    ``settings.label_dropout`` (classifier-free guidance). bf16 autocast only on CUDA.
    On return ``unet`` holds the EMA weights (the model that is sampled) in eval mode, and the
    checkpoint is left in place (the caller deletes it once the model is saved).

    Returns ``{"steps", "resumed_from_step", "losses", "seconds", "device", "parameters"}``.
    """
    from diffusers.training_utils import EMAModel

    if mixed_precision not in MIXED_PRECISION:
        raise ExpansionError(
            f"closed_set_diffusion: mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}"
        )
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) != len(labels) or len(images) == 0:
        raise ExpansionError("closed_set_diffusion: training needs uint8 images [N, C, H, W] and N labels, N >= 1")
    if settings.label_dropout > 0 and null_class is None:
        raise ExpansionError("closed_set_diffusion: label_dropout > 0 needs a null class in the model")
    device = torch.device(device)
    fit_key = fit_key if fit_key is not None else {"settings": signature_of(settings)}
    use_amp = device.type == "cuda" and mixed_precision == "bf16"
    resolution = int(unet.config.sample_size)
    data = to_model_input(images, resolution).to(device)
    labels = torch.as_tensor(labels, dtype=torch.long).to(device)
    n = data.shape[0]
    scheduler = schedule.training_scheduler()
    alphas = scheduler.alphas_cumprod.to(device)
    num_t = schedule.num_train_timesteps

    unet.to(device).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    ema = EMAModel(
        unet.parameters(), decay=settings.ema_max_decay, use_ema_warmup=True, inv_gamma=1.0, power=settings.ema_power
    )
    start_step, losses = 0, []
    rng_state: dict[str, torch.Tensor] = {}
    if Path(checkpoint_path).is_file():
        start_step, losses, rng_state = load_checkpoint(
            Path(checkpoint_path), unet=unet, ema=ema, optimizer=optimizer, fit_key=fit_key, device=device
        )
    t0 = time.perf_counter()
    with torch.random.fork_rng(devices=_rng_devices(device)):  # dropout draws are seeded and checkpointed
        if rng_state:
            torch.set_rng_state(rng_state["rng.cpu"])
            for i in _rng_devices(device):
                if f"rng.cuda.{i}" in rng_state:
                    torch.cuda.set_rng_state(rng_state[f"rng.cuda.{i}"], i)
        else:
            torch.manual_seed(settings.seed)
        progress = ProgressLog("closed-set diffusion fit", settings.steps - start_step, "steps", log)
        for step in range(start_step, settings.steps):
            gen = torch.Generator().manual_seed(_stream_seed(settings.seed, "step", step))
            bs = settings.batch_size
            idx = batch_indices(step, bs, n, settings.seed).to(device)
            flip = torch.rand(bs, generator=gen) < 0.5
            timesteps = torch.randint(0, num_t, (bs,), generator=gen)
            noise = torch.randn((bs, *data.shape[1:]), generator=gen)
            drop = torch.rand(bs, generator=gen) < settings.label_dropout
            x0 = data[idx]
            if settings.hflip:
                x0 = torch.where(flip.to(device).view(-1, 1, 1, 1), x0.flip(-1), x0)
            y = labels[idx]
            if settings.label_dropout > 0:
                y = torch.where(drop.to(device), torch.full_like(y, int(null_class)), y)
            noise, timesteps = noise.to(device), timesteps.to(device)
            a = alphas[timesteps].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            target = noise if schedule.prediction_type == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            lr = settings.lr * min(1.0, (step + 1) / settings.warmup_steps) if settings.warmup_steps else settings.lr
            for group in optimizer.param_groups:
                group["lr"] = lr
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                pred = unet(xt, timesteps, class_labels=y).sample
            loss = F.mse_loss(pred.float(), target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), settings.max_grad_norm)
            optimizer.step()
            ema.step(unet.parameters())
            losses.append(float(loss.detach()))
            done = step + 1
            progress.update(done - start_step, f"step {done}/{settings.steps}, loss {losses[-1]:.4f}")
            if done % settings.checkpoint_every == 0 and done < settings.steps:
                save_checkpoint(
                    Path(checkpoint_path),
                    unet=unet,
                    ema=ema,
                    optimizer=optimizer,
                    step=done,
                    losses=losses,
                    fit_key=fit_key,
                    device=device,
                )
    ema.copy_to(unet.parameters())
    unet.eval().requires_grad_(False)
    return {
        "steps": settings.steps,
        "resumed_from_step": start_step,
        "losses": losses,
        "seconds": time.perf_counter() - t0,
        "device": str(device),
        "parameters": sum(p.numel() for p in unet.parameters()),
    }


# --------------------------------------------------------------------------- persistence


def model_available(model_dir: Path) -> bool:
    """True once :func:`save_model` completed (the DONE marker is written last)."""
    return (Path(model_dir) / DONE_MARKER).is_file()


def save_model(unet, schedule: ScheduleSpec, info: Mapping[str, Any], model_dir: Path) -> None:
    """``model_dir/{unet,scheduler,fit.json,DONE}``: the EMA UNet (safetensors) and the training
    schedule, built in a temporary folder and moved into place, so a crash never leaves a model
    that :func:`model_available` accepts."""
    with atomic_directory(Path(model_dir)) as tmp:  # replaces an incomplete earlier attempt (no DONE marker)
        unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        schedule.training_scheduler().save_pretrained(str(tmp / "scheduler"))
        (tmp / "fit.json").write_text(json.dumps(dict(info), indent=2) + "\n")
        (tmp / DONE_MARKER).write_text("ok\n")


def load_model(model_dir: Path):
    """The EMA ``UNet2DModel`` saved by :func:`save_model` (safetensors only), eval mode, no grad."""
    from diffusers import UNet2DModel

    if not model_available(model_dir):
        raise ExpansionError(f"closed_set_diffusion: no complete model in {model_dir} (missing {DONE_MARKER})")
    unet = UNet2DModel.from_pretrained(str(Path(model_dir) / "unet"), use_safetensors=True)
    return unet.eval().requires_grad_(False)


# --------------------------------------------------------------------------- sampling


def sampling_scheduler(schedule: ScheduleSpec, sampler: str):
    """DDIM (eta 0) or DPM-Solver++ (order 2, multistep) on the training schedule; both deterministic,
    with trailing timestep spacing (the first step starts from t = T - 1, pure noise)."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    config = schedule.training_scheduler().config
    if sampler == "ddim":
        return DDIMScheduler.from_config(config, timestep_spacing="trailing")
    if sampler == "dpm_solver":
        return DPMSolverMultistepScheduler.from_config(
            config, timestep_spacing="trailing", algorithm_type="dpmsolver++", solver_order=2
        )
    raise ExpansionError(f"closed_set_diffusion: sampler must be one of {SAMPLERS}, got {sampler!r}")


def sample_images(
    unet,
    scheduler,
    class_labels: torch.Tensor,
    seeds: torch.Tensor,
    *,
    num_inference_steps: int,
    guidance_scale: float = 1.0,
    null_class: int | None = None,
    mixed_precision: str = "no",
) -> torch.Tensor:
    """One batched denoising loop for N images: image i is a sample of class ``class_labels[i]`` whose
    initial noise comes from ``seeds[i]`` alone. Returns float ``[N, C, R, R]`` in [-1, 1]. The same
    seeds and labels give the same images in any batch, up to the float rounding of batched
    convolutions (on the CPU ~1e-6, which rarely moves a stored pixel by one grey level).

    With ``guidance_scale`` w != 1 (classifier-free guidance) each step evaluates the conditional and the
    ``null_class`` prediction in one forward pass: out = out_null + w (out_c - out_null).
    """
    device = next(unet.parameters()).device
    res, channels = int(unet.config.sample_size), int(unet.config.in_channels)
    seeds = seeds.reshape(-1)
    labels = class_labels.reshape(-1).to(device=device, dtype=torch.long)
    guided = guidance_scale != 1.0
    if guided and null_class is None:
        raise ExpansionError("closed_set_diffusion: classifier-free guidance needs a model trained with label_dropout")
    use_amp = device.type == "cuda" and mixed_precision == "bf16"
    x = per_image_rand(derive(seeds, "noise"), (channels, res, res), normal=True, device=device)
    scheduler.set_timesteps(num_inference_steps, device=device)
    x = x * scheduler.init_noise_sigma
    cond = torch.cat([torch.full_like(labels, int(null_class)), labels]) if guided else labels
    extra = {"eta": 0.0} if "eta" in _step_params(scheduler) else {}
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(x, t)
        model_in = torch.cat([model_in, model_in]) if guided else model_in
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
            out = unet(model_in, t, class_labels=cond).sample.float()
        if guided:
            out_null, out_cond = out.chunk(2)
            out = out_null + guidance_scale * (out_cond - out_null)
        x = scheduler.step(out, t, x, **extra).prev_sample
    return x.clamp(-1.0, 1.0)


def _step_params(scheduler) -> set[str]:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


# --------------------------------------------------------------------------- the expander


@dataclass(frozen=True)
class ClosedSetSettings:
    """``unet``: a preset of :data:`UNET_PRESETS` or a mapping of :class:`UNetSpec` fields; ``schedule``
    (:class:`ScheduleSpec`) and ``fit`` (:class:`FitSettings`); ``resolution``: the model's side (see
    :func:`model_resolution`; samples are resized back to the dataset's size); ``sampler`` (ddim |
    dpm_solver, both deterministic per image seed), ``num_inference_steps``, ``guidance_scale`` (1 = no
    classifier-free guidance; otherwise it needs ``fit.label_dropout`` > 0) and ``mixed_precision``
    (bf16 autocast on CUDA for training and sampling; ignored on the CPU)."""

    resolution: int | None = None
    unet: str | UNetSpec = "ddpm_cifar10"
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)
    fit: FitSettings = field(default_factory=FitSettings)
    sampler: str = "ddim"
    num_inference_steps: int = 50
    guidance_scale: float = 1.0
    mixed_precision: str = "bf16"

    def __post_init__(self) -> None:
        object.__setattr__(self, "unet", unet_spec(self.unet))
        if self.sampler not in SAMPLERS:
            raise ExpansionError(f"closed_set_diffusion: sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        if self.num_inference_steps < 1:
            raise ExpansionError(
                f"closed_set_diffusion: num_inference_steps must be >= 1, got {self.num_inference_steps}"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            raise ExpansionError(
                f"closed_set_diffusion: mixed_precision must be one of {MIXED_PRECISION}, got {self.mixed_precision!r}"
            )
        if self.guidance_scale != 1.0 and self.fit.label_dropout == 0:
            raise ExpansionError(
                "closed_set_diffusion: guidance_scale != 1 (classifier-free guidance) needs a model "
                "trained with fit.label_dropout > 0 (e.g. 0.1)"
            )
        if self.resolution is not None:
            check_resolution(self.unet, self.resolution)


class ClosedSetDiffusion(Expander):
    """Closed-set class-conditional diffusion (arXiv 2508.09550): fit on the training split, then the
    k outputs of a parent of class c are k samples of class c, each from its own image seed
    (settings: :class:`ClosedSetSettings`).

    Manifest fields: ``sampler``, ``sampling_steps``, ``guidance_scale``.
    """

    name = "closed_set_diffusion"
    settings_class = ClosedSetSettings
    needs_fit = True

    def __init__(self, ratio: int, **settings: Any) -> None:
        super().__init__(ratio, **settings)
        self.unet_spec, self.schedule, self.fit_settings = self.settings.unet, self.settings.schedule, self.settings.fit
        self.unet = None

    def fit_signature(self) -> dict[str, Any]:
        """What the trained weights depend on (not the ratio or the sampler: one fit serves them all)."""
        sig = signature_of(self.settings)
        return {
            "kind": "closed_set_diffusion",
            **{k: sig[k] for k in ("resolution", "unet", "schedule", "fit", "mixed_precision")},
        }

    @property
    def null_class(self) -> int | None:
        return len(self.context.class_names) if self.fit_settings.label_dropout > 0 else None

    def prepare(self, context: ExpansionContext) -> None:
        super().prepare(context)
        if not context.class_names:
            raise ExpansionError("closed_set_diffusion: the dataset has no class names (class-conditional model)")

    def fit(self, train: ImageSet, artifact_dir: Path) -> None:
        """Train (or resume, or load) the generator on the training split; cached in ``artifact_dir``."""
        images, labels = train_tensors(train)
        if images.shape[-1] != images.shape[-2]:
            raise ExpansionError(f"closed_set_diffusion: needs square images, got {tuple(images.shape[-2:])}")
        resolution = model_resolution(self.unet_spec, int(images.shape[-1]), self.settings.resolution)
        model_dir = Path(artifact_dir) / "model"
        if not model_available(model_dir):
            unet = build_unet(
                self.unet_spec,
                channels=int(images.shape[1]),
                resolution=resolution,
                num_classes=len(self.context.class_names),
                null_class=self.null_class is not None,
                seed=self.fit_settings.seed,
            )
            checkpoint = Path(artifact_dir) / CHECKPOINT_NAME
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            result = train_diffusion(
                unet,
                self.schedule,
                images,
                labels,
                self.fit_settings,
                checkpoint_path=checkpoint,
                fit_key=self.fit_signature(),
                device=device,
                mixed_precision=self.settings.mixed_precision,
                null_class=self.null_class,
            )
            save_model(unet.cpu(), self.schedule, fit_summary(result, n_images=len(images)), model_dir)
            checkpoint.unlink(missing_ok=True)
        self.fit_info = json.loads((model_dir / "fit.json").read_text())
        unet = load_model(model_dir)
        if int(unet.config.in_channels) != self.context.channels:
            raise ExpansionError(
                f"closed_set_diffusion: the model in {model_dir} has {unet.config.in_channels} "
                f"channels, the dataset {self.context.channels}"
            )
        self.unet = unet

    @torch.no_grad()
    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        if self.unet is None:
            raise ExpansionError("closed_set_diffusion: the generator is not fitted (run fit before expand)")
        b, k = seeds.shape
        num_classes = len(self.context.class_names)
        if labels.numel() != b or (b and (int(labels.min()) < 0 or int(labels.max()) >= num_classes)):
            raise ExpansionError(f"closed_set_diffusion: need {b} labels in [0, {num_classes})")
        p = self.settings
        class_labels = labels.reshape(-1).long().repeat_interleave(k)  # output (b, j) is a sample of labels[b]
        x = sample_images(
            self.unet,
            sampling_scheduler(self.schedule, p.sampler),
            class_labels,
            seeds.reshape(-1),
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            null_class=self.null_class,
            mixed_precision=p.mixed_precision,
        )
        size = int(self.context.image_size or images.shape[-1])
        images01 = (x + 1.0) / 2.0
        if images01.shape[-1] != size:
            images01 = F.interpolate(images01, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out = to_uint8(images01).reshape(b, k, *images01.shape[1:]).cpu()
        n = b * k
        fields = {
            "sampler": [p.sampler] * n,
            "sampling_steps": torch.full((b, k), p.num_inference_steps),
            "guidance_scale": [p.guidance_scale] * n,
        }
        return ExpansionOutput(images=out, fields=fields)


def fit_summary(result: Mapping[str, Any], n_images: int, points: int = 200) -> dict[str, Any]:
    """fit.json: steps, resume point, wall time and the loss curve as means over at most ``points`` windows."""
    losses = list(result["losses"])
    every = max(1, math.ceil(len(losses) / points))
    curve = [sum(losses[i : i + every]) / len(losses[i : i + every]) for i in range(0, len(losses), every)]
    return {
        "steps": result["steps"],
        "resumed_from_step": result["resumed_from_step"],
        "seconds": round(result["seconds"], 3),
        "device": result["device"],
        "parameters": result["parameters"],
        "train_images": n_images,
        "loss_curve_every": every,
        "loss_curve": [round(v, 6) for v in curve],
    }
