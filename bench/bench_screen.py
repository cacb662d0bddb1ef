"""End-to-end screening throughput on the tiny pair: images/hour through ``cgidm.screen``
(load the pair, read, encode, invert, decode, score, write triptychs and rows, merge,
summary, report) and the fraction of wall time the engine is busy (time inside
``api.recover`` / wall).

Two modes, same images, same run: ``prefetch`` (reading and encoding the next batch and
writing the last one overlap with the inversion) and ``inline`` (``--prefetch 0``: all in
one thread). Before timing, every image must have exactly one scored row and both modes
must give the same scores. The imports of a process's first screen (diffusers,
scikit-learn, matplotlib) are paid before timing, by a one-step warm-up run. Prints a table and appends one JSON row to
``bench/results/screen-<device>.json``.

    python bench/bench_screen.py                          # CPU: 12 images x 20 steps
    python bench/bench_screen.py --device cuda --images 12 --steps 100
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, percentiles, provenance  # noqa: E402

from cgidm.config import AuthConfig, preset_config, resolve_runtime  # noqa: E402
from cgidm.manifest import read_manifest  # noqa: E402
from cgidm.screen import screen  # noqa: E402
from cgidm.testing.tiny import INSTANCE_PROMPT, build_tiny_world  # noqa: E402

SCORES = ("latent_cos", "latent_mse", "ssim", "psnr")
TOL = 1e-5  # batched convolutions may differ in the last bits between runs


@dataclass(frozen=True)
class Config:
    device: str
    images: int  # members and hold-outs of the tiny world, in id order
    steps: int
    batch_size: int
    prefetch: int  # batches read ahead in the "prefetch" mode
    repeats: int
    variant: str  # "full" fine-tune or "lora"
    dtype: str = "auto"


@dataclass(frozen=True)
class Result:
    mode: str  # "prefetch" or "inline"
    images_per_hour: float  # median, end to end: the whole screen() call
    images_per_hour_p20: float
    images_per_hour_p80: float
    wall_s: float  # median
    engine_busy: float  # median of time in recover / wall of the screen() call
    engine_busy_after_load: float  # the same with model loading taken out of the wall
    load_s: float  # median


def _entries(cfg: Config, root: Path):
    finetuned = root / "finetuned" if cfg.variant == "full" else None
    lora = root / "lora.safetensors" if cfg.variant == "lora" else None
    entries = [e for e in read_manifest(root / "images", root / "base", finetuned, lora) if e.label != "control"]
    if len(entries) < cfg.images:
        raise SystemExit(f"the tiny world has {len(entries)} members and hold-outs, asked for {cfg.images}")
    return entries[: cfg.images]


def _run(entries, auth: AuthConfig, cfg: Config, prefetch: int) -> tuple[dict, list[dict]]:
    rt = resolve_runtime(cfg.device, cfg.dtype)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = screen(entries, tmp, auth, device=rt.device, dtype=rt.dtype, progress=False, prefetch_depth=prefetch)
        wall = time.perf_counter() - t0
        rows = [json.loads(line) for line in (Path(tmp) / "results.jsonl").read_text().splitlines()]
    t = summary["timing"]
    return {"wall": wall, "engine": t["engine_s"], "load": t["load_s"], "images": t["images"]}, rows


def _check(rows: list[dict], reference: list[dict], n: int, mode: str) -> None:
    ids = [r["id"] for r in rows]
    if len(ids) != n or len(set(ids)) != n or any("error" in r for r in rows):
        raise SystemExit(f"{mode}: expected {n} scored rows, one per image")
    ref = {r["id"]: r for r in reference}
    worst = max(abs(r[k] - ref[r["id"]][k]) for r in rows for k in SCORES)
    if worst > TOL:
        raise SystemExit(f"{mode}: scores differ from the first run by {worst:.3g} > {TOL}")


def bench(cfg: Config) -> list[Result]:
    root = build_tiny_world()
    entries = _entries(cfg, root)
    auth = preset_config("demo", prompt=INSTANCE_PROMPT, batch_size=cfg.batch_size, steps=cfg.steps)
    # warm-up: a process's first screen imports diffusers, scikit-learn and matplotlib
    _run(entries[:2], auth.replace(steps=1), cfg, cfg.prefetch)
    results, reference = [], None
    for mode, prefetch in (("prefetch", cfg.prefetch), ("inline", 0)):
        samples = []
        for _ in range(cfg.repeats):
            s, rows = _run(entries, auth, cfg, prefetch)
            reference = reference or rows
            _check(rows, reference, len(entries), mode)
            samples.append(s)
        rates = [3600 * s["images"] / s["wall"] for s in samples]
        p20, med, p80 = percentiles(rates)
        results.append(Result(
            mode=mode, images_per_hour=med, images_per_hour_p20=p20, images_per_hour_p80=p80,
            wall_s=statistics.median(s["wall"] for s in samples),
            engine_busy=statistics.median(s["engine"] / s["wall"] for s in samples),
            engine_busy_after_load=statistics.median(s["engine"] / (s["wall"] - s["load"]) for s in samples),
            load_s=statistics.median(s["load"] for s in samples),
        ))
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--images", type=int, default=12)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", choices=("full", "lora"), default="full")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-save", action="store_true", help="print only; no row in bench/results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = Config(args.device, args.images, args.steps, args.batch_size, args.prefetch, args.repeats, args.variant,
                 args.dtype)
    results = bench(cfg)

    print(f"screen, tiny pair ({cfg.variant}), {cfg.images} images x {cfg.steps} PGD steps, batch {cfg.batch_size}, "
          f"{cfg.device}, {torch.get_num_threads()} threads, median of {cfg.repeats}")
    print(f"{'mode':<10} {'images/hour':>12} {'p20':>9} {'p80':>9} {'wall s':>8} {'load s':>7} "
          f"{'engine busy':>12} {'after load':>11}")
    for r in results:
        print(f"{r.mode:<10} {r.images_per_hour:>12,.0f} {r.images_per_hour_p20:>9,.0f} "
              f"{r.images_per_hour_p80:>9,.0f} {r.wall_s:>8.2f} {r.load_s:>7.2f} "
              f"{100 * r.engine_busy:>11.1f}% {100 * r.engine_busy_after_load:>10.1f}%")
    if not args.no_save:
        row = {**provenance(resolve_runtime(cfg.device, cfg.dtype).device), "config": asdict(cfg), "results": [asdict(r) for r in results]}
        print(f"appended to {append_row('screen', resolve_runtime(cfg.device, cfg.dtype).device, row)}")


if __name__ == "__main__":
    main()
