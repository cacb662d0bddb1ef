"""``ProtectEngine`` (what ``protect_batch`` and ``cgidm protect`` run: one PGD step on
static buffers, captured in a CUDA graph on a GPU) against ``protect_loop``, the plain
loop with fresh tensors every step (docs/protect.md, "How it runs").

Two bases: the tiny world's (identity codec: the pixels are the latent) and a random
SD-shaped one with a VAE, so that the keyed posterior sample and the encoder's backward
are inside the captured step too. CPU cases run the static-buffer step eagerly; the CUDA
cases replay the graph."""
from __future__ import annotations

import json
import logging
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cgidm.codec import VaeCodec
from cgidm.config import ProtectConfig
from cgidm.protect import collect_protect_items, protect
from cgidm.protect_pgd import (BaseModel, ProtectEngine, builtin_target, load_base, protect_batch, protect_loop,
                               set_checkpointing, target_latent)
from cgidm.testing.world import copy_members


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def vae_base() -> BaseModel:
    """A random base with SD's structure at toy sizes: a 2-level VAE (factor 2, 4 latent
    channels) under a cross-attention UNet on 4x4 latents, so 8 px images."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=4, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=8, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
                        norm_num_groups=8, sample_size=8)
    unet.eval().requires_grad_(False)
    vae.eval().requires_grad_(False)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return BaseModel(unet, None, None, VaeCodec(vae), torch.cumprod(1 - betas, 0))


def to_device(model: BaseModel, device: str, dtype=None) -> BaseModel:
    import copy

    m = copy.deepcopy(model)
    m.unet.to(device=device, **({"dtype": dtype} if dtype is not None else {}))
    m.codec.to(device=device, **({"dtype": dtype} if dtype is not None else {}))  # as load_base does
    m.abar = m.abar.to(device)
    if m.text_encoder is not None:
        m.text_encoder.to(device)
    return m


@pytest.fixture(scope="module")
def bases(tiny_world):
    return {"tiny": load_base(tiny_world / "base"), "vae": vae_base()}


def images_of(model: BaseModel, n: int) -> tuple[torch.Tensor, list[str]]:
    g = torch.Generator().manual_seed(1)
    r = model.resolution
    x = (torch.rand(n, 3, r, r, generator=g) * 2 - 1) * 0.9
    x[0, :, : r // 2] = 1.0  # a saturated half pushes on the pixel range
    return x, [f"img{i}.png" for i in range(n)]


def inputs(model: BaseModel, cfg: ProtectConfig) -> dict:
    cond = torch.randn(1, 3, 8) if model.text_encoder is None else None
    z_target = target_latent(model, builtin_target(model.resolution)) if cfg.needs_target else None
    return {"cond": cond, "z_target": z_target}


def assert_same_steps(got, want, note=""):
    """Sign steps: a last-bit difference (a padded batch's convolutions, another kernel)
    can flip an entry whose gradient is ~0, nothing more."""
    assert got.delta.shape == want.delta.shape
    differ = (got.delta != want.delta).float().mean().item()
    assert differ < 0.01, f"{note}: {differ:.3%} of the perturbation differs"
    torch.testing.assert_close(got.objective, want.objective, rtol=1e-3, atol=1e-5)
    assert torch.equal(got.skipped_steps, want.skipped_steps)


CASES = [("tiny", "advdm", 1, False), ("tiny", "advdm", 2, True), ("vae", "advdm", 1, True),
         ("vae", "fused", 2, False), ("vae", "textural", 1, True)]


@pytest.mark.parametrize("base_name,loss,k,random_start", CASES)
def test_engine_takes_the_plain_loops_steps_in_a_padded_bucket(bases, base_name, loss, k, random_start):
    model = bases[base_name]
    cfg = ProtectConfig(steps=4, k=k, loss=loss, random_start=random_start, step_size="2/255")
    x, ids = images_of(model, 3)
    kw = inputs(model, cfg)
    want = protect_loop(model, x, ids, cfg, **kw)
    engine = ProtectEngine(model, cfg, batch=4, **kw)
    got = engine.run(x, ids)
    assert_same_steps(got, want, "engine vs loop")
    assert got.delta.abs().max() > 0 and int(engine.step) == cfg.steps
    # the objective's first and last steps are the loop's, per image
    assert torch.isfinite(got.objective).all()


def test_a_reused_engine_starts_each_batch_afresh(bases):
    model = bases["vae"]
    cfg = ProtectConfig(steps=3, k=2, random_start=True)
    x, ids = images_of(model, 3)
    kw = inputs(model, cfg)
    engine = ProtectEngine(model, cfg, batch=3, **kw)
    engine.run(x, ids)
    tail = engine.run(x[2:], ids[2:])  # the tail batch: padded, its step counter reset
    alone = protect_loop(model, x[2:], ids[2:], cfg, **kw)
    assert_same_steps(tail, alone, "reused engine")
    with pytest.raises(ValueError, match="bucket of 3"):
        engine.run(torch.cat([x, x[:1]]), ids + ["x"])


def test_zero_steps_and_bad_arguments(bases):
    model = bases["tiny"]
    x, ids = images_of(model, 2)
    res = protect_batch(model, x, ids, ProtectConfig(steps=0))
    assert torch.equal(res.delta, torch.zeros_like(x)) and torch.isnan(res.objective).all()
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        ProtectEngine(model, ProtectConfig(), 2, use_graph=True)
    with pytest.raises(ValueError, match="1 ids for 2 images"):
        protect_batch(model, x, ids[:1], ProtectConfig(steps=1))
    with pytest.raises(ValueError, match="needs a target"):
        ProtectEngine(model, ProtectConfig(loss="fused"), 2)


def _art(tiny_world, tmp_path, n=3):
    return collect_protect_items(copy_members(tiny_world, tmp_path / "art", n))


def test_runner_goes_on_eagerly_when_capture_fails(bases, tiny_world, tmp_path, monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(ProtectEngine, "capture", broken)
    cfg = ProtectConfig(steps=2, eval_draws=2, batch_size=2)
    with caplog.at_level(logging.WARNING, logger="cgidm.protect"):
        summary = protect(bases["tiny"], _art(tiny_world, tmp_path), tmp_path / "out", cfg, progress=False)
    assert summary["protected"] == 3 and summary["timing"]["cuda_graph"] is False
    assert "CUDA graph capture failed" in caplog.text and "protecting eagerly" in caplog.text


# --------------------------------------------------------------------------- CUDA graphs


@pytest.mark.parametrize("base_name,loss,k,random_start", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_graph_replay_takes_the_eager_steps(bases, base_name, loss, k, random_start, dtype, no_tf32):
    """Replays draw from the keys and the device step counter the captured step advances:
    the eager engine's steps at the same batch (the same kernels), and in fp32 the plain
    loop's on the same device (another batch size may pick other kernels: in fp16 their
    last-bit differences can flip sign steps on more than the 1 % the comparison allows)."""
    needs_cuda()
    model = to_device(bases[base_name], "cuda", dtype)
    cfg = ProtectConfig(steps=4, k=k, loss=loss, random_start=random_start, step_size="2/255")
    x, ids = images_of(model, 3)
    kw = {k_: (v.cuda() if v is not None else None) for k_, v in inputs(model, cfg).items()}
    graphed = ProtectEngine(model, cfg, batch=4, **kw)
    got = graphed.run(x, ids)
    assert graphed.graph is not None
    eager_engine = ProtectEngine(model, cfg, batch=4, use_graph=False, **kw)
    assert_same_steps(got, eager_engine.run(x, ids), "graph vs eager")
    tail = graphed.run(x[1:2], ids[1:2])  # a smaller batch replays the same graph
    assert_same_steps(tail, eager_engine.run(x[1:2], ids[1:2]), "tail")
    if dtype == torch.float32:
        assert_same_steps(got, protect_loop(model, x, ids, cfg, **kw), "graph vs loop")


def test_protect_on_cuda_uses_the_graph(tiny_world, tmp_path):
    needs_cuda()
    model = load_base(tiny_world / "base", device="cuda")
    items = _art(tiny_world, tmp_path)
    summary = protect(model, items, tmp_path / "out", ProtectConfig(steps=3, eval_draws=2, batch_size=2),
                      progress=False)
    assert summary["protected"] == 3 and summary["timing"]["cuda_graph"] is True


def test_speed_bench_smoke(tmp_path):
    """``bench/bench_protect_speed.py --tiny`` on CPU: the SD-shape bench's code path (the
    eager public-tools loop, the engine at two batches, the check against the plain loop)
    runs and prints its table; rows go to a temporary folder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, CGIDM_BENCH_RESULTS=str(tmp_path))
    out = subprocess.run([sys.executable, str(root / "bench" / "bench_protect_speed.py"), "--device", "cpu", "--tiny",
                          "--batches", "1", "2", "--timed-steps", "2", "--repeats", "1", "--warmup", "0"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "agree on 100.00 %" in out.stdout and "engine batch 2:" in out.stdout
    rows = (tmp_path / "protect-speed-smoke-cpu.json").read_text().splitlines()
    assert len(rows) == 1 and '"speedup_vs_eager"' in rows[0] and '"peak_reserved_gib"' in rows[0]
    row = json.loads(rows[0])  # strict JSON (no NaN), and a smoke run judges no goal
    assert row["goals"]["judged"] is False and "speedup_ge_10x" not in row["goals"]
    assert row["rows"][0]["peak_reserved_gib"] is None


def test_out_of_memory_halves_the_engine_and_the_run_goes_on(bases, tiny_world, tmp_path, monkeypatch, caplog):
    """A batch that does not fit is split in halves, the engine rebuilt at the smaller size
    and kept for the later batches; an image that does not fit alone even with --low-memory
    is an error row."""
    real_run = ProtectEngine.run
    sizes, handling = [], []

    def run(self, images, ids, callback=None):
        sizes.append(self.b)
        handling.append(sys.exc_info()[0])  # retries run after the handler (its traceback holds the tensors)
        if self.b > 1 or "member_01" in ids[0]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, images, ids, callback)

    monkeypatch.setattr(ProtectEngine, "run", run)
    items = _art(tiny_world, tmp_path, n=5)
    cfg = ProtectConfig(steps=1, eval_draws=2, batch_size=4)
    with caplog.at_level(logging.WARNING, logger="cgidm.protect"):
        summary = protect(bases["tiny"], items, tmp_path / "out", cfg, progress=False)
    assert "out of memory on a batch of 4; trying 2 and 2" in caplog.text
    # smaller engines from then on (each engine has its batch's rows: the retry of the image
    # that did not fit alone, once --low-memory is on, and the last image are batches of one)
    assert sizes[:2] == [4, 2] and set(sizes[2:]) == {1}
    assert handling == [None] * len(sizes)
    bad = [i.id for i in items if "member_01" in i.id]
    assert summary["failed"] == len(bad) == 1 and summary["protected"] == 4
    assert summary["errors"][bad[0]].startswith("out of memory: OutOfMemoryError")
    assert "recomputing the activations" in caplog.text


def test_one_image_out_of_memory_goes_on_with_low_memory(bases, tiny_world, tmp_path, monkeypatch, caplog):
    """An image that does not fit alone turns on --low-memory for the rest of the run (the
    same perturbation; larger batches are tried again) instead of failing."""
    real_run = ProtectEngine.run
    seen = []

    def run(self, images, ids, callback=None):
        seen.append((self.b, self.cfg.low_memory))
        if not self.cfg.low_memory:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_run(self, images, ids, callback)

    items = _art(tiny_world, tmp_path, n=5)
    cfg = ProtectConfig(steps=2, eval_draws=2, batch_size=2)
    want = protect(bases["tiny"], items, tmp_path / "plain", cfg, progress=False)
    monkeypatch.setattr(ProtectEngine, "run", run)
    with caplog.at_level(logging.WARNING, logger="cgidm.protect"):
        got = protect(bases["tiny"], items, tmp_path / "low", cfg, progress=False)
    set_checkpointing(bases["tiny"], False)
    # the first pair, its first image alone, then that image and the second with --low-memory,
    # and the next pair together again
    assert seen[:5] == [(2, False), (1, False), (1, True), (1, True), (2, True)]
    assert got["protected"] == want["protected"] == 5 and got["low_memory_fallback"].startswith("one image did not fit")
    for it in items:
        a = np.asarray(Image.open(tmp_path / "plain" / "protected" / it.id))
        b = np.asarray(Image.open(tmp_path / "low" / "protected" / it.id))
        assert np.array_equal(a, b)


def test_the_bar_shows_the_pgd_step(bases, tiny_world, tmp_path, capsys):
    protect(bases["tiny"], _art(tiny_world, tmp_path, n=2), tmp_path / "out",
            ProtectConfig(steps=3, eval_draws=2, batch_size=2), progress=True)
    err = capsys.readouterr().err
    assert "batch of 2: PGD step 3/3" in err and "2/2" in err
    # one bar, made with its total: no count-only bar ("0img [...]") printed before it
    assert err.lstrip("\r").startswith("images:   0%") and ": 0img [" not in err


def test_low_memory_recomputes_activations_for_the_same_result(bases):
    """``--low-memory`` turns gradient checkpointing on in the UNet and the VAE encoder (and
    off again without it); the perturbation is the same."""
    model = bases["vae"]
    cfg = ProtectConfig(steps=3, k=2, random_start=True)
    x, ids = images_of(model, 2)
    kw = inputs(model, cfg)
    calls = []  # forward calls of a conv in each model (a recompute runs them again; it skips module hooks)
    convs = {"vae": model.codec.vae.encoder.down_blocks[0].resnets[0].conv1,
             "unet": model.unet.down_blocks[0].resnets[0].conv1}
    for name, conv in convs.items():
        conv.forward = (lambda f, name: lambda *a, **k: (calls.append(name), f(*a, **k))[1])(conv.forward, name)
    try:
        plain = protect_batch(model, x, ids, cfg, **kw)
        assert calls.count("vae") == calls.count("unet") == 3
        calls.clear()
        low = protect_batch(model, x, ids, cfg.replace(low_memory=True), **kw)
        assert calls.count("vae") == calls.count("unet") == 6  # each step's forward again in its backward
    finally:
        for conv in convs.values():
            del conv.forward
    assert model.unet.is_gradient_checkpointing and model.codec.vae.is_gradient_checkpointing
    assert torch.equal(low.delta, plain.delta) and torch.equal(low.objective, plain.objective)
    protect_batch(model, x, ids, cfg.replace(steps=1), **kw)
    assert not model.unet.is_gradient_checkpointing and not model.codec.vae.is_gradient_checkpointing
