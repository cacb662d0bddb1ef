"""Shared benchmark helpers: timing with percentiles, provenance of a result row, and the
JSON Lines files under bench/results/."""
from __future__ import annotations

import json
import math
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

# CGIDM_BENCH_RESULTS sends rows elsewhere (smoke runs that must not touch bench/results).
RESULTS = Path(os.environ.get("CGIDM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def percentiles(samples: list[float]) -> tuple[float, float, float]:
    """``(p20, median, p80)`` of ``samples``."""
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return q[1], statistics.median(samples), q[7]


def time_fn(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn``, one sample per call. CUDA calls are timed with events
    on the current stream (no host sync inside the timed region)."""
    for _ in range(warmup):
        fn()
    samples = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_slug(device: torch.device) -> str:
    """File-name part for a device: ``cpu`` or e.g. ``nvidia-h100-80gb-hbm3``."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def git_sha() -> str:
    """The commit measured: ``$CGIDM_GIT_SHA`` where given (a device machine gets the tree
    without ``.git``), else git's HEAD (``-dirty`` with uncommitted changes), else ``unknown``."""
    if os.environ.get("CGIDM_GIT_SHA"):
        return os.environ["CGIDM_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def driver_version() -> str | None:
    """The NVIDIA driver's version (``nvidia-smi``), or None without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    return lines[0] if out.returncode == 0 and lines else None


def kernels_available() -> dict:
    """The op implementations this process has: the C++ extension (CPU, CUDA) and Triton."""
    try:
        from cgidm import ops
    except ImportError:
        return {}
    return {"cpp": ops.has_cpp(), "cuda": ops.has_cuda(), "triton": ops.has_triton()}


def provenance(device: torch.device) -> dict:
    """Where and how a result was measured."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = {}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "driver": driver_version(),
            "compute_capability": f"{props.major}.{props.minor}",
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "cudnn": torch.backends.cudnn.version(),
        }
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        **gpu,
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "python": platform.python_version(),
        # which kernels the run could use: without the extension's CUDA kernels a GPU run
        # falls back (Triton, then plain torch) with only a warning
        "kernels": kernels_available(),
        "git_sha": git_sha(),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
    }


def append_row(name: str, device: torch.device, row: dict) -> Path:
    """Append ``row`` as one JSON line to ``bench/results/<name>-<device>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{device_slug(device)}.json"
    with path.open("a") as f:  # strict JSON: a value not measured (NaN: no CUDA memory on a CPU) is null
        f.write(json.dumps(_strict(row), sort_keys=True, allow_nan=False) + "\n")
    return path


def _strict(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_strict(x) for x in v]
    return v
