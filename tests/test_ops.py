"""The compiled core's ops (cgidm/ops.py) against the plain-torch reference.

Implementations under test: ``cpp`` (the extension's CPU kernels), ``cuda`` (its CUDA
kernels), ``default`` (the reference registered as the ops' default kernel, reached by
redispatch). The Triton PGD update has its own module (test_kernels_triton.py).

Tolerance (STYLE.md): an implementation's error against the fp32 reference must be within
2x the error of plain torch in the same dtype, plus a tiny absolute floor.
"""
from __future__ import annotations

import itertools
import warnings
from types import SimpleNamespace

import pytest
import torch

from cgidm import ops as cgidm_ops
from cgidm import reference

SHAPES = [(4, 64, 64), (4, 40, 56), (3, 17, 23)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
IMPLS = ["cpp", "cuda", "default"]


# --------------------------------------------------------------------------- helpers


def assert_within_rule(got, want, plain, what: str, floor: float = 2e-6) -> None:
    """``|got - want| <= 2 |plain - want| + floor * max(1, |want|)`` (max over entries);
    ``want`` is the fp32 reference, ``plain`` plain torch in the dtype under test."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    got, want, plain = got.double().cpu(), want.double().cpu(), plain.double().cpu()
    assert torch.isfinite(got).all() == torch.isfinite(want).all(), f"{what}: finiteness differs"
    err = (got - want).abs().nan_to_num(0.0).max().item()
    plain_err = (plain - want).abs().nan_to_num(0.0).max().item()
    bound = 2 * plain_err + floor * max(1.0, want.abs().nan_to_num(0.0).max().item())
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (plain torch {plain_err:.3g})"


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


# --------------------------------------------------------------------------- pair_noise

PAIR_NOISE_CASES = [
    (shape, dtype, bk, shared)
    for shape, dtype, bk, shared in itertools.product(SHAPES, DTYPES, [(1, 1), (2, 3)], [True, False])
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype,bk,shared", PAIR_NOISE_CASES)
def test_pair_noise_matches_reference(impl, shape, dtype, bk, shared):
    device = require(impl)
    args = pair_noise_inputs(shape, *bk, dtype, shared)
    want = reference.pair_noise_ref(*[a if a is None else a.float() for a in args])
    plain = reference.pair_noise_ref(*args)
    got = public_ops(impl).pair_noise(*to(args, device=device))
    assert got[0].dtype == dtype and got[1].dtype == dtype
    for name, g, w, p in zip(("z", "x_t"), got, want, plain):
        assert_within_rule(g, w, p, f"{impl} pair_noise {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_batched", [False, True])
def test_pair_noise_strided_inputs_and_batched_mask(impl, mask_batched):
    device = require(impl)
    args = pair_noise_inputs((3, 17, 23), 2, 2, torch.float32, False, contiguous=False, mask_batched=mask_batched)
    assert not args[0].is_contiguous()
    want = reference.pair_noise_ref(*args)
    got = public_ops(impl).pair_noise(*to(args, device=device))
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_pair_noise_promotes_like_the_reference(impl):
    device = require(impl)
    x0, x, mask, noise_ft, _, sa, sb = pair_noise_inputs((3, 5, 7), 2, 1, torch.float16, True)
    args = (x0, x, mask.float(), noise_ft.float(), None, sa, sb)  # z fp32 (mask), x_t fp32
    want = reference.pair_noise_ref(*args)
    got = public_ops(impl).pair_noise(*to(args, device=device))
    assert [g.dtype for g in got] == [w.dtype for w in want]
    for g, w in zip(got, want):
        torch.testing.assert_close(g.cpu(), w, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_pair_noise_rejects_mismatched_batches(impl):
    device = require(impl)
    x0, x, mask, noise_ft, _, sa, sb = pair_noise_inputs((3, 5, 7), 2, 2, torch.float32, True)
    with pytest.raises(RuntimeError, match="multiple of the image batch"):
        public_ops(impl).pair_noise(*to((x0, x, mask, noise_ft[:3], None, sa[:3], sb[:3]), device=device))


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
def test_pair_contrast_loss_and_gradients_match_reference(impl, shape, eps_dtype, noise_dtype, n, shared):
    device = require(impl)
    args = loss_inputs(shape, eps_dtype, noise_dtype, n, shared)
    grad_loss = torch.rand(n) + 0.5  # the engine's incoming gradient is 1 or 1/K; any works
    want = loss_and_grads(reference.pair_contrast_loss_ref, [a if a is None else a.float() for a in args], grad_loss)
    plain = loss_and_grads(reference.pair_contrast_loss_ref, args, grad_loss)
    got = loss_and_grads(public_ops(impl).pair_contrast_loss, to(args, device=device), grad_loss.to(device))
    assert got[0].dtype == torch.float32
    assert [g.dtype for g in got[1]] == [a.dtype for a in args if a is not None]
    assert_within_rule(got[0], want[0], plain[0], f"{impl} loss")
    for i, (g, w, p) in enumerate(zip(got[1], want[1], plain[1])):
        assert_within_rule(g, w, p, f"{impl} grad of input {i}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shared", [True, False])
def test_pair_contrast_loss_seeds(impl, shared):
    device = require(impl)
    eps_ft, eps_pre, noise_ft, noise_pre = loss_inputs((4, 40, 56), torch.float32, torch.float32, 3, shared, contiguous=False)
    loss, seed_ft, seed_pre = raw_op(impl, "pair_contrast_loss")(*to((eps_ft, eps_pre, noise_ft, noise_pre), device=device))
    m = 4 * 40 * 56
    n_pre = noise_ft if shared else noise_pre
    torch.testing.assert_close(seed_ft.cpu(), 2 * (eps_ft - noise_ft) / m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(seed_pre.cpu(), -2 * (eps_pre - n_pre) / m, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(loss.cpu(), reference.pair_contrast_loss_ref(eps_ft, eps_pre, noise_ft, noise_pre))


# --------------------------------------------------------------------------- pgd_update

PGD_CASES = [
    (shape, dtype, b, per_sample)
    for shape, dtype, b, per_sample in itertools.product(SHAPES, DTYPES, [1, 3], [True, False])
]


def run_pgd(fn, args, alpha=2.0, eps=70.0, per_sample=True):
    return fn(*args, alpha, eps, -100.0, 100.0, per_sample)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,dtype,b,per_sample", PGD_CASES)
def test_pgd_update_matches_reference(impl, shape, dtype, b, per_sample):
    device = require(impl)
    args = pgd_inputs(shape, b, dtype)
    want = run_pgd(reference.pgd_update_ref, [a.float() for a in args], per_sample=per_sample)
    plain = run_pgd(reference.pgd_update_ref, args, per_sample=per_sample)
    got = run_pgd(public_ops(impl).pgd_update, to(args, device=device), per_sample=per_sample)
    for name, g, w, p in zip(("delta", "z"), got, want, plain):
        assert g.dtype == torch.float32
        assert_within_rule(g, w, p, f"{impl} pgd_update {name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "grad_kind,per_sample",
    [("zero-first", True), ("nan-first", True), ("inf-last", True), ("all-zero", True),
     ("nan-first", False), ("zero-first", False)],
)
def test_pgd_update_zero_and_nonfinite_gradients(impl, grad_kind, per_sample):
    device = require(impl)
    delta, grad, x0, x_init, mask = pgd_inputs((3, 17, 23), 3, torch.float32, grad_kind=grad_kind)
    want = run_pgd(reference.pgd_update_ref, (delta, grad, x0, x_init, mask), per_sample=per_sample)
    got = run_pgd(public_ops(impl).pgd_update, to((delta, grad, x0, x_init, mask), device=device), per_sample=per_sample)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-4)
    # A skipped sample is only clamped and projected: the gradient must not leak in.
    stepped = run_pgd(public_ops(impl).pgd_update, to((delta, torch.zeros_like(grad), x0, x_init, mask), device=device),
                      per_sample=per_sample)
    if per_sample:
        skipped = {"zero-first": [0], "nan-first": [0], "inf-last": [2], "all-zero": [0, 1, 2]}[grad_kind]
    else:
        skipped = [] if grad_kind == "zero-first" else [0, 1, 2]
    for i in skipped:
        torch.testing.assert_close(got[0][i].cpu(), stepped[0][i].cpu(), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("per_sample", [True, False])
def test_pgd_update_strided_inputs_batched_mask_and_inactive_projection(impl, per_sample):
    device = require(impl)
    delta, grad, x0, x_init, mask = pgd_inputs((4, 40, 56), 2, torch.float32, contiguous=False, mask_batched=True)
    delta = maybe_strided(delta.contiguous() * 1e-3, contiguous=False)  # well inside the ball
    assert not delta.is_contiguous()
    for eps in (70.0, 1e4):
        want = run_pgd(reference.pgd_update_ref, (delta, grad, x0, x_init, mask), eps=eps, per_sample=per_sample)
        got = run_pgd(public_ops(impl).pgd_update, to((delta, grad, x0, x_init, mask), device=device), eps=eps,
                      per_sample=per_sample)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- autograd through the pair


def fake_unet(x_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.sin(x_t) * w + 0.3 * x_t


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("k,shared", [(1, True), (3, True), (1, False)])
def test_contrast_gradient_reaches_x_through_both_ops(impl, k, shared):
    """The engine's path: x -> pair_noise -> two models -> pair_contrast_loss -> d/dx."""
    device = require(impl)
    x0, x, mask, noise_ft, noise_pre, sa, sb = pair_noise_inputs((4, 40, 56), 2, k, torch.float32, shared)
    w = torch.randn(2, 4, 40, 56)

    def grad_x(o, dev):
        xx = x.to(dev).requires_grad_(True)
        _, x_t = o.pair_noise(*to((x0, xx, mask, noise_ft, noise_pre, sa, sb), device=dev))
        ww = w.to(dev)
        loss = o.pair_contrast_loss(fake_unet(x_t[0], ww[0]), fake_unet(x_t[1], ww[1]), *to((noise_ft, noise_pre), device=dev))
        (g,) = torch.autograd.grad(loss.view(2, k).mean(1).sum(), xx)
        return g.cpu()

    want = grad_x(reference.REFERENCE_OPS, "cpu")
    got = grad_x(public_ops(impl), device)
    assert want.abs().sum() > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-9)
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
        tiny_pair.abar, cfg, generator=torch.Generator(device).manual_seed(4), ops=ops,
    )


def assert_same_inversion(got, want) -> None:
    assert (want.delta.abs().sum(dim=(1, 2, 3)) > 0).all(), "the reference run did not move"
    torch.testing.assert_close(got.x_rec.cpu(), want.x_rec, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.delta.cpu(), want.delta, rtol=1e-4, atol=1e-4)
    assert got.skipped_steps.cpu().tolist() == want.skipped_steps.tolist()
    assert got.loss_history == pytest.approx(want.loss_history, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("impl", ["cpp", "cuda"])
@pytest.mark.parametrize("noise,k", [("shared", 2), ("paper", 1)])
def test_invert_with_compiled_ops_recovers_the_reference_latents(tiny_pair, impl, noise, k):
    device = require(impl)
    want = run_invert(tiny_pair, reference.REFERENCE_OPS, noise, k)
    got = run_invert(tiny_pair, cgidm_ops.get_ops(impl), noise, k, device=device)
    assert_same_inversion(got, want)
