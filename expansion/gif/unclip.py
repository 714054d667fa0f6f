"""GIF-unCLIP: the open replacement of GIF-DALLE (arXiv 2211.13976). No official code exists (DALL-E 2
is closed); every setting here is ours.

GIF-DALLE perturbs the CLIP *image embedding* of a seed and decodes it with DALL-E 2's
decoder (closed weights). Here the decoder is an open unCLIP decoder that takes CLIP image
embeddings, selectable with ``backend`` (default ``stable_unclip``, as in ``conf/method/gif_unclip.yaml``):

* ``karlo`` -- diffusers' ``UnCLIPImageVariationPipeline`` (default
  ``kakaobrain/karlo-v1-alpha-image-variations``, a DALL-E 2 reproduction; diffusers 0.42 deprecates
  the pipeline and cannot ``from_pretrained`` it, so :func:`load_unclip` loads its ten components one
  by one from the repo's / folder's subfolders and builds the pipeline by hand): CLIP ViT-L/14
  image embedding -> ``text_proj`` (extra context tokens + additive time embedding, empty
  text) -> 64 px pixel-space decoder UNet (UnCLIPScheduler, classifier-free guidance) ->
  two-stage 256 px super-resolution UNets (``super_res_first`` / ``super_res_last``);
* ``stable_unclip`` -- diffusers' ``StableUnCLIPImg2ImgPipeline`` (default
  ``stabilityai/stable-diffusion-2-1-unclip-small``): CLIP image embedding, noise-augmented
  with the pipeline's ``image_normalizer`` + ``image_noising_scheduler`` at ``noise_level``
  (default 0) and concatenated with the noise level's timestep embedding, fed as
  ``class_labels`` to the SD 2.1 UNet (empty text prompt; the unconditional branch of
  classifier-free guidance gets zeros, as in the pipeline), latent sampling with the
  pipeline's scheduler, then the VAE decoder.

For each seed and each of its k output images (all seeds of a batch at once, every random
draw from the output image's own seed via :func:`expansion.seeding.derive`):

1. encode: RGB in [0, 1], bicubic resize to the image encoder's size, CLIP mean/std
   normalisation (the pipeline's ``feature_extractor`` values) -> ``CLIPVisionModelWithProjection``
   ``image_embeds`` ``z0 [B, D]`` (unnormalised, as both pipelines use it), repeated k times;
2. GIF (:mod:`expansion.guidance`): ``z' = z0 * (1 + e) + b`` with ``e ~ U(0, 1)``, ``b ~ N(0, 1)``
   of shape ``[N, D]`` (one value per embedding channel), score the decoded samples of each seed
   with the guide, signed-gradient step(s) on (e, b), projection onto the L-inf ball around z0;
3. decode the projected embedding with the full sampler (no gradient).

Scoring path (``score_path``). The pipelines' ``__call__`` run under ``no_grad``, so the sampling
loops are re-written here over the pipelines' components, once, and used both for guidance (with
gradients) and for the final decode (without); the final decode is the faithful sampler.

* ``cheap`` (the DEFAULT, both backends): guidance scores a SHORT decode -- ``score_steps``
  (default 2) sampler steps from the image's own initial noise, gradients through that short
  chain (and the VAE decoder for stable unCLIP); Karlo's cheap path stops at the decoder's 64 px
  base image (no super-resolution). The guide therefore scores a blurry preview of the sample the
  final decode produces from the same noise.
* ``faithful`` (available, opt in with ``score_path: faithful``): guidance backpropagates
  through exactly the final sampler (all ``num_inference_steps`` steps, and Karlo's
  super-resolution), as GIF-DALLE does through DALL-E 2's decoder. Memory grows with the number
  of steps (activations of every UNet call are kept); lower ``guidance_chunk`` to fit.

Radius. The CLIP image embeddings both pipelines consume are the projection head's raw
output (not L2-normalised), whose scale depends on the model. As in GIF-MAE, ``radius`` is
RELATIVE: the L-inf radius around each image's z0 is ``radius * std(z0)`` (std over its D
channels). Because the raw perturbation (``b ~ N(0, 1)`` plus ``z0 * e``) is much larger than
the per-channel std of a CLIP embedding (about 1/sqrt(D) of its norm), nearly every channel is
clipped to the ball's surface, so the perturbation's norm is about ``radius * ||z0 - mean||``
and the cosine similarity to the seed's embedding is about ``1 / sqrt(1 + radius**2)``. The
default 0.5 keeps it near 0.9: the variation stays recognisably the seed's content (unCLIP
variations of the unperturbed embedding already vary a lot), while 0.8 (GIF-SD's number) would
drop it to about 0.78. The manifest records ``radius`` (relative) and ``radius_abs``.

No seed augmentation (rotation/flip) is applied: the decoder only sees the embedding, and a
seed's k copies share one encoder pass; they differ by their own perturbation and noise.
``dtype: auto`` runs the image encoder and the UNets in bfloat16 on GPUs that support it
(float16 otherwise) and float32 on CPU; the stable-unCLIP VAE, the perturbation, the guide and
the criteria stay in float32.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..base import ExpansionError
from ..seeding import derive, generator, per_image_rand
from ..settings import speed_only
from ..weights import Weights, unavailable_error
from .guides import rgb_at
from .loading import check_dtype, pretrained_source, resolve_dtype
from .template import Encoding, GifExpander, GifSettings

BACKENDS = {
    "karlo": "kakaobrain/karlo-v1-alpha-image-variations",
    "stable_unclip": "stabilityai/stable-diffusion-2-1-unclip-small",
}
#: the pipelines' own __call__ defaults
DEFAULT_STEPS = {"karlo": 25, "stable_unclip": 20}
DEFAULT_GUIDANCE_SCALE = {"karlo": 8.0, "stable_unclip": 10.0}
KARLO_SUPER_RES_STEPS = 7
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SCORE_PATHS = ("cheap", "faithful")


#: Karlo's components: attribute / subfolder -> (module, class) (the hub repo's layout, loaded one by one)
KARLO_COMPONENTS = {
    "decoder": ("diffusers", "UNet2DConditionModel"),
    "text_proj": ("text_proj", "UnCLIPTextProjModel"),
    "super_res_first": ("diffusers", "UNet2DModel"),
    "super_res_last": ("diffusers", "UNet2DModel"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
    "feature_extractor": ("transformers", "CLIPImageProcessor"),
    "decoder_scheduler": ("diffusers", "UnCLIPScheduler"),
    "super_res_scheduler": ("diffusers", "UnCLIPScheduler"),
}


class KarloComponents:
    """Karlo's components as plain attributes (what the sampling loop here uses), for diffusers versions
    that no longer ship ``UnCLIPImageVariationPipeline``."""

    def __init__(self, **components: Any):
        missing = sorted(set(KARLO_COMPONENTS) - set(components))
        if missing:
            raise ExpansionError(f"gif_unclip: Karlo components missing: {missing}")
        self.components = dict(components)
        for name, module in components.items():
            setattr(self, name, module)


def _text_proj_class():
    """diffusers' ``UnCLIPTextProjModel``: deprecated (and moved) in recent diffusers."""
    for module in ("diffusers.pipelines.deprecated.unclip.text_proj", "diffusers.pipelines.unclip.text_proj"):
        try:
            return __import__(module, fromlist=["UnCLIPTextProjModel"]).UnCLIPTextProjModel
        except (ImportError, AttributeError):
            continue
    raise ExpansionError(
        "gif_unclip: this diffusers has no UnCLIPTextProjModel (needed by backend karlo); "
        "use backend stable_unclip or a diffusers release that ships the unCLIP pipelines"
    )


def _karlo_pipeline_class():
    try:
        from diffusers import UnCLIPImageVariationPipeline
    except ImportError:
        return None
    return UnCLIPImageVariationPipeline


def _pipeline_class(backend: str):
    if backend == "karlo":
        return _karlo_pipeline_class() or KarloComponents
    from diffusers import StableUnCLIPImg2ImgPipeline

    return StableUnCLIPImg2ImgPipeline


def _load_karlo(source: str, kwargs: dict[str, Any]):
    """Karlo, component by component (``from_pretrained(source, subfolder=name)``), then the pipeline built
    by hand: diffusers 0.42 cannot ``from_pretrained`` the deprecated ``UnCLIPImageVariationPipeline`` (its
    model_index names text_proj under the ``unclip`` library, which is no longer importable)."""
    import diffusers
    import transformers

    libs = {"diffusers": diffusers, "transformers": transformers}
    parts: dict[str, Any] = {}
    for name, (lib, cls_name) in KARLO_COMPONENTS.items():
        cls = _text_proj_class() if lib == "text_proj" else getattr(libs[lib], cls_name)
        parts[name] = cls.from_pretrained(source, subfolder=name, **kwargs)
    cls = _karlo_pipeline_class()
    return cls(**parts) if cls is not None else KarloComponents(**parts)


def unclip_weights(backend: str, model_id: str | None = None, revision: str | None = None) -> Weights:
    what = f"unCLIP ({backend})"
    return Weights(what, model_id or BACKENDS[backend], "method.model_id", revision, hub_files=("model_index.json",))


def load_unclip(
    backend: str, model_id: str | None = None, revision: str | None = None, local_files_only: bool | None = None
):
    """The backend's diffusers pipeline from a hub id or a local folder (``save_pretrained`` of the pipeline,
    or for Karlo any folder with the hub repo's component subfolders). A missing model is an error that says
    how to get it."""
    if backend not in BACKENDS:
        raise ExpansionError(f"gif_unclip: backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    model_id = model_id or BACKENDS[backend]
    cls = _pipeline_class(backend)
    layout = (
        "model_index.json + its components"
        if backend == "stable_unclip"
        else "subfolders " + ", ".join(KARLO_COMPONENTS)
    )
    source, kwargs = pretrained_source(
        "unCLIP",
        model_id,
        revision,
        local_files_only,
        (
            "set method.model_id to a diffusers "
            f"{cls.__name__} folder ({layout}) or a hub id such as {BACKENDS[backend]}"
        ),
    )
    try:
        pipe = _load_karlo(source, kwargs) if backend == "karlo" else cls.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise unavailable_error(
            unclip_weights(backend, model_id, revision), exc, f"saved with {cls.__name__}.save_pretrained ({layout})"
        ) from exc
    return pipe


def _step_kwargs(scheduler, gens: list[torch.Generator] | None) -> dict[str, Any]:
    params = set(inspect.signature(scheduler.step).parameters)
    kw: dict[str, Any] = {}
    if "eta" in params:
        kw["eta"] = 0.0
    if "generator" in params and gens is not None:
        kw["generator"] = gens if len(gens) > 1 else gens[0]
    return kw


@dataclass(frozen=True)
class UnCLIPSettings(GifSettings):
    """GIF-unCLIP's settings: GIF's (``radius`` relative to each embedding's channel std; 0.5 keeps
    cos(seed, perturbed) near 0.89) and the decoder's: ``backend`` and its model (None = the
    backend's default), the guidance ``score_path`` (``score_steps`` for the cheap one), sampler
    steps and classifier-free guidance (None = the pipeline's defaults), stable unCLIP's
    ``noise_level`` and ``resolution``, ``dtype``. Settings another backend does not read are
    normalised to None, so they stay out of the store key."""

    radius: float = 0.5
    backend: str = "stable_unclip"
    model_id: str | None = None
    revision: str | None = None
    score_path: str = "cheap"
    score_steps: int | None = 2
    num_inference_steps: int | None = None
    super_res_num_inference_steps: int | None = None
    guidance_scale: float | None = None
    noise_level: int | None = 0
    resolution: int | None = None
    dtype: str = "auto"
    local_files_only: bool | None = speed_only()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backend not in BACKENDS:
            raise ExpansionError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")
        if self.score_path not in SCORE_PATHS:
            raise ExpansionError(f"score_path must be one of {SCORE_PATHS}, got {self.score_path!r}")
        check_dtype("dtype", self.dtype)
        karlo, cheap = self.backend == "karlo", self.score_path == "cheap"
        resolved = {
            "model_id": self.model_id or BACKENDS[self.backend],
            "num_inference_steps": self.num_inference_steps or DEFAULT_STEPS[self.backend],
            "score_steps": (self.score_steps or 2) if cheap else None,
            "super_res_num_inference_steps": (self.super_res_num_inference_steps or KARLO_SUPER_RES_STEPS)
            if karlo
            else None,
            "guidance_scale": float(
                DEFAULT_GUIDANCE_SCALE[self.backend] if self.guidance_scale is None else self.guidance_scale
            ),
            "noise_level": None if karlo else int(self.noise_level or 0),
            "resolution": None if karlo else self.resolution,
        }
        for name, value in resolved.items():
            object.__setattr__(self, name, value)
        if (cheap and self.score_steps < 1) or self.num_inference_steps < 1:
            raise ExpansionError("score_steps and num_inference_steps must be >= 1")


class GifUnCLIP(GifExpander):
    name = "gif_unclip"
    settings_class = UnCLIPSettings
    radius_is_relative = True

    def __init__(self, ratio: int, **settings: Any):
        super().__init__(ratio, **settings)
        self.pipe = None

    # -- the prior's loader -----------------------------------------------------------------
    def prior_weights(self) -> list[Weights]:
        return [unclip_weights(self.settings.backend, self.settings.model_id, self.settings.revision)]

    def load_prior(self) -> None:
        s = self.settings
        self.set_components(load_unclip(s.backend, s.model_id, s.revision, s.local_files_only))

    def set_components(self, pipe) -> None:
        """Use an already-built pipeline of the configured backend (tests, benchmarks with random
        weights at the real architecture size)."""
        backend = self.settings.backend
        expected = _pipeline_class(backend)
        if not isinstance(pipe, (expected, KarloComponents) if backend == "karlo" else expected):
            raise ExpansionError(
                f"{self.name}: backend {backend} needs a {expected.__name__}, got {type(pipe).__name__}"
            )
        self.pipe = pipe
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval().requires_grad_(False)
        fe = getattr(pipe, "feature_extractor", None)
        mean = getattr(fe, "image_mean", None) or CLIP_MEAN
        std = getattr(fe, "image_std", None) or CLIP_STD
        self.register_buffer("clip_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("clip_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        size = pipe.image_encoder.config.image_size
        self.encoder_size = int(size[0] if isinstance(size, tuple | list) else size)
        self._placed_on = None

    def prior_fit_signature(self) -> dict[str, Any]:
        s = self.settings
        return {"kind": "unclip", "backend": s.backend, "model_id": s.model_id, "revision": s.revision}

    def _models(self) -> list[torch.nn.Module]:
        names = (
            ["image_encoder", "text_encoder", "text_proj", "decoder", "super_res_first", "super_res_last"]
            if self.settings.backend == "karlo"
            else ["image_encoder", "text_encoder", "unet"]
        )
        return [getattr(self.pipe, n) for n in names]

    def place(self, device: torch.device) -> None:
        if self.pipe is None:
            raise ExpansionError(f"{self.name}: no unCLIP pipeline loaded (prepare() or set_components() not run)")
        self.model_dtype = resolve_dtype(self.settings.dtype, device)
        for m in self._models():
            m.to(device=device, dtype=self.model_dtype)
        if self.settings.backend == "stable_unclip":
            self.pipe.vae.to(device=device, dtype=torch.float32)
            self.pipe.image_normalizer.to(device, torch.float32)
        self.clip_mean, self.clip_std = self.clip_mean.to(device), self.clip_std.to(device)

    # -- the prior: encode / decode ------------------------------------------------
    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) ``[B, C, H, W]`` -> CLIP image embeddings ``[B, D]`` (fp32)."""
        self._place(images.device)
        x = (rgb_at(images, self.encoder_size) - self.clip_mean) / self.clip_std
        return self.pipe.image_encoder(pixel_values=x.to(self.model_dtype)).image_embeds.float()

    def _empty_text(self, n: int, device):
        tok = self.pipe.tokenizer(
            [""],
            padding="max_length",
            max_length=self.pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        out = self.pipe.text_encoder(tok.input_ids.to(device))
        return out, tok.attention_mask.bool().to(device)

    def encode(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> Encoding:
        """z0: the seed's CLIP image embedding, shared by its k copies (one encoder pass); decode needs
        each output image's seed (its sampler noise)."""
        b, k = seeds.shape
        s = self.settings
        return Encoding(
            self.embed(images).repeat_interleave(k, 0),
            {"seeds": seeds.reshape(-1)},
            {"backend": [s.backend] * (b * k), "score_path": [s.score_path] * (b * k)},
        )

    def decode(self, z: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, final: bool) -> torch.Tensor:
        """Image embeddings ``[N, D]`` -> images in [0, 1] (differentiable when called with grad).
        The final decode and ``score_path: faithful`` run the full sampler (all steps, Karlo's
        super-resolution); guidance under ``score_path: cheap`` runs ``score_steps`` steps at the
        base resolution."""
        s = self.settings
        full = final or s.score_path == "faithful"
        steps = s.num_inference_steps if full else s.score_steps
        if s.backend == "karlo":
            return self._decode_karlo(z, inputs["seeds"], steps, super_res=full)
        return self._decode_stable(z, inputs["seeds"], steps)

    def _decode_stable(self, z: torch.Tensor, flat_seeds: torch.Tensor, steps: int) -> torch.Tensor:
        pipe, p = self.pipe, self.settings
        device, n = z.device, z.shape[0]
        # pipe.noise_image_embeddings, with per-image noise (normaliser and noising scheduler in fp32)
        level = torch.full((n,), p.noise_level, device=device, dtype=torch.long)
        emb_noise = per_image_rand(derive(flat_seeds, "embed_noise"), z.shape[1:], normal=True, device=device)
        from diffusers.models.embeddings import get_timestep_embedding

        emb = pipe.image_normalizer.scale(z.float())
        emb = pipe.image_noising_scheduler.add_noise(emb, timesteps=level, noise=emb_noise)
        emb = pipe.image_normalizer.unscale(emb)
        level_emb = get_timestep_embedding(
            timesteps=level, embedding_dim=emb.shape[-1], flip_sin_to_cos=True, downscale_freq_shift=0
        )
        class_labels = torch.cat([emb, level_emb.to(emb)], 1)
        text, _ = self._empty_text(n, device)
        cond = text[0].expand(n, -1, -1)
        cfg = p.guidance_scale > 1.0
        if cfg:
            class_labels = torch.cat([torch.zeros_like(class_labels), class_labels])
            cond = torch.cat([cond, cond])
        class_labels, cond = class_labels.to(self.model_dtype), cond.to(self.model_dtype)
        scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        res = p.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        shape = (pipe.unet.config.in_channels, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor)
        latents = per_image_rand(derive(flat_seeds, "latents"), shape, normal=True, device=device)
        latents = latents * scheduler.init_noise_sigma
        gens = [generator(s) for s in derive(flat_seeds, "step_noise").tolist()]
        kw = _step_kwargs(scheduler, gens)
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if cfg else latents
            model_in = scheduler.scale_model_input(model_in, t)
            eps = pipe.unet(
                model_in.to(self.model_dtype), t, encoder_hidden_states=cond, class_labels=class_labels
            ).sample.float()
            if cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + p.guidance_scale * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, **kw).prev_sample
        x = pipe.vae.decode(latents.float() / pipe.vae.config.scaling_factor).sample.float()
        return ((x + 1) / 2).clamp(0, 1)

    def _decode_karlo(self, z: torch.Tensor, flat_seeds: torch.Tensor, steps: int, super_res: bool) -> torch.Tensor:
        pipe, p = self.pipe, self.settings
        device, n = z.device, z.shape[0]
        text, mask = self._empty_text(n, device)
        prompt_embeds = text.text_embeds.expand(n, -1)
        hidden = text.last_hidden_state.expand(n, -1, -1)
        mask = mask.expand(n, -1)
        cfg = p.guidance_scale > 1.0
        if cfg:
            prompt_embeds, hidden, mask = (
                torch.cat([prompt_embeds] * 2),
                torch.cat([hidden] * 2),
                torch.cat([mask] * 2),
            )
        hidden, time_emb = pipe.text_proj(
            image_embeddings=z.to(self.model_dtype),
            prompt_embeds=prompt_embeds.to(self.model_dtype),
            text_encoder_hidden_states=hidden.to(self.model_dtype),
            do_classifier_free_guidance=cfg,
        )
        dec_mask = F.pad(mask, (pipe.text_proj.clip_extra_context_tokens, 0), value=True)
        scheduler = pipe.decoder_scheduler.__class__.from_config(pipe.decoder_scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
        size = pipe.decoder.config.sample_size
        shape = (pipe.decoder.config.in_channels, size, size)
        latents = per_image_rand(derive(flat_seeds, "latents"), shape, normal=True, device=device)
        latents = latents * scheduler.init_noise_sigma
        gens = [generator(s) for s in derive(flat_seeds, "step_noise").tolist()]
        for i, t in enumerate(timesteps):
            model_in = torch.cat([latents] * 2) if cfg else latents
            out = pipe.decoder(
                sample=model_in.to(self.model_dtype),
                timestep=t,
                encoder_hidden_states=hidden,
                class_labels=time_emb,
                attention_mask=dec_mask,
            ).sample.float()
            if cfg:
                out_u, out_c = out.chunk(2)
                out_u, _ = out_u.split(latents.shape[1], dim=1)
                out_c, var = out_c.split(latents.shape[1], dim=1)
                out = torch.cat([out_u + p.guidance_scale * (out_c - out_u), var], dim=1)
            prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
            latents = scheduler.step(
                out, t, latents, prev_timestep=prev, generator=gens if n > 1 else gens[0]
            ).prev_sample
        image = latents.clamp(-1, 1)
        if super_res:
            image = self._super_res(image, flat_seeds)
        return (image * 0.5 + 0.5).clamp(0, 1)

    def _super_res(self, small: torch.Tensor, flat_seeds: torch.Tensor) -> torch.Tensor:
        pipe, p = self.pipe, self.settings
        device, n = small.device, small.shape[0]
        scheduler = pipe.super_res_scheduler.__class__.from_config(pipe.super_res_scheduler.config)
        scheduler.set_timesteps(p.super_res_num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        size = pipe.super_res_first.config.sample_size
        shape = (pipe.super_res_first.config.in_channels // 2, size, size)
        latents = per_image_rand(derive(flat_seeds, "sr_latents"), shape, normal=True, device=device)
        latents = latents * scheduler.init_noise_sigma
        up = F.interpolate(small, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        gens = [generator(s) for s in derive(flat_seeds, "sr_noise").tolist()]
        for i, t in enumerate(timesteps):
            unet = pipe.super_res_last if i == len(timesteps) - 1 else pipe.super_res_first
            out = unet(sample=torch.cat([latents, up], 1).to(self.model_dtype), timestep=t).sample.float()
            prev = None if i + 1 == len(timesteps) else timesteps[i + 1]
            latents = scheduler.step(
                out, t, latents, prev_timestep=prev, generator=gens if n > 1 else gens[0]
            ).prev_sample
        return latents
