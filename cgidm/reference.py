"""The whole CGI-DM algorithm in plain PyTorch, fp32 math: the spec every fast path is
checked against (docs/faithfulness.md, "The algorithm, as the paper's code runs it").

Shapes: ``B`` images, ``K`` timesteps per image, ``N = B*K`` model samples (sample
``n = b*K + k``), latents ``[C, H, W]``.

Every image is its own PGD problem whatever the batch: its own ``t``, noise, gradient
norm, projection and skip rule, so a batch of ``B`` gives each image what a batch of one
gives it. Its draws are counter-based (``cgidm.rng``): a pure function of its key (run
seed, image id), the step, the timestep slot and the model side. The two noise modes
differ only in the draws:

- ``"paper"``: what the official code does (batch 1): one ``t`` per image per step and
  independent noise ``n``, ``n'`` for the two models.
- ``"shared"`` (default): common random numbers: the same ``(t, noise)`` for both models,
  ``K`` timesteps per image stratified over ``[t_min, t_max]``.

The loss is scaled by a power of two near ``C*H*W`` before the backward pass (see
``loss_scale``): free for the normalised step, and it keeps fp16 gradient seeds out of
the subnormals.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Sequence, Union

import torch

from cgidm import rng
from cgidm.config import PGDConfig, check_t_max  # noqa: F401 (PGDConfig re-exported: the spec's settings)

# eps_fn(x_t [N, C, H, W], t [N] int64, cond [N, L, D]) -> eps [N, C, H, W]
EpsFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# target(z [N, C, H, W], noise [N, C, H, W], sqrt_abar [N], sqrt_one_minus_abar [N]) -> [N, C, H, W]
TargetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------- ops (refs)


def check_mask(mask: torch.Tensor, like: torch.Tensor) -> None:
    """A mask as the compiled kernels take it, else ``ValueError`` (never broadcast): ``[C, H, W]``, ``[B|1, C, H, W]``."""
    if not (tuple(mask.shape) == tuple(like.shape[1:]) or (
            mask.dim() == like.dim() and mask.shape[0] in (1, like.shape[0]) and mask.shape[1:] == like.shape[1:])):
        raise ValueError(f"cgidm: mask must be [C, H, W] or [B, C, H, W] (or [1, C, H, W]; the latent's shape "
                         f"{list(like.shape)}), got {list(mask.shape)}")


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
    check_mask(mask, x0)
    b = x0.shape[0]
    n = noise_ft.shape[0]
    if (n % b if b else n):
        raise ValueError(f"noise batch {n} is not a multiple of the image batch {b}")
    k = n // b if b else 1
    # math in fp32 (as the compiled kernels do), the outputs in torch's promoted dtypes
    z_dtype = torch.promote_types(torch.promote_types(x0.dtype, mask.dtype), x.dtype)
    xt_dtype = torch.promote_types(z_dtype, noise_ft.dtype)
    if noise_pre is not None:
        xt_dtype = torch.promote_types(xt_dtype, noise_pre.dtype)
    m = mask.float()
    z = x0.float() * m + x.float() * (1 - m)
    zk = z.repeat_interleave(k, dim=0) if k > 1 else z
    a = sqrt_abar.view(-1, 1, 1, 1).float()
    s = sqrt_one_minus_abar.view(-1, 1, 1, 1).float()
    x_ft = a * zk + s * noise_ft.float()
    x_pre = x_ft if noise_pre is None else a * zk + s * noise_pre.float()
    return z.to(z_dtype), torch.stack([x_ft, x_pre]).to(xt_dtype)


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
    if eps_ft.dim() < 2 or math.prod(eps_ft.shape[1:]) == 0:
        raise ValueError("cgidm: the loss of an empty latent is undefined")
    noise_pre = noise_ft if noise_pre is None else noise_pre
    d_ft = eps_ft.float() - noise_ft.float()
    d_pre = eps_pre.float() - noise_pre.float()
    return d_ft.pow(2).flatten(1).mean(1) - d_pre.pow(2).flatten(1).mean(1)


def v_target_ref(
    z: torch.Tensor,  # [N, C, H, W] clean latent of each sample
    noise: torch.Tensor,  # [N, C, H, W]
    sqrt_abar: torch.Tensor,  # [N]
    sqrt_one_minus_abar: torch.Tensor,  # [N]
) -> torch.Tensor:
    """The v-prediction target ``v = sqrt(abar) n - sqrt(1 - abar) z`` (diffusers'
    ``DDPMScheduler.get_velocity``), ``[N, C, H, W]`` fp32. It depends on ``z``, so the
    contrast's gradient flows through it to ``delta`` (docs/families.md)."""
    a = sqrt_abar.view(-1, 1, 1, 1).float()
    s = sqrt_one_minus_abar.view(-1, 1, 1, 1).float()
    return a * noise.float() - s * z.float()


def eps_from_v_ref(
    v: torch.Tensor,  # [N, C, H, W] a v-prediction model's output
    x_t: torch.Tensor,  # [N, C, H, W] its input
    sqrt_abar: torch.Tensor,  # [N]
    sqrt_one_minus_abar: torch.Tensor,  # [N]
) -> torch.Tensor:
    """The noise a v-prediction output stands for, ``[N, C, H, W]`` fp32:
    ``eps = sqrt(abar) v + sqrt(1 - abar) x_t``. With ``a = sqrt(abar)``,
    ``s = sqrt(1 - abar)``, ``x_t = a z + s n`` and ``v = a n - s z``:
    ``a v + s x_t = a^2 n - a s z + a s z + s^2 n = (a^2 + s^2) n = n``
    (docs/families.md)."""
    a = sqrt_abar.view(-1, 1, 1, 1).float()
    s = sqrt_one_minus_abar.view(-1, 1, 1, 1).float()
    return a * v.float() + s * x_t.float()


# a family's target -> how its models' outputs become noise predictions (the epsilon
# family, target None, predicts the noise itself)
EPS_FROM_OUTPUT: dict[TargetFn, Callable[..., torch.Tensor]] = {v_target_ref: eps_from_v_ref}


def _norm(v: torch.Tensor, per_sample: bool) -> torch.Tensor:
    """L2 norm per sample ``[B, 1, ...]`` or over the whole tensor (broadcastable).
    At ``B = 1`` both are the official whole-tensor norm."""
    ones = [1] * (v.dim() - 1)  # [B, ...] of any rank, as the compiled kernels take it
    if per_sample:
        return v.flatten(1).norm(dim=1).view(-1, *ones)
    return v.norm().view(1, *ones).expand(v.shape[0], *ones)


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

    The gradient norm is taken over the free entries. The official code normalises the
    gradient of ``delta`` over the whole tensor, but the compose ``x0*M + (x_init+delta)*(1-M)``
    hands the kept entries a gradient of exactly 0, so the two norms are equal
    (``tests/test_reference.py``). A zero or non-finite norm (or any non-finite entry) means
    no step for that sample (the official code's ``NaN -> 0``). ``per_sample=False`` takes
    one norm and one projection over the whole batch; ``invert`` never does (every image
    is its own problem), the ops keep it for callers that want it.
    """
    check_mask(mask, delta)
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
    z = x0.float() * mask.float() + (x_init + delta) * free
    return delta, z


def check_linf_scalars(alpha: float, eps: float, lo: float, hi: float) -> None:
    """``linf_update``'s scalars are finite in every implementation (and the C++ glue's): a
    NaN step would be NaN where the gradient is 0 here, and no change in the kernels."""
    if not all(math.isfinite(float(v)) for v in (alpha, eps, lo, hi)):
        raise ValueError("cgidm: alpha, eps, lo and hi must be finite")


def linf_pgd_update_ref(
    delta: torch.Tensor,  # [B, 3, H, W] fp32
    grad: torch.Tensor,  # [B, 3, H, W] d objective / d image
    x: torch.Tensor,  # [B, 3, H, W] the clean image, in [lo, hi]
    alpha: float,
    eps: float,
    lo: float = -1.0,
    hi: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One L-inf PGD ascent step (``cgidm protect``, the op ``cgidm::linf_update``):
    ``delta + alpha * sign(grad)``, clipped to ``[-eps, eps]`` and so that ``x + delta``
    stays in ``[lo, hi]``. An image with a non-finite gradient takes no step; a zero entry
    of the gradient moves nothing (``sign(0) = 0``). Math in fp32. Returns
    ``(delta [B, 3, H, W] fp32, skipped [B] bool)``."""
    if delta.dim() < 1 or grad.shape != delta.shape or x.shape != delta.shape:
        raise ValueError("delta, grad and x must have one shape [B, ...]")
    check_linf_scalars(alpha, eps, lo, hi)
    g = grad.float()
    # [B, M] also for a 1-D delta (M = 1) and for B = 0, as the compiled kernels read it
    ok = torch.isfinite(g).reshape(g.shape[0], math.prod(g.shape[1:])).all(1)
    step = torch.where(ok.view(-1, *([1] * (g.dim() - 1))), g.sign(), torch.zeros_like(g))
    d = (delta.float() + alpha * step).clamp(-eps, eps)
    # x + d can only leave [lo, hi] by pushing through it, never by more than eps: clamp d to
    # the room left, which keeps |d| <= eps exactly (``(x + d).clamp() - x`` may round past it)
    x = x.float()
    d = torch.minimum(torch.maximum(d, lo - x), hi - x)
    return d, ~ok


REFERENCE_OPS = SimpleNamespace(
    pair_noise=pair_noise_ref,
    pair_contrast_loss=pair_contrast_loss_ref,
    pgd_update=pgd_update_ref,
    linf_update=linf_pgd_update_ref,
    draw_noise=rng.counter_draws,
)


# --------------------------------------------------------------------------- the loop


Keys = Union[torch.Tensor, Sequence[int]]

_NO_GENERATORS = (
    "torch.Generators are no longer accepted: draws are counter-based, keyed per image; "
    "pass keys=cgidm.rng.image_keys(seed, image_ids) (one int64 per image)"
)


def as_keys(keys: Keys, b: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[b]`` int64 keys on ``device`` from a tensor or a list of ints
    (``rng.image_key(seed, image_id)`` each); a clear error for anything else."""
    if keys is None:
        raise ValueError("one key per image is needed: keys=cgidm.rng.image_keys(seed, image_ids)")
    if isinstance(keys, torch.Generator) or (
        not isinstance(keys, torch.Tensor) and any(isinstance(k, torch.Generator) for k in keys)
    ):
        raise TypeError(_NO_GENERATORS)
    if not isinstance(keys, torch.Tensor):
        try:
            keys = torch.tensor([int(k) for k in keys], dtype=torch.int64)
        except (TypeError, ValueError) as e:
            raise TypeError(f"keys must be ints (cgidm.rng.image_keys(seed, image_ids)): {e}") from None
    if keys.dtype != torch.int64 or keys.dim() != 1 or keys.shape[0] != b:
        raise ValueError(f"keys must be [{b}] int64 (one per image), got {tuple(keys.shape)} {keys.dtype}")
    return keys.to(device)


def draw_step(
    cfg: PGDConfig,
    keys: Keys,  # [B] int64
    step: Union[int, torch.Tensor],  # PGD step: int, or 0-d int64 device tensor (graph capture)
    latent_shape: Sequence[int],  # (C, H, W)
    device: torch.device | str = "cpu",
    draw: Optional[Callable] = None,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """One step's random draws: ``t [N]`` int64, ``noise_ft [N, C, H, W]`` fp32 and
    ``noise_pre`` (paper mode; ``None`` in shared mode), ``N = B*K``. Image ``b``'s draws
    are a pure function of ``(keys[b], step, k, side)`` (``cgidm.rng.counter_draws``):
    whatever its batch, its position in it, the padding, eager or graph replay. Shared
    mode stratifies the K timesteps over ``[t_min, t_max]``; paper mode (``K = 1``) draws
    one uniform ``t`` per image and independent noise for the two models. ``draw``: an
    implementation of the op ``draw_noise`` with ``counter_draws``'s signature (default:
    ``counter_draws`` itself)."""
    keys = as_keys(keys, len(keys), device)
    return (draw or rng.counter_draws)(
        keys, step, cfg.k, latent_shape, cfg.t_min, cfg.t_max, cfg.noise == "paper", device,
    )


@dataclass
class InversionResult:
    x_rec: torch.Tensor  # [B, C, H, W] recovered latent
    delta: torch.Tensor  # [B, C, H, W]
    skipped_steps: torch.Tensor  # [B] steps with a zero or non-finite gradient
    # the mean loss of every step when a callback was given, else of the last step only
    # (reading each step's loss would sync the device every step)
    loss_history: list[float]


def loss_scale(latent_shape: Sequence[int]) -> float:
    """The power of two nearest ``M = C*H*W`` that the summed loss is multiplied by before
    the backward pass.

    The gradient seeds ``2(eps - n)/M`` are ~1e-4 at SD's ``M = 16384`` and shrink further
    through the UNet's backward: in fp16 they sink into subnormals (and to zero). Scaled
    by ~``M`` they are O(1). The step divides the gradient by its norm, so the scale
    cancels; a power of two makes it exact in fp32 (every product and the norm scale by
    exactly ``2^p``), so fp32 results are bit-for-bit those of the unscaled loss."""
    m = math.prod(int(d) for d in latent_shape)
    return float(2 ** max(0, round(math.log2(max(m, 1)))))


def contrast_gradient(
    eps_ft: EpsFn,
    eps_pre: EpsFn,
    x0: torch.Tensor,  # [B, C, H, W] fp32
    x: torch.Tensor,  # [B, C, H, W] fp32, x_init + delta
    mask: torch.Tensor,  # [C, H, W] fp32
    t: torch.Tensor,  # [N] int64
    noise_ft: torch.Tensor,  # [N, C, H, W]
    noise_pre: Optional[torch.Tensor],  # [N, C, H, W] or None (shared noise)
    abar: torch.Tensor,  # [T] float64
    cond_ft: torch.Tensor,  # [N, L, D]
    cond_pre: torch.Tensor,  # [N, L, D]
    ops: SimpleNamespace = REFERENCE_OPS,
    valid: Optional[torch.Tensor] = None,  # [B] bool, rows whose loss counts
    scale: Optional[float] = None,
    pair_fn: Optional[Callable] = None,
    target: Optional[TargetFn] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's contrast loss and its gradient: ``(loss [B, K] fp32, grad [B, C, H, W])``.

    ``target(z [N, C, H, W], noise, sqrt_abar [N], sqrt_one_minus_abar [N])`` is what the
    models' outputs are regressed on, from the model family (``cgidm.families``):
    ``None`` = the noise (epsilon-prediction), ``v_target_ref`` for v-prediction. Each
    model's target uses its own noise; ``pair_contrast_loss`` compares the outputs with
    the targets and its autograd carries the gradient through a target that depends on
    ``z`` back to ``x``.

    ``pair_fn(x_ft, x_pre, t, cond_ft, cond_pre) -> (eps_ft, eps_pre)`` runs both models
    as one pair pass (``cgidm.pairpass``); without it, ``eps_ft`` and ``eps_pre`` are
    called one after the other.

    ``loss`` is unscaled (rows outside ``valid`` are 0); ``grad`` is
    ``scale * d/dx sum_b mean_k loss[b, k]`` (``scale``: ``loss_scale`` of the latent by
    default), so image ``b``'s gradient depends on its own samples only. Rows outside
    ``valid`` are cut out with ``torch.where``: a NaN there cannot leak in as ``0 * NaN``.
    No host sync, no branch on a tensor value: safe inside a CUDA graph capture."""
    b = x0.shape[0]
    k = noise_ft.shape[0] // b
    scale = loss_scale(x0.shape[1:]) if scale is None else float(scale)
    sa = abar[t].sqrt().float()
    sb = (1 - abar[t]).sqrt().float()
    x = x.detach().requires_grad_(True)
    z, x_t = ops.pair_noise(x0, x, mask, noise_ft, noise_pre, sa, sb)
    if pair_fn is not None:
        out_ft, out_pre = pair_fn(x_t[0], x_t[1], t, cond_ft, cond_pre)
    else:
        out_ft = eps_ft(x_t[0], t, cond_ft)
        out_pre = eps_pre(x_t[1], t, cond_pre)
    tgt_ft, tgt_pre = noise_ft, noise_pre
    if target is not None:
        zk = z.repeat_interleave(k, dim=0) if k > 1 else z
        tgt_ft = target(zk, noise_ft, sa, sb)
        tgt_pre = None if noise_pre is None else target(zk, noise_pre, sa, sb)
    loss = ops.pair_contrast_loss(out_ft, out_pre, tgt_ft, tgt_pre).view(b, k)  # [B, K]
    if valid is not None:
        loss = torch.where(valid.view(b, 1), loss, torch.zeros_like(loss))
    (grad,) = torch.autograd.grad(loss.mean(1).sum() * scale, x)
    return loss.detach(), grad


def skip_rows(loss: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """``[B]`` bool: images that take no step this time: a non-finite loss (even with a
    finite gradient, e.g. a NaN output cut out of the graph), or a zero or non-finite
    gradient. ``loss [B, K]``, ``grad [B, C, H, W]``."""
    g = grad.flatten(1)
    return ~torch.isfinite(loss).all(1) | ~torch.isfinite(g).all(1) | (g.abs().sum(1) == 0)


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
    keys: Optional[Keys] = None,  # [B] int64, rng.image_key(seed, image_id) per image
    ops: SimpleNamespace = REFERENCE_OPS,
    callback: Optional[Callable[[int, float], None]] = None,
    *,
    generator=None,
    target: Optional[TargetFn] = None,
) -> InversionResult:
    """Recover the masked half of ``x0`` by L2 PGD on the contrast loss.

    ``keys``: one int64 per image (``cgidm.rng.image_keys(seed, image_ids)``); step ``s``
    of image ``b`` draws ``draw_step(cfg, keys[b:b+1], s)``, so an image's result does not
    depend on what it is batched with. ``generator`` is gone (a ``TypeError`` says so).
    ``ops`` supplies ``pair_noise``, ``pair_contrast_loss`` and ``pgd_update``; the
    default is this module's plain-torch twins, and the compiled ops are drop-in.
    ``callback(step, loss)`` and the history get the unscaled loss, averaged over images.
    ``target``: the family's regression target (``contrast_gradient``; ``None``: epsilon).
    A diffusers UNet may stand for either denoiser (``unet_eps_fn``, as the engine takes it).
    """
    if generator is not None:
        raise TypeError(_NO_GENERATORS)
    eps_ft, eps_pre = unet_eps_fn(eps_ft), unet_eps_fn(eps_pre)
    if not isinstance(cfg, PGDConfig):
        raise TypeError(f"cfg must be a PGDConfig, got {type(cfg).__name__}"
                        + (" (pass its .pgd)" if isinstance(getattr(cfg, "pgd", None), PGDConfig) else ""))
    b = x0.shape[0]
    if b == 0:
        raise ValueError("x0 is an empty batch: nothing to invert")
    check_t_max(cfg.t_max, abar.shape[0])
    k = cfg.k
    device = x0.device
    keys = as_keys(keys, b, device)
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
        t, noise_ft, noise_pre = draw_step(cfg, keys, step, x0.shape[1:], device)
        loss, grad = contrast_gradient(
            eps_ft, eps_pre, x0, x_init + delta, mask, t, noise_ft, noise_pre, abar, cond_ft, cond_pre, ops,
            target=target,
        )
        with torch.no_grad():
            bad = skip_rows(loss, grad)
            grad = torch.where(bad.view(-1, 1, 1, 1), torch.zeros_like(grad), grad)
            skipped += bad.long()
            delta, _ = ops.pgd_update(
                delta, grad, x0, x_init, mask, cfg.alpha, cfg.eps, cfg.clamp_min, cfg.clamp_max, True,
            )
        if callback is not None or step == cfg.steps - 1:
            value = float(loss.mean(1).sum() / b)  # fp32, as the engine computes it
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


def quantize_8bit(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` images in [-1, 1] through an 8-bit image and back, as the official
    code's round trip through a PIL image does: ``(x/2 + 0.5).clamp(0, 1) * 255``,
    rounded (half to even, like numpy), ``/ 255``, back to [-1, 1]. fp32 out."""
    u8 = ((images.float() / 2 + 0.5).clamp(0, 1) * 255).round()
    return u8 / 255 * 2 - 1


def partial_representation(codec, x0: torch.Tensor, mask: torch.Tensor, generator=None):
    """Decode the masked latent, quantise it to an 8-bit image and encode that again
    (docs/faithfulness.md, "Partial representation"): the official code saves ``x0 * M``
    decoded as an image and encodes the saved image, so values the decoder puts outside
    [-1, 1] are clamped and every pixel is one of 256 levels.

    ``x0 [B, C, H, W]``, ``mask [C, H, W]``; ``generator`` samples the encoder. Returns
    ``(x_init [B, C, H, W], partial_image [B, 3, H*f, W*f])``, the partial image being the
    quantised one that was encoded (the evidence), in [-1, 1]."""
    partial_image = quantize_8bit(codec.decode(x0 * mask))
    x_init = codec.encode(partial_image, generator=generator)
    return x_init, partial_image


def takes_unet_call(model) -> bool:
    """Whether ``model`` is called as a diffusers UNet, ``model(x_t, t,
    encoder_hidden_states=cond, return_dict=False)[0]``, rather than as an ``EpsFn``: by its
    forward's ``encoder_hidden_states``, read through ``DataParallel``'s ``.module`` and
    ``torch.compile``'s ``._orig_mod`` (both take ``**kwargs``, whatever they wrap). A
    wrapper of cgidm's own that passes keywords on says so itself (``unet_call``:
    ``lora.AdaptersOff``)."""
    if not isinstance(model, torch.nn.Module):
        return False
    marked = getattr(model, "unet_call", None)
    if marked is not None:
        return bool(marked)
    inner = getattr(model, "_orig_mod", None)
    if inner is None and isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        inner = model.module
    if isinstance(inner, torch.nn.Module):
        return takes_unet_call(inner)
    forward = getattr(model, "forward", None)
    if forward is None:
        return False
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):  # no signature to read: taken as a UNet, as before
        return True
    return "encoder_hidden_states" in params


def unet_eps_fn(unet) -> EpsFn:
    """Wrap a diffusers ``UNet2DConditionModel`` (or any module with that call) as an
    ``EpsFn``: inputs are cast to the UNet's dtype, the output comes back as is. A module
    whose forward takes no ``encoder_hidden_states`` is an ``EpsFn`` already: it comes back
    as it is."""
    if not takes_unet_call(unet):
        return unet
    dtype = next(unet.parameters()).dtype

    def fn(x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return unet(x_t.to(dtype), t, encoder_hidden_states=cond.to(dtype), return_dict=False)[0]

    return fn
