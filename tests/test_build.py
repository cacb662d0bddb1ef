"""Build of the compiled core: setup.py's choice, the CUDA sources (compiled, never run,
on machines without a GPU), the CMake build with its C++ tests, and a missing extension."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

ROOT = Path(__file__).resolve().parents[1]


def test_every_cuda_source_compiles_with_nvcc():
    if shutil.which(os.environ.get("NVCC", "nvcc")) is None:
        pytest.skip("nvcc not found")
    proc = subprocess.run(
        ["bash", str(ROOT / "csrc" / "check_cuda_compile.sh")],
        env=dict(os.environ, PYTHON=sys.executable), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = {line.split()[1] for line in proc.stdout.splitlines() if line.startswith("ok")}
    assert {p.name for p in (ROOT / "csrc").glob("*.cu")} <= compiled


def test_cmake_builds_the_cpu_kernels_and_their_cpp_tests_pass():
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    # Kept between runs (build/ is ignored): a rebuild only recompiles what changed.
    build = ROOT / "build" / "cmake-test"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    env = dict(os.environ, CMAKE_BUILD_PARALLEL_LEVEL=os.environ.get("MAX_JOBS", "2"))
    steps = [
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
        ["cmake", "--build", str(build)],
        ["ctest", "--test-dir", str(build), "--output-on-failure"],
    ]
    for cmd in steps:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    assert "100% tests passed" in proc.stdout


def test_cmake_configure_never_runs_torchs_cuda_config(tmp_path):
    """A CUDA build of torch makes ``find_package(Torch)`` enable CUDA and stop without the
    toolkit; the CPU kernels need torch's CPU half only. A torch prefix whose config
    files fail when run (as a CUDA torch's would on a machine without the toolkit) must
    still configure."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake not found")
    real = Path(torch.utils.cmake_prefix_path).parents[1]  # <torch>/share/cmake -> <torch>
    fake = tmp_path / "torch"
    for name in ("include", "lib"):
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).symlink_to(real / name)
    for pkg in ("Torch", "Caffe2"):
        (fake / "share" / "cmake" / pkg).mkdir(parents=True)
        (fake / "share" / "cmake" / pkg / f"{pkg}Config.cmake").write_text(
            'message(FATAL_ERROR "Your installed Caffe2 version uses CUDA but I cannot find the CUDA libraries.")\n'
        )
    build = tmp_path / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []
    proc = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), *generator, f"-DCMAKE_PREFIX_PATH={fake / 'share' / 'cmake'}"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"cgidm: torch (CPU libraries only) from {fake}" in proc.stdout


def test_gpu_check_without_cuda_says_so_and_passes_its_cpu_smoke(tmp_path):
    """``make gpu-check`` off a GPU: the no-CUDA line, every stage of the same script on CPU
    (the extension, the CUDA test modules collected, the sanitizers' workload, bench_engine
    --tiny), the stage table, its row, and the copies into $OUT; exit status 0."""
    out = tmp_path / "out"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OUT=str(out), CGIDM_BENCH_RESULTS=str(tmp_path / "results"),
               OMP_NUM_THREADS="1", CGIDM_GPU_CHECK_WORK=str(tmp_path / "work"))  # its own logs
    cmd = (["make", "--no-print-directory", "gpu-check", f"GPU_PY={sys.executable}"] if shutil.which("make")
           else [sys.executable, "bench/gpu_check.py"])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "gpu-check: no CUDA device here" in proc.stdout
    table = proc.stdout[proc.stdout.index("stage      status"):]
    for stage in ("env", "build", "tests", "memcheck", "racecheck", "bench", "synccheck", "protect", "extract"):
        assert re.search(rf"^{stage} +ok ", table, re.M), table
    # a lease returns at most 8 files: the row files and one log of every stage
    assert sorted(p.name for p in out.iterdir()) == ["engine-cpu-smoke.json", "extract-smoke-cpu.json",
                                                     "gpu-check-cpu.json", "gpu-check-cpu.log",
                                                     "protect-speed-smoke-cpu.json"]
    log = (out / "gpu-check-cpu.log").read_text()
    assert all(f"===== {name} =====" in log for name in ("build", "tests", "memcheck", "bench", "extract"))
    assert re.search(r"^tests +ok +\d+  \d+ cases of \d+ modules collected", table, re.M), table
    row = json.loads((out / "gpu-check-cpu.json").read_text().splitlines()[-1])
    assert row["ok"] and not row["cuda_available"] and row["git_sha"] and row["command"]
    assert {s["name"]: s["status"] for s in row["stages"]}["bench"] == "ok"


def test_gpu_check_reads_pytests_lines():
    """The tests stage's note on a GPU is pytest's summary line, which ``-q`` prints without
    the '=' rule; the CPU smoke counts the cases selected, not all collected."""
    sys.path.insert(0, str(ROOT / "bench"))
    from gpu_check import collected_count, pytest_summary

    assert pytest_summary("....\nSKIPPED [2] x.py:3: slow\n1 passed, 1 skipped in 5.58s\n") == "1 passed, 1 skipped in 5.58s"
    assert pytest_summary("===== 3 failed, 2 passed in 1.2s =====\n") == "3 failed, 2 passed in 1.2s"
    assert pytest_summary("collecting ...\n") == ""
    assert pytest_summary("ss\n2 skipped in 1.0s\n") == "2 skipped in 1.0s"
    assert collected_count("612/1025 tests collected (413 deselected) in 3.1s") == 612
    assert collected_count("7 tests collected in 0.5s") == 7 and collected_count("no tests ran") is None


def test_a_stage_stopped_by_its_timeout_gets_sigint_first_to_write_its_rows(tmp_path, monkeypatch):
    """A bench the time budget stops writes what it measured (KeyboardInterrupt) before the
    SIGKILL; one that ignores SIGINT is killed all the same."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    monkeypatch.setattr(gpu_check, "WORK", tmp_path)
    monkeypatch.setattr(gpu_check, "GRACE_S", 3.0)
    runner = gpu_check.Runner(dict(os.environ), 120)
    kept = tmp_path / "kept.txt"
    polite = (f"import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              f"    open({str(kept)!r}, 'w').write('rows')\n    raise")
    st = runner.stage("polite", [sys.executable, "-c", polite], 4.0)  # time to reach its try on a busy machine
    assert st.status == "failed" and "timed out" in st.note and kept.read_text() == "rows"
    stubborn = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\ntime.sleep(60)"
    st = runner.stage("stubborn", [sys.executable, "-c", stubborn], 1.0)
    assert st.status == "failed" and st.seconds < 30


def test_a_fault_of_the_check_itself_fails_its_stage_and_the_next_stages_run(tmp_path):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CGIDM_BENCH_RESULTS=str(tmp_path / "results"),
               CGIDM_GPU_CHECK_WORK=str(tmp_path / "work"))
    env.pop("OUT", None)
    code = ("import sys; sys.path.insert(0, 'bench'); import gpu_check as g\n"
            "def broken(*a): raise KeyError('planted')\n"
            "g.bench_protect = broken\n"
            "g.bench_extract = lambda r, *a: r.add(g.Stage('extract', 'ok', 0.0, 'ran after'))\n"
            "sys.exit(g.main(['--only', 'protect,extract']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("stage      status"):]
    assert re.search(r"^protect +failed .*gpu_check itself: KeyError: 'planted'", table, re.M), table
    assert re.search(r"^extract +ok .*ran after", table, re.M), table
    row = json.loads((tmp_path / "results" / "gpu-check-cpu.json").read_text().splitlines()[-1])
    assert not row["ok"]


def test_cuda_cases_selects_the_cuda_cases_only():
    """gpu-check's tests stage runs ``--cuda-cases``: a device-parametrized test's cuda case
    and a test that checks for CUDA itself are in, the cpu case and a CPU-only test out.
    (That every case skipped for want of CUDA is selected, conftest checks on every run.)"""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only",
                           "--cuda-cases", "tests/test_kernels_triton.py", "tests/test_engine.py"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    ids = {line for line in proc.stdout.splitlines() if "::" in line}
    assert "tests/test_kernels_triton.py::test_pgd_update_triton_matches_reference[shape0-dtype0-1-True-cuda]" in ids
    assert "tests/test_kernels_triton.py::test_pgd_update_triton_matches_reference[shape0-dtype0-1-True-cpu]" not in ids
    assert "tests/test_engine.py::test_graph_is_captured_once_per_bucket" in ids
    assert "tests/test_kernels_triton.py::test_pgd_update_triton_rejects_a_mask_of_the_wrong_size" not in ids


def test_gpu_check_runs_only_the_stages_asked_for(tmp_path):
    """``--only protect``: env and the protect bench, nothing else; an unknown stage is refused."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", CGIDM_BENCH_RESULTS=str(tmp_path / "results"), OMP_NUM_THREADS="1",
               CGIDM_GPU_CHECK_WORK=str(tmp_path / "work"))
    env.pop("OUT", None)
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "protect"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    table = proc.stdout[proc.stdout.index("stage      status"):]
    names = re.findall(r"^(\w+) +(?:ok|failed|skipped) ", table, re.M)
    assert names[-1] == "protect" and not {"build", "tests", "bench", "memcheck"} & set(names), table
    bad = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "protect,nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown stages ['nope']" in bad.stderr


@pytest.mark.parametrize(
    "env,expected",
    [
        ({"CGIDM_BUILD_EXT": "0"}, "cgidm: CGIDM_BUILD_EXT=0, building without the compiled core"),
        (
            {},
            "cgidm: building cgidm._C with CPU + CUDA kernels"
            if torch.version.cuda and torch.utils.cpp_extension.CUDA_HOME
            else "cgidm: building cgidm._C with CPU kernels only",
        ),
    ],
)
def test_setup_says_in_one_line_what_it_builds(env, expected):
    proc = subprocess.run(
        [sys.executable, "setup.py", "--name"], cwd=ROOT, env={**os.environ, **env},
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("cgidm:")]
    assert len(lines) == 1 and lines[0].startswith(expected), proc.stdout


def test_missing_extension_degrades_to_the_reference_with_one_warning():
    script = textwrap.dedent(
        """
        import logging, sys, warnings
        sys.modules["cgidm._C"] = None  # what an install with CGIDM_BUILD_EXT=0 looks like
        import torch
        logging.basicConfig(level=logging.DEBUG, format="%(name)s %(message)s", stream=sys.stdout)
        from cgidm import ops, reference
        assert not torch.cuda.is_initialized(), "importing cgidm.ops touched the GPU"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = [ops.get_ops(impl) for impl in ("cpp", "auto", "cpp", "cuda", "auto")]
        assert got[0] is reference.REFERENCE_OPS, got[0]
        assert not torch.cuda.is_initialized(), "get_ops touched the GPU"
        print("WARNINGS", len(caught), caught[0].message if caught else "")
        x, mask = torch.randn(2, 3, 5, 7), (torch.rand(3, 5, 7) > 0.5).float()
        for g, w in zip(got[1].pgd_update(x, x, x, x, mask, 2.0, 70.0), reference.pgd_update_ref(x, x, x, x, mask, 2.0, 70.0)):
            torch.testing.assert_close(g, w)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "WARNINGS 1 cgidm: " in proc.stdout and "cgidm._C is not built" in proc.stdout, proc.stdout
    debug = [line for line in proc.stdout.splitlines() if line.startswith("cgidm.ops cgidm ops: impl=")]
    assert len(debug) == 3, debug  # one per distinct impl asked for
