"""What ``cgidm demo`` shows and how long it takes: each variant (``--variant full`` and
``lora``, the SD 1.x tiny world, assembled beforehand) run as a user runs it, in a
subprocess, with its wall time (the demo's own, world cached) and what its summary says:
AUC, the members' and hold-outs' mean latent cosine, PSNR and SSIM, and the official
validator's AUC. One JSON row per family in ``bench/results/demo-<device>.json`` (README,
"What the demo shows"; ``docs/families.md``, the family worlds' table).

With ``--first-build`` each family's world is built afresh in a temporary folder first, in a
subprocess, and that build's wall time is recorded too (``first_build_s``); the demos then
run on that world.

    python bench/bench_demo.py
    python bench/bench_demo.py --variants full --threads 2
    python bench/bench_demo.py --families sd2,sd2-v,sdxl --first-build --threads 2
    python bench/bench_demo.py --variants full --extra "--baselines all --with-controls"
    python bench/bench_demo.py --families sd1,sdxl --variants full --extra "--blocks-per-side 2"

``--extra`` passes more options to each demo (recorded as ``extra_args``); the row then
holds each baseline's AUC (``by_metric``) and, with controls, the set verdict.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import append_row, provenance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="full,lora")
    p.add_argument("--families", default="sd1", help="comma-separated: sd1, sd2, sd2-v, sdxl")
    p.add_argument("--first-build", action="store_true",
                   help="build each world afresh in a temporary folder and time the build")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the demo (default: unset)")
    p.add_argument("--extra", default="", help="more options for each demo, one string")
    a = p.parse_args()

    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    for family in a.families.split(","):
        with tempfile.TemporaryDirectory() as worlds:
            world = Path(worlds) / family if a.first_build else None
            first_build_s = _build(family, world, env)
            row = {"family": family, "first_build_s": first_build_s,
                   "first_build_timing": "the subprocess, Python's start included" if first_build_s else None,
                   **_demos(family, world, a.variants.split(","), shlex.split(a.extra), env),
                   "extra_args": a.extra, "omp_num_threads": a.threads}
        row.update(provenance(torch.device("cpu")))
        print(append_row("demo", torch.device("cpu"), row))


def _build(family: str, world: Path | None, env: dict) -> float | None:
    """Build (or, without ``world``, make sure of) the family's world before any demo is timed,
    in a subprocess; the wall time of a fresh build, else None: the whole subprocess, Python's
    start and imports included (what a user waits for the first time; the rows README.md and
    docs/families.md cite were timed so, ``first_build_timing``)."""
    code = ("import sys; from cgidm.testing.family_worlds import build_family_world; "
            "build_family_world(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, family, *([str(world)] if world else [])], env=env, check=True,
                   stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    if world is None:
        return None
    print(f"{family}: first build {wall:.0f} s")
    return wall


def _demos(family: str, world: Path | None, variants: list, extra: list, env: dict) -> dict:
    row = {"variants": {}}
    for variant in variants:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "cgidm.cli", "demo", "--family", family, "--variant", variant, "--out", out, "-q",
                   *extra]
            run = subprocess.run(cmd + (["--world", str(world)] if world else []), capture_output=True, text=True, env=env)
            if run.returncode != 0:
                sys.exit(f"cgidm demo --variant {variant} failed ({run.returncode}): {run.stderr[-2000:]}")
            wall = float(re.search(r"demo wall time: ([0-9.]+) s", run.stdout)[1])
            summary = json.loads((Path(out) / "summary.json").read_text())
            rows = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
        means = {label: {k: statistics.mean(r[k] for r in rows if r.get("label") == label)
                         for k in ("latent_cos", "psnr", "ssim")} for label in ("member", "holdout")}
        official = re.search(r"official validator .*?AUC ([0-9.]+)", run.stdout)
        # with --with-controls: how many of each label got each per-image verdict
        verdicts = {label: dict(collections.Counter(r["verdict"] for r in rows if r.get("label") == label
                                                    and r.get("verdict")))
                    for label in ("member", "holdout")} if summary.get("verdicts") else None
        row["variants"][variant] = {"wall_s": wall, "auc": summary.get("auc"), "means": means,
                                    "official_auc": float(official[1]) if official else None,
                                    "set_verdict": summary.get("set_verdict"), "verdicts": verdicts,
                                    "controls": summary.get("controls"),
                                    "by_metric": {k: v.get("auc") for k, v in summary.get("by_metric", {}).items()
                                                  if isinstance(v, dict)}}
        print(f"{family} {variant}: {wall:.1f} s  AUC {summary.get('auc')}  members {means['member']}  "
              f"hold-outs {means['holdout']}  official {official[1] if official else None}")
    return row


if __name__ == "__main__":
    main()
