"""Backward formulas of the pair ops (``cgidm::pair_noise``, ``cgidm::pair_contrast_loss``),
registered by ``cgidm.ops`` once their schemas exist (``register()``). In eager mode they
are Python; ``torch.compile`` and CUDA graphs remove that overhead."""
from __future__ import annotations

import torch


def _pair_noise_setup(ctx, inputs, output):
    x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar = inputs
    z, _ = output
    ctx.set_materialize_grads(False)
    ctx.shared = noise_pre is None
    ctx.mask_batched = mask.numel() != x0[0].numel()
    ctx.mask_shape = mask.shape
    ctx.dtypes = [None if t is None else t.dtype for t in inputs]
    ctx.save_for_backward(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar, z)


def _pair_noise_backward(ctx, grad_z, grad_x_t):
    x0, x, mask, noise_ft, noise_pre, sa, sb, z = ctx.saved_tensors
    needs = ctx.needs_input_grad
    b, k = x0.shape[0], noise_ft.shape[0] // x0.shape[0]
    a = sa.float().view(-1, 1, 1, 1)
    s = sb.float().view(-1, 1, 1, 1)
    g_ft = grad_x_t[0].float() if grad_x_t is not None else torch.zeros_like(noise_ft, dtype=torch.float32)
    g_pre = grad_x_t[1].float() if grad_x_t is not None else torch.zeros_like(g_ft)
    # d x_t / d z = sqrt_abar for both halves; the K samples of an image share its z.
    g_both = g_ft + g_pre
    g_z = (a * g_both).view(b, k, *x0.shape[1:]).sum(1)
    if grad_z is not None:
        g_z = g_z + grad_z.float()
    m = mask.float().reshape(-1, *x0.shape[1:]) if ctx.mask_batched else mask.float().reshape(x0.shape[1:])
    grads = [None] * 7

    def cast(g, i):
        return g.to(ctx.dtypes[i])

    if needs[0]:
        grads[0] = cast(g_z * m, 0)
    if needs[1]:
        grads[1] = cast(g_z * (1 - m), 1)
    if needs[2]:
        g_m = g_z * (x0.float() - x.float())
        if not ctx.mask_batched:
            g_m = g_m.sum(0)
        grads[2] = cast(g_m.reshape(ctx.mask_shape), 2)
    if needs[3]:
        grads[3] = cast(s * (g_both if ctx.shared else g_ft), 3)
    if needs[4] and not ctx.shared:
        grads[4] = cast(s * g_pre, 4)
    if needs[5]:
        zk = z.float().repeat_interleave(k, dim=0)
        grads[5] = cast((zk * g_both).flatten(1).sum(1).view(sa.shape), 5)
    if needs[6]:
        n_pre = noise_ft if ctx.shared else noise_pre
        g_s = noise_ft.float() * g_ft + n_pre.float() * g_pre
        grads[6] = cast(g_s.flatten(1).sum(1).view(sb.shape), 6)
    return tuple(grads)


def _pair_contrast_loss_setup(ctx, inputs, output):
    eps_ft, eps_pre, noise_ft, noise_pre = inputs
    _, seed_ft, seed_pre = output
    # The seeds are rarely used as outputs: zero-filled gradients for them would cost two
    # full passes (more than the kernel itself).
    ctx.set_materialize_grads(False)
    ctx.shared = noise_pre is None
    ctx.dtypes = [None if t is None else t.dtype for t in inputs]
    ctx.save_for_backward(seed_ft, seed_pre)


def _pair_contrast_loss_backward(ctx, grad_loss, grad_seed_ft, grad_seed_pre):
    seed_ft, seed_pre = ctx.saved_tensors
    needs = ctx.needs_input_grad
    m = seed_ft[0].numel()
    g_ft = g_pre = None
    if grad_loss is not None:
        g = grad_loss.float().view((-1,) + (1,) * (seed_ft.dim() - 1))
        g_ft, g_pre = seed_ft * g, seed_pre * g
    # The seeds are outputs too (seed = +-2(eps - n)/M): their own gradients, for completeness.
    if grad_seed_ft is not None:
        g_ft = grad_seed_ft.float() * (2.0 / m) + (0 if g_ft is None else g_ft)
    if grad_seed_pre is not None:
        g_pre = grad_seed_pre.float() * (-2.0 / m) + (0 if g_pre is None else g_pre)
    if g_ft is None:
        g_ft = torch.zeros_like(seed_ft)
    if g_pre is None:
        g_pre = torch.zeros_like(seed_pre)
    grads = [None] * 4
    if needs[0]:
        grads[0] = g_ft.to(ctx.dtypes[0])
    if needs[1]:
        grads[1] = g_pre.to(ctx.dtypes[1])
    if needs[2]:
        grads[2] = (-(g_ft + g_pre) if ctx.shared else -g_ft).to(ctx.dtypes[2])
    if needs[3] and not ctx.shared:
        grads[3] = (-g_pre).to(ctx.dtypes[3])
    return tuple(grads)


def _not_differentiable(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(f"cgidm::{name} is a PGD step, not differentiable: call it on detached tensors "
                           "(or under torch.no_grad())")
    return backward


def register() -> None:
    """Registers the formulas on the ops (``cgidm.ops`` calls it after defining them). The
    PGD steps get a backward that refuses: without one, a graph through them would give no
    gradient and only a warning, with the compiled kernels, but a gradient with the default."""
    for name in ("pgd_update", "linf_update"):
        torch.library.register_autograd(f"cgidm::{name}", _not_differentiable(name))
    torch.library.register_autograd(
        "cgidm::pair_noise", _pair_noise_backward, setup_context=_pair_noise_setup
    )
    torch.library.register_autograd(
        "cgidm::pair_contrast_loss", _pair_contrast_loss_backward, setup_context=_pair_contrast_loss_setup
    )
