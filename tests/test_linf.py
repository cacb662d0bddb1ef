"""``cgidm::linf_update``, the L-inf PGD step of ``cgidm protect``: every implementation
(the reference and the default kernel, the C++ CPU kernel, the CUDA kernel, the Triton
kernel in Triton's interpreter on CPU tensors and compiled on CUDA tensors) against the op
written out in float64 in this file (``expect_linf_update``), not against
``cgidm.reference``; each on its own device.

Tolerance: the 2x dtype rule (csrc/README.md, ``test_ops.assert_within_rule``): the op's
math is fp32 whatever the storage, so plain torch is the written-out op in fp32 on the
same inputs. Inputs fp32/fp16/bf16, odd shapes, batch 1 and 3.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch

# The interpreter must be chosen before triton is first imported (test_kernels_triton.py).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cgidm import ops as cgidm_ops  # noqa: E402
from cgidm import reference  # noqa: E402
from test_ops import assert_within_rule, maybe_strided, raw_op  # noqa: E402

SHAPES = [(3, 17, 23), (4, 40, 56)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
BATCHES = [1, 3]
IMPLS = ["ref", "default", "cpp", "cuda", "triton-cpu", "triton-cuda"]
ALPHA, EPS = 4 / 255, 16 / 255  # [-1, 1] units: a step and a budget of 2 and 8 grey levels
GRAD_KINDS = ["zero-entries", "nan-first", "inf-last", "all-zero", "neg-inf-middle"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def require(impl: str) -> str:
    """The device ``impl`` runs on; skips when it cannot run here."""
    if impl in ("cuda", "triton-cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if impl in ("cpp", "cuda") and not cgidm_ops.has_cpp():
        pytest.skip("extension not built")
    if impl == "cuda" and not cgidm_ops.has_cuda():
        pytest.skip("extension built without CUDA")
    if impl.startswith("triton"):
        if not cgidm_ops.has_triton():
            pytest.skip("triton is not installed")
        from cgidm.kernels.pgd_update import interpreting

        if impl == "triton-cpu" and not interpreting():
            pytest.skip("triton was imported before TRITON_INTERPRET=1 (run this module alone)")
    return "cuda" if impl in ("cuda", "triton-cuda") else "cpu"


def update_fn(impl: str):
    """``(delta, grad, x, alpha, eps, lo, hi) -> (delta_out, skipped)`` as ``impl`` runs it."""
    if impl == "ref":
        return reference.linf_pgd_update_ref
    if impl == "default":
        return raw_op("default", "linf_update")
    if impl.startswith("triton"):
        return cgidm_ops.triton_ops().linf_update
    return torch.ops.cgidm.linf_update.default  # cpp / cuda: the extension's kernel for the device


def linf_inputs(shape, b, dtype, grad_kind="normal", contiguous=True):
    """``(delta, grad, x)`` ``[b, *shape]`` in ``dtype``: pixels in [-1, 1] with a tenth at
    the ends (the range clip acts), delta up to 1.5 budgets (the budget clip acts), a tenth
    of the gradient's entries exactly 0."""
    x = torch.rand(b, *shape) * 2 - 1
    ends = torch.rand(b, *shape) < 0.1
    x = torch.where(ends, torch.sign(x) * (1 - torch.rand(b, *shape) * 0.01), x)
    delta = (torch.rand(b, *shape) * 2 - 1) * 1.5 * EPS
    grad = torch.randn(b, *shape) * torch.rand(b, 1, 1, 1) * 1e-3
    grad = torch.where(torch.rand(b, *shape) < 0.1, torch.zeros_like(grad), grad)
    flat = grad.view(b, -1)
    if grad_kind == "nan-first":
        flat[0, 0] = float("nan")
    elif grad_kind == "inf-last":
        flat[-1, -1] = float("inf")
    elif grad_kind == "neg-inf-middle":
        flat[b // 2, flat.shape[1] // 2] = -float("inf")
    elif grad_kind == "all-zero":
        flat[0].zero_()
    out = [t.to(dtype) for t in (delta, grad, x)]
    return [maybe_strided(t, contiguous) for t in out]


def expect_linf_update(delta, grad, x, alpha, eps, lo=-1.0, hi=1.0, dtype=torch.float64):
    """The L-inf step written out: per image, no step if any gradient entry is non-finite;
    else ``+alpha`` where the gradient is positive, ``-alpha`` where negative, nothing where
    0; then the budget ``[-eps, eps]``, then the room ``[lo - x, hi - x]`` left in the range."""
    d, g, xx = (t.to(dtype) for t in (delta, grad, x))
    finite = ~(torch.isnan(g) | torch.isinf(g))
    ok = finite.reshape(g.shape[0], -1).all(dim=1)
    move = alpha * ((g > 0).to(dtype) - (g < 0).to(dtype))
    move = move * ok.to(dtype).reshape(-1, *([1] * (g.dim() - 1)))
    move = torch.where(finite, move, torch.zeros_like(move))  # 0 * inf would be NaN
    out = d + move
    out = torch.where(out > eps, torch.full_like(out, eps), out)
    out = torch.where(out < -eps, torch.full_like(out, -eps), out)
    low, high = lo - xx, hi - xx
    out = torch.where(out < low, low, out)
    out = torch.where(out > high, high, out)
    return out, ~ok


def check(impl, args, what, **kw):
    device = require(impl)
    args = [t.to(device) for t in args]
    want, want_skipped = expect_linf_update(*args, ALPHA, EPS, **kw)
    plain, _ = expect_linf_update(*args, ALPHA, EPS, dtype=torch.float32, **kw)
    lo, hi = kw.get("lo", -1.0), kw.get("hi", 1.0)
    got, skipped = update_fn(impl)(*args, ALPHA, EPS, lo, hi)
    assert got.dtype == torch.float32 and got.device.type == device and got.shape == args[0].shape, what
    assert skipped.dtype == torch.bool and skipped.shape == (args[0].shape[0],), what
    assert torch.equal(skipped.cpu(), want_skipped.cpu()), f"{what}: skipped {skipped} != {want_skipped}"
    assert_within_rule(got, want, plain, what)
    return got, skipped


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b", BATCHES)
def test_linf_update_matches_the_float64_expectation(impl, shape, dtype, b):
    check(impl, linf_inputs(shape, b, dtype), f"{impl} linf_update {shape} {dtype} b={b}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad_kind", GRAD_KINDS)
def test_linf_update_zero_and_nonfinite_gradients(impl, grad_kind):
    delta, grad, x = linf_inputs((3, 17, 23), 3, torch.float32, grad_kind)
    got, skipped = check(impl, (delta, grad, x), f"{impl} linf_update {grad_kind}")
    got, skipped = got.cpu(), skipped.cpu()
    assert torch.isfinite(got).all()
    # A skipped image, and every zero entry, only has delta clipped back into the budget and range.
    clipped = torch.minimum(torch.maximum(delta.clamp(-EPS, EPS), -1 - x), 1 - x)
    still = (grad == 0) | skipped.view(-1, 1, 1, 1)
    assert torch.equal(got[still], clipped[still])
    want = {"nan-first": [True, False, False], "neg-inf-middle": [False, True, False],
            "inf-last": [False, False, True]}.get(grad_kind, [False, False, False])
    assert skipped.tolist() == want


@pytest.mark.parametrize("impl", IMPLS)
def test_linf_update_strided_inputs_and_other_range(impl):
    args = linf_inputs((3, 17, 23), 3, torch.float16, contiguous=False)
    assert not args[1].is_contiguous()
    # A [0, 1] pixel range: the room left is measured from the bounds given.
    x01 = (args[2].float() + 1) / 2
    check(impl, (args[0], args[1], x01.to(torch.float16)), f"{impl} linf_update strided [0, 1]", lo=0.0, hi=1.0)


@pytest.mark.parametrize("impl", IMPLS)
def test_linf_update_keeps_the_budget_and_the_range_over_many_steps(impl):
    device = require(impl)
    fn = update_fn(impl)
    _, _, x = linf_inputs((3, 17, 23), 3, torch.float32)
    x = x.to(device)
    delta = torch.zeros_like(x)
    for step in range(40):
        grad = torch.randn(x.shape, device=device)
        grad = torch.where(torch.rand(x.shape, device=device) < 0.2, torch.zeros_like(grad), grad)
        if step % 7 == 3:
            grad[1, 0, 0, 0] = float("nan")
        delta, skipped = fn(delta, grad, x, ALPHA, EPS, -1.0, 1.0)
        assert skipped.tolist() == [False, step % 7 == 3, False]
        assert (delta.abs() <= torch.tensor(EPS, dtype=torch.float32)).all(), step
        adv = x.double() + delta.double()
        ulp = 2.0 ** -23  # x + delta in fp32 math can round one ulp of 1 past the bound
        assert (adv >= -1 - ulp).all() and (adv <= 1 + ulp).all(), step
    assert delta.abs().max() > 0.9 * EPS  # it did move


@pytest.mark.parametrize("impl", ["default", "cpp", "cuda", "triton-cpu", "triton-cuda"])
def test_linf_update_takes_the_references_fp32_steps_exactly(impl):
    """Same fp32 operations in the same order as the reference: equal results, so the
    protection does not depend on the implementation (``cgidm.protect_pgd``)."""
    device = require(impl)
    args = [t.to(device) for t in linf_inputs((3, 17, 23), 3, torch.float32, "nan-first")]
    want = reference.linf_pgd_update_ref(*args, ALPHA, EPS)
    got = update_fn(impl)(*args, ALPHA, EPS, -1.0, 1.0)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@pytest.mark.parametrize("impl", ["ref", "default", "cpp", "triton-cpu"])
def test_linf_update_edge_sizes(impl):
    require(impl)
    fn = update_fn(impl)
    for shape in [(0, 3, 5, 7), (2, 0), (1, 1), (3,)]:
        z = torch.zeros(shape)
        got, skipped = fn(z, z, z, ALPHA, EPS, -1.0, 1.0)
        assert got.shape == shape and skipped.shape == (shape[0],) and not skipped.any()


@pytest.mark.parametrize("impl", IMPLS)
def test_linf_update_of_a_1d_delta_takes_each_entry_as_an_image(impl):
    # every implementation reads [B] as B images of one entry (the reference too)
    device = require(impl)
    delta = torch.tensor([0.0, 0.01, -0.02], device=device)
    grad = torch.tensor([1.0, float("nan"), -3.0], device=device)
    got, skipped = update_fn(impl)(delta, grad, torch.zeros(3, device=device), ALPHA, EPS, -1.0, 1.0)
    want = torch.tensor([min(ALPHA, EPS), 0.01, max(-0.02 - ALPHA, -EPS)])
    torch.testing.assert_close(got.cpu(), want)
    assert skipped.cpu().tolist() == [False, True, False]


def test_linf_update_rejects_mismatched_shapes():
    a, b = torch.zeros(2, 3, 5, 7), torch.zeros(2, 3, 5, 6)
    with pytest.raises((RuntimeError, ValueError), match="one shape"):
        torch.ops.cgidm.linf_update(a, b, a, ALPHA, EPS)


# --------------------------------------------------------------------------- the op


def test_linf_update_default_kernel_dtypes_and_shapes():
    for dtype in DTYPES:
        delta, grad, x = linf_inputs((3, 17, 23), 3, dtype)
        got, skipped = raw_op("default", "linf_update")(delta, grad, x, ALPHA, EPS, -1.0, 1.0)
        assert got.dtype == torch.float32 and got.shape == delta.shape
        assert skipped.dtype == torch.bool and skipped.shape == (3,)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_linf_update_opcheck(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    delta, grad, x = (t.to(device) for t in linf_inputs((3, 17, 23), 2, torch.float32, "nan-first"))
    torch.library.opcheck(torch.ops.cgidm.linf_update.default, (delta, grad, x, ALPHA, EPS, -1.0, 1.0))
    torch.library.opcheck(torch.ops.cgidm.linf_update.default, (delta, grad.half(), x, ALPHA, EPS, 0.0, 1.0))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_linf_update_triton_op_schema_and_opcheck(device):
    """In the interpreter opcheck's AOT test cannot run (test_kernels_triton.py says why)."""
    require("triton-cuda" if device == "cuda" else "triton-cpu")
    op = cgidm_ops.triton_ops().linf_update

    def args_of(op_):
        s = str(op_._schema)
        return s[s.index("("):s.index(") ->")].replace("SymInt", "int")

    assert args_of(torch.ops.cgidm.linf_update_triton.default) == args_of(torch.ops.cgidm.linf_update.default)
    assert len(torch.ops.cgidm.linf_update_triton.default._schema.returns) == 2
    delta, grad, x = (t.to(device) for t in linf_inputs((3, 5, 7), 2, torch.float32))
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device == "cuda":
        utils = utils + ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, (delta, grad, x, ALPHA, EPS, -1.0, 1.0), test_utils=utils)


def test_get_ops_exposes_linf_update_with_the_reference_signature():
    import inspect

    want = inspect.signature(reference.linf_pgd_update_ref)
    impls = ["ref", "auto", "cpp"] + (["triton"] if cgidm_ops.has_triton() else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for impl in impls:
            got = inspect.signature(cgidm_ops.get_ops(impl).linf_update)
            assert list(got.parameters) == list(want.parameters), impl
            assert [p.default for p in got.parameters.values()] == [p.default for p in want.parameters.values()]
    assert cgidm_ops.get_ops("ref").linf_update is reference.linf_pgd_update_ref


def test_protect_step_goes_through_get_ops(monkeypatch):
    """Both protect paths (the plain loop and the engine) take their step from
    ``get_ops(impl)``: a spy on the op sees every step of each."""
    from types import SimpleNamespace

    from cgidm import protect_pgd
    from cgidm.config import ProtectConfig
    from cgidm.protect_pgd import BaseModel

    calls = []

    def spy_ops(impl):
        real = cgidm_ops.get_ops(impl)

        def linf_update(*args, **kw):
            calls.append(impl)
            return real.linf_update(*args, **kw)

        return SimpleNamespace(linf_update=linf_update)

    monkeypatch.setattr(protect_pgd, "get_ops", spy_ops)
    from cgidm.codec import IdentityCodec

    unet = torch.nn.Linear(1, 1)  # the textural loss never calls it; it gives the size and device
    unet.config = SimpleNamespace(sample_size=4, in_channels=3)
    model = BaseModel(unet, None, None, IdentityCodec(), torch.linspace(0.99, 0.01, 1000, dtype=torch.float64))
    z_t = torch.zeros(1, 3, 4, 4)
    x = torch.rand(2, 3, 4, 4) * 2 - 1
    cfg = ProtectConfig(steps=3, loss="textural")
    a = protect_pgd.protect_loop(model, x, ["a", "b"], cfg, z_target=z_t, impl="ref")
    b = protect_pgd.protect_batch(model, x, ["a", "b"], cfg, z_target=z_t, impl="ref")
    assert calls == ["ref"] * 6 and torch.equal(a.delta, b.delta)
    assert protect_pgd.linf_pgd_update_ref is reference.linf_pgd_update_ref  # one copy of the spec


@pytest.mark.parametrize("impl", IMPLS)
def test_linf_update_keeps_a_nan_delta_or_image_nan(impl):
    """A NaN in delta or in the image comes out NaN in that entry only, as the reference's
    clamps give it (min/max that drop a NaN operand would hand back a finite number)."""
    device = require(impl)
    delta = torch.tensor([[float("nan"), 0.0, 0.01]], device=device)
    x = torch.tensor([[0.0, float("nan"), 0.5]], device=device)
    grad = torch.ones(1, 3, device=device)
    got, skipped = update_fn(impl)(delta, grad, x, ALPHA, EPS, -1.0, 1.0)
    want, _ = reference.linf_pgd_update_ref(delta.cpu(), grad.cpu(), x.cpu(), ALPHA, EPS)
    assert torch.isnan(want[0, :2]).all() and torch.isfinite(want[0, 2])
    torch.testing.assert_close(got.cpu(), want, equal_nan=True)
    assert not skipped.any()


@pytest.mark.parametrize("impl", ["ref", "default", "cpp", "cuda", "triton-cpu", "triton-cuda"])
def test_linf_update_refuses_a_step_or_budget_that_is_not_finite(impl):
    """A NaN alpha would be a NaN change wherever the gradient is 0 in the reference and
    none in the kernels: every implementation refuses it, and a non-finite eps or range."""
    device = require(impl)
    z = torch.zeros(1, 3, device=device)
    for alpha, eps, lo in ((float("nan"), EPS, -1.0), (ALPHA, float("inf"), -1.0), (ALPHA, EPS, float("-inf"))):
        with pytest.raises((ValueError, RuntimeError), match="alpha, eps, lo and hi must be finite"):
            update_fn(impl)(z, z, z, alpha, eps, lo, 1.0)
