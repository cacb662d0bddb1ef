"""Counter-based draws (cgidm/rng.py): Philox4x32-10 against Random123's known answers, the
spec checked value by value, the reference's invariances (batch, step type, device, graph
replay), the statistics of its normals and timesteps, and the C++/CUDA op
``cgidm::draw_noise`` against the reference. The Triton kernel's cases are in
tests/test_kernels_triton.py (they need Triton's interpreter on CPU).

Tolerances: timesteps and every integer agree exactly across implementations. Normals
agree to ``rtol = atol = 8 * 2**-23`` (NORMAL_TOL): the uniforms, the angle ``fp32(2π)*u``,
the square root and the products are correctly rounded fp32 everywhere, but log, cos and
sin are each backend's own fp32 functions (torch: Sleef, 1 ulp; C++: glibc; CUDA and
Triton-on-GPU: libdevice, 1-2 ulp; the interpreter: numpy), so a normal may differ by a
few ulps (measured: under 3 ulps).
"""
from __future__ import annotations

import hashlib
import math
import warnings

import pytest
import torch

from cgidm import ops as cgidm_ops
from cgidm import rng

EPS32 = torch.finfo(torch.float32).eps
NORMAL_TOL = dict(rtol=8 * EPS32, atol=8 * EPS32)

# Random123 (DEShawResearch/random123, tests/kat_vectors), "philox4x32 10" lines:
# counter c0..c3, key k0 k1 -> output words.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

# Latent shapes with C*H*W % 4 = 1, 2, 3, 0, and the odd 3x17x23 (1173 = 4*293 + 1).
ODD_SHAPES = [(1, 1, 1), (1, 1, 2), (1, 1, 3), (3, 17, 23), (4, 8, 8), (2, 5, 7)]


def keys_of(*ids: str, seed: int = 0) -> torch.Tensor:
    return rng.image_keys(seed, list(ids))


def assert_draws_close(got, want, exact_normals: bool = False) -> None:
    """``(t, noise_ft, noise_pre)`` triples: t exactly, normals within NORMAL_TOL."""
    t, nft, npre = got
    wt, wft, wpre = want
    assert t.dtype == torch.int64 and nft.dtype == torch.float32
    assert torch.equal(t.cpu(), wt.cpu())
    assert (npre is None) == (wpre is None)
    for g, w in ((nft, wft), (npre, wpre)):
        if w is None:
            continue
        assert g.shape == w.shape
        if exact_normals:
            assert torch.equal(g.cpu(), w.cpu())
        else:
            torch.testing.assert_close(g.cpu(), w.cpu(), **NORMAL_TOL)


def require_cpp() -> None:
    if not cgidm_ops.has_cpp():
        pytest.skip("extension not built")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


# --------------------------------------------------------------------------- Philox


@pytest.mark.parametrize("counter,key,want", KAT)
def test_philox4x32_10_known_answers(counter, key, want):
    got = rng.philox4x32(*key, *counter)
    assert [int(w) for w in got] == list(want)


def test_philox4x32_broadcasts_tensors_and_matches_the_scalar_form():
    counters = torch.tensor([c for c, _, _ in KAT], dtype=torch.int64)  # [3, 4]
    keys = torch.tensor([k for _, k, _ in KAT], dtype=torch.int64)  # [3, 2]
    got = torch.stack(rng.philox4x32(keys[:, 0], keys[:, 1], *counters.unbind(1)), dim=1)
    assert got.tolist() == [list(w) for _, _, w in KAT]


# --------------------------------------------------------------------------- keys


def test_image_key_is_the_sha256_prefix_with_the_top_bit_cleared():
    digest = hashlib.sha256(b"0/a").digest()
    assert rng.image_key(0, "a") == int.from_bytes(digest[:8], "little") & (2**63 - 1)
    assert rng.image_key(0, "a") == 0x0964C4C78D6B21D3
    keys = [rng.image_key(s, i) for s in (0, 1, 12345) for i in ("a", "b", "member/001.png")]
    assert all(0 <= k < 2**63 for k in keys)
    assert len(set(keys)) == len(keys)
    assert rng.image_keys(0, ["a", "b"]).tolist() == [rng.image_key(0, "a"), rng.image_key(0, "b")]


# --------------------------------------------------------------------------- the spec, value by value


def _spec_normals(key: int, step: int, k: int, stream: int, j: int) -> list[float]:
    """The four normals of counter group j, from the spec in float64 (Python math)."""
    words = [int(w) for w in rng.philox4x32(key & 0xFFFFFFFF, key >> 32, j, step, k, stream)]
    u = [((w >> 8) + 0.5) * 2.0**-24 for w in words]
    out = []
    for a, b in ((u[0], u[1]), (u[2], u[3])):
        r = math.sqrt(-2.0 * math.log(a))
        out += [r * math.cos(2 * math.pi * b), r * math.sin(2 * math.pi * b)]
    return out


def _spec_timestep(key: int, step: int, k: int, big_k: int, t_min: int, t_max: int) -> int:
    x = int(rng.philox4x32(key & 0xFFFFFFFF, key >> 32, 0, step, k, rng.STREAM_T)[0])
    span = t_max - t_min + 1
    start = math.floor(k * span / big_k)
    width = max(math.floor((k + 1) * span / big_k) - start, 1)
    return t_min + start + min(math.floor((x >> 8) * 2.0**-24 * width), width - 1)


@pytest.mark.parametrize("shape", [(3, 17, 23), (1, 1, 3)])
def test_counter_draws_follow_the_spec_entry_by_entry(shape):
    keys = keys_of("img-0", "img-1")
    big_k, step, t_min, t_max = 3, 41, 1, 999
    t, nft, npre = rng.counter_draws(keys, step, big_k, shape, t_min, t_max, True, "cpu")
    m = math.prod(shape)
    groups = (m + 3) // 4
    for b, key in enumerate(keys.tolist()):
        for k in range(big_k):
            n = b * big_k + k
            assert int(t[n]) == _spec_timestep(key, step, k, big_k, t_min, t_max)
            for stream, noise in ((rng.STREAM_FT, nft), (rng.STREAM_PRE, npre)):
                flat = noise[n].reshape(-1).double()
                for j in sorted({0, 1, groups // 2, groups - 1}):
                    want = _spec_normals(key, step, k, stream, j)
                    for r in range(4):
                        if 4 * j + r < m:
                            assert abs(float(flat[4 * j + r]) - want[r]) < 1e-5 * max(1.0, abs(want[r]))


def test_strata_match_equal_float_edges():
    for k in (1, 2, 3, 4, 7, 16, 999, 1200):
        for t_min, t_max in ((1, 999), (0, 999), (5, 5), (10, 20), (0, 0)):
            span = t_max - t_min + 1
            edges = torch.arange(k + 1, dtype=torch.float64) * span / k  # equal strata by float edges, as written in the spec
            start = edges[:-1].floor().long()
            width = (edges[1:].floor() - edges[:-1].floor()).long().clamp_min(1)
            assert rng.strata(k, t_min, t_max) == (start.tolist(), width.tolist())


# --------------------------------------------------------------------------- invariances


@pytest.mark.parametrize("shape", ODD_SHAPES)
@pytest.mark.parametrize("independent", [False, True])
def test_a_batch_of_keys_equals_one_call_per_key_exactly(shape, independent):
    keys = keys_of("a", "b", "c")
    big_k = 3
    t, nft, npre = rng.counter_draws(keys, 7, big_k, shape, 1, 999, independent, "cpu")
    for b in range(3):
        tb, fb, pb = rng.counter_draws(keys[b:b + 1], 7, big_k, shape, 1, 999, independent, "cpu")
        rows = slice(b * big_k, (b + 1) * big_k)
        assert torch.equal(tb, t[rows]) and torch.equal(fb, nft[rows])
        assert (pb is None) if not independent else torch.equal(pb, npre[rows])
    # Order of the batch does not matter either.
    t2, nft2, _ = rng.counter_draws(keys.flip(0), 7, big_k, shape, 1, 999, independent, "cpu")
    assert torch.equal(t2.view(3, big_k).flip(0), t.view(3, big_k))
    assert torch.equal(nft2.view(3, big_k, *shape).flip(0), nft.view(3, big_k, *shape))


def test_step_as_a_0d_tensor_equals_the_int():
    keys = keys_of("a", "b")
    for step in (0, 5, 2**32 + 5):
        want = rng.counter_draws(keys, step, 2, (3, 17, 23), 1, 999, True, "cpu")
        got = rng.counter_draws(keys, torch.tensor(step), 2, (3, 17, 23), 1, 999, True, "cpu")
        assert_draws_close(got, want, exact_normals=True)
    # The step counts modulo 2**32.
    a = rng.counter_draws(keys, 5, 2, (3, 17, 23), 1, 999, False, "cpu")
    b = rng.counter_draws(keys, 2**32 + 5, 2, (3, 17, 23), 1, 999, False, "cpu")
    assert_draws_close(a, b, exact_normals=True)


def test_shared_noise_is_the_fine_tuned_stream_of_paper_mode():
    keys = keys_of("a", "b")
    t_s, ft_s, pre_s = rng.counter_draws(keys, 3, 1, (4, 8, 8), 1, 999, False, "cpu")
    t_p, ft_p, pre_p = rng.counter_draws(keys, 3, 1, (4, 8, 8), 1, 999, True, "cpu")
    assert pre_s is None
    assert torch.equal(t_s, t_p) and torch.equal(ft_s, ft_p)
    assert not torch.equal(ft_p, pre_p)


def test_draws_change_with_every_coordinate():
    keys = keys_of("a", "b")
    t, nft, _ = rng.counter_draws(keys, 3, 2, (4, 8, 8), 1, 999, False, "cpu")
    assert not torch.equal(nft[0], nft[1])  # k
    assert not torch.equal(nft[0], nft[2])  # key
    _, nft4, _ = rng.counter_draws(keys, 4, 2, (4, 8, 8), 1, 999, False, "cpu")
    assert not torch.equal(nft, nft4)  # step
    _, other, _ = rng.counter_draws(keys_of("a", "b", seed=1), 3, 2, (4, 8, 8), 1, 999, False, "cpu")
    assert not torch.equal(nft, other)  # seed


def test_counter_draws_trace_without_host_syncs():
    """A fake-tensor trace fails on any ``.item()`` or data-dependent branch: what a CUDA
    graph capture forbids too (the capture itself runs in the CUDA test below)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def draws(keys, step):
        return rng.counter_draws(keys, step, 2, (3, 17, 23), 1, 999, True, keys.device)

    keys, step = keys_of("a", "b"), torch.tensor(9)
    gm = make_fx(draws, tracing_mode="fake")(keys, step)
    got = gm(keys, step)
    assert_draws_close(got, draws(keys, step), exact_normals=True)
    assert "item" not in gm.code and "_local_scalar_dense" not in gm.code


# --------------------------------------------------------------------------- statistics


def test_noise_is_standard_normal():
    keys = rng.image_keys(0, [f"img-{i}" for i in range(25)])
    _, nft, npre = rng.counter_draws(keys, 0, 1, (4, 32, 32), 1, 999, True, "cpu")  # 102400 each
    for x in (nft.flatten().double(), npre.flatten().double()):
        n = x.numel()
        assert abs(float(x.mean())) < 5 / math.sqrt(n)
        assert abs(float(x.std()) - 1) < 5 / math.sqrt(2 * n)
        # Kolmogorov-Smirnov distance to the normal CDF (1 % critical value: 1.63/sqrt(n)).
        xs = x.sort().values
        cdf = 0.5 * (1 + torch.erf(xs / math.sqrt(2)))
        ecdf_hi = torch.arange(1, n + 1, dtype=torch.float64) / n
        ks = torch.maximum(ecdf_hi - cdf, cdf - (ecdf_hi - 1 / n)).max()
        assert float(ks) < 1.63 / math.sqrt(n)
        # Skewness and excess kurtosis near 0 (standard errors sqrt(6/n), sqrt(24/n)).
        z = (x - x.mean()) / x.std()
        assert abs(float((z**3).mean())) < 5 * math.sqrt(6 / n)
        assert abs(float((z**4).mean()) - 3) < 5 * math.sqrt(24 / n)
    # The two streams and neighbouring entries are uncorrelated.
    a, b = nft.flatten().double(), npre.flatten().double()
    assert abs(float((a * b).mean())) < 5 / math.sqrt(a.numel())
    assert abs(float((a[1:] * a[:-1]).mean())) < 5 / math.sqrt(a.numel())


@pytest.mark.parametrize("big_k,t_min,t_max", [(4, 1, 999), (1, 1, 999), (3, 10, 20)])
def test_timesteps_are_uniform_within_their_strata(big_k, t_min, t_max):
    keys = rng.image_keys(0, [f"img-{i}" for i in range(2000)])
    ts = torch.cat([rng.counter_draws(keys, s, big_k, (1, 1, 1), t_min, t_max, False, "cpu")[0]
                    for s in range(100 // big_k)]).view(-1, big_k)
    starts, widths = rng.strata(big_k, t_min, t_max)
    for k in range(big_k):
        lo, width = t_min + starts[k], widths[k]
        col = ts[:, k]
        assert int(col.min()) >= lo and int(col.max()) <= lo + width - 1
        counts = torch.bincount(col - lo, minlength=width).double()
        expected = col.numel() / width
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        dof = width - 1
        assert chi2 < dof + 6 * math.sqrt(2 * dof), (k, chi2, dof)


# --------------------------------------------------------------------------- the op cgidm::draw_noise


def _op_draws(keys, step, big_k, shape, t_min, t_max, independent, device="cpu"):
    return cgidm_ops.get_ops("cpp").draw_noise(keys, step, big_k, shape, t_min, t_max, independent, device)


@pytest.mark.parametrize("shape", ODD_SHAPES + [(4, 64, 64)])
@pytest.mark.parametrize("big_k,independent", [(1, True), (3, False), (2, True)])
def test_cpp_draws_equal_the_reference(shape, big_k, independent):
    require_cpp()
    keys = keys_of("a", "b", "c")
    for step in (0, 17):
        want = rng.counter_draws(keys, step, big_k, shape, 1, 999, independent, "cpu")
        got = _op_draws(keys, torch.tensor(step), big_k, shape, 1, 999, independent)
        assert_draws_close(got, want)


def test_cpp_draws_do_not_depend_on_batch_or_threads():
    require_cpp()
    keys = keys_of("a", "b", "c")
    shape = (3, 17, 23)
    want = _op_draws(keys, 5, 2, shape, 1, 999, True)
    for b in range(3):
        one = _op_draws(keys[b:b + 1], 5, 2, shape, 1, 999, True)
        assert_draws_close(one, tuple(x[2 * b:2 * b + 2] for x in want), exact_normals=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert_draws_close(_op_draws(keys, 5, 2, shape, 1, 999, True), want, exact_normals=True)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("independent", [False, True])
def test_draw_noise_op_passes_opcheck(independent):
    keys = keys_of("a", "b", "c")
    torch.library.opcheck(
        torch.ops.cgidm.draw_noise.default, (keys, torch.tensor(3), 2, [3, 17, 23], 1, 999, independent)
    )


def test_draw_noise_default_kernel_is_the_reference():
    keys = keys_of("a", "b")
    t, noise = cgidm_ops._draw_noise_default(keys, torch.tensor(3), 2, [3, 5, 7], 1, 999, True)
    want = rng.counter_draws(keys, 3, 2, (3, 5, 7), 1, 999, True, "cpu")
    assert_draws_close((t, noise[0], noise[1]), want, exact_normals=True)


def test_draw_noise_op_rejects_bad_arguments():
    keys = keys_of("a")
    with pytest.raises(RuntimeError, match="keys must be"):
        torch.ops.cgidm.draw_noise(keys.float(), torch.tensor(0), 1, [1, 2, 3], 1, 999, False)
    with pytest.raises(RuntimeError, match="latent_shape"):
        torch.ops.cgidm.draw_noise(keys, torch.tensor(0), 1, [2, 3], 1, 999, False)
    with pytest.raises(RuntimeError, match="t_min"):
        torch.ops.cgidm.draw_noise(keys, torch.tensor(0), 1, [1, 2, 3], 9, 1, False)


def test_get_ops_offers_draw_noise_with_the_reference_signature():
    keys = keys_of("a", "b")
    want = rng.counter_draws(keys, 2, 2, (3, 5, 7), 1, 999, True, "cpu")
    impls = ["auto", "cpp"] if cgidm_ops.has_cpp() else []
    if hasattr(cgidm_ops.get_ops("ref"), "draw_noise"):
        assert cgidm_ops.get_ops("ref").draw_noise is rng.counter_draws
        impls.append("ref")
    if not impls:
        pytest.skip("extension not built, and reference.REFERENCE_OPS has no draw_noise yet")
    for impl in impls:
        with warnings.catch_warnings():
            # A missing extension warns once (test_ops.py's concern, not this test's).
            warnings.simplefilter("ignore", RuntimeWarning)
            got = cgidm_ops.get_ops(impl).draw_noise(keys, 2, 2, (3, 5, 7), 1, 999, True, "cpu")
        assert_draws_close(got, want)


# --------------------------------------------------------------------------- CUDA


@pytest.mark.parametrize("shape", [(3, 17, 23), (4, 64, 64), (1, 1, 3)])
@pytest.mark.parametrize("independent", [False, True])
def test_cuda_draws_equal_the_cpu_reference(shape, independent):
    require_cuda()
    keys = keys_of("a", "b", "c")
    want = rng.counter_draws(keys, 9, 2, shape, 1, 999, independent, "cpu")
    got_ref = rng.counter_draws(keys.cuda(), torch.tensor(9, device="cuda"), 2, shape, 1, 999, independent, "cuda")
    assert_draws_close(got_ref, want)
    if cgidm_ops.has_cuda():
        got_op = _op_draws(keys.cuda(), torch.tensor(9, device="cuda"), 2, shape, 1, 999, independent, "cuda")
        assert got_op[1].is_cuda
        assert_draws_close(got_op, want)


@pytest.mark.parametrize("impl", ["ref", "cuda"])
def test_draws_replay_inside_a_cuda_graph(impl):
    require_cuda()
    if impl == "cuda" and not cgidm_ops.has_cuda():
        pytest.skip("extension built without CUDA kernels")
    draw = cgidm_ops.get_ops(impl).draw_noise
    keys = keys_of("a", "b", "c").cuda()
    step = torch.zeros((), dtype=torch.int64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        draw(keys, step, 2, (3, 17, 23), 1, 999, True, "cuda")  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = draw(keys, step, 2, (3, 17, 23), 1, 999, True, "cuda")
    for value in (5, 123):
        step.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        want = draw(keys, value, 2, (3, 17, 23), 1, 999, True, "cuda")
        assert_draws_close(out, want, exact_normals=True)


def test_engines_draw_with_the_op_on_cuda_and_the_plain_draws_elsewhere():
    """``ops.step_draws``: on CUDA the op (one kernel instead of some 550 replayed ones);
    on CPU ``counter_draws`` itself, whatever ``impl``: a CPU engine equals the reference
    loop bit for bit, and the compiled CPU op agrees with it to a few ulps only."""
    from cgidm.ops import step_draws

    for impl in ("ref", "cpp", "auto"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ops = cgidm_ops.get_ops(impl)
        assert step_draws(ops, "cpu") is rng.counter_draws
        assert step_draws(ops, torch.device("cuda")) is ops.draw_noise


def test_the_reference_draws_refuse_what_the_compiled_kernels_refuse():
    """One id is not a list of its characters; a timestep range or a K the kernels refuse
    is refused here too (a -5 would index the schedule from its end)."""
    from cgidm import rng

    with pytest.raises(TypeError, match="wrap it in a list"):
        rng.image_keys(0, "member_00.png")
    keys = rng.image_keys(0, ["a", "b"])
    for t_min, t_max, k in ((500, 100, 1), (-5, 3, 1), (0, 999, 0)):
        with pytest.raises(ValueError, match="need 0 <= t_min <= t_max and k >= 1"):
            rng.counter_draws(keys, 0, k, (1, 1, 1), t_min, t_max, False, "cpu")
