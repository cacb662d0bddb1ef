"""The Triton PGD update (kernels/pgd_update.py) against the reference: on CPU tensors in
Triton's interpreter, on CUDA tensors compiled when a GPU is present."""
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

from cgidm import ops as cgidm_ops  # noqa: E402
from cgidm import reference  # noqa: E402
from cgidm.kernels.pgd_update import interpreting, pgd_update_triton  # noqa: E402
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


def test_pgd_update_triton_rejects_a_mask_of_the_wrong_size():
    delta, grad, x0, x_init, _ = pgd_inputs((3, 5, 7), 2, torch.float32)
    with pytest.raises(ValueError, match="mask must be"):
        pgd_update_triton(delta, grad, x0, x_init, torch.ones(3, 5, 6), 2.0, 70.0)


@pytest.mark.parametrize("device", DEVICES)
def test_get_ops_triton_uses_the_triton_update(device):
    require(device)
    ops = cgidm_ops.get_ops("triton")
    assert ops.pgd_update is pgd_update_triton


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise,k", [("shared", 2), ("paper", 1)])
def test_invert_with_triton_ops_recovers_the_reference_latents(tiny_pair, device, noise, k):  # noqa: F811
    require(device)
    want = run_invert(tiny_pair, reference.REFERENCE_OPS, noise, k)
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
