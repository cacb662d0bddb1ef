"""What ``cgidm demo`` shows and how long it takes: each variant (``--variant full`` and
``lora``, the SD 1.x tiny world, assembled beforehand) run as a user runs it, in a
subprocess, with its wall time (the demo's own, world cached) and what its summary says:
AUC, the members' and hold-outs' mean latent cosine, PSNR and SSIM, and the official
validator's AUC. One JSON row in ``bench/results/demo-<device>.json`` (README, "What the
demo shows").

    python bench/bench_demo.py
    python bench/bench_demo.py --variants full --threads 2
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from common import append_row, provenance


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default="full,lora")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of the demo (default: unset)")
    a = p.parse_args()

    from cgidm.testing.tiny import build_tiny_world

    build_tiny_world()  # assembled before timing: the demo's wall time is that of a cached world
    env = dict(os.environ)
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
        torch.set_num_threads(a.threads)
    row = {"variants": {}, "omp_num_threads": a.threads}
    for variant in a.variants.split(","):
        with tempfile.TemporaryDirectory() as out:
            run = subprocess.run([sys.executable, "-m", "cgidm.cli", "demo", "--variant", variant, "--out", out, "-q"],
                                 capture_output=True, text=True, env=env)
            if run.returncode != 0:
                sys.exit(f"cgidm demo --variant {variant} failed ({run.returncode}): {run.stderr[-2000:]}")
            wall = float(re.search(r"demo wall time: ([0-9.]+) s", run.stdout)[1])
            summary = json.loads((Path(out) / "summary.json").read_text())
            rows = [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]
        means = {label: {k: statistics.mean(r[k] for r in rows if r.get("label") == label)
                         for k in ("latent_cos", "psnr", "ssim")} for label in ("member", "holdout")}
        official = re.search(r"official validator .*?AUC ([0-9.]+)", run.stdout)
        row["variants"][variant] = {"wall_s": wall, "auc": summary.get("auc"), "means": means,
                                    "official_auc": float(official[1]) if official else None,
                                    "by_metric": {k: v.get("auc") for k, v in summary.get("by_metric", {}).items()
                                                  if isinstance(v, dict)}}
        print(f"{variant}: {wall:.1f} s  AUC {summary.get('auc')}  members {means['member']}  "
              f"hold-outs {means['holdout']}  official {official[1] if official else None}")
    row.update(provenance(torch.device("cpu")))
    print(append_row("demo", torch.device("cpu"), row))


if __name__ == "__main__":
    main()
