"""``sd_txt2img``: open-set generative augmentation (the closed-set paper's open-set arm, seed 002): a pretrained
text-to-image Stable Diffusion, no seed image, k images per real image of each class from the class prompt.
Reference settings: Diff-Mix's ``real-gen`` (``real_mix.py:25-99``: SD v1.5, DPM-Solver++ 25 steps, CFG 7.5,
512 px); its prompt "a photo of a <Class_Name>" is a quirk we do not copy: the plain class name, optionally
with a super-class (", a type of {super}")."""

from __future__ import annotations

import torch

from ..base import ExpansionOutput
from ..stable_diffusion import StableDiffusionExpander


class SDTxt2Img(StableDiffusionExpander):
    name = "sd_txt2img"

    def expand(self, images: torch.Tensor, labels: torch.Tensor, seeds: torch.Tensor) -> ExpansionOutput:
        """k images per seed, each from its own seed:

        1. place the networks on the device;
        2. the class prompt of every output image (the seed image itself is not used);
        3. per-image Gaussian latents scaled by the sampler's initial sigma;
        4. the sampler's steps under classifier-free guidance;
        5. decode and store at ``output_size``.
        """
        b, k = seeds.shape
        flat = seeds.reshape(-1)
        # 1. place
        self._place(images.device)
        # 2. prompts
        prompts = self.class_prompts(labels, k)
        # 3. start from noise
        scheduler, latents, timesteps = self.start(None, flat, 1.0, self.latent_shape())
        # 4. denoise
        latents = self.sample(scheduler, latents, timesteps, self.conditioning(prompts, images.device), flat)
        # 5. decode
        decoded = self.decode_latents(latents)
        n = b * k
        fields = {"prompt": prompts, "guidance_scale": [self.settings.guidance_scale] * n}
        return ExpansionOutput(self.stored(decoded, b, k), fields)
