"""GIF-MAE: guided imagination with a masked-autoencoder prior (arXiv 2211.13976).

The prior is a pixel-reconstruction MAE with its decoder: transformers'
``ViTMAEForPreTraining`` (default ``facebook/vit-mae-large``: ViT-L/16 encoder,
197 x 1024 tokens at 224 px, 8-layer 512-wide decoder). For each seed image and
each of its k output images (all seeds of a batch at once; every random draw
from the output image's own seed):

1. preprocess: RGB in [0, 1], bicubic resize to the model's ``image_size`` (224),
   optionally (``augment``) RandomRotation(15) + hflip as in GIF-SD, then the MAE
   image processor's normalisation (ImageNet mean/std);
2. encode: the MAE encoder with ``mask_ratio`` of the patches dropped (0 = the
   whole image; the random mask comes from the image's seed through the model's
   ``noise`` argument). The latent ``z0`` is the encoder's ``last_hidden_state``
   ``[N, 1 + L_kept, D]`` (CLS + kept tokens, after the final LayerNorm);
3. GIF: perturb the tokens channel-wise, ``z' = z0 * (1 + e) + b`` with
   ``e ~ U(0, 1)`` and ``b ~ N(0, 1)`` of shape ``[N, 1, D]`` (one value per hidden
   channel, shared by all tokens of the image -- the token axis is dim 1 and the
   channels are the LAST dim, unlike the ``[N, C, H, W]`` latents of GIF-SD), score
   the decoded samples of each seed with the guide, one signed-gradient step,
   project onto the L-inf ball around ``z0`` (see :mod:`expansion.guidance`);
4. decode: ``model.decoder(z, ids_restore)`` -> per-patch pixels -> ``unpatchify``
   -> inverse normalisation -> [0, 1]. With ``mask_ratio > 0`` the image is the
   decoder's prediction of ALL patches (visible ones included: the perturbation acts
   on them too), not the MAE demo's paste of the visible input patches.

Pixel targets. An MAE trained with ``norm_pix_loss`` predicts each patch normalised to
zero mean / unit variance (over its p*p*3 values), which cannot be mapped back to
pixels from the output alone. The released ``facebook/vit-mae-*`` checkpoints are
converted from the pixel-target "visualize" checkpoints and have
``norm_pix_loss: false``: their output is in the normalised image space and is
un-normalised with the ImageNet mean/std. When a model has ``norm_pix_loss: true``,
each predicted patch is de-normalised with the mean and variance of the same patch
of the (preprocessed) seed input, which is always at hand -- exact for a perfect
reconstruction; with ``mask_ratio > 0`` the masked patches borrow their input
statistics too. In that mode guidance can change a patch's structure, not its mean
colour or contrast.

Radius. GIF's paper gives no GIF-MAE settings (the spec leaves them open), so
``radius`` is a documented choice, and it is RELATIVE: the L-inf radius around each
image's ``z0`` is ``radius * std(z0)`` (std over all its tokens and channels). The
MAE latent is the output of the encoder's final LayerNorm, so its scale is set by
the learned LayerNorm gain (about 1, but model dependent); measuring it per image
keeps the setting meaningful for any MAE. The default 0.8 token std matches the
relative size of GIF-SD's default radius (0.8 on the unit-variance scaled SD latent):
each hidden channel may move by up to 0.8 of a typical token value. Use smaller
values (GIF-SD uses 0.1 on the medical sets) to stay closer to the seed. The manifest
records both ``radius`` (relative) and ``radius_abs`` (per image).

Other choices: all tokens (CLS included, which the decoder also reads) are
perturbed; with ``augment: false`` and ``mask_ratio: 0`` a seed's k copies share one
encoder pass. ``dtype: auto`` runs the MAE in bfloat16 on GPUs that support it
(float16 otherwise) and in float32 on CPU; the perturbation, the guide and the
criteria stay in float32.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .gif_base import GifExpander, check_dtype, pretrained_source, resolve_dtype
from .base import ExpansionContext, ExpansionError, ExpansionOutput
from .guidance import criteria, guided_perturbation
from .guides import Guide, to_rgb
from .seeding import derive, per_image_rand

#: ViTMAEImageProcessor's normalisation (facebook/vit-mae-* preprocessor_config.json: ImageNet mean/std);
#: a model config carrying image_mean/image_std overrides it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the +eps of ViTMAEForPreTraining's norm_pix_loss target
NORM_PIX_EPS = 1.0e-6


def load_mae(model_id: str, revision: str | None = None, local_files_only: bool | None = None):
    """``ViTMAEForPreTraining`` (encoder + decoder) from a hub id or a local folder
    (``save_pretrained`` layout). A missing model is an error that says how to get it."""
    from transformers import ViTMAEForPreTraining

    source, kwargs = pretrained_source("MAE", model_id, revision, local_files_only, (
        "set method.model_id to a transformers "
        "ViTMAEForPreTraining folder (config.json + model.safetensors) or a hub id such as "
        "facebook/vit-mae-large"))
    try:
        model = ViTMAEForPreTraining.from_pretrained(source, **kwargs)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ExpansionError(
            f"MAE weights {model_id!r} are not available here ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Provide them: download once on a machine with "
            f"network (`huggingface-cli download {model_id}`, cached under HF_HOME), or set method.model_id to a "
            "local folder saved with ViTMAEForPreTraining.save_pretrained."
        ) from exc
    return model


def _image_size(config) -> int:
    size = config.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return int(size)


def rotate_flip(x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
    """GIF-SD's seed augmentation on ``x [N, C, H, W]`` in [0, 1]: a rotation in [-15, 15] deg and a
    horizontal flip with p=0.5 per image, drawn from ``seeds [N]`` (one batched grid_sample, zero fill)."""
    draws = per_image_rand(derive(seeds, "augment"), (2,), device=x.device).reshape(-1, 2)
    angle = (draws[:, 0] * 30 - 15) * (math.pi / 180)
    flip = torch.where(draws[:, 1] < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * flip, -sin, torch.zeros_like(cos)], -1),
                         torch.stack([sin * flip, cos, torch.zeros_like(cos)], -1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class GifMAE(GifExpander):
    name = "gif_mae"
    speed_only_params = ("batch_size", "num_workers", "guidance_chunk", "local_files_only")

    def __init__(self, ratio: int, model_id: str = "facebook/vit-mae-large", revision: str | None = None,
                 mask_ratio: float = 0.0, radius: float = 0.8, guide: Mapping[str, Any] | None = None,
                 guidance: Mapping[str, Any] | None = None, group_size: int | None = None, augment: bool = True,
                 output_size: int | None = 224, dtype: str = "auto", guidance_chunk: int | None = None,
                 local_files_only: bool | None = None, batch_size: int = 8, num_workers: int = 0):
        guide = dict(guide or {"kind": "clip", "arch": "ViT-B-32", "pretrained": "openai"})
        guidance = dict(guidance or {})
        super().__init__(ratio, model_id=model_id, revision=revision, mask_ratio=float(mask_ratio),
                         radius=float(radius), guide=guide, guidance=guidance, group_size=group_size,
                         augment=bool(augment), output_size=output_size, dtype=dtype, guidance_chunk=guidance_chunk,
                         local_files_only=local_files_only, batch_size=batch_size, num_workers=num_workers)
        if not 0.0 <= float(mask_ratio) < 1.0:
            raise ExpansionError(f"{self.name}: mask_ratio must be in [0, 1), got {mask_ratio}")
        check_dtype(self.name, "dtype", dtype)
        self.init_guidance(guide, radius, guidance)
        self.mae = None
        self._dtype_set_for: str | None = None

    # -- set-up ------------------------------------------------------------------
    def prepare(self, context: ExpansionContext) -> None:
        super().prepare(context)
        p = self.params
        self.set_components(load_mae(p["model_id"], p["revision"], p["local_files_only"]))
        self.build_clip_guide()

    def set_components(self, model, guide: Guide | None = None) -> None:
        """Use an already-built ``ViTMAEForPreTraining`` and, optionally, a guide (tests, benchmarks
        with random weights at the real architecture size)."""
        config = model.config
        if int(config.num_channels) != 3:
            raise ExpansionError(f"{self.name}: the MAE must take RGB input (num_channels 3), got {config.num_channels}")
        self.mae = model.eval().requires_grad_(False)
        self.image_size = _image_size(config)
        mean = getattr(config, "image_mean", None) or IMAGENET_MEAN
        std = getattr(config, "image_std", None) or IMAGENET_STD
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._dtype_set_for = None
        if guide is not None:
            self.guide = guide

    def fit_signature(self) -> dict[str, Any]:
        return {"kind": "mae", "model_id": self.params["model_id"], "revision": self.params["revision"],
                "probe": self.probe_fit_signature()}

    def _set_dtype(self, device: torch.device) -> None:
        if self.mae is None:
            raise ExpansionError(f"{self.name}: no MAE loaded (prepare() or set_components() not run)")
        if self._dtype_set_for == str(device):
            return
        self.model_dtype = resolve_dtype(self.params["dtype"], device)
        self.mae.to(device=device, dtype=self.model_dtype)
        self.pixel_mean, self.pixel_std = self.pixel_mean.to(device), self.pixel_std.to(device)
        self._dtype_set_for = str(device)

    # -- the prior: encode / decode ---------------------------------------------------------
    def resize_to_model(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) ``[B, C, H, W]`` -> RGB in [0, 1] at the model's image size (bicubic)."""
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = to_rgb(x)
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=x.shape[-1] > size).clamp(0, 1)
        return x

    def _preprocess(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` and seeds ``[B, k]`` -> normalised MAE input ``[B*k, 3, S, S]``."""
        k = seeds.shape[1]
        x = self.resize_to_model(images).repeat_interleave(k, dim=0)
        if self.params["augment"]:
            x = rotate_flip(x, seeds.reshape(-1))
        return (x - self.pixel_mean) / self.pixel_std

    def _mask_noise(self, flat_seeds: torch.Tensor, device) -> torch.Tensor:
        """ViTMAE's ``noise [N, L]``: the patches are kept in argsort order of the noise. With mask_ratio 0
        the identity order (no random draw); otherwise one uniform draw per image from its seed."""
        n_patches = (self.image_size // int(self.mae.config.patch_size)) ** 2
        if self.params["mask_ratio"] == 0:
            return torch.arange(n_patches, dtype=torch.float32, device=device).expand(len(flat_seeds), -1)
        return per_image_rand(derive(flat_seeds, "mae_mask"), (n_patches,), device=device)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, flat_seeds: torch.Tensor):
        """Normalised input ``[N, 3, S, S]`` -> (z0 ``[N, 1 + L_kept, D]`` fp32, ids_restore ``[N, L]``,
        per-patch (mean, std) of the input for norm_pix models or None)."""
        self._set_dtype(x.device)
        cfg = self.mae.config
        for c in {id(cfg): cfg, id(self.mae.vit.config): self.mae.vit.config,
                  id(self.mae.vit.embeddings.config): self.mae.vit.embeddings.config}.values():
            c.mask_ratio = self.params["mask_ratio"]
        noise = self._mask_noise(flat_seeds, x.device)
        out = self.mae.vit(pixel_values=x.to(self.model_dtype), noise=noise)
        stats = None
        if cfg.norm_pix_loss:
            target = self.mae.patchify(x.float())
            stats = (target.mean(dim=-1, keepdim=True), (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5)
        return out.last_hidden_state.float(), out.ids_restore, stats

    def decode(self, latents: torch.Tensor, ids_restore: torch.Tensor, stats=None) -> torch.Tensor:
        """MAE tokens ``[N, 1 + L_kept, D]`` -> images in [0, 1] ``[N, 3, S, S]`` (differentiable)."""
        logits = self.mae.decoder(latents.to(self.model_dtype), ids_restore).logits.float()
        if self.mae.config.norm_pix_loss:
            if stats is None:
                raise ExpansionError(f"{self.name}: a norm_pix_loss MAE needs the input patch statistics to decode")
            mean, std = stats
            logits = logits * std + mean
        x = self.mae.unpatchify(logits, (self.image_size, self.image_size))
        return (x * self.pixel_std + self.pixel_mean).clamp(0, 1)

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Encode and decode without perturbation or guidance (no augmentation): ``[B, C, H, W]`` ->
        ``[B, 3, S, S]`` in [0, 1], to compare with :meth:`resize_to_model` of the same images."""
        self._set_dtype(images.device)
        flat = torch.zeros(images.shape[0], dtype=torch.long) if seeds is None else seeds.reshape(-1)
        x = (self.resize_to_model(images) - self.pixel_mean) / self.pixel_std
        z0, ids_restore, stats = self.encode(x, flat)
        return self.decode(z0, ids_restore, stats)

    # -- generation ---------------------------------------------------------------
    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        device = images.device
        self._set_dtype(device)
        b, k = seeds.shape
        flat = seeds.reshape(-1)
        if not self.params["augment"] and self.params["mask_ratio"] == 0:  # the k copies share one encoder pass
            x = self._preprocess(images, seeds[:, :1])
            z0, ids_restore, stats = self.encode(x, flat[::k])
            z0, ids_restore = z0.repeat_interleave(k, 0), ids_restore.repeat_interleave(k, 0)
            stats = None if stats is None else tuple(s.repeat_interleave(k, 0) for s in stats)
        else:
            z0, ids_restore, stats = self.encode(self._preprocess(images, seeds), flat)
        latents, fields = self._guide(images, z0, ids_restore, stats, seeds)
        with torch.no_grad():
            out = self.decode(latents, ids_restore, stats)
            final = self.guide(out)
        seed_probs = fields.pop("_seed_probs")
        n = b * k
        fields = {"mask_ratio": [self.params["mask_ratio"]] * n, "radius": [self.settings.radius] * n, **fields}
        fields["score_after"] = criteria(seed_probs, final.probs, final.embeddings, self._groups(b, k, device),
                                         self.settings).score.tolist()
        fields["guide_class"] = final.probs.argmax(-1).tolist()
        fields["guide_confidence"] = final.probs.max(-1).values.tolist()
        return ExpansionOutput(self._finish(out, b, k), fields)


    def _guide(self, images: torch.Tensor, z0: torch.Tensor, ids_restore: torch.Tensor, stats, seeds: torch.Tensor):
        """Step 3 of the module doc, in chunks of ``guidance_chunk`` seeds (memory)."""
        b, k = seeds.shape
        if self.guide is None:
            raise ExpansionError(f"{self.name}: no guide was built (prepare/fit not run)")
        with torch.no_grad():
            seed_probs = self.guide(images.float() / 255.0).probs.repeat_interleave(k, 0)
        flat = seeds.reshape(-1)
        shape = (1, z0.shape[-1])  # [N, 1, D]: one value per hidden channel, broadcast over the tokens
        e = per_image_rand(derive(flat, "gif_e"), shape, device=z0.device)
        bias = per_image_rand(derive(flat, "gif_b"), shape, normal=True, device=z0.device)
        # per-image L-inf radius in units of the image's token std
        radius = self.settings.radius * z0.flatten(1).std(dim=1).view(-1, 1, 1)
        groups = self._groups(b, k, z0.device)
        chunk = int(self.params["guidance_chunk"] or b) * k
        latents, before = [], []
        for start in range(0, b * k, chunk):
            rows = slice(start, start + chunk)
            g = groups[rows] - groups[rows].min()
            st = None if stats is None else tuple(s[rows] for s in stats)

            def score_fn(z, rows=rows, g=g, st=st):
                out = self.guide(self.decode(z, ids_restore[rows], st))
                return criteria(seed_probs[rows], out.probs, out.embeddings, g, self.settings)

            res = guided_perturbation(z0[rows], e[rows], bias[rows], score_fn, self.settings, radius=radius[rows])
            latents.append(res.latents)
            before.append(res.score_before)
        return torch.cat(latents), {"radius_abs": radius.reshape(-1).tolist(),
                                    "score_before": torch.cat(before).tolist(), "_seed_probs": seed_probs}

