"""Triton kernel of the fused L-inf PGD update of ``cgidm protect`` (semantics:
``cgidm.reference.linf_pgd_update_ref``).

Design limits:
- One program per image: whether the image's gradient is all finite (an image with a
  non-finite entry takes no step) is reduced inside one program, so no atomics, no second
  launch, no host sync. One SM per image; the update is a tiny part of a PGD step.
- Two sweeps over the image: the finiteness check; then the sign step, the budget clip and
  the pixel-range clip, elementwise in the reference's order and fp32 arithmetic. Inputs
  are read in any float dtype, math and the output are fp32, ``skipped`` is int8 in the
  kernel and bool outside.
- Inputs must be contiguous (the launcher makes them so); offsets are int64.
- CPU tensors run in Triton's interpreter (``TRITON_INTERPRET=1`` before triton is first
  imported; slow: tests only).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# the same block sizes as the L2 update, and the same interpreter check
from cgidm.reference import check_linf_scalars
from cgidm.kernels.pgd_update import BLOCK, INTERPRET_BLOCK, check_floats, interpreter_inputs, launcher


@triton.jit
def _linf_update_kernel(
    delta_ptr,  # [B, ...]
    grad_ptr,  # [B, ...]
    x_ptr,  # [B, ...] the clean image
    delta_out_ptr,  # [B, ...] fp32
    skipped_ptr,  # [B] int8
    m,  # entries per image
    alpha,
    eps,
    lo,
    hi,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    base = b * m

    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, m, BLOCK):
        inb = (start + tl.arange(0, BLOCK)) < m
        g = tl.load(grad_ptr + base + start + tl.arange(0, BLOCK), mask=inb, other=0.0).to(tl.float32)
        # |g| < inf is false for inf and NaN alike.
        bad = tl.maximum(bad, tl.where(tl.abs(g) < float("inf"), 0, 1))
    any_bad = tl.max(bad, axis=0)
    step = any_bad == 0
    tl.store(skipped_ptr + b, any_bad.to(tl.int8))

    for start in range(0, m, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        inb = (start + tl.arange(0, BLOCK)) < m
        g = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        s = tl.where(g > 0.0, alpha, tl.where(g < 0.0, -alpha, 0.0))
        s = tl.where(step, s, 0.0)
        d = tl.load(delta_ptr + offs, mask=inb, other=0.0).to(tl.float32) + s
        # NaN kept (torch.clamp's rule): Triton's minimum/maximum drop a NaN operand by default
        d = tl.minimum(tl.maximum(d, -eps, propagate_nan=tl.PropagateNan.ALL), eps, propagate_nan=tl.PropagateNan.ALL)
        xv = tl.load(x_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        d = tl.minimum(tl.maximum(d, lo - xv, propagate_nan=tl.PropagateNan.ALL), hi - xv, propagate_nan=tl.PropagateNan.ALL)
        tl.store(delta_out_ptr + offs, d, mask=inb)


def linf_update_triton(
    delta: torch.Tensor,  # [B, ...]
    grad: torch.Tensor,  # [B, ...] d objective / d image
    x: torch.Tensor,  # [B, ...] the clean image, in [lo, hi]
    alpha: float,
    eps: float,
    lo: float = -1.0,
    hi: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One L-inf PGD ascent step; returns ``(delta [B, ...] fp32, skipped [B] bool)``."""
    if delta.dim() < 1 or not (grad.shape == delta.shape and x.shape == delta.shape):
        raise ValueError("delta, grad and x must have one shape [B, ...]")
    check_floats("L-inf update", delta=delta, grad=grad, x=x)
    check_linf_scalars(alpha, eps, lo, hi)
    b = delta.shape[0]
    m = delta[0].numel() if b > 0 else 0
    delta_out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    skipped = torch.zeros((b,), dtype=torch.int8, device=delta.device)
    if b == 0:
        return delta_out, skipped.bool()
    tensors = [t.contiguous() for t in (delta, grad, x)]
    if delta.is_cuda:
        block, launch = BLOCK, {"num_warps": 8}
    else:
        tensors = interpreter_inputs(tensors, delta, "L-inf update")
        block, launch = INTERPRET_BLOCK, {}
    # wrap_triton: traced as a kernel call under torch.compile / make_fx (the launcher is
    # the body of the torch op cgidm::linf_update_triton, see cgidm.ops.triton_ops).
    launcher(_linf_update_kernel)[(b,)](
        *tensors, delta_out, skipped, m,
        float(alpha), float(eps), float(lo), float(hi),
        BLOCK=block, **launch,
    )
    return delta_out, skipped.bool()
