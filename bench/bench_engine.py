"""The engine (cgidm.engine) against the paper's official loop, same device, same run.

Baseline, as the official code runs it (docs/faithfulness.md): fp16 UNets, batch 1, one ``t`` and
independent noise per model per step, weight gradients left on (``loss.backward()``
fills every weight's ``.grad``), a fresh autograd graph every step, eager.

Engine: frozen weights (bf16 by default), fp32 ``delta``, shared ``(t, noise)``, K
timesteps per image, the whole step replayed from a CUDA graph; at batch 1 and at the
batch the memory calibration picks.

Models: SD v1.x UNet shapes (``SD15_UNET`` below, 859.5 M parameters) with random
weights — FLOPs and time do not depend on the weights; no downloads. Before timing, the
engine's first-step input gradient is checked against fp32 models, once, on at most 2
images (an fp32 autograd pass at the calibrated batch would not fit): its error must be
within 2x the error of plain torch in the same dtype (the 2x dtype rule, csrc/README.md). MFU is against an
8192^3 bf16 matmul timed in the same run (back-to-back calls, each sample >= 20 ms on a
GPU, median of the samples). One row per measurement goes to
``bench/results/engine-<device>.json`` as soon as it is measured, so a later failure (out
of memory at a large batch) keeps the rows before it; each engine and its CUDA graph are
freed before the next batch.

    python bench/bench_engine.py                          # CUDA only
    python bench/bench_engine.py --device cpu --tiny      # CPU smoke: tiny UNets, tiny sizes

``--device cpu`` without ``--tiny`` is refused: CPU numbers on SD shapes would take
hours and say nothing about the engine. The smoke row goes to
``bench/results/engine-cpu-smoke.json``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS, append_row, percentiles, provenance, time_fn  # noqa: E402

from cgidm import reference, rng  # noqa: E402
from cgidm.engine import Engine, plan_memory  # noqa: E402
from cgidm.reference import PGDConfig  # noqa: E402
from cgidm.testing.precision import full_fp32  # noqa: E402

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

# Stable Diffusion v1.5's UNet (its unet/config.json, the fields that set the shapes).
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_TOKENS = 77


@dataclass(frozen=True)
class Config:
    device: str
    tiny: bool
    dtype: str  # engine weights; the baseline is fp16 as in the paper's code
    k: int
    batches: tuple[str, ...]  # "1", "auto" (calibrated on CUDA) or a number
    max_batch: int
    warmup: int
    repeats: int
    matmul_n: int
    check_batch: int  # images of the fp32 correctness check (at most 2)
    low_memory: bool = False  # the engine's UNets recompute their activations (--low-memory)


@dataclass(frozen=True)
class Result:
    name: str  # "baseline" or "engine"
    batch: int
    k: int
    dtype: str
    median_ms_per_step: float
    p20_ms_per_step: float
    p80_ms_per_step: float
    ms_per_image_step: float
    image_steps_per_s: float
    tflops_per_s: float
    mfu: float  # achieved / the bf16 matmul rate measured in this run
    speedup_vs_baseline: Optional[float]


def unet_config(tiny: bool) -> tuple[dict, int]:
    if tiny:
        from cgidm.testing.tiny import tiny_unet_config

        return tiny_unet_config(16), 8
    return dict(SD15_UNET), SD15_TOKENS


def build_models(cfg: Config):
    """Two random UNets (a "pretrained" and a "fine-tuned") in fp32 on the device, frozen
    (every user copies them: the baseline turns its copies' gradients on), prompt
    embeddings and ``abar``."""
    from diffusers import UNet2DConditionModel

    ucfg, tokens = unet_config(cfg.tiny)
    with torch.device(cfg.device):  # initialised where they run: SD's 860 M weights init slowly on a CPU
        torch.manual_seed(0)
        pre = UNet2DConditionModel(**ucfg).to(cfg.device).eval().requires_grad_(False)
        torch.manual_seed(1)
        ft = UNet2DConditionModel(**ucfg).to(cfg.device).eval().requires_grad_(False)
    dim = ucfg["cross_attention_dim"]
    g = torch.Generator().manual_seed(2)
    c_ft = torch.randn(1, tokens, dim, generator=g).to(cfg.device)
    c_pre = torch.randn(1, tokens, dim, generator=g).to(cfg.device)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0).to(cfg.device)
    shape = (ucfg["in_channels"], ucfg["sample_size"], ucfg["sample_size"])
    return ft, pre, c_ft, c_pre, abar, shape


def image_keys(b: int, device) -> torch.Tensor:
    """``[b]`` counter-based draw keys of the benchmark's images (cgidm.rng)."""
    return rng.image_keys(0, [f"bench-{i}" for i in range(b)], device)


def latents(b: int, shape, device):
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(b, *shape, generator=g)
    x_init = x0 + 0.5 * torch.randn(b, *shape, generator=g)
    mask = (torch.rand(shape, generator=g) > 0.5).float()
    return x0.to(device), x_init.to(device), mask.to(device)


# --------------------------------------------------------------------------- baseline


class PaperLoop:
    """The official loop, one step per call: fp16 models with ``requires_grad`` on,
    ``loss.backward()`` (weight gradients computed and thrown away), batch 1, one ``t``
    and independent noise per model, a new autograd graph every step."""

    def __init__(self, ft, pre, c_ft, c_pre, abar, x0, x_init, mask, pgd: PGDConfig):
        self.ft = copy.deepcopy(ft).half().requires_grad_(True)
        self.pre = copy.deepcopy(pre).half().requires_grad_(True)
        self.c_ft, self.c_pre = c_ft.half(), c_pre.half()
        self.abar = abar
        self.x0, self.x_init, self.mask = x0[:1], x_init[:1], mask
        self.delta = torch.zeros_like(self.x0)
        self.pgd = pgd

    def step(self) -> None:
        pgd, dev = self.pgd, self.x0.device
        for m in (self.ft, self.pre):
            m.zero_grad(set_to_none=True)
        x = (self.x_init + self.delta).detach().requires_grad_(True)
        z = self.x0 * self.mask + x * (1 - self.mask)
        t = torch.randint(pgd.t_min, pgd.t_max + 1, (1,), device=dev)
        a, s = self.abar[t].sqrt().float(), (1 - self.abar[t]).sqrt().float()
        n_ft, n_pre = torch.randn_like(z), torch.randn_like(z)
        out_ft = self.ft((a * z + s * n_ft).half(), t, encoder_hidden_states=self.c_ft).sample
        out_pre = self.pre((a * z + s * n_pre).half(), t, encoder_hidden_states=self.c_pre).sample
        loss = F.mse_loss(out_ft.float(), n_ft) - F.mse_loss(out_pre.float(), n_pre)
        loss.backward()
        with torch.no_grad():
            g = torch.nan_to_num(x.grad / x.grad.norm(), nan=0.0)
            delta = self.delta - pgd.alpha * g
            delta = (self.x_init + delta).clamp(pgd.clamp_min, pgd.clamp_max) - self.x_init
            norm = delta.norm()
            self.delta = delta * torch.where(norm > pgd.eps, pgd.eps / norm.clamp_min(1e-12), torch.ones_like(norm))


# --------------------------------------------------------------------------- correctness


def input_grad(eps_ft, eps_pre, x0, x_init, mask, c_ft, c_pre, t, noise, abar, ops):
    """d loss / d x at ``delta = 0`` for fixed draws, the engine's loss (shared noise)."""
    b, k = x0.shape[0], t.shape[0] // x0.shape[0]
    x = x_init.clone().requires_grad_(True)
    sa, sb = abar[t].sqrt().float(), (1 - abar[t]).sqrt().float()
    _, x_t = ops.pair_noise(x0, x, mask, noise, None, sa, sb)
    cf, cp = reference._expand_cond(c_ft, b, k), reference._expand_cond(c_pre, b, k)
    loss = ops.pair_contrast_loss(eps_ft(x_t[0], t, cf), eps_pre(x_t[1], t, cp), noise, None)
    return torch.autograd.grad(loss.view(b, k).mean(1).sum(), x)[0]


def check_engine(engine: Engine, ft32, pre32, c_ft, c_pre, abar, x0, x_init, mask, dtype) -> dict:
    """The engine's first-step gradient (captured from its own step) against fp32 models;
    error within 2x plain torch's in ``dtype`` (plus a floor for tiny errors)."""
    seen = {}
    inner = engine.ops

    def spy_pgd_update(delta, grad, *args):
        seen["grad"] = grad.detach().clone()
        return inner.pgd_update(delta, grad, *args)

    engine.ops = SimpleNamespace(**{**vars(inner), "pgd_update": spy_pgd_update})
    b = engine.b
    keys = image_keys(b, engine.device)
    engine.load(x0[:b], x_init[:b], mask, keys)
    t, noise, _ = reference.draw_step(engine.cfg, keys, 0, engine.latent_shape, engine.device)
    engine._step((t, noise, None))  # one eager step from these draws, graph or not
    engine.ops = inner
    engine.load(x0[:b], x_init[:b], mask, keys)

    args = (x0[:b], x_init[:b], mask, c_ft, c_pre, t, noise, abar, reference.REFERENCE_OPS)
    with full_fp32(deterministic=False):  # the fp32 reference in fp32, not in TF32 convolutions
        want = input_grad(reference.unet_eps_fn(ft32), reference.unet_eps_fn(pre32), *args)
    ft_lo = copy.deepcopy(ft32).to(dtype).requires_grad_(False)
    pre_lo = copy.deepcopy(pre32).to(dtype).requires_grad_(False)
    plain = input_grad(reference.unet_eps_fn(ft_lo), reference.unet_eps_fn(pre_lo), *args)
    del ft_lo, pre_lo
    scale = want.abs().max().item()
    # The engine's gradient is of the loss times loss_scale (a power of two: exact to undo).
    got = seen["grad"] / reference.loss_scale(engine.latent_shape)
    err_engine = (got - want).abs().max().item()
    err_plain = (plain - want).abs().max().item()
    ok = math.isfinite(err_engine) and err_engine <= 2 * err_plain + 1e-6 * scale
    row = {"grad_err_engine": err_engine, "grad_err_plain_torch": err_plain, "grad_scale": scale, "ok": ok}
    if not ok:
        raise SystemExit(f"engine gradient fails the 2x dtype rule: {row}")
    return row


# --------------------------------------------------------------------------- timing


def step_flops(ft, pre, c_ft, c_pre, abar, shape, device) -> float:
    """FLOPs of one image-step at K=1 (both models' forward + input backward), counted."""
    from torch.utils.flop_counter import FlopCounterMode

    x0, x_init, mask = latents(1, shape, device)
    t = torch.tensor([500], device=device)
    noise = torch.randn(1, *shape, device=device)
    fn_ft, fn_pre = reference.unet_eps_fn(ft), reference.unet_eps_fn(pre)
    with FlopCounterMode(display=False) as counter:
        input_grad(fn_ft, fn_pre, x0, x_init, mask, c_ft, c_pre, t, noise, abar, reference.REFERENCE_OPS)
    return float(counter.get_total_flops())


def matmul_rate(device: torch.device, n: int) -> tuple[float, dict]:
    """FLOP/s of an ``n^3`` bf16 matmul on this device, now (the MFU denominator), and how
    it was measured. One matmul is ~1 ms on an H100, below the noise of one event pair and
    of clock ramp-up: each sample runs ``calls`` back-to-back matmuls (>= 20 ms on a GPU),
    after a warm-up long enough for the clocks to settle, and the median of 15 samples is
    the rate (its p20/p80 spread is recorded)."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    out = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    one = percentiles(time_fn(lambda: torch.matmul(a, b, out=out), device, warmup=3, repeats=3))[1]
    gpu = device.type == "cuda"
    calls = max(1, math.ceil((0.02 if gpu else 0.0) / one))
    repeats = 15 if gpu else 3

    def burst():
        for _ in range(calls):
            torch.matmul(a, b, out=out)

    samples = [s / calls for s in time_fn(burst, device, warmup=5 if gpu else 1, repeats=repeats)]
    p20, med, p80 = percentiles(samples)
    flop = 2 * n**3
    info = {"n": n, "calls_per_sample": calls, "samples": repeats, "tflops_p20": flop / p80 / 1e12,
            "tflops_median": flop / med / 1e12, "tflops_p80": flop / p20 / 1e12}
    return flop / med, info


def result(name, batch, k, dtype, samples, flops_per_image_step, peak, base_ms) -> Result:
    p20, med, p80 = (s * 1e3 for s in percentiles(samples))
    per_image = med / batch
    rate = flops_per_image_step * k * batch / (med / 1e3)
    return Result(
        name=name, batch=batch, k=k, dtype=dtype, median_ms_per_step=med, p20_ms_per_step=p20,
        p80_ms_per_step=p80, ms_per_image_step=per_image, image_steps_per_s=1e3 / per_image,
        tflops_per_s=rate / 1e12, mfu=rate / peak,
        speedup_vs_baseline=None if base_ms is None else base_ms / per_image,
    )


def pick_batches(cfg: Config, make_engine) -> tuple[list[int], Optional[dict]]:
    """The batches to time, and the memory plan behind ``auto`` (CUDA) if one was made."""
    out, plan = [], None
    for b in cfg.batches:
        if b == "auto":
            if cfg.device == "cuda":
                mp = plan_memory(make_engine, cfg.k, cfg.max_batch)
                plan = asdict(mp)
                out.append(mp.batch)
                free_memory()
            else:
                out.append(min(4, cfg.max_batch))
        else:
            out.append(int(b))
    return sorted(set(out)), plan


def time_engine(make_engine, b: int, shape, device: torch.device, cfg: Config) -> tuple[list[float], bool]:
    """Seconds per step of an engine of ``b`` images (graph replays on CUDA) and whether its
    state stayed finite; the engine and its graph are dropped on return."""
    engine = make_engine(b)
    engine.load(*latents(b, shape, device), image_keys(b, device))
    if engine.use_graph:
        engine.capture()
        step = engine.graph.replay
    else:
        step = engine._step
    samples = time_fn(step, device, cfg.warmup, cfg.repeats)
    finite = bool(torch.isfinite(engine.delta).all()) and math.isfinite(float(engine.loss_value))
    engine.graph = None
    return samples, finite


def free_memory() -> None:
    """Give what dropped engines held (a CUDA graph's private pool included) back to the
    device before the next, larger one is built."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(cfg: Config, emit) -> list[Result]:
    """Measures, calling ``emit(result, extra)`` as soon as each row is measured."""
    device = torch.device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    ft32, pre32, c_ft, c_pre, abar, shape = build_models(cfg)
    pgd = PGDConfig(steps=1, k=cfg.k)
    peak, matmul = matmul_rate(device, cfg.matmul_n)
    flops = step_flops(ft32, pre32, c_ft, c_pre, abar, shape, device)
    extra = {"peak_bf16_matmul_tflops": peak / 1e12, "matmul": matmul, "flops_per_image_step": flops}

    baseline = PaperLoop(ft32, pre32, c_ft, c_pre, abar, *latents(1, shape, device), pgd=PGDConfig(steps=1))
    base_samples = time_fn(baseline.step, device, cfg.warmup, cfg.repeats)
    assert any(p.grad is not None for p in baseline.ft.parameters()), "the baseline must compute weight gradients"
    del baseline
    free_memory()
    base = result("baseline", 1, 1, "fp16", base_samples, flops, peak, None)
    emit(base, extra)
    results = [base]

    ft_lo = copy.deepcopy(ft32)
    pre_lo = copy.deepcopy(pre32)
    if cfg.low_memory:
        from cgidm.checkpointing import set_gradient_checkpointing

        set_gradient_checkpointing((ft_lo, pre_lo), True)

    from cgidm.pairpass import low_memory_pass

    pass_name = low_memory_pass(ft_lo, pre_lo, device) if cfg.low_memory else None

    def make_engine(b: int) -> Engine:
        return Engine(ft_lo, pre_lo, c_ft, c_pre, abar, shape, pgd, batch=b, device=device,
                      weight_dtype=dtype, warmup=cfg.warmup, pair_pass=pass_name)

    # Correctness before any timing, once, on at most 2 images: the fp32 reference pass
    # keeps every activation for autograd, which at the calibrated batch would not fit.
    engine = make_engine(cfg.check_batch)
    check = check_engine(engine, ft32, pre32, c_ft, c_pre, abar, *latents(cfg.check_batch, shape, device), dtype)
    del engine
    free_memory()
    print(f"engine b={cfg.check_batch}: first-step gradient ok {json.dumps(check)}")
    extra["check"] = {"batch": cfg.check_batch, **check}

    batches, plan = pick_batches(cfg, make_engine)
    if plan is not None:
        extra["memory_plan"] = plan
    for b in batches:
        # An out-of-memory error (a graph capture needs its own pool beside the warm-up's
        # cached blocks) is recorded as a row, and the batch halved until it fits.
        while True:
            try:
                samples, finite = time_engine(make_engine, b, shape, device, cfg)
                error = None
            except torch.cuda.OutOfMemoryError as e:
                error = f"out of memory at b={b}: {str(e).splitlines()[0][:300]}"
            free_memory()
            if error is None:
                break
            emit(None, {**extra, "error": error, "batch": b})
            if b == 1:
                raise SystemExit(error)
            b //= 2
        r = result("engine", b, cfg.k, cfg.dtype, samples, flops, peak, base.ms_per_image_step)
        emit(r, {**extra, "finite_after_timing": finite})
        results.append(r)
        if not finite:
            raise SystemExit(f"engine b={b}: delta or loss not finite after the timed steps")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="tiny UNets (a smoke run of the code path)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--batches", nargs="+", default=["1", "auto"])
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--matmul-n", type=int, default=None, help="peak-rate matmul size (default 8192; 1024 with --tiny)")
    p.add_argument("--low-memory", action="store_true",
                   help="the engine's UNets recompute their activations in the backward pass (cgidm --low-memory); "
                        "the memory plan of 'auto' shows what that saves")
    a = p.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_engine needs CUDA (or --device cpu --tiny for a smoke run)")
    if a.device == "cpu" and not a.tiny:
        raise SystemExit("on CPU bench_engine only runs the --tiny smoke mode")
    cfg = Config(device=a.device, tiny=a.tiny, dtype=a.dtype, k=a.k, batches=tuple(a.batches),
                 max_batch=a.max_batch, warmup=a.warmup, repeats=a.repeats,
                 matmul_n=a.matmul_n or (1024 if a.tiny else 8192), check_batch=min(2, a.max_batch),
                 low_memory=a.low_memory)
    device = torch.device(cfg.device)
    # A tiny-model row only shows the code path runs: its MFU (CPU bf16 is emulated) means nothing.
    path = RESULTS / "engine-cpu-smoke.json" if device.type == "cpu" else None

    def emit(r: Optional[Result], extra: dict) -> None:
        """Appends one row now: a measurement, or (``r`` None) an error with its batch."""
        nonlocal path
        row = {"bench": "engine", "smoke": cfg.tiny, "config": asdict(cfg), "result": r and asdict(r), **extra,
               **provenance(device)}
        if device.type == "cpu":
            RESULTS.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:
                f.write(json.dumps(row, sort_keys=True) + "\n")
        else:
            path = append_row("engine", device, row)
        what = extra["error"] if r is None else f"{r.name} b={r.batch}: {r.median_ms_per_step:.2f} ms/step"
        print(f"{what}, row appended to {path}", flush=True)

    results = run(cfg, emit)
    print(f"{'name':>9} {'B':>4} {'K':>3} {'dtype':>5} {'ms/step':>10} {'ms/img-step':>12} {'TFLOP/s':>9} {'MFU':>7} {'speedup':>8}")
    for r in results:
        sp = "" if r.speedup_vs_baseline is None else f"{r.speedup_vs_baseline:.2f}x"
        print(f"{r.name:>9} {r.batch:>4} {r.k:>3} {r.dtype:>5} {r.median_ms_per_step:>10.2f} "
              f"{r.ms_per_image_step:>12.2f} {r.tflops_per_s:>9.3f} {r.mfu:>7.3f} {sp:>8}")


if __name__ == "__main__":
    main()
