"""The extraction sampler's pair pass from static buffers (``cgidm.guidance.StaticPairCall``):
the padding of a short batch on CPU (the eager path runs the same buffers a CUDA graph
captures), a sample independent of the batch it ran in and of the padding, the refusal of a
graph off CUDA; on CUDA, graph replay against eager sampling in fp32 and bf16 and an odd
batch replayed through one graph; and the smoke run of ``bench/bench_extract.py --sd15``."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cgidm import extract as X
from cgidm import guidance as G
from cgidm.config import ExtractConfig
from cgidm.graphs import graph_wanted

ROOT = Path(__file__).resolve().parents[1]
CFG = ExtractConfig(prompt="a sks pattern", guidance=3.0, correction=-0.02)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def _shape(pair):
    return pair.latent_shape


def _load(tiny_world, kind="full", device="cpu", dtype="fp32"):
    from cgidm.models import load_pair

    ft = {"full": (tiny_world / "finetuned", None), "lora": (None, tiny_world / "lora.safetensors")}[kind]
    return load_pair(tiny_world / "base", *ft, device=device, dtype=DTYPES[dtype])


def _sample(pair, tiny_world, keys, batch_size, use_graph, steps=4, rows=None):
    """``G.sample`` of the tiny world's pair; ``rows`` (a list) collects the batch of
    every pair pass."""
    fn, _ = X.pair_pass(pair)
    if rows is not None:
        inner = fn

        def fn(x_ft, *rest):
            rows.append(x_ft.shape[0])
            return inner(x_ft, *rest)

    c_ft, c_pre = X.conditioning(pair, CFG)
    return G.sample(fn, c_ft, c_pre, G.load_scheduler(tiny_world / "base"), keys, _shape(pair), CFG.guidance,
                    CFG.correction, steps, batch_size, pair.device, use_graph=use_graph)


def _tol(want: torch.Tensor) -> float:
    """tests/test_extract.py's tolerance of batched against unbatched sampling: 1e-5 of the
    largest value per pass, weighed by |1 - w + k| + |w| ~ 5 over a few steps."""
    return 2e-4 * float(want.abs().max())


# --------------------------------------------------------------------------- CPU: the static buffers


def test_a_short_batch_is_zero_padded_and_sliced(world_pair):
    pair = world_pair
    fn, _ = X.pair_pass(pair)
    c_ft, c_pre = X.conditioning(pair, CFG)
    shape = _shape(pair)
    call = G.StaticPairCall(fn, c_ft, c_pre, 3, shape, "cpu", use_graph=False)
    assert call.graph is None and call.cond_ft.shape == (3, *c_ft.shape[1:])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, *shape, generator=g)
    t = torch.tensor(621)
    with torch.no_grad():
        full = call(x, t)
        want = fn(x, x, torch.full((3,), 621), call.cond_ft, call.cond_pre)
        assert all(torch.equal(a, b) for a, b in zip(full, want))
        # a tail of one after a full batch: the stale rows are zeros, not the last batch's
        short = call(x[2:], torch.tensor(41))
        assert torch.equal(call.x[1:], torch.zeros(2, *shape)) and torch.equal(call.t, torch.full((3,), 41))
        xp = torch.cat([x[2:], torch.zeros(2, *shape)])
        padded = fn(xp, xp, torch.full((3,), 41), call.cond_ft, call.cond_pre)
        assert short[0].shape == (1, *shape)
        assert all(torch.equal(a, b[:1]) for a, b in zip(short, padded))
        alone = fn(x[2:], x[2:], torch.tensor([41]), c_ft, c_pre)
        for a, b in zip(short, alone):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5 * float(b.abs().max()))
    with pytest.raises(ValueError, match="static batch of 3"):
        call(torch.zeros(4, *shape), t)
    with pytest.raises(ValueError, match="n >= 1"):
        G.StaticPairCall(fn, c_ft, c_pre, 0, shape)
    call.close()
    assert call.x is None and call.graph is None


def test_a_padded_last_batch_gives_each_sample_as_alone(world_pair, tiny_world):
    """5 samples at batch 2: the last batch is one sample padded to two. Every sample
    equals the plain per-sample loop's, and sample 4 alone, within the tolerance of
    batched against unbatched convolutions."""
    pair = world_pair
    keys, steps = G.sample_keys(5, range(5)), 4
    rows = []
    got = _sample(pair, tiny_world, keys, 2, None, steps, rows)
    assert rows == [2] * (3 * steps)  # the last batch too: padded
    c_ft, c_pre = X.conditioning(pair, CFG)
    plain = G.sample_plain(pair.unet_ft, pair.unet_pre, c_ft, c_pre, G.load_scheduler(tiny_world / "base"), keys,
                           _shape(pair), CFG.guidance, CFG.correction, steps)
    torch.testing.assert_close(got, plain, rtol=0, atol=_tol(plain))
    alone = _sample(pair, tiny_world, keys[4:], 1, None, steps)
    torch.testing.assert_close(got[4], alone[0], rtol=0, atol=_tol(plain))
    # a batch larger than the run is the run's size: one batch, no padding
    torch.testing.assert_close(_sample(pair, tiny_world, keys, 8, None, steps), plain, rtol=0, atol=_tol(plain))


def test_out_of_memory_halves_the_batch_for_the_same_samples(world_pair, tiny_world, caplog, monkeypatch):
    """A batch that runs out of memory (here: any of more than 2 rows, after its first
    step) is run again at half the size, and the rest of the run keeps that size; the
    samples are the ones a plain run gives."""
    import logging

    pair = world_pair
    keys, steps = G.sample_keys(5, range(5)), 3
    want = _sample(pair, tiny_world, keys, 2, None, steps)
    real = G.StaticPairCall.__call__
    seen, handling = [], []

    def call(self, x, t):
        seen.append(self.n)
        handling.append(sys.exc_info()[0])  # the retry runs after the handler, not inside it
        if self.n > 2 and len(seen) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(self, x, t)

    real_close = G.StaticPairCall.close

    def close(self):  # frees the failed batch's buffers: after the handler, or its traceback keeps them
        handling.append(sys.exc_info()[0])
        real_close(self)

    monkeypatch.setattr(G.StaticPairCall, "__call__", call)
    monkeypatch.setattr(G.StaticPairCall, "close", close)
    with caplog.at_level(logging.WARNING, logger="cgidm.guidance"):
        got = _sample(pair, tiny_world, keys, 5, None, steps)
    assert "out of memory sampling a batch of 5; going on with batches of 2" in caplog.text
    assert seen[:2] == [5, 5] and set(seen[2:]) == {2}
    assert handling == [None] * len(handling) and len(handling) > len(seen)
    torch.testing.assert_close(got, want, rtol=0, atol=_tol(want))

    def never(self, x, t):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(G.StaticPairCall, "__call__", never)
    with pytest.raises(torch.cuda.OutOfMemoryError):  # one sample that does not fit ends the run
        _sample(pair, tiny_world, keys[:1], 1, None, steps)


def test_the_progress_bar_ends_on_the_sample_count(tiny_world):
    """The bar moves by a fraction of the batch every step and lands on the sample count
    exactly (3 batches of 8 in 10 steps: summed fractions of 0.8 overshot 24, and tqdm
    warned and showed a negative time left); a batch that fails takes its progress back."""
    import io
    import warnings

    from tqdm import tqdm

    sched = G.load_scheduler(tiny_world / "base")

    def call(x, t):
        return torch.zeros_like(x), torch.zeros_like(x)

    bar = tqdm(total=24, file=io.StringIO(), mininterval=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # tqdm's "clamping frac to range [0, 1]"
        for b in range(3):
            G._sample_batch(call, sched, G.sample_keys(8, range(8 * b, 8 * b + 8)), (4, 2, 2), 3.0, 0.0, 10, "cpu", bar)
            assert bar.n == 8 * (b + 1)
    seen = []

    def failing(x, t):
        seen.append(t)
        if len(seen) == 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return call(x, t)

    bar = tqdm(total=16, initial=8, file=io.StringIO(), mininterval=0)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        G._sample_batch(failing, sched, G.sample_keys(8, range(8)), (4, 2, 2), 3.0, 0.0, 10, "cpu", bar)
    assert bar.n == 8


def test_a_graph_needs_a_cuda_device(world_pair, tiny_world):
    pair = world_pair
    assert graph_wanted(None, "cpu") is False and graph_wanted(False, "cpu") is False
    fn, _ = X.pair_pass(pair)
    c_ft, c_pre = X.conditioning(pair, CFG)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        G.StaticPairCall(fn, c_ft, c_pre, 2, _shape(pair), "cpu", use_graph=True)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        _sample(pair, tiny_world, G.sample_keys(0, range(2)), 2, True, 1)


def _graph_against_eager(tiny_world, device: str, dtype: str, graph: bool):
    """Sampling with ``use_graph=graph`` against eager sampling of the same pair on
    ``device`` in ``dtype`` (4 samples, batch 3: the second batch padded). fp32: within
    the batched-vs-unbatched tolerance (a replay runs the captured kernels; at worst
    another algorithm of the same op). A half dtype: the 2x rule of csrc/README.md, the
    error against an fp32 eager reference within twice eager sampling's own in that
    dtype, plus a floor of 1e-3 of the largest value for when eager is almost exact."""
    keys = G.sample_keys(11, range(4))
    pair = _load(tiny_world, "full", device, dtype)
    got = _sample(pair, tiny_world, keys, 3, graph)
    eager = _sample(pair, tiny_world, keys, 3, False)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    if dtype == "fp32":
        torch.testing.assert_close(got, eager, rtol=0, atol=_tol(eager))
        return
    ref = _sample(_load(tiny_world, "full", device, "fp32"), tiny_world, keys, 3, False)
    err_got, err_eager = float((got - ref).abs().max()), float((eager - ref).abs().max())
    assert err_got <= 2 * err_eager + 1e-3 * float(ref.abs().max()), (err_got, err_eager)


def test_the_graph_check_runs_eagerly_on_cpu(tiny_world):
    """The CUDA case below with the graph off, so that its loading and its tolerance run
    on every machine."""
    _graph_against_eager(tiny_world, "cpu", "bf16", graph=False)


# --------------------------------------------------------------------------- CUDA: the graph


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_graph_replay_equals_eager_sampling(tiny_world, dtype, no_tf32):
    needs_cuda()
    _graph_against_eager(tiny_world, "cuda", dtype, graph=True)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_an_odd_batch_replays_one_graph(tiny_world, kind, no_tf32):
    """3 samples at batch 2: one graph captured on the first call and replayed for the
    padded tail; the same as the eager static call, and as each sample alone."""
    needs_cuda()
    pair = _load(tiny_world, kind, "cuda")
    keys = G.sample_keys(2, range(3))
    got = _sample(pair, tiny_world, keys, 2, True)
    eager = _sample(pair, tiny_world, keys, 2, False)
    alone = torch.cat([_sample(pair, tiny_world, keys[i:i + 1], 1, False) for i in range(3)])
    torch.testing.assert_close(got, eager, rtol=0, atol=_tol(eager))
    torch.testing.assert_close(got, alone, rtol=0, atol=_tol(alone))

    fn, _ = X.pair_pass(pair)
    c_ft, c_pre = X.conditioning(pair, CFG)
    shape = _shape(pair)
    graphed = G.StaticPairCall(fn, c_ft, c_pre, 2, shape, "cuda")
    plain = G.StaticPairCall(fn, c_ft, c_pre, 2, shape, "cuda", use_graph=False)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(4)).cuda()
    t = torch.tensor(500, device="cuda")
    with torch.inference_mode():  # as sample() calls it
        first = [o.clone() for o in graphed(x[:2], t)]
        graph = graphed.graph
        tail = [o.clone() for o in graphed(x[2:], t)]
        assert graph is not None and graphed.graph is graph
        assert torch.equal(graphed.x[1:], torch.zeros_like(graphed.x[1:]))
        for got_o, want_o in zip(first + tail, [*plain(x[:2], t), *plain(x[2:], t)]):
            assert got_o.shape == want_o.shape
            torch.testing.assert_close(got_o, want_o, rtol=0, atol=1e-5 * float(want_o.abs().max()))
    graphed.close()
    assert graphed.graph is None


# --------------------------------------------------------------------------- the speed bench


def test_bench_sd15_mode_refuses_cpu_and_smokes_with_tiny_unets(tmp_path):
    """``--sd15`` needs CUDA; ``--tiny`` runs the same code path on CPU with tiny UNets,
    writing its row under CGIDM_BENCH_RESULTS (never into bench/results)."""
    env = dict(os.environ, CGIDM_BENCH_RESULTS=str(tmp_path), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    bench = [sys.executable, str(ROOT / "bench" / "bench_extract.py"), "--sd15", "--device", "cpu"]
    refused = subprocess.run(bench, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--sd15 needs CUDA" in refused.stderr, refused.stderr[-2000:]
    smoke = subprocess.run([*bench, "--tiny", "--speed-samples", "3", "--speed-steps", "2", "--batches", "4", "2",
                            "--repeats", "1"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert smoke.returncode == 0, smoke.stdout[-3000:] + smoke.stderr[-3000:]
    assert "samples/hour" in smoke.stdout
    rows = [json.loads(line) for line in (tmp_path / "extract-smoke-cpu.json").read_text().splitlines()]
    row = rows[-1]
    assert row["mode"] == "sd15" and row["smoke"] and row["config"]["steps"] == 2 and row["git_sha"]
    methods = [(s["method"], s["batch"], s["cuda_graph"]) for s in row["speed"]]
    assert methods == [("plain", 1, False), ("pair pass", 1, False), ("pair pass", 4, False)]
    assert all(s["median_samples_per_hour"] > 0 for s in row["speed"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["extract-smoke-cpu.json"]


def test_bench_sd15_stopped_part_way_keeps_what_it_measured(tmp_path, monkeypatch):
    """gpu_check stops a bench past its time with SIGINT: the row keeps the runs measured."""
    monkeypatch.setenv("CGIDM_BENCH_RESULTS", str(tmp_path))
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_extract
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    measured = bench_extract.SD15Speed("plain", 1, 3, False, 100.0, 90.0, 110.0, 1.0, None, None)

    def stopped(cfg, res):
        res["speed"] = [measured]
        raise KeyboardInterrupt

    monkeypatch.setattr(bench_extract, "sd15_speed", stopped)
    with pytest.raises(KeyboardInterrupt):
        bench_extract.main(["--sd15", "--tiny", "--device", "cpu"])
    row = json.loads((tmp_path / "extract-smoke-cpu.json").read_text().splitlines()[-1])
    assert row["error"] == "KeyboardInterrupt: " and [s["method"] for s in row["speed"]] == ["plain"]
    assert row["summary"] == {"plain_samples_per_hour": 100.0}
