"""Extraction (``cgidm extract``, docs/extract.md) on the tiny world: how much of the
fine-tuning set comes back, and how fast the sampling runs.

Quality, for the full fine-tune and the LoRA (each pretrained-prompt mode): ``extract()``
end to end, then every member and hold-out image is scored by its best similarity to the
extracted candidates; the fraction of members above the best hold-out (a threshold fixed
on the hold-outs) and the members-vs-hold-outs AUC.

Speed, same pairs: samples/hour of the batched sampler (``cgidm.guidance.sample``: the
pair pass, no autograd) at batch 1 and at each batch of ``--batches``, against the plain
per-sample loop calling both UNets (``cgidm.guidance.sample_plain``, a diffusers-style
loop), after checking that the batched output equals the plain loop's. Median with
p20/p80 over ``--repeats`` runs. Prints a table and appends one JSON row to
``bench/results/extract-<device>.json``.

GPU speed (``--sd15``): Stable Diffusion v1.5 shapes with random weights (the UNet config
``SD15_UNET`` of ``bench/bench_engine.py``, random ``[1, 77, 768]`` conditionings; FLOPs do
not depend on the weights, nothing is downloaded), 512 px (latents 4x64x64), DDIM
(SD v1.5's scheduler config), ``--dtype`` bf16 or fp16, ``--speed-steps`` (50) steps:
samples/hour of the plain per-sample loop (``guidance.sample_plain``) and of
``guidance.sample`` (the pair pass from static buffers, one CUDA graph per run, capture
included in the time) at batch 1 and at the largest of ``--batches`` that fits, with the
peak memory (``torch.cuda.max_memory_allocated``, the weights included). Before timing,
3 samples at batch 2 (the last batch padded) are checked against fp32 eager sampling of the
same models: the error within 2x the plain loop's in the same dtype. Needs CUDA; ``--tiny``
runs the same code path with tiny UNets (on CPU in seconds), its row going to
``extract-smoke-<device>.json``.

    python bench/bench_extract.py --threads 1          # the committed CPU row (~3-5 min)
    python bench/bench_extract.py --sd15 --speed-samples 8 --speed-steps 20 --repeats 2   # GPU
    python bench/bench_extract.py --sd15 --tiny --device cpu                               # CPU smoke
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import DTYPES, build_models, free_memory  # noqa: E402
from common import append_row, percentiles, provenance  # noqa: E402

from cgidm import extract as X  # noqa: E402
from cgidm import guidance as G  # noqa: E402
from cgidm.config import ExtractConfig  # noqa: E402
from cgidm.graphs import graph_wanted  # noqa: E402
from cgidm.models import load_pair  # noqa: E402
from cgidm.testing.precision import full_fp32  # noqa: E402
from cgidm.testing.tiny import INSTANCE_PROMPT, build_tiny_world  # noqa: E402

VARIANTS = ("full", "lora")


@dataclass(frozen=True)
class Config:
    device: str
    world: str
    samples: int  # quality: samples per extraction
    steps: int  # quality: sampling steps
    clusters: int  # N: the tiny world has 6 members
    guidance: float
    correction: float
    modes: tuple[str, ...]  # pretrained-prompt modes measured
    speed_steps: int
    speed_samples: int  # per timed run (at least the batch)
    batches: tuple[int, ...]
    repeats: int
    seed: int


@dataclass(frozen=True)
class Quality:
    variant: str
    pretrained_prompt: str
    samples: int
    steps: int
    threshold: Optional[float]  # the clustering's similarity threshold
    cluster_sizes: tuple[int, ...]  # of the candidates, densest first
    members_extracted: int
    members: int
    extracted_fraction: float  # members above the best hold-out's similarity
    holdout_threshold: float
    auc: float  # members vs hold-outs, each scored by its best similarity to the candidates
    sampling_s: float


@dataclass(frozen=True)
class Speed:
    variant: str
    method: str  # "plain": per-sample loop, both UNets; "batched": cgidm.guidance.sample
    batch: int
    samples: int
    median_samples_per_hour: float
    p20_samples_per_hour: float
    p80_samples_per_hour: float
    vs_plain: Optional[float]  # median / the plain loop's median


def load(world: Path, variant: str, device: str):
    if variant == "full":
        return load_pair(world / "base", world / "finetuned", device=device)
    return load_pair(world / "base", None, world / "lora.safetensors", device=device)


def quality(cfg: Config, pair, variant: str, mode: str, world: Path) -> Quality:
    ecfg = ExtractConfig(prompt=INSTANCE_PROMPT, samples=cfg.samples, steps=cfg.steps, clusters=cfg.clusters,
                         guidance=cfg.guidance, correction=cfg.correction, pretrained_prompt=mode,
                         batch_size=min(32, cfg.samples), seed=cfg.seed)
    with tempfile.TemporaryDirectory() as out:
        s = X.extract(pair, out, ecfg, compare=world / "images", progress=False)
    m = s["compare"]["labelled"]
    return Quality(variant, mode, cfg.samples, cfg.steps, s["clustering"]["threshold"],
                   tuple(c["cluster_size"] for c in s["candidates"]), m["extracted"], m["members"],
                   m["extracted_fraction"], m["threshold"], m["auc"], s["timing"]["sampling_s"])


def _rate(fn, n: int, device: torch.device, repeats: int, warmup: Optional[Callable] = None) -> list[float]:
    """Samples/hour of ``fn`` (which makes ``n`` samples), one value per run, after one
    warm-up run (of ``warmup`` when given: a shorter run of the same code)."""
    (warmup or fn)()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(3600 * n / (time.perf_counter() - t0))
    return out


def speed(cfg: Config, pair, variant: str, world: Path) -> list[Speed]:
    device = torch.device(cfg.device)
    ecfg = ExtractConfig(prompt=INSTANCE_PROMPT, guidance=cfg.guidance, correction=cfg.correction)
    c_ft, c_pre = X.conditioning(pair, ecfg)
    fn, _ = X.pair_pass(pair)
    sched = G.load_scheduler(world / "base")
    shape = pair.latent_shape
    w, k, steps = cfg.guidance, cfg.correction, cfg.speed_steps

    def plain(keys):
        return G.sample_plain(pair.unet_ft, pair.unet_pre, c_ft, c_pre, sched, keys, shape, w, k, steps, device)

    def batched(keys, b):
        return G.sample(fn, c_ft, c_pre, sched, keys, shape, w, k, steps, b, device)

    # correctness before timing: every batch size gives the plain loop's samples
    check_keys = G.sample_keys(cfg.seed, range(max(cfg.batches)))
    want = plain(check_keys)
    tol = 2e-4 * float(want.abs().max())  # batched vs unbatched convolutions, weighed by the guidance
    for b in (1, *cfg.batches):
        got = batched(check_keys, b)
        err = float((got - want).abs().max())
        if not err <= tol:
            raise AssertionError(f"{variant}: batch {b} differs from the plain loop by {err:.3g} (> {tol:.3g})")

    rows = []
    n1 = cfg.speed_samples
    keys1 = G.sample_keys(cfg.seed, range(n1))
    p20, med_plain, p80 = percentiles(_rate(lambda: plain(keys1), n1, device, cfg.repeats))
    rows.append(Speed(variant, "plain", 1, n1, med_plain, p20, p80, 1.0))
    for b in (1, *cfg.batches):
        n = max(n1, b)
        keys = G.sample_keys(cfg.seed, range(n))
        p20, med, p80 = percentiles(_rate(lambda: batched(keys, b), n, device, cfg.repeats))
        rows.append(Speed(variant, "batched", b, n, med, p20, p80, med / med_plain))
    return rows


def table(cfg: Config, qual: list[Quality], speeds: list[Speed]) -> str:
    lines = [f"extraction on the tiny world ({cfg.device}): {cfg.samples} samples x {cfg.steps} steps, N = "
             f"{cfg.clusters}, w = {cfg.guidance}, k = {cfg.correction}",
             f"{'variant':<8}{'pre prompt':<12}{'extracted':>10}{'fraction':>10}{'AUC':>8}{'thr':>8}  cluster sizes"]
    for q in qual:
        lines.append(f"{q.variant:<8}{q.pretrained_prompt:<12}{q.members_extracted:>7}/{q.members:<2}"
                     f"{q.extracted_fraction:>10.2f}{q.auc:>8.3f}{q.holdout_threshold:>8.3f}  "
                     f"{', '.join(map(str, q.cluster_sizes))}")
    lines += ["", f"sampling speed ({cfg.speed_steps} steps, {cfg.repeats} runs): samples/hour",
              f"{'variant':<8}{'method':<9}{'batch':>6}{'median':>12}{'p20':>12}{'p80':>12}{'vs plain':>10}"]
    for s in speeds:
        lines.append(f"{s.variant:<8}{s.method:<9}{s.batch:>6}{s.median_samples_per_hour:>12,.0f}"
                     f"{s.p20_samples_per_hour:>12,.0f}{s.p80_samples_per_hour:>12,.0f}{s.vs_plain:>9.2f}x")
    return "\n".join(lines)


def summary(speeds: list[Speed]) -> dict:
    out = {}
    for v in {s.variant for s in speeds}:
        rows = [s for s in speeds if s.variant == v]
        plain = next(s for s in rows if s.method == "plain")
        b1 = next(s for s in rows if s.method == "batched" and s.batch == 1)
        best = max((s for s in rows if s.method == "batched"), key=lambda s: s.median_samples_per_hour)
        out[v] = {"plain_samples_per_hour": plain.median_samples_per_hour,
                  "batch1_samples_per_hour": b1.median_samples_per_hour,
                  "best_batch": best.batch, "best_samples_per_hour": best.median_samples_per_hour,
                  "best_vs_batch1": best.median_samples_per_hour / b1.median_samples_per_hour,
                  "best_vs_plain": best.vs_plain}
    return out


# --------------------------------------------------------------------------- GPU speed, SD v1.5 shapes

# Stable Diffusion v1.5's scheduler/scheduler_config.json, read as a DDIM scheduler (what
# load_scheduler builds from a base's config).
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


@dataclass(frozen=True)
class SD15Config:
    device: str
    tiny: bool  # tiny UNets: a smoke run of the code path
    dtype: str  # the UNets' weights; latents and the guidance stay fp32
    steps: int
    samples: int  # per timed run (at least the batch)
    batches: tuple[int, ...]  # the largest that fits is timed
    repeats: int
    guidance: float
    correction: float
    seed: int
    check_samples: int = 3  # at batch 2: the last batch padded
    check_steps: int = 3


@dataclass(frozen=True)
class SD15Speed:
    method: str  # "plain": guidance.sample_plain, one sample at a time; "pair pass": guidance.sample
    batch: int
    samples: int
    cuda_graph: bool
    median_samples_per_hour: float
    p20_samples_per_hour: float
    p80_samples_per_hour: float
    vs_plain: float  # median / the plain loop's median
    peak_memory_bytes: Optional[int]  # max_memory_allocated over the warm-up and the runs, weights included
    weights_bytes: Optional[int]  # memory_allocated before them: both UNets and the conditionings


def sd15_check(cfg: SD15Config, models32, models, c_ft, c_pre, sched, shape) -> dict:
    """``guidance.sample`` in ``cfg.dtype`` (the graph on CUDA) against fp32 eager sampling
    of the same weights: its error within 2x the plain loop's in the same dtype, plus 1e-3
    of the largest value (the 2x dtype rule, csrc/README.md)."""
    device = torch.device(cfg.device)
    keys = G.sample_keys(cfg.seed, range(cfg.check_samples))
    w, k, steps = cfg.guidance, cfg.correction, cfg.check_steps

    def batched(ft, pre, use_graph):
        fn, _ = X.pair_pass(SimpleNamespace(unet_ft=ft, unet_pre=pre, device=device))
        return G.sample(fn, c_ft, c_pre, sched, keys, shape, w, k, steps, 2, device, use_graph=use_graph)

    with full_fp32(deterministic=False):  # an fp32 reference, not TF32
        ref = batched(*models32, False)
    got = batched(*models, None)
    plain = G.sample_plain(*models, c_ft, c_pre, sched, keys, shape, w, k, steps, device)
    if not (torch.isfinite(ref).all() and torch.isfinite(got).all()):
        raise AssertionError("the check's samples are not finite")
    err, err_plain, scale = (float((got - ref).abs().max()), float((plain - ref).abs().max()),
                             float(ref.abs().max()))
    if not err <= 2 * err_plain + 1e-3 * scale:
        raise AssertionError(f"pair pass error {err:.3g} > 2 x the plain loop's {err_plain:.3g} + 1e-3 x {scale:.3g}")
    return {"samples": cfg.check_samples, "steps": steps, "batch": 2, "max_abs_err": err,
            "plain_max_abs_err": err_plain, "ref_max_abs": scale}


def sd15_speed(cfg: SD15Config, res: Optional[dict] = None) -> dict:
    """The check, then the plain loop, the pair pass at batch 1 and at the largest batch of
    ``cfg.batches`` that fits; returns the row's measurements, put into ``res`` as each is
    made (a run stopped part way keeps what it measured)."""
    from diffusers import DDIMScheduler

    res = {} if res is None else res

    device = torch.device(cfg.device)
    cuda = device.type == "cuda"
    ft32, pre32, c_ft, c_pre, _, shape = build_models(cfg)
    dtype = DTYPES[cfg.dtype]
    ft, pre = copy.deepcopy(ft32).to(dtype), copy.deepcopy(pre32).to(dtype)
    sched = DDIMScheduler(**SD15_SCHEDULER)
    res["check"] = sd15_check(cfg, (ft32, pre32), (ft, pre), c_ft, c_pre, sched, shape)
    del ft32, pre32
    free_memory()
    fn, res["pair_pass"] = X.pair_pass(SimpleNamespace(unet_ft=ft, unet_pre=pre, device=device))
    graph = graph_wanted(None, device)
    w, k, steps = cfg.guidance, cfg.correction, cfg.steps

    def plain(n):
        return lambda: G.sample_plain(ft, pre, c_ft, c_pre, sched, G.sample_keys(cfg.seed, range(n)), shape, w, k,
                                      steps, device)

    def batched(n, b):
        return lambda: G.sample(fn, c_ft, c_pre, sched, G.sample_keys(cfg.seed, range(n)), shape, w, k, steps, b,
                                device)

    def measure(method, b, n, run, warmup, med_plain=None) -> SD15Speed:
        base = None
        free_memory()  # the last run's cached blocks and graph pool: room for a larger batch
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        p20, med, p80 = percentiles(_rate(run, n, device, cfg.repeats, warmup))
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        r = SD15Speed(method, b, n, graph and method != "plain", med, p20, p80, med / (med_plain or med), peak, base)
        print(f"{method} b={b}: {med:,.0f} samples/hour", flush=True)
        return r

    rows, out_of_memory = res.setdefault("speed", []), res.setdefault("out_of_memory", [])
    rows.append(measure("plain", 1, cfg.samples, plain(cfg.samples), plain(1)))
    med_plain = rows[0].median_samples_per_hour
    rows.append(measure("pair pass", 1, cfg.samples, batched(cfg.samples, 1), batched(1, 1), med_plain))
    for b in sorted({b for b in cfg.batches if b > 1}, reverse=True):
        n = max(cfg.samples, b)
        try:
            rows.append(measure("pair pass", b, n, batched(n, b), batched(b, b), med_plain))
            break
        except torch.cuda.OutOfMemoryError as e:
            out_of_memory.append({"batch": b, "error": str(e).splitlines()[0][:300]})
            print(f"pair pass b={b}: out of memory, next batch", flush=True)
            free_memory()
    return res


def sd15_table(cfg: SD15Config, rows: list[SD15Speed]) -> str:
    what = "tiny UNets (smoke)" if cfg.tiny else "SD v1.5 shapes, random weights, 512 px"
    lines = [f"extraction sampling, {what} ({cfg.device}, {cfg.dtype}): {cfg.steps} DDIM steps, {cfg.repeats} runs; "
             "samples/hour",
             f"{'method':<10}{'batch':>6}{'graph':>7}{'median':>12}{'p20':>12}{'p80':>12}{'vs plain':>10}"
             f"{'peak GiB':>10}"]
    for r in rows:
        peak = "" if r.peak_memory_bytes is None else f"{r.peak_memory_bytes / 2**30:.2f}"
        lines.append(f"{r.method:<10}{r.batch:>6}{'yes' if r.cuda_graph else 'no':>7}"
                     f"{r.median_samples_per_hour:>12,.0f}{r.p20_samples_per_hour:>12,.0f}"
                     f"{r.p80_samples_per_hour:>12,.0f}{r.vs_plain:>9.2f}x{peak:>10}")
    return "\n".join(lines)


def main_sd15(a) -> int:
    cfg = SD15Config(a.device, a.tiny, a.dtype, a.speed_steps or 50, a.speed_samples or 8,
                     tuple(a.batches or (32, 16, 8)), a.repeats, a.guidance, a.correction, a.seed)
    t0 = time.perf_counter()
    res: dict = {}
    failed = None
    try:
        sd15_speed(cfg, res)
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - what was measured is kept, the failure said
        failed, res["error"] = e, f"{type(e).__name__}: {e}"
    wall = time.perf_counter() - t0
    rows = res.get("speed", [])
    print(sd15_table(cfg, rows))
    print(f"bench wall time: {wall:.0f} s")
    if not a.no_save:
        dev = torch.device(cfg.device)
        summary = {}
        if rows:
            summary["plain_samples_per_hour"] = rows[0].median_samples_per_hour
        if len(rows) > 1:
            best = rows[-1]
            summary.update(batch1_samples_per_hour=rows[1].median_samples_per_hour, batch1_vs_plain=rows[1].vs_plain,
                           best_batch=best.batch, best_samples_per_hour=best.median_samples_per_hour,
                           best_vs_plain=best.vs_plain)
        path = append_row("extract-smoke" if cfg.tiny else "extract", dev, {
            "bench": "extract", "mode": "sd15", "smoke": cfg.tiny, **provenance(dev), "config": asdict(cfg),
            **res, "speed": [asdict(r) for r in rows], "summary": summary, "wall_s": wall,
        })
        print(f"appended to {path}")
    if failed is not None:
        raise failed
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--world", default=None, help="tiny world folder (default: the cache)")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clusters", type=int, default=6)
    p.add_argument("--guidance", type=float, default=ExtractConfig.guidance)
    p.add_argument("--correction", type=float, default=ExtractConfig.correction)
    p.add_argument("--modes", nargs="+", default=["empty", "same"], choices=["empty", "same"])
    p.add_argument("--speed-steps", type=int, help="sampling steps of the timed runs (default 10; --sd15: 50)")
    p.add_argument("--speed-samples", type=int, help="samples per timed run, at least the batch (default 4; --sd15: 8)")
    p.add_argument("--batches", type=int, nargs="+",
                   help="batches timed (default 8 16 32); --sd15: the largest that fits is timed (default 32 16 8)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-save", action="store_true", help="print only, append no result row")
    p.add_argument("--sd15", action="store_true", help="GPU sampling speed on SD v1.5 shapes, random weights")
    p.add_argument("--tiny", action="store_true", help="with --sd15: tiny UNets, a smoke run of the same code path")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES), help="--sd15: the UNets' dtype")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.tiny and not a.sd15:
        p.error("--tiny goes with --sd15")
    if a.sd15:
        if not a.tiny and (torch.device(a.device).type != "cuda" or not torch.cuda.is_available()):
            p.error("--sd15 needs CUDA (add --tiny for a smoke run of the same code path with tiny UNets)")
        return main_sd15(a)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per loaded file of a tiny model
    world = build_tiny_world(a.world)
    cfg = Config(a.device, str(world), a.samples, a.steps, a.clusters, a.guidance, a.correction, tuple(a.modes),
                 a.speed_steps or 10, a.speed_samples or 4, tuple(a.batches or (8, 16, 32)), a.repeats, a.seed)
    t0 = time.perf_counter()
    qual, speeds = [], []
    for variant in a.variants:
        pair = load(world, variant, a.device)
        for mode in cfg.modes:
            qual.append(quality(cfg, pair, variant, mode, world))
        speeds += speed(cfg, pair, variant, world)
    wall = time.perf_counter() - t0
    print(table(cfg, qual, speeds))
    print(f"bench wall time: {wall:.0f} s")
    if not a.no_save:
        dev = torch.device(cfg.device)
        path = append_row("extract", dev, {
            **provenance(dev), "config": asdict(cfg), "quality": [asdict(q) for q in qual],
            "speed": [asdict(s) for s in speeds], "summary": summary(speeds), "wall_s": wall,
        })
        print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
