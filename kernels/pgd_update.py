"""Triton kernel of the fused L2 PGD update (semantics: ``cgidm.reference.pgd_update_ref``).

Design limits:
- One program per image (``per_sample=True``) or one program for the whole batch
  (``per_sample=False``, the paper's whole-tensor norm): a segment is reduced inside one
  program, so no atomics, no second launch, no host sync, and the result does not depend on
  the launch. The whole-batch mode runs on one SM; the update is a tiny part of a step.
- Three sweeps over the segment: gradient norm on the free entries; step + clamp + norm of
  the stepped delta (stored); projection + compose. Inputs are read in any float dtype,
  math and outputs are fp32, norms accumulate in fp32 BLOCK-wide partial sums.
- Inputs must be contiguous (the launcher makes them so); offsets are int64.
- CPU tensors run in Triton's interpreter (``TRITON_INTERPRET=1`` before triton is first
  imported; slow: tests only).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from cgidm.reference import check_mask

BLOCK = 1024
INTERPRET_BLOCK = 4096  # the interpreter pays per op, not per element: fewer, wider sweeps


@triton.jit
def _pgd_update_kernel(
    delta_ptr,  # [B, C, H, W]
    grad_ptr,  # [B, C, H, W]
    x0_ptr,  # [B, C, H, W]
    x_init_ptr,  # [B, C, H, W]
    mask_ptr,  # [C, H, W] or [B, C, H, W]
    delta_out_ptr,  # [B, C, H, W] fp32
    z_ptr,  # [B, C, H, W] fp32
    length,  # elements per program: C*H*W, or B*C*H*W for the whole-tensor norm
    m,  # C*H*W
    alpha,
    eps,
    clamp_min,
    clamp_max,
    MASK_BATCHED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    base = tl.program_id(0).to(tl.int64) * length

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, length, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        inb = (start + tl.arange(0, BLOCK)) < length
        moffs = offs if MASK_BATCHED else offs % m
        g = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        free = 1.0 - tl.load(mask_ptr + moffs, mask=inb, other=0.0).to(tl.float32)
        gf = g * free
        acc += gf * gf
    norm = tl.sqrt_rn(tl.sum(acc, axis=0))
    # NaN fails both comparisons: a non-finite gradient anywhere means no step.
    ok = (norm > 0.0) & (norm < float("inf"))
    safe_norm = tl.where(ok, norm, 1.0)

    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, length, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        inb = (start + tl.arange(0, BLOCK)) < length
        moffs = offs if MASK_BATCHED else offs % m
        g = tl.load(grad_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        free = 1.0 - tl.load(mask_ptr + moffs, mask=inb, other=0.0).to(tl.float32)
        gn = tl.where(ok, tl.div_rn(g * free, safe_norm), 0.0)
        d = tl.load(delta_ptr + offs, mask=inb, other=0.0).to(tl.float32) - alpha * gn
        xi = tl.load(x_init_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        d = tl.minimum(tl.maximum(xi + d, clamp_min, propagate_nan=tl.PropagateNan.ALL), clamp_max, propagate_nan=tl.PropagateNan.ALL) - xi  # NaN kept
        tl.store(delta_out_ptr + offs, d, mask=inb)
        acc += tl.where(inb, d * d, 0.0)
    dnorm = tl.sqrt_rn(tl.sum(acc, axis=0))
    factor = tl.where(dnorm > eps, tl.div_rn(eps, tl.maximum(dnorm, 1e-12)), 1.0)
    # The third sweep reads back what this program stored in the second.
    tl.debug_barrier()

    for start in range(0, length, BLOCK):
        offs = base + start + tl.arange(0, BLOCK)
        inb = (start + tl.arange(0, BLOCK)) < length
        moffs = offs if MASK_BATCHED else offs % m
        d = tl.load(delta_out_ptr + offs, mask=inb, other=0.0) * factor
        mk = tl.load(mask_ptr + moffs, mask=inb, other=0.0).to(tl.float32)
        x0 = tl.load(x0_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        xi = tl.load(x_init_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        tl.store(delta_out_ptr + offs, d, mask=inb)
        tl.store(z_ptr + offs, x0 * mk + (xi + d) * (1.0 - mk), mask=inb)


def interpreting() -> bool:
    """Whether CPU tensors can run here: triton itself (its library of @jit functions, not
    only this kernel) was imported in interpreter mode."""
    return not isinstance(tl.zeros, triton.runtime.JITFunction) and not isinstance(
        _pgd_update_kernel, triton.runtime.JITFunction
    )


def launcher(kernel):
    """``torch.library.wrap_triton(kernel)`` (traced as a kernel call under torch.compile /
    make_fx), or the kernel itself where the interpreter runs it: torch 2.13's
    ``wrap_triton`` hands an interpreted kernel back as it is, older ones refuse it."""
    if not isinstance(kernel, (triton.runtime.JITFunction, triton.runtime.Autotuner)):
        return kernel
    return torch.library.wrap_triton(kernel)


def interpreter_inputs(tensors: list, lead: torch.Tensor, what: str) -> list:
    """A CPU launch's inputs: numpy has no bfloat16, so the interpreter gets fp32 copies
    (exact). Fake and functional tensors (tracing) launch nothing: only a real ``lead``
    tensor needs the interpreter."""
    if type(lead) is torch.Tensor and not interpreting():
        raise RuntimeError(
            f"the Triton {what} runs on CPU tensors only in Triton's interpreter: "
            "set TRITON_INTERPRET=1 before triton is first imported"
        )
    return [t.float() if t.dtype == torch.bfloat16 else t for t in tensors]


FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_floats(what: str, **tensors: torch.Tensor) -> None:
    """``TypeError`` naming a tensor that is not a real float (complex, an integer): the
    kernels read real floats only (a bool mask is taken as 0/1 by the caller)."""
    for name, t in tensors.items():
        if t.dtype not in FLOATS:
            raise TypeError(f"the Triton {what}: {name} must be a real floating tensor, got {t.dtype}")


def pgd_update_triton(
    delta: torch.Tensor,  # [B, C, H, W]
    grad: torch.Tensor,  # [B, C, H, W]
    x0: torch.Tensor,  # [B, C, H, W]
    x_init: torch.Tensor,  # [B, C, H, W]
    mask: torch.Tensor,  # [C, H, W] or [B, C, H, W]
    alpha: float,
    eps: float,
    clamp_min: float = -100.0,
    clamp_max: float = 100.0,
    per_sample: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One L2 PGD step; returns ``(delta [B, C, H, W] fp32, z [B, C, H, W] fp32)``."""
    if not (grad.shape == delta.shape and x0.shape == delta.shape and x_init.shape == delta.shape):
        raise ValueError("delta, grad, x0 and x_init must have one shape")
    if not mask.is_floating_point() and not mask.is_complex():  # a bool or integer mask: 0/1, as the others read it
        mask = mask.float()
    check_floats("PGD update", delta=delta, grad=grad, x0=x0, x_init=x_init, mask=mask)
    b = delta.shape[0]
    m = math.prod(delta.shape[1:])
    # a mask with the right element count in another shape would be read in the wrong order
    check_mask(mask, delta)
    mask_batched = tuple(mask.shape) not in (tuple(delta.shape[1:]), (1, *delta.shape[1:]))
    delta_out = torch.empty(delta.shape, dtype=torch.float32, device=delta.device)
    z = torch.empty_like(delta_out)
    if delta.numel() == 0:
        return delta_out, z
    tensors = [t.contiguous() for t in (delta, grad, x0, x_init, mask)]
    if delta.is_cuda:
        kernel, block, launch = _pgd_update_kernel, BLOCK, {"num_warps": 8}
    else:
        tensors = interpreter_inputs(tensors, delta, "PGD update")
        kernel, block, launch = _pgd_update_kernel, INTERPRET_BLOCK, {}
    grid = (b,) if per_sample else (1,)
    # wrap_triton: traced as a kernel call under torch.compile / make_fx (the launcher is
    # the body of the torch op cgidm::pgd_update_triton, see cgidm.ops.triton_ops).
    launcher(kernel)[grid](
        *tensors, delta_out, z,
        m if per_sample else b * m, m,
        float(alpha), float(eps), float(clamp_min), float(clamp_max),
        MASK_BATCHED=mask_batched, BLOCK=block, **launch,
    )
    return delta_out, z
