"""Prepare (encode + mask) and invert: the two compute stages between loading and scoring
(docs/architecture.md, "Stages").

``prepare`` encodes a batch of images and builds each one's partial representation;
``recover`` runs the inversion on the engine the configuration names. Both take the
images' ids: every random draw of an image is keyed by ``(run seed, image id)``, so an
image's result does not depend on the batch it ran in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from cgidm.config import AuthConfig
from cgidm.masks import block_mask
from cgidm.models import ModelPair
from cgidm.reference import invert, partial_representation, unet_eps_fn
from cgidm.rng import image_key


@dataclass
class Prepared:
    """Encoded inputs of a batch: ``x0``, ``x_init`` ``[B, C, h, w]``; ``mask [C, h, w]``;
    images and partial images ``[B, 3, H, W]`` in [-1, 1]; ``ids`` ``[B]`` and their
    draw keys ``keys [B]`` int64 (``rng.image_key(seed, id)``)."""

    x0: torch.Tensor
    x_init: torch.Tensor
    mask: torch.Tensor
    images: torch.Tensor
    partial_images: torch.Tensor
    keys: torch.Tensor
    ids: list[str] = field(default_factory=list)


def make_mask(pair: ModelPair, cfg: AuthConfig) -> torch.Tensor:
    h = pair.latent_size
    blocks = cfg.blocks_per_side or max(1, h // 4)
    return block_mask(h, h, pair.latent_channels, blocks, cfg.pass_rate, device=pair.device)


@torch.no_grad()
def prepare(pair: ModelPair, images: torch.Tensor, ids: Sequence[str], cfg: AuthConfig) -> Prepared:
    """Encode (sampled, one generator per image, seeded by its key), mask, and build the
    partial representation (decode the masked latent to an 8-bit image, encode again)."""
    device = pair.device
    keys = [image_key(cfg.seed, i) for i in ids]
    gens = [torch.Generator(device=device).manual_seed(k) for k in keys]
    mask = make_mask(pair, cfg)
    x0s, inits, partials = [], [], []
    for img, g in zip(images, gens):
        x0 = pair.codec.encode(img[None].to(device), generator=g)
        x_init, partial = partial_representation(pair.codec, x0, mask, generator=g)
        x0s.append(x0)
        inits.append(x_init)
        partials.append(partial)
    return Prepared(torch.cat(x0s), torch.cat(inits), mask, images, torch.cat(partials),
                    torch.tensor(keys, dtype=torch.int64, device=device), list(ids))


def recover(pair: ModelPair, prep: Prepared, cfg: AuthConfig, callback=None):
    """PGD on the contrast loss; returns the reference's ``InversionResult``."""
    from cgidm.ops import get_ops

    c_ft, c_pre = pair.encode_prompt(cfg.prompt)
    if cfg.engine == "engine":
        from cgidm.engine import Engine

        # One bucket per call: a graph captured here serves this batch only.
        engine = Engine(
            pair.unet_ft, pair.unet_pre, c_ft, c_pre, pair.abar, prep.x0.shape[1:], cfg.pgd,
            batch=prep.x0.shape[0], device=pair.device, impl=cfg.impl,
        )
        return engine.invert(prep.x0, prep.x_init, prep.mask, prep.keys, callback=callback)
    return invert(
        unet_eps_fn(pair.unet_ft), unet_eps_fn(pair.unet_pre), prep.x0, prep.x_init, prep.mask,
        c_ft, c_pre, pair.abar, cfg.pgd, keys=prep.keys, ops=get_ops(cfg.impl), callback=callback,
    )


def resolve_prompt(cfg: AuthConfig, pair: ModelPair) -> tuple[AuthConfig, str]:
    """The prompt both models encode: the one given, else the one the fine-tune's
    checkpoint names (training metadata); returns the configuration with it and where it
    came from. Without either, a ``ValueError`` says what to pass: a generic prompt
    weakens the contrast (docs/faithfulness.md, "Prompt")."""
    if cfg.prompt is not None:
        return cfg, "given"
    from cgidm.checkpoints import find_prompt

    prompt, where = find_prompt(pair.info.get("finetuned"), pair.info.get("lora"))
    if prompt is None:
        raise ValueError(
            "no prompt: the fine-tune does not say which prompt it was trained with "
            f"({where}); pass --prompt TEXT, the instance prompt of the fine-tune (e.g. 'sks style')"
        )
    return cfg.replace(prompt=prompt), where
