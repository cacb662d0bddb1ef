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

    python bench/bench_extract.py --threads 1          # the committed CPU row (~3-5 min)
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, percentiles, provenance  # noqa: E402

from cgidm import extract as X  # noqa: E402
from cgidm import guidance as G  # noqa: E402
from cgidm.config import ExtractConfig  # noqa: E402
from cgidm.models import load_pair  # noqa: E402
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


def _rate(fn, n: int, device: torch.device, repeats: int) -> list[float]:
    """Samples/hour of ``fn`` (which makes ``n`` samples), one value per run, after one
    warm-up run."""
    fn()
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
    shape = (pair.latent_channels, pair.latent_size, pair.latent_size)
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
    p.add_argument("--speed-steps", type=int, default=10)
    p.add_argument("--speed-samples", type=int, default=4)
    p.add_argument("--batches", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-save", action="store_true", help="print only, append no result row")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per loaded file of a tiny model
    world = build_tiny_world(a.world)
    cfg = Config(a.device, str(world), a.samples, a.steps, a.clusters, a.guidance, a.correction, tuple(a.modes),
                 a.speed_steps, a.speed_samples, tuple(a.batches), a.repeats, a.seed)
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
