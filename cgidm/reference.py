"""The whole CGI-DM algorithm in plain PyTorch, fp32 math: the spec every fast path is
checked against (DESIGN.md, "The algorithm, as the paper's code runs it").

Shapes: ``B`` images, ``K`` timesteps per image, ``N = B*K`` model samples (sample
``n = b*K + k``), latents ``[C, H, W]``.

Two noise modes:
- ``"paper"``: what the official code does — one ``t`` per step for the whole batch,
  independent noise for the two models, gradient normalised and ``delta`` projected over
  the whole tensor (identical to per-image at batch 1, the official batch size).
- ``"shared"`` (default): common random numbers — the same ``(t, noise)`` for both models,
  ``t`` drawn per image (stratified over K), gradient norm and projection per image, so an
  image's result does not depend on what it is batched with.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Sequence, Union

import torch

from cgidm.config import NOISE_MODES, PGDConfig  # noqa: F401 (re-exported: the spec's settings)

# eps_fn(x_t [N, C, H, W], t [N] int64, cond [N, L, D]) -> eps [N, C, H, W]
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- ops (refs)


def pair_noise_ref(
    x0: torch.Tensor,  # [B, C, H, W] clean latent
    x: torch.Tensor,  # [B, C, H, W] x_init + delta
    mask: torch.Tensor,  # [C, H, W] or [B, C, H, W], 1 = kept
    noise_ft: torch.Tensor,  # [N, C, H, W], N = B*K
    noise_pre: Optional[torch.Tensor],  # [N, C, H, W] or None (shared noise)
    sqrt_abar: torch.Tensor,  # [N]
    sqrt_one_minus_abar: torch.Tensor,  # [N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose ``z = x0*M + x*(1-M)`` and noise it for both models.

    Returns ``z [B, C, H, W]`` and ``x_t [2, N, C, H, W]`` (index 0: fine-tuned model's
    input, 1: pretrained model's). With ``noise_pre=None`` both use ``noise_ft``.
    """
    b = x0.shape[0]
    n = noise_ft.shape[0]
    if n % b:
        raise ValueError(f"noise batch {n} is not a multiple of the image batch {b}")
    k = n // b
    z = x0 * mask + x * (1 - mask)
    zk = z.repeat_interleave(k, dim=0) if k > 1 else z
    a = sqrt_abar.view(-1, 1, 1, 1).to(z.dtype)
    s = sqrt_one_minus_abar.view(-1, 1, 1, 1).to(z.dtype)
    x_ft = a * zk + s * noise_ft
    x_pre = x_ft if noise_pre is None else a * zk + s * noise_pre
    return z, torch.stack([x_ft, x_pre])


def pair_contrast_loss_ref(
    eps_ft: torch.Tensor,  # [N, C, H, W]
    eps_pre: torch.Tensor,  # [N, C, H, W]
    noise_ft: torch.Tensor,  # [N, C, H, W]
    noise_pre: Optional[torch.Tensor],  # [N, C, H, W] or None (shared noise)
) -> torch.Tensor:
    """Per-sample ``MSE(eps_ft, n) - MSE(eps_pre, n')`` in fp32, shape ``[N]``.

    Its gradient seeds are ``2(eps_ft - n)/M`` and ``-2(eps_pre - n')/M``
    (``M = C*H*W``), which autograd derives from this expression.
    """
    noise_pre = noise_ft if noise_pre is None else noise_pre
    d_ft = eps_ft.float() - noise_ft.float()
    d_pre = eps_pre.float() - noise_pre.float()
    return d_ft.pow(2).flatten(1).mean(1) - d_pre.pow(2).flatten(1).mean(1)


def _norm(v: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """L2 norm per sample ``[B, 1, 1, 1]`` or over the whole tensor (broadcastable)."""
    if per_sample:
        return v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return v.norm().view(1, 1, 1, 1).expand(v.shape[0], 1, 1, 1)


def pgd_update_ref(
    delta: torch.Tensor,  # [B, C, H, W] fp32
    grad: torch.Tensor,  # [B, C, H, W] d loss / d delta
    x0: torch.Tensor,  # [B, C, H, W]
    x_init: torch.Tensor,  # [B, C, H, W]
    mask: torch.Tensor,  # [C, H, W] or [B, C, H, W], 1 = kept
    alpha: float,
    eps: float,
    clamp_min: float = -100.0,
    clamp_max: float = 100.0,
    per_sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One L2 PGD step. Returns the new ``delta`` and the composed latent
    ``x0*M + (x_init + delta)*(1-M)``, both ``[B, C, H, W]`` fp32.

    The gradient norm is taken over the free entries; a zero or non-finite norm (or any
    non-finite entry) means no step for that sample (the official code's ``NaN -> 0``).
    """
    free = 1 - mask.float()
    g = grad.float() * free
    norm = _norm(g, per_sample)
    ok = torch.isfinite(norm) & (norm > 0)
    g = torch.where(ok, g / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(g))
    delta = delta.float() - alpha * g
    x_init = x_init.float()
    delta = (x_init + delta).clamp(clamp_min, clamp_max) - x_init
    dnorm = _norm(delta, per_sample)
    factor = torch.where(dnorm > eps, eps / dnorm.clamp_min(1e-12), torch.ones_like(dnorm))
    delta = delta * factor
    z = x0.float() * mask + (x_init + delta) * free
    return delta, z


REFERENCE_OPS = SimpleNamespace(
    pair_noise=pair_noise_ref,
    pair_contrast_loss=pair_contrast_loss_ref,
    pgd_update=pgd_update_ref,
)


# --------------------------------------------------------------------------- the loop


def sample_timesteps(
    batch: int,
    k: int,
    cfg: PGDConfig,
    generator: Optional[torch.Generator],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``t [batch*k]`` int64. Shared mode: per image, stratified over ``k`` equal strata
    of ``[t_min, t_max]``. Paper mode: one draw, repeated for the whole batch."""
    lo, span = cfg.t_min, cfg.t_max - cfg.t_min + 1
    if cfg.noise == "paper":
        t = torch.randint(lo, cfg.t_max + 1, (1,), generator=generator, device=device)
        return t.expand(batch * k).clone()
    u = torch.rand(batch, k, generator=generator, device=device)
    edges = torch.arange(k + 1, device=device, dtype=torch.float64) * span / k
    start = edges[:-1].floor().long()
    width = (edges[1:].floor() - edges[:-1].floor()).long().clamp_min(1)
    t = lo + start + (u * width).long().clamp_max(width - 1)
    return t.reshape(-1)


Generators = Union[None, torch.Generator, Sequence[torch.Generator]]


def draw_step(
    cfg: PGDConfig,
    b: int,
    latent_shape,
    generator: Generators,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One step's random draws: ``t [N]``, ``noise_ft [N, C, H, W]`` and ``noise_pre``
    (``None`` in shared mode). Per-image generators draw each image's share in turn."""
    k = cfg.k
    if generator is None or isinstance(generator, torch.Generator):
        t = sample_timesteps(b, k, cfg, generator, device)
        noise_ft = torch.randn(b * k, *latent_shape, generator=generator, device=device)
        noise_pre = (
            None if cfg.noise == "shared"
            else torch.randn(b * k, *latent_shape, generator=generator, device=device)
        )
        return t, noise_ft, noise_pre
    gens = list(generator)
    if len(gens) != b:
        raise ValueError(f"{len(gens)} generators for {b} images")
    if cfg.noise == "paper":
        t = sample_timesteps(b, k, cfg, gens[0], device)
    else:
        t = torch.cat([sample_timesteps(1, k, cfg, g, device) for g in gens])
    noise_ft = torch.cat([torch.randn(k, *latent_shape, generator=g, device=device) for g in gens])
    noise_pre = (
        None if cfg.noise == "shared"
        else torch.cat([torch.randn(k, *latent_shape, generator=g, device=device) for g in gens])
    )
    return t, noise_ft, noise_pre


@dataclass
class InversionResult:
    x_rec: torch.Tensor  # [B, C, H, W] recovered latent
    delta: torch.Tensor  # [B, C, H, W]
    skipped_steps: torch.Tensor  # [B] steps with a zero or non-finite gradient
    loss_history: list[float]


def invert(
    eps_ft: EpsFn,
    eps_pre: EpsFn,
    x0: torch.Tensor,  # [B, C, H, W]
    x_init: torch.Tensor,  # [B, C, H, W]
    mask: torch.Tensor,  # [C, H, W]
    cond_ft: torch.Tensor,  # [1 or B, L, D]
    cond_pre: torch.Tensor,  # [1 or B, L, D]
    abar: torch.Tensor,  # [T] alphas_cumprod of the scheduler
    cfg: PGDConfig = PGDConfig(),
    generator: Generators = None,
    ops: SimpleNamespace = REFERENCE_OPS,
    callback: Optional[Callable[[int, float], None]] = None,
) -> InversionResult:
    """Recover the masked half of ``x0`` by L2 PGD on the contrast loss.

    ``ops`` supplies ``pair_noise``, ``pair_contrast_loss`` and ``pgd_update``; the
    default is this module's plain-torch twins, and the compiled ops are drop-in.
    ``generator`` is one generator for the batch or one per image; with one per image,
    an image's draws (and so its result) do not depend on what it is batched with.
    """
    b = x0.shape[0]
    k = cfg.k
    device = x0.device
    x0 = x0.float()
    x_init = x_init.float()
    mask = mask.to(device=device, dtype=torch.float32)
    abar = abar.to(device=device, dtype=torch.float64)
    cond_ft = _expand_cond(cond_ft, b, k)
    cond_pre = _expand_cond(cond_pre, b, k)
    delta = torch.zeros_like(x0)
    skipped = torch.zeros(b, dtype=torch.long, device=device)
    history: list[float] = []
    for step in range(cfg.steps):
        t, noise_ft, noise_pre = draw_step(cfg, b, x0.shape[1:], generator, device)
        sa = abar[t].sqrt().float()
        sb = (1 - abar[t]).sqrt().float()
        x = (x_init + delta).requires_grad_(True)
        _, x_t = ops.pair_noise(x0, x, mask, noise_ft, noise_pre, sa, sb)
        out_ft = eps_ft(x_t[0], t, cond_ft)
        out_pre = eps_pre(x_t[1], t, cond_pre)
        loss = ops.pair_contrast_loss(out_ft, out_pre, noise_ft, noise_pre)  # [N]
        if cfg.per_sample:
            total = loss.view(b, k).mean(1).sum()
        else:
            total = loss.mean()
        (grad,) = torch.autograd.grad(total, x)
        with torch.no_grad():
            # a non-finite loss skips the step even when autograd hands back a finite
            # gradient (e.g. a NaN output cut out of the graph)
            bad = ~torch.isfinite(loss.detach().view(b, k)).all(1)
            bad |= ~torch.isfinite(grad.flatten(1)).all(1) | (grad.flatten(1).abs().sum(1) == 0)
            if not cfg.per_sample:
                bad = bad.any().expand(b)
            grad = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(grad), grad)
            skipped += bad.long()
            delta, _ = ops.pgd_update(
                delta, grad, x0, x_init, mask, cfg.alpha, cfg.eps,
                cfg.clamp_min, cfg.clamp_max, cfg.per_sample,
            )
        if callback is not None or step == cfg.steps - 1:
            value = float(total.detach()) / b if cfg.per_sample else float(total.detach())
            history.append(value)
            if callback is not None:
                callback(step, value)
    x_rec = x0 * mask + (x_init + delta).clamp(cfg.clamp_min, cfg.clamp_max) * (1 - mask)
    return InversionResult(x_rec=x_rec, delta=delta, skipped_steps=skipped, loss_history=history)


def _expand_cond(cond: torch.Tensor, b: int, k: int) -> torch.Tensor:
    if cond.dim() != 3:
        raise ValueError(f"prompt embeddings must be [batch, tokens, dim], got {tuple(cond.shape)}")
    if cond.shape[0] == 1:
        return cond.expand(b * k, -1, -1)
    if cond.shape[0] != b:
        raise ValueError(f"prompt embeddings batch {cond.shape[0]} != images {b}")
    return cond.repeat_interleave(k, dim=0)


def partial_representation(codec, x0: torch.Tensor, mask: torch.Tensor, generator=None):
    """Decode the masked latent and encode it again (DESIGN.md step 4).

    Returns ``(x_init [B, C, H, W], partial_image [B, 3, H*f, W*f] in [-1, 1])``.
    """
    partial_image = codec.decode(x0 * mask)
    x_init = codec.encode(partial_image, generator=generator)
    return x_init, partial_image


def unet_eps_fn(unet) -> EpsFn:
    """Wrap a diffusers ``UNet2DConditionModel`` (or any module with that call) as an
    ``EpsFn``: inputs are cast to the UNet's dtype, the output comes back as is."""
    dtype = next(unet.parameters()).dtype

    def fn(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]

    return fn
