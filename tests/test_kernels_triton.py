"""The Triton kernels (kernels/pgd_update.py, kernels/draw_noise.py) and their torch ops
(cgidm::pgd_update_triton, cgidm::draw_noise_triton) against the reference: on CPU tensors
in Triton's interpreter, on CUDA tensors compiled when a GPU is present."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

# The interpreter must be chosen before triton is first imported. Without a GPU the CPU
# cases are all there is, so ask for it; with one, the CUDA cases run the real compiler.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.language.random import philox_impl  # noqa: E402

from cgidm import ops as cgidm_ops  # noqa: E402
from cgidm import reference, rng  # noqa: E402
from cgidm.kernels.pgd_update import interpreting, pgd_update_triton  # noqa: E402
from cgidm.testing.precision import full_fp32  # noqa: E402
from test_ops import (  # noqa: E402
    DTYPES,
    SHAPES,
    assert_same_inversion,
    assert_within_rule,
    capture_and_replay,
    maybe_strided,
    pgd_inputs,
    run_invert,
    run_pgd,
    tiny_pair,  # noqa: F401 - fixture
    to,
)
from test_rng import KAT, ODD_SHAPES, assert_draws_close, keys_of  # noqa: E402

INTERPRETED = interpreting()
# Another test module in this process imported triton (e.g. through diffusers) before this
# one could ask for the interpreter: the CPU cases then run in a fresh process instead.
_REDIRECTED = "CPU cases ran in a fresh process (triton was imported before TRITON_INTERPRET=1)"


def require(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device == "cpu" and not INTERPRETED:
        pytest.skip(_REDIRECTED)


DEVICES = ["cpu", "cuda"]
CASES = [
    (shape, dtype, b, per_sample)
    for shape in SHAPES
    for dtype in DTYPES
    for b, per_sample in [(1, True), (3, True), (3, False)]
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,dtype,b,per_sample", CASES)
def test_pgd_update_triton_matches_reference(device, shape, dtype, b, per_sample):
    require(device)
    args = pgd_inputs(shape, b, dtype)
    want = run_pgd(reference.pgd_update_ref, [a.float() for a in args], per_sample=per_sample)
    plain = run_pgd(reference.pgd_update_ref, args, per_sample=per_sample)
    got = run_pgd(pgd_update_triton, to(args, device=device), per_sample=per_sample)
    for name, g, w, p in zip(("delta", "z"), got, want, plain):
        assert g.dtype == torch.float32 and g.device.type == device
        assert_within_rule(g, w, p, f"triton pgd_update {name}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "grad_kind,per_sample",
    [("zero-first", True), ("nan-first", True), ("inf-last", True), ("all-zero", True), ("nan-first", False)],
)
def test_pgd_update_triton_zero_and_nonfinite_gradients(device, grad_kind, per_sample):
    require(device)
    args = pgd_inputs((3, 17, 23), 3, torch.float32, grad_kind=grad_kind)
    want = run_pgd(reference.pgd_update_ref, args, per_sample=per_sample)
    got = run_pgd(pgd_update_triton, to(args, device=device), per_sample=per_sample)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_pgd_update_triton_keeps_a_nan_delta_nan(device):
    """Triton's minimum/maximum drop a NaN operand by default: the clamp keeps it, as the
    reference's torch.clamp does (else a finite -100 and every entry shrunk)."""
    require(device)
    d = torch.tensor([float("nan"), 0.1, 0.2, 0.0]).view(1, 1, 1, 4)
    g = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4)
    z, m = torch.zeros(1, 1, 1, 4), torch.tensor([0.0, 0.0, 0.0, 1.0]).view(1, 1, 4)
    for alpha in (0.5, float("nan")):
        want = reference.pgd_update_ref(d, g, z, z, m, alpha, 1.0)
        got = pgd_update_triton(*to((d, g, z, z, m), device=device), alpha, 1.0)
        for a, b in zip(got, want):
            torch.testing.assert_close(a.cpu(), b, equal_nan=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_sample", [True, False])
def test_pgd_update_triton_strided_inputs_batched_mask_and_inactive_projection(device, per_sample):
    require(device)
    delta, grad, x0, x_init, mask = pgd_inputs((3, 17, 23), 2, torch.float16, contiguous=False, mask_batched=True)
    delta = maybe_strided(delta.contiguous() * 1e-3, contiguous=False)
    assert not grad.is_contiguous()
    for eps in (70.0, 1e4):
        want = run_pgd(reference.pgd_update_ref, (delta, grad, x0, x_init, mask), eps=eps, per_sample=per_sample)
        got = run_pgd(pgd_update_triton, to((delta, grad, x0, x_init, mask), device=device), eps=eps,
                      per_sample=per_sample)
        for g, w in zip(got, want):
            torch.testing.assert_close(g.cpu(), w, rtol=1e-5, atol=1e-4)


def test_pgd_update_triton_rejects_a_mask_of_the_wrong_shape():
    delta, grad, x0, x_init, _ = pgd_inputs((3, 5, 7), 2, torch.float32)
    # the wrong size, and the right size in another shape (would be read in the wrong order)
    for mask in (torch.ones(3, 5, 6), torch.ones(5, 3, 7), torch.ones(2 * 3 * 5 * 7)):
        with pytest.raises(ValueError, match="mask must be"):
            pgd_update_triton(delta, grad, x0, x_init, mask, 2.0, 70.0)
    shared = (torch.rand(1, 3, 5, 7) > 0.5).float()  # [1, C, H, W]: shared, as the reference broadcasts it
    got = pgd_update_triton(delta, grad, x0, x_init, shared, 2.0, 70.0)
    for g, w in zip(got, reference.pgd_update_ref(delta, grad, x0, x_init, shared[0], 2.0, 70.0)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_pgd_update_triton_of_an_empty_batch():
    delta, grad, x0, x_init, _ = (t[:0] for t in pgd_inputs((3, 5, 7), 2, torch.float32))
    got = pgd_update_triton(delta, grad, x0, x_init, torch.ones(3, 5, 7), 2.0, 70.0)
    assert [tuple(g.shape) for g in got] == [(0, 3, 5, 7)] * 2


def test_draw_noise_triton_checks_its_arguments_as_the_compiled_op_does():
    from cgidm.kernels.draw_noise import draw_noise_triton

    keys, step = torch.tensor([1, 2], dtype=torch.int64), torch.tensor(3, dtype=torch.int64)
    bad = [
        dict(t_min=9, t_max=3),  # the compiled op refuses it; the kernel's span would be negative
        dict(k=0),
        dict(step=torch.tensor(1.7)),  # not truncated silently
        dict(keys=keys.double()),  # a float key rounds past 2**53
        dict(latent_shape=[4, 8]),
    ]
    for change in bad:
        args = dict(keys=keys, step=step, k=2, latent_shape=[4, 8, 8], t_min=0, t_max=999, independent=False)
        args.update(change)
        with pytest.raises(ValueError):
            draw_noise_triton(**args)
        if cgidm_ops.has_cpp():
            with pytest.raises(RuntimeError):
                torch.ops.cgidm.draw_noise(*args.values())


@pytest.mark.parametrize("device", DEVICES)
def test_get_ops_triton_uses_the_triton_ops(device):
    require(device)
    ops = cgidm_ops.get_ops("triton")
    assert ops.pgd_update is cgidm_ops._pgd_update_triton_op
    assert ops.draw_noise is cgidm_ops._draw_noise_triton_op
    args = to(pgd_inputs((3, 5, 7), 2, torch.float32), device=device)
    for g, w in zip(ops.pgd_update(*args, 2.0, 70.0), pgd_update_triton(*args, 2.0, 70.0)):
        assert torch.equal(g, w)


# --------------------------------------------------------------------------- the Triton ops


def _schema_args(op) -> str:
    """An op's arguments as its schema prints them; int and SymInt are one thing here
    (triton_op infers SymInt for every int annotation)."""
    schema = str(op._schema)
    return schema[schema.index("("):schema.index(") ->")].replace("SymInt", "int")


def _recording_backend(graphs: list):
    """A torch.compile backend that keeps Dynamo's graph and runs it eagerly."""

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _pgd_case(device, b=2):
    return to(pgd_inputs((3, 5, 7), b, torch.float32), device=device)


def _draw_case(device):
    return keys_of("a", "b", "c").to(device), torch.tensor(7, device=device)


def test_triton_ops_have_the_schemas_of_the_ops_they_implement():
    triton_ops = cgidm_ops.triton_ops()
    assert triton_ops is cgidm_ops.triton_ops()  # registered once
    assert _schema_args(torch.ops.cgidm.pgd_update_triton.default) == _schema_args(torch.ops.cgidm.pgd_update.default)
    assert _schema_args(torch.ops.cgidm.draw_noise_triton.default) == _schema_args(torch.ops.cgidm.draw_noise.default)
    for name in ("pgd_update_triton", "draw_noise_triton"):
        assert len(getattr(torch.ops.cgidm, name).default._schema.returns) == 2


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", ["pgd_update", "draw_noise"])
def test_triton_ops_pass_opcheck(device, op_name):
    """In the interpreter opcheck's AOT test cannot run: triton_op decomposes the op into
    its kernel when AOT traces it, and an interpreted kernel cannot be traced (wrap_triton
    hands back the bare InterpretedFunction, which would then run on fake tensors). The
    decomposition itself is checked without the interpreter, in
    test_triton_ops_decompose_into_their_kernels_under_aot."""
    require(device)
    ops = cgidm_ops.triton_ops()
    if op_name == "pgd_update":
        op, args = ops.pgd_update, (*_pgd_case(device), 2.0, 70.0, -100.0, 100.0, True)
    else:
        op, args = ops.draw_noise, (*_draw_case(device), 2, [3, 17, 23], 1, 999, True)
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if device == "cuda":
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, args, test_utils=utils)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_ops_compile_into_one_graph(device):
    require(device)
    ops = cgidm_ops.get_ops("triton")
    graphs = []
    backend = _recording_backend(graphs) if device == "cpu" else "aot_eager"

    def step(keys, step_t, delta, grad, x0, x_init, mask):
        t, noise_ft, _ = ops.draw_noise(keys, step_t, 2, (3, 5, 7), 1, 999, False, keys.device)
        new_delta, z = ops.pgd_update(delta, grad, x0, x_init, mask, 2.0, 70.0)
        return t, noise_ft, new_delta, z

    args = (*_draw_case(device), *_pgd_case(device, b=3))
    torch._dynamo.reset()
    got = torch.compile(step, backend=backend, fullgraph=True)(*args)
    want = step(*args)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    if graphs:
        code = graphs[0].code
        assert "cgidm.draw_noise_triton" in code and "cgidm.pgd_update_triton" in code


_AOT_TRACE = """
import torch
from torch._dynamo.backends.common import aot_autograd
from cgidm import ops, rng

graphs = []
def fw(gm, example_inputs):
    graphs.append(gm.code)
    raise SystemExit(0)  # traced: nothing to run it on without a GPU

triton_ops = ops.triton_ops()
def step(keys, step_t, delta, grad, x0, x_init, mask):
    t, noise = triton_ops.draw_noise(keys, step_t, 2, [3, 5, 7], 1, 999, False)
    return t, noise, *triton_ops.pgd_update(delta, grad, x0, x_init, mask, 2.0, 70.0)

x = [torch.randn(2, 3, 5, 7) for _ in range(4)] + [torch.ones(3, 5, 7)]
try:
    torch.compile(step, backend=aot_autograd(fw_compiler=fw), fullgraph=True)(
        rng.image_keys(0, ["a", "b"]), torch.tensor(3), *x)
except SystemExit:
    pass
except Exception as e:
    if not graphs:
        raise
print("GRAPH", graphs[0] if graphs else "")
"""


def test_triton_ops_decompose_into_their_kernels_under_aot():
    """Without the interpreter (the compiled-Triton path), AOT tracing sees through both
    ops into ``triton_kernel_wrapper_functional`` calls: what Inductor compiles. Run in a
    fresh process so that triton is imported without TRITON_INTERPRET; without a GPU the
    kernels are traced, not run."""
    if torch.cuda.is_available():
        pytest.skip("test_triton_ops_compile_into_one_graph runs aot_eager on the GPU")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", _AOT_TRACE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    graph = proc.stdout.split("GRAPH", 1)[1]
    assert graph.count("triton_kernel_wrapper_functional(") == 2, graph
    assert "cgidm.pgd_update_triton" not in graph and "cgidm.draw_noise_triton" not in graph


# --------------------------------------------------------------------------- Triton draw_noise


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", ODD_SHAPES + [(4, 64, 64)])
@pytest.mark.parametrize("big_k,independent", [(1, True), (3, False)])
def test_triton_draws_equal_the_reference(device, shape, big_k, independent):
    require(device)
    keys = keys_of("a", "b", "c")
    want = rng.counter_draws(keys, 11, big_k, shape, 1, 999, independent, "cpu")
    got = cgidm_ops.get_ops("triton").draw_noise(
        keys.to(device), torch.tensor(11, device=device), big_k, shape, 1, 999, independent, device
    )
    assert got[1].device.type == device
    assert_draws_close(got, want)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_draws_do_not_depend_on_the_batch(device):
    require(device)
    draw = cgidm_ops.get_ops("triton").draw_noise
    keys = keys_of("a", "b", "c").to(device)
    want = draw(keys, 4, 2, (3, 17, 23), 1, 999, True, device)
    for b in range(3):
        one = draw(keys[b:b + 1], torch.tensor(4), 2, (3, 17, 23), 1, 999, True, device)
        assert_draws_close(one, tuple(x[2 * b:2 * b + 2] for x in want), exact_normals=True)


@triton.jit
def _kat_kernel(inp_ptr, out_ptr):
    i = tl.program_id(0)
    one = tl.arange(0, 1)
    c0 = tl.load(inp_ptr + 6 * i + 0 + one).to(tl.uint32)
    c1 = tl.load(inp_ptr + 6 * i + 1 + one).to(tl.uint32)
    c2 = tl.load(inp_ptr + 6 * i + 2 + one).to(tl.uint32)
    c3 = tl.load(inp_ptr + 6 * i + 3 + one).to(tl.uint32)
    k0 = tl.load(inp_ptr + 6 * i + 4 + one).to(tl.uint32)
    k1 = tl.load(inp_ptr + 6 * i + 5 + one).to(tl.uint32)
    w0, w1, w2, w3 = philox_impl(c0, c1, c2, c3, k0, k1)
    tl.store(out_ptr + 4 * i + 0 + one, w0.to(tl.int64))
    tl.store(out_ptr + 4 * i + 1 + one, w1.to(tl.int64))
    tl.store(out_ptr + 4 * i + 2 + one, w2.to(tl.int64))
    tl.store(out_ptr + 4 * i + 3 + one, w3.to(tl.int64))


@pytest.mark.parametrize("device", DEVICES)
def test_triton_philox_is_random123_philox4x32_10(device):
    """triton.language.random.philox_impl (which the kernel calls) against the KAT vectors."""
    require(device)
    inp = torch.tensor([[*c, *k] for c, k, _ in KAT], dtype=torch.int64, device=device)
    out = torch.empty(len(KAT), 4, dtype=torch.int64, device=device)
    _kat_kernel[(len(KAT),)](inp, out)
    assert out.cpu().tolist() == [list(w) for _, _, w in KAT]


def test_triton_draws_replay_inside_a_cuda_graph():
    require("cuda")
    draw = cgidm_ops.get_ops("triton").draw_noise
    keys = keys_of("a", "b", "c").cuda()
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    draw(keys, step, 2, (3, 17, 23), 1, 999, True, "cuda")  # compile outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = draw(keys, step, 2, (3, 17, 23), 1, 999, True, "cuda")
    for value in (5, 123):
        step.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert_draws_close(out, rng.counter_draws(keys.cpu(), value, 2, (3, 17, 23), 1, 999, True, "cpu"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise,k", [("shared", 2), ("paper", 1)])
def test_invert_with_triton_ops_recovers_the_reference_latents(tiny_pair, device, noise, k):  # noqa: F811
    require(device)
    # the expectation on the same device (a CUDA UNet's arithmetic is not the CPU's), TF32 off
    with full_fp32():
        want = run_invert(tiny_pair, reference.REFERENCE_OPS, noise, k, device=device)
        got = run_invert(tiny_pair, cgidm_ops.get_ops("triton"), noise, k, device=device)
    assert_same_inversion(got, want)


def test_triton_update_replays_inside_a_cuda_graph():
    require("cuda")
    replayed, eager = capture_and_replay(cgidm_ops.get_ops("triton"))
    for r, e in zip(replayed, eager):
        torch.testing.assert_close(r, e, rtol=1e-6, atol=1e-6)


def test_cpu_cases_in_a_fresh_interpreter():
    """Runs this module's CPU cases in a new process when this one cannot interpret."""
    if INTERPRETED:
        pytest.skip("CPU cases ran in this process")
    if torch.cuda.is_available():
        pytest.skip("the CUDA cases cover the kernel")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "not fresh_interpreter", __file__],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout


def test_the_triton_updates_refuse_tensors_that_are_not_real_floats():
    """A complex or integer tensor is refused by name (it was a KeyError on the dtype)."""
    from cgidm.kernels.linf_update import linf_update_triton

    z = torch.zeros(1, 1, 2, 2)
    with pytest.raises(TypeError, match="grad must be a real floating tensor, got torch.complex64"):
        pgd_update_triton(z, z.to(torch.complex64), z, z, torch.ones(1, 2, 2), 0.5, 1.0)
    with pytest.raises(TypeError, match="x must be a real floating tensor, got torch.int64"):
        linf_update_triton(z, z, z.long(), 0.01, 0.03)


def test_the_triton_pgd_update_takes_an_integer_mask_as_the_others_do():
    z, g = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2)
    m = torch.tensor([[[1, 0], [0, 1]]], dtype=torch.uint8)
    want = reference.pgd_update_ref(z, g, z, z, m, 0.5, 1.0)
    for a, b in zip(pgd_update_triton(z, g, z, z, m, 0.5, 1.0), want):
        torch.testing.assert_close(a, b)
