"""Triton kernel of the counter-based draws (semantics and spec: ``cgidm.rng``, reference
``cgidm.rng.counter_draws``).

Design limits:
- Grid ``(N, ceil(J / BLOCK), S)``: one program per sample ``n = b*K + k``, block of
  ``BLOCK`` Philox counters ``j`` (4 latent entries each) and noise stream ``s`` (S = 1
  shared, 2 paper). Pure function of (key, step, k, j, s): no state, no atomics, no host
  sync; ``step`` is read from device memory, so a captured CUDA graph draws the step its
  0-d tensor holds at replay.
- Philox4x32-10 is ``triton.language.random.philox_impl`` (the same algorithm as
  Random123's and ``cgidm.rng.philox4x32``: checked by tests/test_rng.py).
- Box–Muller in fp32. On CUDA log/cos/sin are libdevice's ``__nv_logf``/``__nv_cosf``/
  ``__nv_sinf`` (the functions the CUDA op calls: the two agree bit for bit), ``sqrt`` is
  ``sqrt_rn``; Triton's own ``tl.cos``/``tl.log`` may lower to approximate instructions.
  In the interpreter (CPU tensors, tests only; set ``TRITON_INTERPRET=1`` before triton is
  first imported) they are numpy's fp32 functions: normals agree with the reference to a
  few ulps, integers exactly.
- The timestep is drawn by the ``j``-block 0, stream 0 program of each sample.
- Element offsets are int64; grid axis 1 is below 65536 for latents under 2**26 entries.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice
from triton.language.random import philox_impl

from cgidm.kernels.pgd_update import launcher

BLOCK = 256
INTERPRET_BLOCK = 4096  # the interpreter pays per op, not per element

# Globals read inside @triton.jit code must be tl.constexpr: Triton's code generator refuses
# a plain Python number there (the interpreter, which the CPU tests run, does not check).
_STREAM_T = tl.constexpr(2)
_TWO_PI = tl.constexpr(6.2831855)  # fp32(2*pi), as cgidm.rng
_TWO_POW_M24 = tl.constexpr(5.9604644775390625e-08)  # 2**-24


@triton.jit
def _normal_pair(w0, w1, LIBDEVICE: tl.constexpr):
    u0 = ((w0 >> 8).to(tl.float32) + 0.5) * _TWO_POW_M24
    u1 = ((w1 >> 8).to(tl.float32) + 0.5) * _TWO_POW_M24
    theta = u1 * _TWO_PI
    if LIBDEVICE:
        r = tl.sqrt_rn(libdevice.log(u0) * -2.0)
        c = libdevice.cos(theta)
        s = libdevice.sin(theta)
    else:
        r = tl.sqrt_rn(tl.log(u0) * -2.0)
        c = tl.cos(theta)
        s = tl.sin(theta)
    return r * c, r * s


@triton.jit
def _draw_noise_kernel(
    keys_ptr,  # [B] int64
    step_ptr,  # [] int64
    t_ptr,  # [N] int64 out, N = B*K
    noise_ptr,  # [S, N, M] fp32 out
    N,
    K,
    M,  # C*H*W
    t_min,
    span,  # t_max - t_min + 1
    LIBDEVICE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    n = tl.program_id(0)
    jb = tl.program_id(1)
    s = tl.program_id(2)
    b = n // K
    k = n % K
    key = tl.load(keys_ptr + b)
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    step = (tl.load(step_ptr) & 0xFFFFFFFF).to(tl.uint32)

    j = jb.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    w0, w1, w2, w3 = philox_impl(
        j.to(tl.uint32), zero + step, zero + k.to(tl.uint32), zero + s.to(tl.uint32), k0, k1
    )
    n0, n1 = _normal_pair(w0, w1, LIBDEVICE)
    n2, n3 = _normal_pair(w2, w3, LIBDEVICE)
    base = noise_ptr + (s.to(tl.int64) * N + n) * M
    i = 4 * j
    tl.store(base + i, n0, mask=i < M)
    tl.store(base + i + 1, n1, mask=i + 1 < M)
    tl.store(base + i + 2, n2, mask=i + 2 < M)
    tl.store(base + i + 3, n3, mask=i + 3 < M)

    if (jb == 0) & (s == 0):
        zero1 = tl.zeros([1], dtype=tl.uint32)
        x, _, _, _ = philox_impl(zero1, zero1 + step, zero1 + k.to(tl.uint32), zero1 + _STREAM_T, k0, k1)
        kk = k.to(tl.int64)
        start = kk * span // K
        width = tl.maximum((kk + 1) * span // K - start, 1)
        # floor(u_t * width) exactly: (x >> 8) < 2**24, so the product fits int64.
        t = t_min + start + tl.minimum(((x >> 8).to(tl.int64) * width) >> 24, width - 1)
        tl.store(t_ptr + n + tl.arange(0, 1), t)


def interpreting() -> bool:
    """Whether CPU tensors can run here (triton was imported in interpreter mode)."""
    return not isinstance(_draw_noise_kernel, triton.runtime.JITFunction)


def draw_noise_triton(
    keys: torch.Tensor,  # [B] int64
    step: torch.Tensor,  # [] int64, on keys' device for capture
    k: int,
    latent_shape: list[int],  # [C, H, W]
    t_min: int,
    t_max: int,
    independent: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(t [B*K] int64, noise [S, B*K, C, H, W] fp32)``, ``S = 2 if independent else 1``;
    the launcher of ``cgidm::draw_noise_triton`` (schema: ``cgidm::draw_noise``)."""
    # the checks of the C++ op and the fake kernel (cgidm.ops._check_draw_noise), eagerly
    if keys.dim() != 1 or keys.dtype != torch.int64:
        raise ValueError(f"keys must be [B] int64, got {tuple(keys.shape)} {keys.dtype}")
    if step.numel() != 1 or step.dtype.is_floating_point:
        raise ValueError(f"step must be a 0-d integer tensor, got {step.dtype}")
    if k < 1 or len(latent_shape) != 3 or not 0 <= t_min <= t_max:
        raise ValueError(f"need k >= 1, latent_shape [C, H, W] and 0 <= t_min <= t_max, got k={k}, "
                         f"latent_shape={list(latent_shape)}, t_min={t_min}, t_max={t_max}")
    c, h, w = latent_shape
    b = keys.shape[0]
    n = b * k
    m = c * h * w
    s = 2 if independent else 1
    t = torch.empty((n,), dtype=torch.int64, device=keys.device)
    noise = torch.empty((s, n, c, h, w), dtype=torch.float32, device=keys.device)
    if n == 0:
        return t, noise
    keys = keys.contiguous()
    step = step.to(device=keys.device, dtype=torch.int64).reshape(())
    if keys.is_cuda:
        block, libdev = BLOCK, True
    else:
        # Fake and functional tensors (tracing) launch nothing: only real ones need the interpreter.
        if type(keys) is torch.Tensor and not interpreting():
            raise RuntimeError(
                "the Triton draw_noise runs on CPU tensors only in Triton's interpreter: "
                "set TRITON_INTERPRET=1 before triton is first imported"
            )
        block, libdev = INTERPRET_BLOCK, False
    groups = max((m + 3) // 4, 1)
    grid = (n, triton.cdiv(groups, block), s)
    if grid[1] > 65535:  # CUDA's limit on a grid's second axis
        raise ValueError(f"draw_noise_triton: a latent of {m} elements is over the kernel's limit "
                         f"({65535 * block * 4}); use the compiled cgidm::draw_noise")
    launcher(_draw_noise_kernel)[grid](
        keys, step, t, noise, n, k, m, t_min, t_max - t_min + 1, LIBDEVICE=libdev, BLOCK=block
    )
    return t, noise
