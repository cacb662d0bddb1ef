"""``make gpu-check``: the first contact with a GPU in one command.

On a CUDA machine (an offline one: the wheels ``../shared/tools/gpu-wheels.sh`` carries in
``.whl/``, the machine's own ``python3``, torch and toolkit), in order, each stage under its
own timeout inside one budget of 9 minutes (how long each stage takes on an H100 is not
measured yet: stages the budget stops are ``cut``), each run even when an earlier one failed:

  wheels     ``.whl/*.whl`` installed into ``.site/`` (PYTHONPATH of every later stage)
  env        device, driver, nvcc, compute-sanitizer, package versions
  build      ``pip install --no-deps --no-build-isolation --no-index -e .`` for this GPU's
             architecture only; fails unless ``cgidm._C`` has CUDA kernels
  bench      ``bench/bench_engine.py --batches 1 auto`` (rows in bench/results/engine-<gpu>.json)
  protect    ``bench/bench_protect_speed.py``: ``cgidm protect`` on SD v1.5 shapes, the eager
             public-tools loop against the engine's CUDA graph (rows in
             bench/results/protect-speed-<gpu>.json)
  extract    ``bench/bench_extract.py --sd15``: ``cgidm extract``'s sampling on SD v1.5 shapes, the
             plain per-sample loop against the batched pair pass in a CUDA graph (rows in
             bench/results/extract-<gpu>.json)
  tests      the CUDA cases (``--cuda-cases``, tests/conftest.py) of the test modules that
             have them (those that skip "needs CUDA"; test_build.py aside), slow ones aside;
             fails if a CUDA case skipped
  memcheck   ``compute-sanitizer --tool memcheck`` on ``gpu_check.py ops``: every op, every
             dtype, odd shapes, both noise modes, both norm modes, against the reference
  racecheck  ``--tool racecheck`` on the ops that reduce in shared memory
             (pair_contrast_loss, pgd_update, linf_update), no torch reduction in that run
  synccheck  ``--tool synccheck`` on the same (barriers in divergent code)
  pairpass   ``bench/bench_pairpass.py --full-size``: the pair-pass variants the engine picks from

then a table (stage -> ok / failed / cut / skipped, seconds, note) and one row in
``bench/results/gpu-check-<gpu>.json``: device, driver, versions, git SHA, command, every
stage. With ``$OUT`` set (a GPU lease returns only what is under it, at most 8 files),
every row file this run appended to (the pair-pass rows too, 5 files on a GPU) and one log
of every stage so far (``gpu-check-<gpu>.log``) are copied there as each stage ends, so a
run the lease cuts off keeps what it did. Exit status 1 if a stage failed or was cut, else 0.

A stage the budget stops (rather than its own limit) is ``cut``, not ``failed``: the table,
the row (``cut``) and the last line say so. Record the commit where the tree travels
without ``.git``: ``CGIDM_GIT_SHA=<sha>`` (bench/common.py) goes into every row.

Without CUDA it says so and runs the CPU smoke of the same stages (the extension checked,
not rebuilt; the test modules collected; the ops on CPU without a sanitizer; bench_engine
``--tiny``), writing under ``build/gpu-check/``; exit status 0 when that passes. The
script cannot rot between GPU runs: tests/test_build.py runs it.

    python bench/gpu_check.py                                     # = make gpu-check
    python bench/gpu_check.py --only protect                      # some stages (a second call)
    python bench/gpu_check.py ops --device cuda [--ops a,b] [--no-compare]  # the sanitizers' workload
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
# logs, and the CPU smoke's rows (build/ is ignored); the tests give each run its own
WORK = Path(os.environ.get("CGIDM_GPU_CHECK_WORK") or ROOT / "build" / "gpu-check")
BUDGET_S = float(os.environ.get("CGIDM_GPU_CHECK_BUDGET_S", "540"))  # 9 minutes: one device call is at most 10
NO_CUDA_LINE = "gpu-check: no CUDA device here (torch.cuda.is_available() is False): CPU smoke of the same stages"
OPS = ("pair_noise", "pair_contrast_loss", "pgd_update", "draw_noise", "linf_update")
REDUCTIONS = ("pair_contrast_loss", "pgd_update", "linf_update")  # block_sum in shared memory
CUDA_SKIP = re.compile(r"needs CUDA|extension not built|CUDA kernels", re.I)
GRACE_S = 15.0  # what a stage stopped by a timeout gets between SIGINT and SIGKILL to write its rows
STAGES = ("build", "bench", "protect", "extract", "tests", "memcheck", "racecheck", "synccheck", "pairpass")
# What the stages import: the runtime and test dependencies (setup.py) a CUDA machine's own
# python3 may lack (diffusers does: ../shared/tools/gpu-wheels.sh carries it).
IMPORTS = ("diffusers", "transformers", "peft", "safetensors", "scipy", "skimage", "sklearn", "jinja2", "tqdm", "matplotlib",
           "pytest", "xdist", "hypothesis")
PACKAGES = ("torch", "triton", "diffusers", "transformers", "peft", "safetensors", "numpy", "importlib_metadata")


@dataclass
class Stage:
    name: str
    status: str  # "ok", "failed", "cut" (stopped by the time budget, not its own limit) or "skipped"
    seconds: float
    note: str = ""


class Runner:
    """Runs stage commands in their own process group (a timeout kills the whole group:
    pytest workers, compute-sanitizer's target), logging each to ``WORK/logs``."""

    def __init__(self, env: dict, budget_s: float) -> None:
        self.env = env
        self.deadline = time.monotonic() + budget_s
        self.reserve = 0.0  # seconds kept for the stages after the next one
        self.stages: list[Stage] = []
        self.after: Optional[Callable[[Stage], None]] = None  # called as each stage ends
        self.cut = False  # the last command ran under less than its own limit (the budget's rest)
        self.logs = WORK / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.written: list[Path] = []  # this run's logs, in order (the folder may hold an earlier run's)

    def left(self) -> float:
        """Seconds the next stage may use: the budget's rest less what later stages keep."""
        return self.deadline - time.monotonic() - self.reserve

    def add(self, stage: Stage) -> Stage:
        self.stages.append(stage)
        print(f"== {stage.name}: {stage.status} ({stage.seconds:.0f} s) {stage.note}", flush=True)
        if self.after is not None:
            try:
                self.after(stage)
            except Exception as e:  # noqa: BLE001 - copying out must not stop the check
                print(f"   (copying the results out failed: {type(e).__name__}: {e})", flush=True)
        return stage

    def command(self, name: str, cmd: list[str], timeout_s: float, env: Optional[dict] = None) -> tuple[Optional[int], str, float]:
        """``(exit status or None on timeout, output, seconds)``; the output is also logged.
        ``self.cut`` says whether the budget gave it less than ``timeout_s``."""
        self.cut = self.left() - 5 - GRACE_S < timeout_s
        timeout_s = min(timeout_s, self.left() - 5 - GRACE_S)
        print(f"-- {name}: {' '.join(cmd)}  (timeout {timeout_s:.0f} s)", flush=True)
        log = self.logs / f"{name}.log"
        self.written = [p for p in self.written if p != log] + [log]
        t0 = time.monotonic()
        with log.open("w") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env or self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc: Optional[int] = proc.wait(timeout=max(1.0, timeout_s))
            except subprocess.TimeoutExpired:
                # SIGINT first: a bench stopped part way writes the rows it measured
                # (KeyboardInterrupt), then SIGKILL for whatever is still running
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    pass
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        seconds = time.monotonic() - t0
        out = log.read_text(errors="replace")
        tail = out.splitlines()[-25:]
        print("\n".join(f"   | {line}" for line in tail), flush=True)
        return rc, out, seconds

    def stage(self, name: str, cmd: list[str], timeout_s: float,
              judge: Optional[Callable[[int, str], tuple[str, str]]] = None, env: Optional[dict] = None) -> Stage:
        """Runs ``cmd`` unless the budget is spent; ``judge(rc, output)`` -> (status, note)
        overrides the plain exit-status verdict."""
        if self.left() < 20 + GRACE_S:
            return self.add(Stage(name, "cut", 0.0, "not run: time budget spent"))
        rc, out, seconds = self.command(name, cmd, timeout_s, env)
        if rc is None:
            if self.cut:  # not a hang: the budget's rest was shorter than the stage's own limit
                return self.add(Stage(name, "cut", seconds, f"stopped by the time budget after {seconds:.0f} s "
                                                            f"(its own limit {timeout_s:.0f} s)"))
            return self.add(Stage(name, "failed", seconds, f"timed out after {seconds:.0f} s"))
        status, note = judge(rc, out) if judge else (("ok", "") if rc == 0 else ("failed", f"exit status {rc}"))
        return self.add(Stage(name, status, seconds, note))


# --------------------------------------------------------------------------- the stages


def install_wheels(runner: Runner, py: str) -> None:
    wheels = sorted(str(p) for p in (ROOT / ".whl").glob("*.whl"))
    if not wheels:
        runner.add(Stage("wheels", "skipped", 0.0, "no .whl/*.whl"))
        return
    site = ROOT / ".site"
    st = runner.stage("wheels", [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                                 "--no-cache-dir", "--upgrade", "--target", str(site), *wheels], 180)
    if st.status == "ok":
        st.note = f"{len(wheels)} wheels into .site/"
        runner.env["PYTHONPATH"] = os.pathsep.join([str(site), runner.env.get("PYTHONPATH", "")]).strip(os.pathsep)
        sys.path.insert(0, str(site))
        importlib.invalidate_caches()


def version_of(cmd: list[str], pattern: str) -> Optional[str]:
    """The first match of ``pattern`` (its group 1) in what ``cmd`` prints, or None."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(pattern, out.stdout + out.stderr)
    return m.group(1) if out.returncode == 0 and m else None


def find_sanitizer() -> Optional[str]:
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda", cuda_home()):
        if home and (Path(home) / "bin" / "compute-sanitizer").is_file():
            return str(Path(home) / "bin" / "compute-sanitizer")
    return None


def environment(cuda: bool) -> dict:
    import torch

    info: dict = {"packages": {}}
    for name in PACKAGES:
        try:
            info["packages"][name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            info["packages"][name] = None
    info["torch_cuda"] = torch.version.cuda
    info["nvcc"] = version_of([os.environ.get("NVCC", "nvcc"), "--version"], r"release ([0-9.]+)")
    sanitizer = find_sanitizer()
    info["compute_sanitizer"] = sanitizer and version_of([sanitizer, "--version"], r"[Vv]ersion ([0-9.]+)")
    if cuda:
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["compute_capability"] = f"{props.major}.{props.minor}"
    return info


def cuda_home() -> Optional[str]:
    """``$CUDA_HOME``, else the first toolkit folder that has ``include/cuda_runtime.h``:
    ``/usr/local/cuda``, then the one above the real ``nvcc`` (links followed)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    for home in [Path("/usr/local/cuda"), *([Path(nvcc).resolve().parents[1]] if nvcc else [])]:
        if (home / "include" / "cuda_runtime.h").is_file():
            return str(home)
    return None


def build(runner: Runner, py: str, cuda: bool, capability: Optional[str]) -> None:
    verify = [py, "-c", "import sys, cgidm.ops as o; print('cgidm._C: cpu', o.has_cpp(), 'cuda', o.has_cuda(), "
                        "('import error: %s' % o._EXT_ERROR) if o._EXT_ERROR else ''); "
                        f"sys.exit(0 if o.has_{'cuda' if cuda else 'cpp'}() else 1)"]
    if not cuda:
        st = runner.stage("build", verify, 120)
        if st.status == "ok":
            st.note = "CPU: the extension of `make env` imports (not rebuilt)"
        return
    if runner.left() < 60:
        runner.add(Stage("build", "cut", 0.0, "not run: time budget spent"))
        return
    env = dict(runner.env, TORCH_CUDA_ARCH_LIST=capability or "9.0", MAX_JOBS=str(os.cpu_count() or 4))
    home = cuda_home()
    if home:  # torch guesses it from nvcc's folder, wrong where nvcc is a wrapper script
        env["CUDA_HOME"] = home
    rc, out, seconds = runner.command("build", [py, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                                                "--no-index", "-e", "."], min(360, runner.left() - 30), env)
    if rc != 0:
        status = "cut" if rc is None and runner.cut else "failed"
        runner.add(Stage("build", status, seconds, "timed out" if rc is None else f"pip exit status {rc}"))
        return
    rc, out, more = runner.command("build-verify", verify, 120)
    kind = next((line for line in out.splitlines() if line.startswith("cgidm._C:")), "cgidm._C does not import")
    runner.add(Stage("build", "ok" if rc == 0 else "failed", seconds + more,
                     f"sm_{(capability or '9.0').replace('.', '')}; {kind}"))


def test_modules() -> list[str]:
    """The test modules with CUDA cases: those that skip "needs CUDA" (the house's skip reason);
    test_build.py aside (its nvcc and CMake checks do not need a GPU)."""
    return [str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
            if p.name != "test_build.py" and "needs CUDA" in p.read_text(errors="replace")]


def pytest_summary(out: str) -> str:
    """pytest's last summary line (``3 passed, 1 skipped in 5.58s``; ``-q`` prints it
    without the ``=`` rule), or ''."""
    return next((line.strip("= ") for line in reversed(out.splitlines())
                 if re.search(r"\b\d+ (passed|failed|errors?|skipped|deselected)\b.* in [\d.]+s", line)), "")


def collected_count(out: str) -> Optional[int]:
    """The cases ``pytest --collect-only -q`` selected (``612/1025 tests collected``: 612)."""
    m = re.search(r"(\d+)(?:/\d+)? tests? collected", out)
    return int(m.group(1)) if m else None


def run_tests(runner: Runner, py: str, cuda: bool) -> None:
    files = test_modules()
    if not cuda:
        def collected(rc: int, out: str) -> tuple[str, str]:
            n = collected_count(out) or 0
            return ("ok" if rc == 0 and n > 0 else "failed"), f"{n} cases of {len(files)} modules collected (CPU: not run)"

        runner.stage("tests", [py, "-m", "pytest", "-q", "--collect-only", "-p", "no:cacheprovider", "--cuda-cases",
                               *files], 180, collected)
        return
    workers = ["-p", "no:xdist"]
    if importlib.util.find_spec("xdist"):
        workers = ["-n", str(min(8, os.cpu_count() or 1)), "--dist", "loadgroup"]

    def judge(rc: int, out: str) -> tuple[str, str]:
        skipped = [line for line in out.splitlines() if line.startswith("SKIPPED") and CUDA_SKIP.search(line)]
        summary = pytest_summary(out)
        if rc != 0:
            return "failed", summary or f"exit status {rc}"
        if skipped:
            return "failed", f"CUDA cases skipped: {skipped[0][:160]}"
        return "ok", summary

    # --cuda-cases (tests/conftest.py): CI runs the CPU cases; the lease is for the CUDA ones
    runner.stage("tests", [py, "-m", "pytest", "-q", "-rs", "-m", "not slow", "-p", "no:cacheprovider", "--cuda-cases",
                           *workers, *files], 240, judge)


def sanitize(runner: Runner, py: str, cuda: bool, tool: str, ops: tuple[str, ...], timeout_s: float) -> None:
    workload = [py, str(Path(__file__).relative_to(ROOT)), "ops", "--ops", ",".join(ops)]
    if tool != "memcheck":
        workload.append("--no-compare")  # torch's own reductions stay out of the race/sync checks
    if not cuda:
        st = runner.stage(tool, [*workload, "--device", "cpu"], 120)
        if st.status == "ok":
            st.note = "CPU: the workload without a sanitizer"
        return
    sanitizer = find_sanitizer()
    if sanitizer is None:
        runner.add(Stage(tool, "skipped", 0.0, "compute-sanitizer not found"))
        return

    def judge(rc: int, out: str) -> tuple[str, str]:
        if "Device not supported" in out:
            return "skipped", "compute-sanitizer does not support this device or runtime (gVisor?)"
        summary = next((line.strip("= ") for line in out.splitlines() if "SUMMARY" in line), "no summary")
        bad = re.search(r"\b[1-9]\d* (errors?|hazards?)", summary)
        return ("ok" if rc == 0 and not bad else "failed"), summary

    # Without the caching allocator every tensor is its own allocation: an out-of-bounds
    # access cannot land unseen in the slack of a cached block.
    env = dict(runner.env, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    # --report-api-errors no: a CUDA call torch or the driver makes and expects to fail
    # (a probe at start-up) is not a finding; the kernels' accesses are
    runner.stage(tool, [sanitizer, "--tool", tool, "--report-api-errors", "no", "--error-exitcode", "1", *workload,
                        "--device", "cuda"],
                 timeout_s, judge, env)


def bench(runner: Runner, py: str, cuda: bool, results: Path, slug: str) -> None:
    path = results / f"engine-{slug if cuda else 'cpu-smoke'}.json"
    before = len(path.read_text().splitlines()) if path.exists() else 0
    if cuda:
        cmd = [py, "bench/bench_engine.py", "--batches", "1", "auto", "--warmup", "2", "--repeats", "5"]
    else:
        cmd = [py, "bench/bench_engine.py", "--device", "cpu", "--tiny", "--batches", "1", "--warmup", "0",
               "--repeats", "1", "--matmul-n", "256"]

    def judge(rc: int, out: str) -> tuple[str, str]:
        rows = [json.loads(line) for line in (path.read_text().splitlines()[before:] if path.exists() else [])]
        measured = [f"{r['result']['name']} b={r['result']['batch']}" if r.get("result") else f"error b={r.get('batch')}"
                    for r in rows]
        note = f"rows: {', '.join(measured) or 'none'} -> {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"
        return ("ok" if rc == 0 else "failed"), note if rc == 0 else f"exit status {rc}; {note}"

    runner.stage("bench", cmd, 330, judge)


def bench_pairs(runner: Runner, py: str, cuda: bool) -> None:
    """The pair-pass variants timed in one run: their rows (bench/results/pairpass-<gpu>.json)
    are what the engine picks its pair pass by on that GPU (cgidm.pairpass.measured_here)."""
    if cuda:
        cmd = [py, "bench/bench_pairpass.py", "--device", "cuda", "--full-size", "--warmup", "2", "--repeats", "8"]
    else:
        cmd = [py, "bench/bench_pairpass.py", "--device", "cpu", "--warmup", "0", "--repeats", "1", "--no-save"]
    runner.stage("pairpass", cmd, 100, lambda rc, out: ("ok" if rc == 0 else "failed",
                                                         out.strip().splitlines()[-1][:200] if out.strip() else ""))


def bench_protect(runner: Runner, py: str, cuda: bool) -> None:
    """``cgidm protect`` on SD v1.5 shapes (random weights): the eager public-tools loop
    against the engine's CUDA graph, images/hour and peak memory (issue 16's goals)."""
    if cuda:
        cmd = [py, "bench/bench_protect_speed.py", "--batches", "1", "8", "--timed-steps", "4", "--repeats", "2"]
    else:
        cmd = [py, "bench/bench_protect_speed.py", "--device", "cpu", "--tiny", "--batches", "1", "2",
               "--timed-steps", "2", "--repeats", "1", "--warmup", "0"]

    def judge(rc: int, out: str) -> tuple[str, str]:
        goals = next((line for line in reversed(out.splitlines()) if line.startswith("goals")), "no goals line")
        return ("ok" if rc == 0 else "failed"), goals[:220] if rc == 0 else f"exit status {rc}"

    runner.stage("protect", cmd, 150, judge)


def bench_extract(runner: Runner, py: str, cuda: bool) -> None:
    """``cgidm extract`` on SD v1.5 shapes (random weights): the plain per-sample loop
    against batched sampling with the pair pass in a CUDA graph (issue 17's speed)."""
    if cuda:
        cmd = [py, "bench/bench_extract.py", "--sd15", "--speed-samples", "8", "--speed-steps", "20", "--repeats", "2"]
    else:
        cmd = [py, "bench/bench_extract.py", "--sd15", "--tiny", "--device", "cpu", "--speed-samples", "3",
               "--speed-steps", "2", "--batches", "4", "2", "--repeats", "1"]
    runner.stage("extract", cmd, 150, lambda rc, out: ("ok" if rc == 0 else "failed",
                                                        out.strip().splitlines()[-1][:200] if out.strip() else ""))


# --------------------------------------------------------------------------- the ops workload


def ops_workload(device: str, names: tuple[str, ...], compare: bool) -> int:
    """Every op of the extension for ``device`` on small odd shapes, each dtype and mode.
    ``compare``: against the reference at a loose tolerance (the values are tested in
    tests/; this catches a kernel that reads or writes the wrong place). Without it, no
    torch reduction runs (racecheck/synccheck see only ours and elementwise kernels)."""
    import torch

    from cgidm import ops as cgidm_ops
    from cgidm import reference

    if not (cgidm_ops.has_cuda() if device == "cuda" else cgidm_ops.has_cpp()):
        print(f"cgidm._C has no {device} kernels", file=sys.stderr)
        return 1
    ops = cgidm_ops.get_ops("cuda" if device == "cuda" else "cpp")
    torch.manual_seed(0)
    calls, bad = 0, []

    def check(what, got, want, dtype):
        nonlocal calls
        calls += 1
        if compare:
            tol = 1e-4 if dtype == torch.float32 else 5e-2
            for g, w in zip(got, want):
                if g.shape != w.shape or not torch.allclose(g.float(), w.float(), rtol=tol, atol=tol, equal_nan=True):
                    bad.append(what)

    def rand(*shape, dtype=torch.float32, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    for c, h, w in ((3, 17, 23), (4, 64, 64)):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            if "pair_noise" in names:
                for shared, batched in ((True, False), (False, True)):
                    b, k = 2, 3
                    mask = (torch.rand((b, c, h, w) if batched else (c, h, w), device=device) > 0.5).to(dtype)
                    args = (rand(b, c, h, w, dtype=dtype), rand(b, c, h, w, dtype=dtype, scale=3), mask,
                            rand(b * k, c, h, w, dtype=dtype), None if shared else rand(b * k, c, h, w, dtype=dtype),
                            torch.rand(b * k, device=device), torch.rand(b * k, device=device))
                    check(f"pair_noise {dtype} {c}x{h}x{w} shared={shared}", ops.pair_noise(*args),
                          reference.pair_noise_ref(*args) if compare else None, dtype)
            if "pair_contrast_loss" in names:
                for noise_dtype in sorted({torch.float32, dtype}, key=str):
                    for shared in (True, False):
                        n = 5
                        args = (rand(n, c, h, w, dtype=dtype), rand(n, c, h, w, dtype=dtype),
                                rand(n, c, h, w, dtype=noise_dtype), None if shared else rand(n, c, h, w, dtype=noise_dtype))
                        got = torch.ops.cgidm.pair_contrast_loss(*args)
                        want = None
                        if compare:
                            n_pre = args[2] if shared else args[3]
                            m = c * h * w
                            want = (reference.pair_contrast_loss_ref(*args), 2 * (args[0].float() - args[2].float()) / m,
                                    -2 * (args[1].float() - n_pre.float()) / m)
                        check(f"pair_contrast_loss {dtype}/{noise_dtype} {c}x{h}x{w} shared={shared}", got, want, dtype)
            if "pgd_update" in names:
                for per_sample in (True, False):
                    b = 3
                    grad = rand(b, c, h, w, dtype=dtype)
                    grad[0, 0, 0, 0] = float("nan")  # a skipped image
                    args = (rand(b, c, h, w, scale=30), grad, rand(b, c, h, w, dtype=dtype),
                            rand(b, c, h, w, dtype=dtype, scale=60),
                            (torch.rand(c, h, w, device=device) > 0.5).to(dtype))
                    check(f"pgd_update {dtype} {c}x{h}x{w} per_sample={per_sample}",
                          ops.pgd_update(*args, 2.0, 70.0, -100.0, 100.0, per_sample),
                          reference.pgd_update_ref(*args, 2.0, 70.0, -100.0, 100.0, per_sample) if compare else None,
                          torch.float32)
            if "linf_update" in names:
                b = 3
                grad = rand(b, 3, h, w, dtype=dtype)
                grad[1, 0, 0, 0] = float("nan")  # a skipped image
                args = (rand(b, 3, h, w, scale=0.03), grad, rand(b, 3, h, w, dtype=dtype).clamp(-1, 1))
                check(f"linf_update {dtype} 3x{h}x{w}", ops.linf_update(*args, 2 / 255, 8 / 255, -1.0, 1.0),
                      reference.linf_pgd_update_ref(*args, 2 / 255, 8 / 255, -1.0, 1.0) if compare else None,
                      torch.float32)
        if "draw_noise" in names and hasattr(torch.ops.cgidm, "draw_noise"):
            keys = torch.arange(3, device=device, dtype=torch.int64) * 7919 + 11
            step = torch.tensor(5, device=device, dtype=torch.int64)
            for independent in (True, False):
                got = torch.ops.cgidm.draw_noise(keys, step, 2, [c, h, w], 1, 999, independent)
                want = None
                if compare:
                    want = torch.ops.cgidm.draw_noise(keys.cpu(), step.cpu(), 2, [c, h, w], 1, 999, independent)
                    want = [x.to(device) for x in want]
                check(f"draw_noise {c}x{h}x{w} independent={independent}", got, want, torch.float32)
    if device == "cuda":
        torch.cuda.synchronize()
    if bad:
        print("ops workload: mismatches against the reference:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    print(f"ops workload: {calls} calls on {device} ok ({'compared' if compare else 'not compared'})")
    return 0


# --------------------------------------------------------------------------- main


def copy_out(paths: list[Path], quiet: bool = False) -> None:
    out = os.environ.get("OUT")
    if not out:
        return
    dst = Path(out)
    dst.mkdir(parents=True, exist_ok=True)
    for p in paths:
        if p.is_file():
            shutil.copy2(p, dst / p.name)
            if not quiet:
                print(f"copied {p.name} to $OUT", flush=True)


def result_files(results: Path, slug: str, cuda: bool) -> list[Path]:
    """The rows this run appends to: on a GPU the engine, pair-pass, protect and extract
    benches' ``<bench>-<gpu>.json`` and the check's own row; the CPU smoke's files."""
    if cuda:  # these five only: other committed rows of this GPU would crowd the lease's 8 files
        names = ("engine", "pairpass", "protect-speed", "extract", "gpu-check")
        return [p for p in (results / f"{n}-{slug}.json" for n in names) if p.is_file()]
    return sorted([*results.glob("*smoke*.json"), *results.glob("gpu-check-cpu.json")])


def combined_log(runner: Runner, path: Path, per_stage_bytes: int = 1 << 20) -> Path:
    with path.open("w") as f:
        for log in runner.written:
            text = log.read_text(errors="replace")
            f.write(f"\n===== {log.stem} =====\n")
            f.write(text[-per_stage_bytes:])
    return path


def check(budget_s: float, only: Optional[set[str]] = None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        print(NO_CUDA_LINE, flush=True)
        os.environ["CGIDM_BENCH_RESULTS"] = os.environ.get("CGIDM_BENCH_RESULTS") or str(WORK / "results")
    sys.path.insert(0, str(ROOT / "bench"))
    from common import RESULTS, append_row, device_slug, git_sha, provenance

    py = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).strip(os.pathsep)
    if cuda:
        env.pop("TRITON_INTERPRET", None)  # the Triton cases compile for the GPU
    runner = Runner(env, budget_s)
    device = torch.device("cuda" if cuda else "cpu")
    slug = device_slug(device)
    # What each stage wrote reaches $OUT as it ends: a run cut off by the lease keeps it.
    # A lease returns at most 8 files from $OUT: the rows (one file per bench, 5 on a GPU) and
    # one log of every stage so far, rewritten each time.
    log = WORK / f"gpu-check-{slug}.log"
    runner.after = lambda stage: copy_out([*result_files(RESULTS, slug, cuda), combined_log(runner, log)], quiet=True)

    install_wheels(runner, py)
    t0 = time.monotonic()
    info = environment(cuda)
    # a wheel the machine lacks shows here, not as a hundred failed tests
    broken = []
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any import failure is the finding
            broken.append(f"{name} ({type(e).__name__}: {str(e)[:80]})")
    missing = f"; does not import: {', '.join(broken)}: carry the missing wheels" if broken else ""
    runner.add(Stage("env", "failed" if missing else "ok", time.monotonic() - t0,
                     f"{info.get('gpu', 'CPU')}, torch {info['packages']['torch']} (CUDA {info['torch_cuda']}), "
                     f"nvcc: {info['nvcc'] or 'none'}{missing}"
                     f"{'; commit unknown (no git here: give CGIDM_GIT_SHA)' if git_sha() == 'unknown' else ''}"))
    # Each stage leaves time for the ones after it, within the budget (``reserve``: the
    # seconds the later stages keep). The benches the open issues' goals are measured by
    # come first after the build (bench_engine checks the engine against the reference
    # before it times it), then the CUDA test cases and the sanitizers; the pair-pass
    # variants take what is left. A stage the budget stops is ``cut``: ``--only`` runs
    # the rest in a second call while the machine is warm.
    def want(name: str) -> bool:
        return only is None or name in only

    plan = [("build", 300, lambda: build(runner, py, cuda, info.get("compute_capability"))),
            ("bench", 220, lambda: bench(runner, py, cuda, RESULTS, slug)),
            ("protect", 160, lambda: bench_protect(runner, py, cuda)),
            ("extract", 100, lambda: bench_extract(runner, py, cuda)),
            ("tests", 60, lambda: run_tests(runner, py, cuda)),
            ("memcheck", 30, lambda: sanitize(runner, py, cuda, "memcheck", OPS, 90)),
            ("racecheck", 0, lambda: sanitize(runner, py, cuda, "racecheck", REDUCTIONS, 90)),
            ("synccheck", 0, lambda: sanitize(runner, py, cuda, "synccheck", REDUCTIONS, 60)),
            ("pairpass", 0, lambda: bench_pairs(runner, py, cuda))]
    for name, reserve, run in plan:
        runner.reserve = reserve
        if want(name):
            try:
                run()
            except Exception as e:  # noqa: BLE001 - a fault of the check itself: said, the next stages run
                runner.add(Stage(name, "failed", 0.0, f"gpu_check itself: {type(e).__name__}: {str(e)[:300]}"))

    failed = [s.name for s in runner.stages if s.status == "failed"]
    cut = [s.name for s in runner.stages if s.status == "cut"]
    print(f"\n{'stage':<10} {'status':<8} {'seconds':>7}  note")
    for s in runner.stages:
        print(f"{s.name:<10} {s.status:<8} {s.seconds:>7.0f}  {s.note}")
    row = {"bench": "gpu-check", "cuda_available": cuda, "ok": not failed and not cut, "cut": cut,
           "stages": [asdict(s) for s in runner.stages],
           **info, **provenance(device)}
    path = append_row("gpu-check", device, row)
    combined_log(runner, log)
    print(f"row appended to {path}; stage logs in {runner.logs} (all in {log})", flush=True)
    copy_out([*result_files(RESULTS, slug, cuda), log])
    skipped = [s.name for s in runner.stages if s.status == "skipped"]
    verdict = "FAILED: " + ", ".join(failed) if failed else "all stages passed" if not cut else "passed what ran"
    print(f"gpu-check: {verdict}{'; cut by the time budget: ' + ', '.join(cut) if cut else ''}"
          f"{'; skipped (not checked): ' + ', '.join(skipped) if skipped else ''}"
          f"{'' if cuda else ' (CPU smoke)'}", flush=True)
    return 1 if failed or cut else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd")
    o = sub.add_parser("ops", help="the sanitizers' workload: every op on small odd shapes")
    o.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    o.add_argument("--ops", default=",".join(OPS))
    o.add_argument("--no-compare", action="store_true")
    p.add_argument("--budget-s", type=float, default=BUDGET_S, help="the whole run's time budget")
    p.add_argument("--only", default=None, help=f"comma-separated stages to run ({', '.join(STAGES)}); "
                   "wheels and env always run; without build, the extension already built is used")
    a = p.parse_args(argv)
    if a.cmd == "ops":
        names = tuple(n for n in a.ops.split(",") if n)
        unknown = set(names) - set(OPS)
        if unknown:
            p.error(f"unknown ops {sorted(unknown)}")
        return ops_workload(a.device, names, not a.no_compare)
    only = None if a.only is None else {n for n in a.only.split(",") if n}
    if only is not None and not only <= set(STAGES):
        p.error(f"unknown stages {sorted(only - set(STAGES))}; choose from {', '.join(STAGES)}")
    return check(a.budget_s, only)


if __name__ == "__main__":
    sys.exit(main())
