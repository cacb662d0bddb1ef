"""How long CI takes on a fresh machine: the committed HEAD cloned into a temporary folder,
``bash .ci/run`` (the README's ``make test``: the virtual environment made and filled, the
tiny worlds built into an empty cache, the whole suite) run there, its wall time and
pytest's summary line. The README's CI figure is this row (the rule of the house: a number
comes with its row). Nothing else should run on the machine meanwhile.

One JSON row per run in ``bench/results/ci-<device>.json``.

    python bench/bench_ci.py            # about 12 minutes on this project's 2-core machine
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import append_row, provenance

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        clone, cache = Path(tmp) / "clone", Path(tmp) / "cache"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        # a new machine's environment: only what finds programs and the package index, every
        # cache (the tiny worlds, pip's, torch.compile's, Triton's) empty, no colour codes
        keep = ("HOME", "LANG", "LC_ALL", "USER", "TMPDIR", "PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_TRUSTED_HOST",
                "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy", "SSL_CERT_FILE")
        env = {k: os.environ[k] for k in keep if k in os.environ}
        venv = os.environ.get("VIRTUAL_ENV")
        env["PATH"] = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                                      if not (venv and p.startswith(venv)) and not p.startswith(str(ROOT)))
        env.update(XDG_CACHE_HOME=str(cache), PIP_CACHE_DIR=str(cache / "pip"), NO_COLOR="1",
                   TORCHINDUCTOR_CACHE_DIR=str(cache / "inductor"), TRITON_CACHE_DIR=str(cache / "triton"),
                   TRITON_HOME=str(cache / "triton-home"))
        t0 = time.perf_counter()
        run = subprocess.run(["bash", ".ci/run"], cwd=clone, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|errors?|skipped).*? in [0-9.]+s.*?)\s*=*$", run.stdout, re.M)
    summary = found[-1] if found else None
    pytest_s = re.search(r" in ([0-9.]+)s", summary) if summary else None
    row = {**provenance(torch.device("cpu")), "measured_sha": sha.strip(), "exit_status": run.returncode,
           "wall_s": round(wall, 1), "pytest_s": float(pytest_s[1]) if pytest_s else None, "pytest": summary,
           "cpu_count": os.cpu_count()}
    print(f"bash .ci/run at {sha.strip()[:7]}: exit {run.returncode}, {wall / 60:.1f} min ({summary})")
    if run.returncode != 0:
        print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
    print(f"row appended to {append_row('ci', torch.device('cpu'), row)}")


if __name__ == "__main__":
    main()
