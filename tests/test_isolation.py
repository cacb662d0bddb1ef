"""A fault inside a batch costs only the images that cause it: out of memory halves the
batch, any other exception retries image by image, an image that still fails gets an error
row, and the run goes on (issue: hardening, per-batch fault isolation)."""
from __future__ import annotations

import json

import pytest
import torch

import cgidm.batches
from cgidm.api import authenticate
from cgidm.config import AuthConfig, PGDConfig
from cgidm.testing.tiny import INSTANCE_PROMPT

CFG = AuthConfig(prompt=INSTANCE_PROMPT, pgd=PGDConfig(steps=2, alpha=0.25, eps=10.0), batch_size=4)
OOM = getattr(torch.cuda, "OutOfMemoryError", MemoryError)


@pytest.fixture(scope="module")
def pair(world_pair):
    return world_pair


@pytest.fixture(scope="module")
def items(world_items):
    return world_items[:6]


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _spy(monkeypatch, name, fault):
    """Wrap ``cgidm.batches.<name>``; ``fault(ids)`` may raise. Returns the batch sizes seen."""
    real = getattr(cgidm.batches, name)
    sizes = []

    def wrapped(pair, prep_or_images, *a, **k):
        ids = prep_or_images.ids if name == "recover" else a[0]
        sizes.append(len(ids))
        fault(list(ids))
        return real(pair, prep_or_images, *a, **k)

    monkeypatch.setattr(cgidm.batches, name, wrapped)
    return sizes


@pytest.mark.parametrize("prefetch", [0, 2])
def test_out_of_memory_halves_the_batch(pair, items, tmp_path, monkeypatch, prefetch):
    def fault(ids):
        if len(ids) > 1:
            raise OOM("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")

    sizes = _spy(monkeypatch, "recover", fault)
    summary = authenticate(pair, items, tmp_path, CFG, progress=False, prefetch_depth=prefetch)
    assert summary["failed"] == 0 and summary["scored"] == 6
    # 4 -> 2 -> 1+1, 2 -> 1+1, then the tail batch of 2 -> 1+1
    assert sizes == [4, 2, 1, 1, 2, 1, 1, 2, 1, 1]
    assert [r["id"] for r in _rows(tmp_path)] == [it.id for it in items]


def test_oom_on_one_image_alone_is_an_error_row(pair, items, tmp_path, monkeypatch):
    bad = items[1].id

    def fault(ids):
        if bad in ids:
            raise OOM("CUDA out of memory (injected)")

    _spy(monkeypatch, "recover", fault)
    summary = authenticate(pair, items, tmp_path, CFG, progress=False, prefetch_depth=0)
    rows = {r["id"]: r for r in _rows(tmp_path)}
    assert summary["failed"] == 1 and rows[bad]["error"].startswith("out of memory")
    assert all("score" in r for i, r in rows.items() if i != bad)


@pytest.mark.parametrize("stage", ["prepare", "recover"])
def test_an_image_that_keeps_failing_is_an_error_row_and_the_run_goes_on(pair, items, tmp_path, monkeypatch, stage):
    bad = items[2].id

    def fault(ids):
        if bad in ids:
            raise RuntimeError(f"injected fault at {stage}")

    sizes = _spy(monkeypatch, stage, fault)
    summary = authenticate(pair, items, tmp_path, CFG, progress=False, prefetch_depth=2)
    rows = {r["id"]: r for r in _rows(tmp_path)}
    assert summary["failed"] == 1 and summary["scored"] == 5
    assert rows[bad]["error"] == f"failed: RuntimeError: injected fault at {stage}"
    assert 1 in sizes  # retried one at a time


def test_a_write_failure_is_not_isolated(pair, items, tmp_path, monkeypatch):
    from cgidm.files import OutputError

    def fault(ids):
        raise OutputError(tmp_path / "x", OSError(28, "No space left on device"))

    _spy(monkeypatch, "recover", fault)
    with pytest.raises(OutputError):
        authenticate(pair, items, tmp_path, CFG, progress=False, prefetch_depth=0)
