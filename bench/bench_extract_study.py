"""Extraction (``cgidm extract``, docs/extract.md) on the study world's graded fine-tunes
(cgidm/testing/study.py; docs/evidence.md): a second, gradient-free line of evidence beside
CGI-DM and the baselines of ``bench/bench_quality.py``, on the same pairs and images.

For each kind (full, LoRA) and grade: ``extract()`` with the instance prompt samples
``--samples`` images with the extrapolated guidance and clusters them into ``--clusters``
candidates; every member and hold-out is then scored by its best similarity to the
candidates. Reported: the members above the best hold-out's similarity (a threshold fixed
on the hold-outs), and the members-vs-hold-outs AUC of that score. One JSON row to
``bench/results/extract-study-<device>.json``.

    python bench/bench_extract_study.py --threads 2
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, provenance  # noqa: E402

from cgidm import extract as X  # noqa: E402
from cgidm.config import ExtractConfig  # noqa: E402
from cgidm.models import load_pair  # noqa: E402
from cgidm.testing.study import KINDS, build_study_world, checkpoint_paths  # noqa: E402
from cgidm.testing.tiny import INSTANCE_PROMPT  # noqa: E402


def run(world: Path, kinds, grades, samples: int, steps: int, clusters: int, seed: int, log=print) -> list[dict]:
    rows = []
    for kind in kinds:
        for grade in grades:
            pair = load_pair(**checkpoint_paths(world, kind, grade))
            ecfg = ExtractConfig(prompt=INSTANCE_PROMPT, samples=samples, steps=steps, clusters=clusters,
                                 batch_size=min(32, samples), seed=seed)
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                compare = Path(tmp) / "compare"  # members and hold-outs (the controls play no part here)
                compare.mkdir()
                for folder in ("members", "holdouts"):
                    shutil.copytree(world / "images" / folder, compare / folder)
                s = X.extract(pair, Path(tmp) / "out", ecfg, compare=compare, progress=False)
            m = s["compare"]["labelled"]
            row = {"kind": kind, "grade": grade, "extracted": m["extracted"], "members": m["members"],
                   "extracted_fraction": m["extracted_fraction"], "auc": m["auc"],
                   "unet_forwards": 2 * samples * steps, "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            log(f"{kind:4s} grade {grade:4d}: extracted {m['extracted']}/{m['members']}  AUC {m['auc']:.3f}  "
                f"({row['seconds']:.0f} s)")
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", default=None, help="study world folder (default: the cache)")
    p.add_argument("--quick", action="store_true", help="the quick study world (smoke test)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--grades", default=None, help="comma-separated fine-tune steps (default: every grade)")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--clusters", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    world = Path(a.world) if a.world and (Path(a.world) / "study.json").is_file() else \
        build_study_world(a.world, quick=a.quick)
    stamp = json.loads((world / "study.json").read_text())
    grades = tuple(int(g) for g in a.grades.split(",")) if a.grades else tuple(stamp["grades"])
    kinds = tuple(k for k in a.kinds.split(",") if k)
    t0 = time.perf_counter()
    rows = run(world, kinds, grades, a.samples, a.steps, a.clusters, a.seed)
    dev = torch.device("cpu")
    row = {"bench": "extract-study", **provenance(dev), "world": {k: v for k, v in stamp.items() if k != "checkpoints"},
           "config": {"samples": a.samples, "steps": a.steps, "clusters": a.clusters, "seed": a.seed,
                      "quick": a.quick}, "rows": rows, "total_s": round(time.perf_counter() - t0, 1)}
    print(f"row appended to {append_row('extract-study', dev, row)}")
    return row


if __name__ == "__main__":
    main()
