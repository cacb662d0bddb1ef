import os
import random
import re

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Triton's interpreter is chosen when triton is first imported: without a GPU it is all
# there is, and a test worker may import triton (through cgidm.ops) before the Triton test
# modules would ask for it, skipping their CPU cases.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One thread per test process: `make test` runs two workers on two cores, and two
# threads each only thrash.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_world():
    """The trained tiny world (built once per machine, then reused from the cache)."""
    from cgidm.testing.tiny import build_tiny_world

    return build_tiny_world()


@pytest.fixture(scope="module")
def world_pair(tiny_world):
    """The tiny world's base and full fine-tune, loaded once per test module."""
    from cgidm.models import load_pair

    return load_pair(tiny_world / "base", tiny_world / "finetuned")


@pytest.fixture(scope="module")
def world_items(tiny_world):
    """The tiny world's members then hold-outs (6 + 6 items, labelled)."""
    from cgidm.manifest import collect_items

    imgs = tiny_world / "images"
    return collect_items(None, imgs / "members", imgs / "holdouts")


@pytest.fixture
def move_ctime():
    """``move_ctime(path, than)``: make ``path``'s change time differ from ``than`` (a
    ``chmod`` to its own mode, a tick apart: a file system with coarse change times, as
    kernels before 6.13 keep them, gives two writes a microsecond apart the same one), or
    skip where it cannot be moved."""
    import time

    def move(path, than: int) -> None:
        for _ in range(300):
            if os.stat(path).st_ctime_ns != than:
                return
            time.sleep(0.01)
            os.chmod(path, os.stat(path).st_mode)
        pytest.skip("this file system's change time does not move")

    return move


@pytest.fixture
def no_tf32():
    """fp32 as fp32 on a GPU (cgidm.testing.precision.full_fp32): no TF32 in the fp32
    comparisons and references, cuDNN's deterministic algorithms for graph vs eager."""
    from cgidm.testing.precision import full_fp32

    with full_fp32():
        yield


# --------------------------------------------------------------------------- --cuda-cases


def pytest_addoption(parser):
    parser.addoption("--cuda-cases", action="store_true",
                     help="only the cases that may use CUDA (gpu-check's tests stage, on a short GPU lease): "
                          "those whose id, function or fixtures mention cuda")


def _mentions_cuda(obj) -> bool:
    import inspect

    try:
        return "cuda" in inspect.getsource(obj).lower()
    except (OSError, TypeError):
        return False


def _uses_cuda(item) -> bool:
    params = item.nodeid.lower().partition("[")[2].rstrip("]").split("-")
    if any("cuda" in p for p in params):
        return True
    if "cpu" in params:  # the CPU case of a test parametrized by device
        return False
    fn = getattr(item, "function", None)
    if fn is not None and _mentions_cuda(fn):
        return True
    # the fixtures the test asks for, and theirs; not the autouse ones (a module's autouse
    # fixture that sets a CUDA flag would select all of its CPU cases too)
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {}) or {}
    todo, seen = list(getattr(info, "argnames", ())), set()
    while todo:
        name = todo.pop()
        if name in seen or not defs.get(name):
            continue
        seen.add(name)
        fixture = defs[name][-1]
        if _mentions_cuda(fixture.func):
            return True
        todo.extend(fixture.argnames)
    return False


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A case skipped for want of CUDA that ``--cuda-cases`` would leave out fails: the GPU
    lease would never run it. (Every CPU run checks the selection is complete.)"""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and re.search(r"needs CUDA|CUDA kernels", str(rep.longrepr)) and not _uses_cuda(item):
        rep.outcome = "failed"
        rep.longrepr = (f"{item.nodeid} skips for want of CUDA, but --cuda-cases (gpu-check) would not select it: "
                        "name cuda in its parameters, its body or a fixture it uses")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--cuda-cases"):
        return
    keep = [i for i in items if _uses_cuda(i)]
    kept = {id(i) for i in keep}
    config.hook.pytest_deselected(items=[i for i in items if id(i) not in kept])
    items[:] = keep
