"""The compiled core's ops (cgidm/ops.py), every implementation against an independent
expectation.

Implementations under test: ``cpp`` (the extension's CPU kernels) and ``cuda`` (its CUDA
kernels); the Triton PGD update has its own module (test_kernels_triton.py). Their values
are compared with each op written out in float64 in this file (``expect_*``), not with
``cgidm.reference``, and computed on the implementation's own device: a CUDA result is never
compared with a CPU computation or a CPU generator's draws.

The plain-torch reference (``cgidm.reference``) and the same functions registered as the
ops' ``default`` kernel (reached by redispatch) are checked against the float64 expectation
in fp32 (``test_reference_and_default_kernel_match_the_float64_expectation``). Over the
dtype/shape grid the ``default`` kernel gets dtype and shape checks only
(``test_default_kernel_*_dtypes_and_shapes``): its values there would be the reference
compared with itself.

Tolerance (the 2x dtype rule, csrc/README.md): an implementation's error against the float64 expectation must be
within 2x the error of plain torch in the same dtype (the written-out op evaluated in that
dtype, or in fp32 where the op's math is fp32 whatever the storage), plus a tiny absolute
floor. TF32 is off in this module: fp32 is compared.
"""
from __future__ import annotations

import ctypes
import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch

from cgidm import ops as cgidm_ops
from cgidm import reference
from cgidm.testing.precision import full_fp32

SHAPES = [(4, 64, 64), (4, 40, 56), (3, 17, 23)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["cpp", "cuda"]  # compared with the float64 expectation
DEVICES = ["cpu", "cuda"]


@pytest.fixture(autouse=True)
def _full_fp32():
    """No TF32 in fp32 matmuls and convolutions (the tiny UNet of the inversion tests), and
    deterministic cuDNN algorithms: those tests compare two runs of the same model."""
    with full_fp32():
        yield


# --------------------------------------------------------------------------- helpers


def assert_within_rule(got, want, plain, what: str, floor: float = 2e-6) -> None:
    """``|got - want| <= 2 |plain - want| + floor * max(1, |want|)`` (max over entries);
    ``want`` is the float64 expectation (or an fp32 reference), ``plain`` plain torch in the
    dtype under test; this module computes both on ``got``'s device."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want, plain = got.double().cpu(), want.double().cpu(), plain.double().cpu()
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{what}: finiteness differs"
    err = (got - want).abs().nan_to_num(0.0).max().item()
    plain_err = (plain - want).abs().nan_to_num(0.0).max().item()
    bound = 2 * plain_err + floor * max(1.0, want.abs().nan_to_num(0.0).max().item())
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (plain torch {plain_err:.3g})"


def assert_close_fp32(got, want, what: str, rtol: float = 1e-5) -> None:
    """fp32 against the float64 expectation: within ``rtol`` of the largest entry."""
    assert got.shape == want.shape and got.device == want.device, what
    err = (got.double() - want.double()).abs().max().item()
    assert err <= rtol * max(1.0, want.abs().max().item()), f"{what}: error {err:.3g}"


def require(impl: str) -> str:
    """The device ``impl`` runs on; skips when it cannot run here."""
    if impl == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        if not cgidm_ops.has_cuda():
            pytest.skip("extension not built")
        return "cuda"
    if impl == "cpp" and not cgidm_ops.has_cpp():
        pytest.skip("extension not built")
    return "cpu"


def require_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return device


_DEFAULT_KEYS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def raw_op(impl: str, name: str):
    """The op ``cgidm::<name>`` as ``impl`` runs it (all outputs)."""
    op = getattr(torch.ops.cgidm, name).default
    if impl == "default":
        return lambda *args: op.redispatch(_DEFAULT_KEYS, *args)
    return op


def public_ops(impl: str) -> SimpleNamespace:
    """``get_ops``-style namespace (reference signatures) for ``impl``."""
    if impl == "default":
        pgd = raw_op("default", "pgd_update")
        return SimpleNamespace(
            pair_noise=raw_op("default", "pair_noise"),
            pair_contrast_loss=lambda *a: raw_op("default", "pair_contrast_loss")(*a)[0],
            pgd_update=lambda d, g, x0, xi, m, a, e, lo=-100.0, hi=100.0, ps=True: pgd(d, g, x0, xi, m, a, e, lo, hi, ps),
        )
    return cgidm_ops.get_ops(impl)


def to(ts, **kw):
    return [t if t is None else t.to(**kw) for t in ts]


def maybe_strided(t: torch.Tensor, contiguous: bool) -> torch.Tensor:
    """Same values; non-contiguous (channels-last storage) unless ``contiguous``."""
    if contiguous or t.dim() != 4:
        return t
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def abar_schedule() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def pair_noise_inputs(shape, b, k, dtype, shared, contiguous=True, mask_batched=False):
    c, h, w = shape
    n = b * k
    x0 = torch.randn(b, c, h, w)
    x = 3 * torch.randn(b, c, h, w)
    mask = (torch.rand((b, c, h, w) if mask_batched else (c, h, w)) > 0.5).float()
    noise_ft = torch.randn(n, c, h, w)
    noise_pre = None if shared else torch.randn(n, c, h, w)
    t = torch.randint(1, 1000, (n,))
    abar = abar_schedule()[t]
    sa, sb = abar.sqrt().float(), (1 - abar).sqrt().float()
    data = [maybe_strided(v.to(dtype), contiguous) if v is not None else None for v in (x0, x, mask, noise_ft, noise_pre)]
    return (*data, sa, sb)


def pgd_inputs(shape, b, dtype, contiguous=True, mask_batched=False, grad_kind="normal"):
    c, h, w = shape
    delta = 30 * torch.randn(b, c, h, w)
    grad = torch.randn(b, c, h, w)
    if grad_kind == "zero-first":
        grad[0] = 0
    elif grad_kind == "nan-first":
        grad[0, 0, 0, 0] = float("nan")
    elif grad_kind == "inf-last":
        grad[-1, -1, -1, -1] = float("inf")
    elif grad_kind == "all-zero":
        grad.zero_()
    x0 = torch.randn(b, c, h, w)
    x_init = 60 * torch.randn(b, c, h, w)
    mask = (torch.rand((b, c, h, w) if mask_batched else (c, h, w)) > 0.5).float()
    if grad_kind == "inf-last":
        mask[..., -1, -1, -1] = 0  # a free entry: on a kept one inf * 0 = NaN, another case
    data = [maybe_strided(v.to(dtype), contiguous) for v in (grad, x0, x_init, mask)]
    return maybe_strided(delta, contiguous), *data


# --------------------------------------------------------------------------- the ops written out
# Independent of cgidm.reference: each op as docs/faithfulness.md states it, in the dtype given
# (float64: the expectation; the storage dtype or fp32: plain torch, the rule's yardstick).


def expect_pair_noise(x0, x, mask, noise_ft, noise_pre, sqrt_abar, sqrt_one_minus_abar, dtype=torch.float64):
    """``z = x0 M + x (1 - M)``; sample ``n = b K + k`` of image ``b``:
    ``x_t[0, n] = sqrt(abar_n) z_b + sqrt(1 - abar_n) noise_ft[n]``, ``x_t[1, n]`` the same with
    ``noise_pre[n]`` (``noise_ft[n]`` when shared)."""
    b, n = x0.shape[0], noise_ft.shape[0]
    m = mask.to(dtype).reshape(-1, *x0.shape[1:])
    z = x0.to(dtype) * m + x.to(dtype) * (1 - m)
    z_of_sample = z[torch.arange(n, device=z.device) // (n // b)]
    a = sqrt_abar.to(dtype).view(n, 1, 1, 1)
    s = sqrt_one_minus_abar.to(dtype).view(n, 1, 1, 1)
    n_pre = noise_ft if noise_pre is None else noise_pre
    return z, torch.stack([a * z_of_sample + s * noise_ft.to(dtype), a * z_of_sample + s * n_pre.to(dtype)])


def expect_contrast_loss(eps_ft, eps_pre, noise_ft, noise_pre, grad_loss, dtype=torch.float64):
    """Per sample ``mean((eps_ft - n)^2) - mean((eps_pre - n')^2)`` (``n' = n`` when shared),
    the math in ``dtype``, and the gradients of ``sum(loss * grad_loss)`` with respect to the
    given inputs (in the inputs' own dtypes: pass float64 inputs for the expectation)."""
    leaves = [None if t is None else t.detach().requires_grad_(True) for t in (eps_ft, eps_pre, noise_ft, noise_pre)]
    e_ft, e_pre, n_ft, n_pre = [None if t is None else t.to(dtype) for t in leaves]
    n_pre = n_ft if n_pre is None else n_pre
    loss = (e_ft - n_ft).pow(2).flatten(1).mean(1) - (e_pre - n_pre).pow(2).flatten(1).mean(1)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None], grad_loss.to(dtype))
    return loss.detach(), grads


def expect_pgd_update(delta, grad, x0, x_init, mask, alpha=2.0, eps=70.0, clamp_min=-100.0, clamp_max=100.0,
                      per_sample=True, dtype=torch.float64):
    """One L2 PGD step: ``g`` = the gradient on the free entries, normalised per image (or
    over the batch); no step where that norm is 0 or not finite; ``delta - alpha g``, then
    ``x_init + delta`` clamped to ``[clamp_min, clamp_max]``, then ``delta`` projected onto
    the L2 ball of radius ``eps`` (per image or over the batch); ``z`` composed from it."""
    delta, grad, x0, x_init = (t.to(dtype) for t in (delta, grad, x0, x_init))
    b = delta.shape[0]
    free = 1 - mask.to(dtype).reshape(-1, *delta.shape[1:])
    groups = b if per_sample else 1

    def norm(v):  # [B, 1, 1, 1]: each image's norm, or the batch's for every image
        return v.reshape(groups, -1).pow(2).sum(1).sqrt().repeat_interleave(b // groups).view(b, 1, 1, 1)

    g = grad * free
    g_norm = norm(g)
    ok = torch.isfinite(g_norm) & (g_norm > 0)
    step = torch.where(ok, g / g_norm, 0.0)
    new = (x_init + delta - alpha * step).clamp(clamp_min, clamp_max) - x_init
    new_norm = norm(new)
    new = torch.where(new_norm > eps, new * (eps / new_norm), new)
    return new, x0 * (1 - free) + (x_init + new) * free


# --------------------------------------------------------------------------- pair_noise

PAIR_NOISE_CASES = [
    (shape, dtype, bk, shared)
    for shape, dtype, bk, shared in itertools.product(SHAPES, DTYPES, [(1, 1), (2, 3)], [True, False])
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype,bk,shared", PAIR_NOISE_CASES)
def test_pair_noise_matches_the_float64_expectation(impl, shape, dtype, bk, shared):
    device = require(impl)
    args = to(pair_noise_inputs(shape, *bk, dtype, shared), device=device)
    want = expect_pair_noise(*args)
    plain = expect_pair_noise(*args, dtype=dtype)
    got = public_ops(impl).pair_noise(*args)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, g, w, p in zip(("z", "x_t"), got, want, plain):
        assert_within_rule(g, w, p, f"{impl} pair_noise {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,bk,shared", PAIR_NOISE_CASES)
def test_default_kernel_pair_noise_dtypes_and_shapes(device, shape, dtype, bk, shared):
    """dtype and shape only: the default kernel is the reference (its values:
    test_reference_and_default_kernel_match_the_float64_expectation)."""
    args = to(pair_noise_inputs(shape, *bk, dtype, shared), device=require_device(device))
    z, x_t = public_ops("default").pair_noise(*args)
    b, n = bk[0], bk[0] * bk[1]
    assert (z.dtype, z.shape, z.device.type) == (dtype, (b, *shape), device)
    assert (x_t.dtype, x_t.shape, x_t.device.type) == (dtype, (2, n, *shape), device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_batched", [False, True])
def test_pair_noise_strided_inputs_and_batched_mask(impl, mask_batched):
    device = require(impl)
    args = to(pair_noise_inputs((3, 17, 23), 2, 2, torch.float32, False, contiguous=False, mask_batched=mask_batched),
              device=device)
    assert not args[0].is_contiguous()
    want, plain = expect_pair_noise(*args), expect_pair_noise(*args, dtype=torch.float32)
    for name, g, w, p in zip(("z", "x_t"), public_ops(impl).pair_noise(*args), want, plain):
        assert_within_rule(g, w, p, f"{impl} strided pair_noise {name}")


@pytest.mark.parametrize("impl", IMPLS + ["default"])
def test_pair_noise_promotes_like_the_reference(impl):
    device = require(impl)
    x0, x, mask, noise_ft, _, sa, sb = pair_noise_inputs((3, 5, 7), 2, 1, torch.float16, True)
    args = to((x0, x, mask.float(), noise_ft.float(), None, sa, sb), device=device)  # z fp32 (mask), x_t fp32
    got = public_ops(impl).pair_noise(*args)
    assert [g.dtype for g in got] == [w.dtype for w in reference.pair_noise_ref(*args)] == [torch.float32] * 2
    for g, w, p in zip(got, expect_pair_noise(*args), expect_pair_noise(*args, dtype=torch.float32)):
        assert_within_rule(g, w, p, f"{impl} promoted pair_noise")


@pytest.mark.parametrize("impl", IMPLS + ["default"])
def test_pair_noise_rejects_mismatched_batches(impl):
    device = require(impl)
    x0, x, mask, noise_ft, _, sa, sb = pair_noise_inputs((3, 5, 7), 2, 2, torch.float32, True)
    with pytest.raises(RuntimeError, match="multiple of the image batch"):
        public_ops(impl).pair_noise(*to((x0, x, mask, noise_ft[:3], None, sa[:3], sb[:3]), device=device))


@pytest.mark.parametrize("impl", IMPLS + ["default"])
def test_pair_noise_and_pgd_update_refuse_a_mask_of_another_shape(impl):
    # the right element count in another order would be read wrongly: refused (the
    # reference refuses these too); [1, C, H, W] is shared, as the reference broadcasts it
    device = require(impl)
    x0, x, _, noise_ft, _, sa, sb = pair_noise_inputs((3, 5, 7), 2, 1, torch.float32, True)
    delta, grad, _, x_init, _ = pgd_inputs((3, 5, 7), 2, torch.float32)
    ops = public_ops(impl)
    for mask in (torch.ones(5, 3, 7), torch.ones(2 * 3 * 5 * 7), torch.ones(3, 2, 5, 7)):
        with pytest.raises(RuntimeError, match=r"mask must be \[C, H, W\] or \[B, C, H, W\]"):
            ops.pair_noise(*to((x0, x, mask, noise_ft, None, sa, sb), device=device))
        with pytest.raises(RuntimeError, match=r"mask must be \[C, H, W\] or \[B, C, H, W\]"):
            ops.pgd_update(*to((delta, grad, x0, x_init, mask), device=device), 2.0, 70.0)
        with pytest.raises(Exception):
            reference.pgd_update_ref(delta, grad, x0, x_init, mask, 2.0, 70.0)
    shared = (torch.rand(1, 3, 5, 7) > 0.5).float()
    for got, want in ((ops.pgd_update(*to((delta, grad, x0, x_init, shared), device=device), 2.0, 70.0),
                       reference.pgd_update_ref(delta, grad, x0, x_init, shared[0], 2.0, 70.0)),
                      (ops.pair_noise(*to((x0, x, shared, noise_ft, None, sa, sb), device=device)),
                       reference.pair_noise_ref(x0, x, shared, noise_ft, None, sa, sb))):
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu().float(), w.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS + ["default"])
def test_pgd_update_of_an_empty_batch(impl):
    device = require(impl)
    delta, grad, x0, x_init, mask = (t[:0] for t in pgd_inputs((3, 5, 7), 2, torch.float32))
    mask = torch.ones(3, 5, 7)
    got = public_ops(impl).pgd_update(*to((delta, grad, x0, x_init, mask), device=device), 2.0, 70.0)
    want = reference.pgd_update_ref(delta, grad, x0, x_init, mask, 2.0, 70.0)
    assert [tuple(g.shape) for g in got] == [tuple(w.shape) for w in want] == [(0, 3, 5, 7)] * 2


def test_default_pgd_update_returns_fp32_whatever_the_mask_dtype():
    delta, grad, x0, x_init, mask = pgd_inputs((3, 5, 7), 2, torch.float32)
    got = public_ops("default").pgd_update(delta, grad, x0, x_init, mask.double(), 2.0, 70.0)
    fake = cgidm_ops._pgd_update_fake(delta, grad, x0, x_init, mask.double(), 2.0, 70.0)
    assert [g.dtype for g in got] == [f.dtype for f in fake] == [torch.float32] * 2


# --------------------------------------------------------------------------- pair_contrast_loss

LOSS_CASES = [
    (shape, eps_dtype, noise_dtype, n, shared)
    for shape, eps_dtype, n, shared in itertools.product(SHAPES, DTYPES, [1, 6], [True, False])
    for noise_dtype in sorted({torch.float32, eps_dtype}, key=str)
]


def loss_inputs(shape, eps_dtype, noise_dtype, n, shared, contiguous=True):
    c, h, w = shape
    eps_ft = maybe_strided((torch.randn(n, c, h, w) * 1.1).to(eps_dtype), contiguous)
    eps_pre = maybe_strided((torch.randn(n, c, h, w) * 0.9).to(eps_dtype), contiguous)
    noise_ft = maybe_strided(torch.randn(n, c, h, w).to(noise_dtype), contiguous)
    noise_pre = None if shared else maybe_strided(torch.randn(n, c, h, w).to(noise_dtype), contiguous)
    return eps_ft, eps_pre, noise_ft, noise_pre


def loss_and_grads(fn, args, grad_loss):
    args = [a if a is None else a.detach().requires_grad_(True) for a in args]
    loss = fn(*args)
    grads = torch.autograd.grad(loss, [a for a in args if a is not None], grad_loss)
    return loss, grads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,eps_dtype,noise_dtype,n,shared", LOSS_CASES)
def test_pair_contrast_loss_and_gradients_match_the_float64_expectation(impl, shape, eps_dtype, noise_dtype, n, shared):
    device = require(impl)
    args = to(loss_inputs(shape, eps_dtype, noise_dtype, n, shared), device=device)
    grad_loss = torch.rand(n, device=device) + 0.5  # the engine's incoming gradient is 1 or 1/K; any works
    want = expect_contrast_loss(*to(args, dtype=torch.float64), grad_loss)
    plain = expect_contrast_loss(*args, grad_loss, dtype=torch.float32)  # the op's math is fp32
    got = loss_and_grads(public_ops(impl).pair_contrast_loss, args, grad_loss)
    assert got[0].dtype == torch.float32
    assert [g.dtype for g in got[1]] == [a.dtype for a in args if a is not None]
    assert_within_rule(got[0], want[0], plain[0], f"{impl} loss")
    for i, (g, w, p) in enumerate(zip(got[1], want[1], plain[1])):
        assert_within_rule(g, w, p, f"{impl} grad of input {i}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,eps_dtype,noise_dtype,n,shared", LOSS_CASES)
def test_default_kernel_pair_contrast_loss_dtypes_and_shapes(device, shape, eps_dtype, noise_dtype, n, shared):
    """dtype and shape only (loss, both seeds, every input's gradient): the default kernel is
    the reference (its values: test_reference_and_default_kernel_match_the_float64_expectation)."""
    args = to(loss_inputs(shape, eps_dtype, noise_dtype, n, shared), device=require_device(device))
    loss, seed_ft, seed_pre = raw_op("default", "pair_contrast_loss")(*args)
    assert (loss.dtype, loss.shape, loss.device.type) == (torch.float32, (n,), device)
    for seed in (seed_ft, seed_pre):
        assert (seed.dtype, seed.shape) == (torch.float32, (n, *shape))
    _, grads = loss_and_grads(public_ops("default").pair_contrast_loss, args, torch.ones(n, device=device))
    assert [(g.dtype, g.shape) for g in grads] == [(a.dtype, a.shape) for a in args if a is not None]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shared", [True, False])
def test_pair_contrast_loss_seeds(impl, shared):
    device = require(impl)
    args = to(loss_inputs((4, 40, 56), torch.float32, torch.float32, 3, shared, contiguous=False), device=device)
    eps_ft, eps_pre, noise_ft, noise_pre = args
    loss, seed_ft, seed_pre = raw_op(impl, "pair_contrast_loss")(*args)
    m = 4 * 40 * 56
    n_pre = noise_ft if shared else noise_pre

    def seeds(dtype):
        e_ft, e_pre, n_ft, n_p = (t.to(dtype) for t in (eps_ft, eps_pre, noise_ft, n_pre))
        return 2 * (e_ft - n_ft) / m, -2 * (e_pre - n_p) / m

    for name, g, w, p in zip(("seed_ft", "seed_pre"), (seed_ft, seed_pre), seeds(torch.float64), seeds(torch.float32)):
        assert_within_rule(g, w, p, f"{impl} {name}", floor=1e-9)
    want = expect_contrast_loss(*to(args, dtype=torch.float64), torch.ones(3, device=device, dtype=torch.float64))[0]
    plain = expect_contrast_loss(*args, torch.ones(3, device=device), dtype=torch.float32)[0]
    assert_within_rule(loss, want, plain, f"{impl} loss")


# --------------------------------------------------------------------------- pgd_update

PGD_CASES = [
    (shape, dtype, b, per_sample)
    for shape, dtype, b, per_sample in itertools.product(SHAPES, DTYPES, [1, 3], [True, False])
]


def run_pgd(fn, args, alpha=2.0, eps=70.0, per_sample=True):
    return fn(*args, alpha, eps, -100.0, 100.0, per_sample)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype,b,per_sample", PGD_CASES)
def test_pgd_update_matches_the_float64_expectation(impl, shape, dtype, b, per_sample):
    device = require(impl)
    args = to(pgd_inputs(shape, b, dtype), device=device)
    want = run_pgd(expect_pgd_update, args, per_sample=per_sample)
    plain = expect_pgd_update(*args, per_sample=per_sample, dtype=torch.float32)  # the op's math is fp32
    got = run_pgd(public_ops(impl).pgd_update, args, per_sample=per_sample)
    for name, g, w, p in zip(("delta", "z"), got, want, plain):
        assert g.dtype == torch.float32
        assert_within_rule(g, w, p, f"{impl} pgd_update {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,b,per_sample", PGD_CASES)
def test_default_kernel_pgd_update_dtypes_and_shapes(device, shape, dtype, b, per_sample):
    """dtype and shape only: the default kernel is the reference (its values:
    test_reference_and_default_kernel_match_the_float64_expectation)."""
    args = to(pgd_inputs(shape, b, dtype), device=require_device(device))
    for out in run_pgd(public_ops("default").pgd_update, args, per_sample=per_sample):
        assert (out.dtype, out.shape, out.device.type) == (torch.float32, (b, *shape), device)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "grad_kind,per_sample",
    [("zero-first", True), ("nan-first", True), ("inf-last", True), ("all-zero", True),
     ("nan-first", False), ("zero-first", False)],
)
def test_pgd_update_zero_and_nonfinite_gradients(impl, grad_kind, per_sample):
    device = require(impl)
    args = to(pgd_inputs((3, 17, 23), 3, torch.float32, grad_kind=grad_kind), device=device)
    delta, grad, x0, x_init, mask = args
    want = run_pgd(expect_pgd_update, args, per_sample=per_sample)
    plain = expect_pgd_update(*args, per_sample=per_sample, dtype=torch.float32)
    got = run_pgd(public_ops(impl).pgd_update, args, per_sample=per_sample)
    for name, g, w, p in zip(("delta", "z"), got, want, plain):
        assert torch.isfinite(g).all()
        assert_within_rule(g, w, p, f"{impl} pgd_update {grad_kind} {name}")
    # A skipped sample is only clamped and projected: the gradient must not leak in.
    stepped = run_pgd(public_ops(impl).pgd_update, (delta, torch.zeros_like(grad), x0, x_init, mask),
                      per_sample=per_sample)
    if per_sample:
        skipped = {"zero-first": [0], "nan-first": [0], "inf-last": [2], "all-zero": [0, 1, 2]}[grad_kind]
    else:
        skipped = [] if grad_kind == "zero-first" else [0, 1, 2]
    for i in skipped:
        torch.testing.assert_close(got[0][i], stepped[0][i], rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_pgd_update_strided_inputs_batched_mask_and_inactive_projection(impl, per_sample):
    device = require(impl)
    delta, grad, x0, x_init, mask = pgd_inputs((4, 40, 56), 2, torch.float32, contiguous=False, mask_batched=True)
    delta = maybe_strided(delta.contiguous() * 1e-3, contiguous=False)  # well inside the ball
    assert not delta.is_contiguous()
    args = to((delta, grad, x0, x_init, mask), device=device)
    for eps in (70.0, 1e4):
        want = run_pgd(expect_pgd_update, args, eps=eps, per_sample=per_sample)
        plain = expect_pgd_update(*args, eps=eps, per_sample=per_sample, dtype=torch.float32)
        got = run_pgd(public_ops(impl).pgd_update, args, eps=eps, per_sample=per_sample)
        for name, g, w, p in zip(("delta", "z"), got, want, plain):
            assert_within_rule(g, w, p, f"{impl} pgd_update eps={eps} {name}")


# --------------------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("impl", ["ref", "default"])
@pytest.mark.parametrize("device", DEVICES)
def test_reference_and_default_kernel_match_the_float64_expectation(impl, device):
    """The spec (cgidm.reference, and the same registered as the default kernel) in fp32
    against the ops written out in float64: odd shape, batch and K > 1, both noise modes,
    a batched mask, both norm modes, skipped samples."""
    require_device(device)
    ops = reference.REFERENCE_OPS if impl == "ref" else public_ops("default")
    for shared, mask_batched in ((True, False), (False, True)):
        args = to(pair_noise_inputs((3, 17, 23), 2, 3, torch.float32, shared, mask_batched=mask_batched), device=device)
        for name, g, w in zip(("z", "x_t"), ops.pair_noise(*args), expect_pair_noise(*args)):
            assert_close_fp32(g, w, f"{impl} pair_noise {name}")
        loss_args = to(loss_inputs((3, 17, 23), torch.float32, torch.float32, 6, shared), device=device)
        grad_loss = torch.rand(6, device=device) + 0.5
        got = loss_and_grads(ops.pair_contrast_loss, loss_args, grad_loss)
        want = expect_contrast_loss(*to(loss_args, dtype=torch.float64), grad_loss)
        assert_close_fp32(got[0], want[0], f"{impl} loss")
        for i, (g, w) in enumerate(zip(got[1], want[1])):
            assert_close_fp32(g, w, f"{impl} grad of input {i}")
    for grad_kind, per_sample in (("normal", True), ("normal", False), ("nan-first", True), ("inf-last", True)):
        args = to(pgd_inputs((3, 17, 23), 3, torch.float32, grad_kind=grad_kind), device=device)
        got = run_pgd(ops.pgd_update, args, per_sample=per_sample)
        for name, g, w in zip(("delta", "z"), got, run_pgd(expect_pgd_update, args, per_sample=per_sample)):
            assert_close_fp32(g, w, f"{impl} pgd_update {grad_kind} {name}")


# --------------------------------------------------------------------------- autograd through the pair


def fake_unet(x_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.sin(x_t) * w + 0.3 * x_t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,shared", [(1, True), (3, True), (1, False)])
def test_contrast_gradient_reaches_x_through_both_ops(impl, k, shared):
    """The engine's path: x -> pair_noise -> two models -> pair_contrast_loss -> d/dx,
    against autograd through the ops written out in float64."""
    device = require(impl)
    x0, x, mask, noise_ft, noise_pre, sa, sb = to(pair_noise_inputs((4, 40, 56), 2, k, torch.float32, shared),
                                                  device=device)
    w = torch.randn(2, 4, 40, 56, device=device)

    def grad_x(pair_noise, pair_contrast_loss, dtype):
        xx = x.to(dtype).requires_grad_(True)
        cast = to((x0, mask, noise_ft, noise_pre, sa, sb, w), dtype=dtype)
        x0_, mask_, n_ft, n_pre, sa_, sb_, w_ = cast
        _, x_t = pair_noise(x0_, xx, mask_, n_ft, n_pre, sa_, sb_)
        loss = pair_contrast_loss(fake_unet(x_t[0], w_[0]), fake_unet(x_t[1], w_[1]), n_ft, n_pre)
        (g,) = torch.autograd.grad(loss.view(2, k).mean(1).sum(), xx)
        return g

    def written_out(dtype):
        def loss_fn(e_ft, e_pre, n_ft, n_pre):
            n_pre = n_ft if n_pre is None else n_pre
            return (e_ft - n_ft).pow(2).flatten(1).mean(1) - (e_pre - n_pre).pow(2).flatten(1).mean(1)

        return grad_x(lambda *a: expect_pair_noise(*a, dtype=dtype), loss_fn, dtype)

    ops = public_ops(impl)
    got = grad_x(ops.pair_noise, ops.pair_contrast_loss, torch.float32)
    want, plain = written_out(torch.float64), written_out(torch.float32)
    assert want.abs().sum() > 0
    assert_within_rule(got, want, plain, f"{impl} d loss / d x", floor=1e-9)
    assert (got * mask).abs().max() == 0, "kept entries must get no gradient"


def test_registered_autograd_gradcheck():
    """Every input's gradient of both pair ops (not only x's), checked numerically. fp32 is
    enough: both ops are at most quadratic in any one entry, so central differences are
    exact up to rounding."""
    x0, x, mask, noise_ft, noise_pre, sa, sb = pair_noise_inputs((2, 3, 5), 2, 2, torch.float32, False)
    args = [a.detach().requires_grad_(True) for a in (x0, x, mask, noise_ft, noise_pre, sa, sb)]
    tol = dict(eps=1e-2, atol=2e-3, rtol=2e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "not double precision": see docstring
        assert torch.autograd.gradcheck(lambda *a: torch.ops.cgidm.pair_noise(*a), args, **tol)
        args[4] = None
        assert torch.autograd.gradcheck(lambda *a: torch.ops.cgidm.pair_noise(*a), args, **tol)
        e1, e2, n1, n2 = [a.detach().requires_grad_(True) for a in loss_inputs((2, 3, 5), torch.float32, torch.float32, 3, False)]
        assert torch.autograd.gradcheck(lambda *a: torch.ops.cgidm.pair_contrast_loss(*a), (e1, e2, n1, n2), **tol)
        assert torch.autograd.gradcheck(lambda *a: torch.ops.cgidm.pair_contrast_loss(*a, None), (e1, e2, n1), **tol)


# --------------------------------------------------------------------------- opcheck, compile


def opcheck_cases(device):
    x0, x, mask, noise_ft, noise_pre, sa, sb = to(pair_noise_inputs((3, 17, 23), 2, 2, torch.float32, False), device=device)
    grad_x = x.clone().requires_grad_(True)
    e1, e2, n1, n2 = to(loss_inputs((3, 17, 23), torch.float16, torch.float32, 4, False), device=device)
    delta, grad, px0, xi, pmask = to(pgd_inputs((3, 17, 23), 2, torch.float32), device=device)
    return [
        (torch.ops.cgidm.pair_noise.default, (x0, grad_x, mask, noise_ft, noise_pre, sa, sb)),
        (torch.ops.cgidm.pair_noise.default, (x0, grad_x, mask, noise_ft, None, sa, sb)),
        (torch.ops.cgidm.pair_contrast_loss.default, (e1.requires_grad_(True), e2.requires_grad_(True), n1, n2)),
        (torch.ops.cgidm.pair_contrast_loss.default, (e1, e2, n1, None)),
        (torch.ops.cgidm.pgd_update.default, (delta, grad, px0, xi, pmask, 2.0, 70.0, -100.0, 100.0, True)),
        (torch.ops.cgidm.pgd_update.default, (delta, grad, px0, xi, pmask, 2.0, 70.0, -100.0, 100.0, False)),
    ]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    for op, args in opcheck_cases(device):
        torch.library.opcheck(op, args)


def test_ops_trace_under_torch_compile_without_graph_breaks():
    """Forward through both pair ops and the PGD update in one graph each (fake kernels,
    schemas); the backward of the compiled forward uses the registered autograd."""
    ops = cgidm_ops.get_ops("auto")
    x0, x, mask, noise_ft, _, sa, sb = pair_noise_inputs((3, 17, 23), 2, 1, torch.float32, True)
    delta, grad, _, x_init, _ = pgd_inputs((3, 17, 23), 2, torch.float32)
    w = torch.randn(2, 3, 17, 23)

    def contrast(x):
        _, x_t = ops.pair_noise(x0, x, mask, noise_ft, None, sa, sb)
        return ops.pair_contrast_loss(fake_unet(x_t[0], w[0]), fake_unet(x_t[1], w[1]), noise_ft, None).sum()

    def update(delta, grad):
        return ops.pgd_update(delta, grad, x0, x_init, mask, 2.0, 70.0)

    def grad_of(fn):
        xx = x.clone().requires_grad_(True)
        return torch.autograd.grad(fn(xx), xx)[0]

    torch.testing.assert_close(grad_of(torch.compile(contrast, backend="aot_eager", fullgraph=True)), grad_of(contrast))
    compiled = torch.compile(update, backend="aot_eager", fullgraph=True)
    for g, w_ in zip(compiled(delta, grad), update(delta, grad)):
        torch.testing.assert_close(g, w_)


def capture_and_replay(ops, device="cuda"):
    """One PGD step's ops (fake models between them) captured in a CUDA graph, replayed
    on new inputs copied into the captured buffers; returns (replayed, eager) outputs."""
    x0, x, mask, noise_ft, noise_pre, sa, sb = to(pair_noise_inputs((4, 40, 56), 2, 2, torch.float32, False), device=device)
    delta, _, _, x_init, _ = to(pgd_inputs((4, 40, 56), 2, torch.float32), device=device)
    w = torch.randn(2, 4, 40, 56, device=device)

    def step():
        xx = x.detach().requires_grad_(True)
        _, x_t = ops.pair_noise(x0, xx, mask, noise_ft, noise_pre, sa, sb)
        loss = ops.pair_contrast_loss(fake_unet(x_t[0], w[0]), fake_unet(x_t[1], w[1]), noise_ft, noise_pre)
        (g,) = torch.autograd.grad(loss.view(2, 2).mean(1).sum(), xx)
        return ops.pgd_update(delta, g, x0, x_init, mask, 2.0, 70.0)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up allocations and lazy initialisation outside the capture
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    for t in (x, noise_ft, noise_pre, delta):
        t.copy_(torch.randn_like(t) * t.std())
    graph.replay()
    torch.cuda.synchronize()
    return [c.clone() for c in captured], step()


@pytest.mark.parametrize("impl", ["cuda", "auto"])
def test_ops_replay_inside_a_cuda_graph(impl):
    if impl == "cuda":
        require("cuda")
    elif not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    replayed, eager = capture_and_replay(cgidm_ops.get_ops(impl))
    for r, e in zip(replayed, eager):
        torch.testing.assert_close(r, e, rtol=1e-6, atol=1e-6)


def loaded_cudart():
    """The CUDA runtime library torch loaded (its last-error state is the one the ops read)."""
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcudart.so" in line}
    if len(paths) != 1:
        pytest.skip(f"cannot tell which CUDA runtime torch uses ({sorted(paths)})")
    return ctypes.CDLL(paths.pop())


def test_a_pending_cuda_error_is_not_blamed_on_the_ops_launch():
    """The runtime keeps an earlier call's error until someone reads it: the op reports it as
    earlier (naming the kernel it was about to launch), not as its own failed launch, and
    the next call runs."""
    require("cuda")
    args = to(pgd_inputs((3, 5, 7), 2, torch.float32), device="cuda")
    ops = cgidm_ops.get_ops("cuda")
    ops.pgd_update(*args, 2.0, 70.0)  # initialised: nothing but the op runs below
    cudart = loaded_cudart()
    ptr = ctypes.c_void_p()
    assert cudart.cudaMalloc(ctypes.byref(ptr), ctypes.c_size_t(1 << 62)) != 0
    if cudart.cudaPeekAtLastError() == 0:
        pytest.skip("this runtime keeps no error from a failed cudaMalloc")
    with pytest.raises(RuntimeError, match=r"error from earlier work was pending before pgd_update_kernel .* was launched"):
        ops.pgd_update(*args, 2.0, 70.0)
    assert cudart.cudaPeekAtLastError() == 0
    ops.pgd_update(*args, 2.0, 70.0)


# --------------------------------------------------------------------------- get_ops


def test_get_ops_signatures_match_the_reference():
    import inspect

    for impl in ("auto", "cpp", "ref"):
        ops = cgidm_ops.get_ops(impl)
        for name in ("pair_noise", "pair_contrast_loss", "pgd_update"):
            got = inspect.signature(getattr(ops, name))
            want = inspect.signature(getattr(reference.REFERENCE_OPS, name))
            assert list(got.parameters) == list(want.parameters), (impl, name)
            defaults = [p.default for p in got.parameters.values()]
            assert defaults == [p.default for p in want.parameters.values()], (impl, name)


def test_get_ops_rejects_unknown_impl():
    with pytest.raises(ValueError, match="impl must be one of"):
        cgidm_ops.get_ops("fast")


def test_get_ops_ref_is_the_reference():
    assert cgidm_ops.get_ops("ref") is reference.REFERENCE_OPS


@pytest.mark.parametrize("impl", ["cpp", "auto"])
def test_get_ops_dispatches_cpu_tensors_to_the_extension(impl):
    require("cpp")
    ops = cgidm_ops.get_ops(impl)
    args = pgd_inputs((3, 17, 23), 1, torch.float32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        ops.pgd_update(*args, 2.0, 70.0)
    names = {e.key for e in prof.key_averages()}
    assert "cgidm::pgd_update" in names
    # The default kernel is the reference, which would show up as a vector norm.
    assert "aten::linalg_vector_norm" not in names


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """A random tiny SD-shaped UNet and a slightly perturbed copy as the "fine-tuned" one,
    with the scheduler's abar. Latents [3, 16, 16], prompts [77, 32]."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from cgidm.testing.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_pipeline")
    build_tiny_pipeline(root, size=16)
    pre = UNet2DConditionModel.from_pretrained(root / "unet").eval().requires_grad_(False)
    ft = UNet2DConditionModel.from_pretrained(root / "unet").eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=g))
    abar = DDPMScheduler.from_pretrained(root / "scheduler").alphas_cumprod
    return SimpleNamespace(ft=ft, pre=pre, abar=abar)


def run_invert(tiny_pair, ops, noise: str, k: int, device: str = "cpu", steps: int = 5):
    """A few PGD steps of ``reference.invert`` with ``ops`` on ``device``. The draws are
    counter-based (the same numbers on every device); the models' arithmetic is the
    device's: compare runs on the same device."""
    from cgidm import rng
    from cgidm.masks import block_mask

    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 3, 16, 16, generator=g)
    mask = block_mask(16, 16, channels=3, blocks_per_side=4)
    x_init = x0 * mask + torch.randn(2, 3, 16, 16, generator=g) * (1 - mask)
    cond_ft, cond_pre = torch.randn(2, 1, 77, 32, generator=g)
    ft, pre = tiny_pair.ft.to(device), tiny_pair.pre.to(device)
    cfg = reference.PGDConfig(steps=steps, noise=noise, k=k)
    return reference.invert(
        reference.unet_eps_fn(ft), reference.unet_eps_fn(pre), *to((x0, x_init, mask, cond_ft, cond_pre), device=device),
        tiny_pair.abar, cfg, keys=rng.image_keys(4, ["a", "b"], device), ops=ops,
    )


def assert_same_inversion(got, want) -> None:
    assert (want.delta.abs().sum(dim=(1, 2, 3)) > 0).all(), "the reference run did not move"
    torch.testing.assert_close(got.x_rec.cpu(), want.x_rec.cpu(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.delta.cpu(), want.delta.cpu(), rtol=1e-4, atol=1e-4)
    assert got.skipped_steps.cpu().tolist() == want.skipped_steps.cpu().tolist()
    assert got.loss_history == pytest.approx(want.loss_history, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("impl", ["cpp", "cuda"])
@pytest.mark.parametrize("noise,k", [("shared", 2), ("paper", 1)])
def test_invert_with_compiled_ops_recovers_the_reference_latents(tiny_pair, impl, noise, k):
    """The implementation inside the whole loop against the spec's loop, both on the
    implementation's device (same keys, same draws)."""
    device = require(impl)
    want = run_invert(tiny_pair, reference.REFERENCE_OPS, noise, k, device=device)
    got = run_invert(tiny_pair, cgidm_ops.get_ops(impl), noise, k, device=device)
    assert_same_inversion(got, want)


@pytest.mark.parametrize("impl", IMPLS + ["default"])
def test_pgd_update_keeps_a_nan_delta_nan(impl):
    """A NaN in delta (or a NaN alpha) comes out NaN where the reference's does, and the
    other entries as the reference has them: a clamp that dropped the NaN would hand back a
    finite number and shrink the whole image in the projection."""
    device = require(impl)
    d = torch.tensor([float("nan"), 0.1, 0.2, 0.0]).view(1, 1, 1, 4)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    z, m = torch.zeros(1, 1, 1, 4), torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 4)
    for alpha in (0.5, float("nan")):
        want = reference.pgd_update_ref(d, g, z, z, m, alpha, 1.0)
        got = public_ops(impl).pgd_update(*to((d, g, z, z, m), device=device), alpha, 1.0)
        assert torch.isnan(want[0]).any()
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, equal_nan=True)


@pytest.mark.parametrize("impl", ["ref", "cpp"])
def test_a_mask_or_a_latent_the_kernels_refuse_the_reference_refuses(impl):
    """One contract for every implementation: a mask in another shape than [C, H, W] or
    [B|1, C, H, W] is refused (not broadcast), and so is the loss of an empty latent."""
    if impl == "cpp":
        require("cpp")
    ops = cgidm_ops.get_ops(impl)
    a = [torch.randn(3, 4, 8, 8) for _ in range(4)]
    for bad in (torch.ones(8, 8), torch.ones(2, 4, 8, 8), torch.ones(4, 8, 7)):
        with pytest.raises((ValueError, RuntimeError), match="mask must be"):
            ops.pgd_update(*a, bad * 0.5, 0.5, 1.0)
        with pytest.raises((ValueError, RuntimeError), match="mask must be"):
            ops.pair_noise(a[0], a[1], bad, a[2], None, torch.ones(3), torch.ones(3))
    for good in (torch.ones(4, 8, 8), torch.ones(1, 4, 8, 8), torch.ones(3, 4, 8, 8)):
        ops.pgd_update(*a, good * 0.5, 0.5, 1.0)
    with pytest.raises((ValueError, RuntimeError), match="the loss of an empty latent is undefined"):
        ops.pair_contrast_loss(*[torch.randn(2, 0, 4, 4)] * 3, None)
