"""GIF-MAE: GIF with a masked-autoencoder prior (arXiv 2211.13976). No official code exists; every
setting here is ours (docs/fidelity.md, "GIF-MAE and GIF-unCLIP").

The prior is transformers' ``ViTMAEForPreTraining`` (default ``facebook/vit-mae-large``: ViT-L/16,
197 x 1024 tokens at 224 px, with its pixel decoder):

1. preprocess: RGB in [0, 1], bicubic resize to the model's ``image_size``, optionally (``augment``)
   GIF-SD's rotation and flip, then the image processor's normalisation (ImageNet mean/std);
2. encode: the MAE encoder with ``mask_ratio`` of the patches dropped (0 = the whole image; the mask
   comes from the image's seed through the model's ``noise``); ``z0`` is ``last_hidden_state``
   ``[N, 1 + L_kept, D]``. The perturbation has shape ``[1, D]``: one value per hidden channel (the
   LAST dim), shared by all tokens;
3. decode: ``decoder(z, ids_restore)`` -> ``unpatchify`` -> inverse normalisation; a
   ``norm_pix_loss`` model's patches are de-normalised with the statistics of the seed's patches.

``radius`` is relative: a multiple of each image's token std (the latent's scale is set by the
encoder's final LayerNorm gain, model dependent); the default 0.8 matches GIF-SD's 0.8 on its
unit-variance latent. With ``augment: false`` and ``mask_ratio: 0`` a seed's k copies share one
encoder pass. ``dtype: auto`` runs the MAE in bfloat16 on GPUs that support it (float16 otherwise)
and float32 on the CPU; the perturbation, the guide and the criteria stay float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..base import ExpansionError
from ..seeding import derive, per_image_rand
from ..settings import speed_only
from ..weights import Weights, unavailable_error
from .guides import rgb_at
from .loading import check_dtype, pretrained_source, resolve_dtype
from .sd import rotate_flip
from .template import Encoding, GifExpander, GifSettings

#: ViTMAEImageProcessor's normalisation (ImageNet mean/std); a model config with image_mean/image_std overrides it
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: the +eps of ViTMAEForPreTraining's norm_pix_loss target
NORM_PIX_EPS = 1.0e-6


@dataclass(frozen=True)
class MAESettings(GifSettings):
    """GIF-MAE's settings: GIF's (``radius`` relative to each image's token std) and the prior's:
    the MAE (hub id or ``save_pretrained`` folder), ``mask_ratio``, seed ``augment``ation, ``dtype``."""

    model_id: str = "facebook/vit-mae-large"
    revision: str | None = None
    mask_ratio: float = 0.0
    augment: bool = True
    output_size: int | None = 224
    dtype: str = "auto"
    local_files_only: bool | None = speed_only()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ExpansionError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        check_dtype("dtype", self.dtype)


def mae_weights(model_id: str, revision: str | None = None) -> Weights:
    return Weights("MAE", model_id, "method.model_id", revision)


def load_mae(model_id: str, revision: str | None = None, local_files_only: bool | None = None):
    """``ViTMAEForPreTraining`` (encoder + decoder) from a hub id or a local folder
    (``save_pretrained`` layout). A missing model is an error that says how to get it."""
    from transformers import ViTMAEForPreTraining

    source, kwargs = pretrained_source(
        "MAE",
        model_id,
        revision,
        local_files_only,
        (
            "set method.model_id to a transformers "
            "ViTMAEForPreTraining folder (config.json + model.safetensors) or a hub id such as "
            "facebook/vit-mae-large"
        ),
    )
    try:
        model = ViTMAEForPreTraining.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise unavailable_error(
            mae_weights(model_id, revision), exc, "saved with ViTMAEForPreTraining.save_pretrained"
        ) from exc
    return model


class GifMAE(GifExpander):
    name = "gif_mae"
    settings_class = MAESettings
    radius_is_relative = True

    def __init__(self, ratio: int, **settings):
        super().__init__(ratio, **settings)
        self.mae = None

    # -- the prior's loader -----------------------------------------------------------------
    def prior_weights(self) -> list[Weights]:
        return [mae_weights(self.settings.model_id, self.settings.revision)]

    def load_prior(self) -> None:
        s = self.settings
        self.set_components(load_mae(s.model_id, s.revision, s.local_files_only))

    def set_components(self, model) -> None:
        """Use an already-built ``ViTMAEForPreTraining`` (tests, benchmarks with random weights)."""
        config = model.config
        if int(config.num_channels) != 3:
            raise ExpansionError(
                f"{self.name}: the MAE must take RGB input (num_channels 3), got {config.num_channels}"
            )
        self.mae = model.eval().requires_grad_(False)
        size = config.image_size
        self.image_size = int(size[0] if isinstance(size, tuple | list) else size)
        mean = getattr(config, "image_mean", None) or IMAGENET_MEAN
        std = getattr(config, "image_std", None) or IMAGENET_STD
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self._placed_on = None

    def place(self, device: torch.device) -> None:
        if self.mae is None:
            raise ExpansionError(f"{self.name}: no MAE loaded (prepare() or set_components() not run)")
        self.model_dtype = resolve_dtype(self.settings.dtype, device)
        self.mae.to(device=device, dtype=self.model_dtype)
        self.pixel_mean, self.pixel_std = self.pixel_mean.to(device), self.pixel_std.to(device)

    def prior_fit_signature(self) -> dict:
        return {"kind": "mae", "model_id": self.settings.model_id, "revision": self.settings.revision}

    # -- encode ---------------------------------------------------------------------------------
    def resize_to_model(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or [0, 1] float) ``[B, C, H, W]`` -> RGB in [0, 1] at the model's image size (bicubic)."""
        return rgb_at(images, self.image_size)

    def preprocess(self, images: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` and seeds ``[B, k]`` -> normalised MAE input ``[B*k, 3, S, S]``."""
        x = self.resize_to_model(images).repeat_interleave(seeds.shape[1], dim=0)
        if self.settings.augment:
            x = rotate_flip(x, seeds.reshape(-1))
        return (x - self.pixel_mean) / self.pixel_std

    def _mask_noise(self, flat_seeds: torch.Tensor, device) -> torch.Tensor:
        """ViTMAE's ``noise [N, L]``: the patches are kept in argsort order of the noise. With mask_ratio 0
        the identity order (no random draw); otherwise one uniform draw per image from its seed."""
        n_patches = (self.image_size // int(self.mae.config.patch_size)) ** 2
        if self.settings.mask_ratio == 0:
            return torch.arange(n_patches, dtype=torch.float32, device=device).expand(len(flat_seeds), -1)
        return per_image_rand(derive(flat_seeds, "mae_mask"), (n_patches,), device=device)

    def encode_tokens(self, x: torch.Tensor, flat_seeds: torch.Tensor) -> Encoding:
        """Normalised input ``[N, 3, S, S]`` -> z0 ``[N, 1 + L_kept, D]`` (fp32) and what decode needs:
        ``ids_restore [N, L]`` and, for norm_pix models, the input's per-patch mean and std."""
        self._place(x.device)
        cfg = self.mae.config
        for c in {
            id(cfg): cfg,
            id(self.mae.vit.config): self.mae.vit.config,
            id(self.mae.vit.embeddings.config): self.mae.vit.embeddings.config,
        }.values():
            c.mask_ratio = self.settings.mask_ratio
        out = self.mae.vit(pixel_values=x.to(self.model_dtype), noise=self._mask_noise(flat_seeds, x.device))
        inputs = {"ids_restore": out.ids_restore}
        if cfg.norm_pix_loss:
            target = self.mae.patchify(x.float())
            inputs["patch_mean"] = target.mean(dim=-1, keepdim=True)
            inputs["patch_std"] = (target.var(dim=-1, keepdim=True) + NORM_PIX_EPS) ** 0.5
        return Encoding(out.last_hidden_state.float(), inputs)

    def encode(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> Encoding:
        b, k = seeds.shape
        flat = seeds.reshape(-1)
        if not self.settings.augment and self.settings.mask_ratio == 0:  # the k copies share one encoder pass
            one = self.encode_tokens(self.preprocess(images, seeds[:, :1]), flat[::k])
            encoding = Encoding(
                one.z0.repeat_interleave(k, 0),
                {name: v.repeat_interleave(k, 0) for name, v in one.decode_inputs.items()},
            )
        else:
            encoding = self.encode_tokens(self.preprocess(images, seeds), flat)
        encoding.fields["mask_ratio"] = [self.settings.mask_ratio] * (b * k)
        return encoding

    # -- decode -------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor, inputs: Mapping[str, torch.Tensor], *, final: bool) -> torch.Tensor:
        """MAE tokens ``[N, 1 + L_kept, D]`` -> images in [0, 1] ``[N, 3, S, S]`` (differentiable)."""
        logits = self.mae.decoder(z.to(self.model_dtype), inputs["ids_restore"]).logits.float()
        if self.mae.config.norm_pix_loss:
            if "patch_mean" not in inputs:
                raise ExpansionError(f"{self.name}: a norm_pix_loss MAE needs the input patch statistics to decode")
            logits = logits * inputs["patch_std"] + inputs["patch_mean"]
        x = self.mae.unpatchify(logits, (self.image_size, self.image_size))
        return (x * self.pixel_std + self.pixel_mean).clamp(0, 1)

    def perturbation_shape(self, z0: torch.Tensor) -> tuple[int, ...]:
        return (1, z0.shape[-1])  # [N, 1, D]: one value per hidden channel, broadcast over the tokens

    @torch.no_grad()
    def reconstruct(self, images: torch.Tensor, seeds: torch.Tensor | None = None) -> torch.Tensor:
        """Encode and decode without perturbation, guidance or augmentation: ``[B, C, H, W]`` ->
        ``[B, 3, S, S]`` in [0, 1], to compare with :meth:`resize_to_model` of the same images."""
        self._place(images.device)
        flat = torch.zeros(images.shape[0], dtype=torch.long) if seeds is None else seeds.reshape(-1)
        x = (self.resize_to_model(images) - self.pixel_mean) / self.pixel_std
        encoding = self.encode_tokens(x, flat)
        return self.decode(encoding.z0, encoding.decode_inputs, final=True)
