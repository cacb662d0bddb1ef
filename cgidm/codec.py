"""Image <-> latent codecs: the pipeline's VAE, or an identity codec for tiny models.

A codec maps images ``[B, 3, H, W]`` in [-1, 1] to scaled latents
``[B, C, H/f, W/f]`` (``encode``, sampled as the paper does) and back (``decode``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

IDENTITY_CODEC_CLASS = "IdentityCodec"


class VaeCodec:
    """A diffusers ``AutoencoderKL``: ``latent = vae.encode(img).latent_dist.sample() * s``.
    ``fp16_in_fp32``: asked for fp16, the VAE stays in fp32 (SDXL's VAE overflows in fp16;
    its config says ``force_upcast``); inputs are cast to its dtype, outputs are fp32."""

    def __init__(self, vae, fp16_in_fp32: bool = False) -> None:
        self.vae = vae
        self.fp16_in_fp32 = fp16_in_fp32
        self.scaling_factor = float(vae.config.scaling_factor)
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = int(vae.config.latent_channels)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.dtype)).latent_dist
        return dist.sample(generator=generator).float() * self.scaling_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        out = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample
        return out.float()

    def to(self, **kw) -> "VaeCodec":
        if self.fp16_in_fp32 and kw.get("dtype") == torch.float16:
            kw["dtype"] = torch.float32
        self.vae.to(**kw)
        return self


class IdentityCodec:
    """Pixels are the latent (``C = 3``, ``f = 1``): the codec of the tiny model world,
    where a VAE would only blur what the test is about."""

    scaling_factor = 1.0
    factor = 1
    latent_channels = 3
    dtype = torch.float32

    def encode(self, images: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return images.float().clone()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.float().clone()

    def to(self, **kw) -> "IdentityCodec":
        return self

    @staticmethod
    def save(directory: str | Path) -> None:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps({"_class_name": IDENTITY_CODEC_CLASS}) + "\n")
