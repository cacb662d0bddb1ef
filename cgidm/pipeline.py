"""Prepare (encode + mask) and invert: the two compute stages between loading and scoring
(docs/architecture.md, "Stages").

``prepare`` encodes a batch of images and builds each one's partial representation;
``recover`` runs the inversion on the engine the configuration names. Both take the
images' ids: every random draw of an image is keyed by ``(run seed, image id)``, so an
image's result does not depend on the batch it ran in.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

from cgidm.config import AuthConfig, check_t_max
from cgidm.masks import block_mask
from cgidm.models import ModelPair
from cgidm.reference import invert, partial_representation, unet_eps_fn
from cgidm.rng import image_key

log = logging.getLogger(__name__)


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


def _check_images(images: torch.Tensor, resolution: int) -> None:
    """What ``prepare`` takes, as ``images.load_image(path, resolution)`` gives it: a float
    batch at the pair's resolution, in [-1, 1] (uint8 pixels or another size would be
    encoded silently wrong, or fail deep in the VAE)."""
    where = "load images with cgidm.images.load_image(path, pair.resolution)"
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype} ({where})")
    if tuple(images.shape[2:]) != (resolution, resolution):
        raise ValueError(f"images must be {resolution} x {resolution} px, the pair's resolution, got "
                         f"{images.shape[2]} x {images.shape[3]} ({where})")
    lo, hi = float(images.min()), float(images.max())
    if not (-1.001 <= lo and hi <= 1.001):  # NaN fails too
        raise ValueError(f"images must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}] ({where})")


@torch.no_grad()
def prepare(pair: ModelPair, images: torch.Tensor, ids: Sequence[str], cfg: AuthConfig) -> Prepared:
    """Encode (sampled, one generator per image, seeded by its key), mask, and build the
    partial representation (decode the masked latent to an 8-bit image, encode again).
    ``images``: ``[B, 3, H, W]`` in [-1, 1]; ``ids``: one string per image."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be a [B, 3, H, W] tensor, got {getattr(images, 'shape', type(images))}")
    if isinstance(ids, str) or len(ids) != images.shape[0]:
        raise ValueError(f"ids must be a sequence of one id per image: {images.shape[0]} images, "
                         f"{'a string' if isinstance(ids, str) else f'{len(ids)} ids'}")
    _check_images(images, pair.resolution)
    if not isinstance(cfg, AuthConfig):
        raise TypeError(f"cfg must be an AuthConfig, got {type(cfg).__name__}")
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


def _engine(pair: ModelPair, cfg: AuthConfig, c_ft, c_pre, latent_shape, batch: int):
    """The pair's engine for a bucket of ``batch`` images, built once per (bucket, settings,
    prompt) and kept on the pair, for the latest settings only: on a GPU each bucket's step is captured once as a CUDA
    graph and replayed for every later batch, a smaller tail batch being padded."""
    from cgidm.engine import Engine
    from cgidm.pairpass import low_memory_pass

    cache = pair.__dict__.setdefault("_engines", {})
    key = (batch, cfg.pgd, cfg.impl, cfg.prompt, tuple(latent_shape), cfg.low_memory)
    engine = cache.get(key)
    if engine is None:
        # the engines of other settings or prompts go: a run keeps one setting (its buckets
        # stay), and a sweep in one process held every engine it ran, graphs and buffers
        for old in [k for k in cache if k[1:] != key[1:]]:
            del cache[old]
        engine = Engine(pair.unet_ft, pair.unet_pre, c_ft, c_pre, pair.abar, latent_shape, cfg.pgd,
                        batch=batch, device=pair.device, impl=cfg.impl, target=_target(pair),
                        pair_pass=low_memory_pass(pair.unet_ft, pair.unet_pre, pair.device) if cfg.low_memory else None)
        if isinstance(getattr(pair, "info", None), dict):
            pair.info["pair_pass"] = f"{engine.pair_pass.name} ({engine.pair_pass_why})"
        log.info("engine for batches of %d: pair pass %s (%s)", batch, engine.pair_pass.name, engine.pair_pass_why)
        cache[key] = engine
    return engine


def shrink_engines(pair: ModelPair, max_batch: int) -> None:
    """After running out of memory: no engine of this pair takes more than ``max_batch``
    images at once any more, and the larger ones (their buffers, their graphs) are freed."""
    pair.__dict__["_max_bucket"] = max(1, min(max_batch, pair.__dict__.get("_max_bucket", max_batch)))
    cache = pair.__dict__.get("_engines", {})
    for key in [k for k in cache if k[0] > pair.__dict__["_max_bucket"]]:
        del cache[key]


def recover(pair: ModelPair, prep: Prepared, cfg: AuthConfig, callback=None):
    """PGD on the contrast loss; returns the reference's ``InversionResult``. Without
    ``cfg.prompt``, the checkpoint's instance prompt (``resolve_prompt``). With the engine,
    more images than ``cfg.batch_size`` run in chunks of it: ``callback`` sees each chunk's
    steps in turn (``Engine.invert``)."""
    from cgidm.checkpointing import set_gradient_checkpointing
    from cgidm.ops import get_ops

    if not isinstance(cfg, AuthConfig):
        raise TypeError(f"cfg must be an AuthConfig, got {type(cfg).__name__}"
                        + (" (recover takes the whole AuthConfig; invert takes its .pgd)"
                           if type(cfg).__name__ == "PGDConfig" else ""))
    if cfg.prompt is None:
        cfg, _ = resolve_prompt(cfg, pair)
    check_t_max(cfg.pgd.t_max, len(pair.abar))  # a screen's pairs load as its rows come
    c_ft, c_pre = pair.encode_prompt(cfg.prompt)
    set_gradient_checkpointing((pair.unet_ft, pair.unet_pre), cfg.low_memory)
    n = prep.x0.shape[0]
    if cfg.engine == "engine":
        # the configured batch size is the bucket; smaller batches (the tail, a halved
        # batch after running out of memory) pad into it, larger ones run in chunks
        cap = pair.__dict__.get("_max_bucket", cfg.batch_size)
        bucket = min(cap, n if n > cfg.batch_size else cfg.batch_size)
        engine = _engine(pair, cfg, c_ft, c_pre, prep.x0.shape[1:], bucket)
        return engine.invert(prep.x0, prep.x_init, prep.mask, prep.keys, callback=callback)
    return invert(
        unet_eps_fn(pair.unet_ft), unet_eps_fn(pair.unet_pre), prep.x0, prep.x_init, prep.mask,
        c_ft, c_pre, pair.abar, cfg.pgd, keys=prep.keys, ops=get_ops(cfg.impl), callback=callback,
        target=_target(pair),
    )


def _target(pair):
    """The pair's regression target from its model family (``None``: epsilon-prediction,
    also for pairs built by hand without a family)."""
    family = getattr(pair, "family", None)
    return None if family is None else family.target


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
        # a base that records one, beside a fine-tune that does not: the two given swapped?
        in_base, _ = find_prompt(pair.info["base"]) if pair.info.get("base") and pair.info.get("finetuned") else (
            None, "")
        swapped = (f"; but the base model records one ({in_base!r}): are --base and --finetuned swapped? The base "
                   "is the pretrained model, the fine-tune the suspect one" if in_base is not None else "")
        raise ValueError(
            "no prompt: the fine-tune does not say which prompt it was trained with "
            f"({where}){swapped}; pass --prompt TEXT, the instance prompt of the fine-tune (e.g. 'sks style'; the "
            "trigger word its model page gives is best, a short description of the work also serves, less sharply)"
        )
    return cfg.replace(prompt=prompt), where
