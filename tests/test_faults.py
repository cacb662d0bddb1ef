"""Faults during a run: bad images, non-finite numbers, failed writes, an exception inside
a step and SIGKILL. Whatever happens, results.jsonl holds complete rows, each image at
most once, and every row that was finished before the fault."""
import dataclasses
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

import cgidm.api
import cgidm.batches
import cgidm.files
from cgidm import cli
from cgidm.api import authenticate, collect_items
from cgidm.files import OutputError, append_jsonl, atomic_write_text
from cgidm.reference import PGDConfig, invert
from cgidm.config import PRESETS, preset_config
from cgidm.testing.tiny import INSTANCE_PROMPT

STEPS = 2


@pytest.fixture(scope="module")
def pair(world_pair):
    return world_pair


@pytest.fixture(scope="module")
def items(world_items):
    return world_items[:5]


def _cfg(batch_size=2, steps=STEPS):
    return preset_config("demo", prompt=INSTANCE_PROMPT, steps=steps, batch_size=batch_size)


def _strict(text: str):
    """JSON as other tools read it: NaN and Infinity are not JSON."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def _rows(out: Path) -> list[dict]:
    """The rows of results.jsonl, checking that every line is complete and no image repeats."""
    text = (out / "results.jsonl").read_text() if (out / "results.jsonl").exists() else ""
    assert text == "" or text.endswith("\n"), "last line is incomplete"
    rows = [_strict(line) for line in text.splitlines()]
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), f"duplicated rows: {ids}"
    return rows


def _no_temp_files(out: Path) -> None:
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


class _Faulty(torch.nn.Module):
    """A UNet whose output ``fault(call, out)`` rewrites (or raises on) a given call."""

    def __init__(self, unet, fault):
        super().__init__()
        self.unet = unet
        self.fault = fault
        self.calls = 0

    @property
    def config(self):
        return self.unet.config

    def forward(self, x, t, encoder_hidden_states=None, return_dict=True):
        self.calls += 1
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]
        return (self.fault(self.calls, out),)


def _with_faulty_ft(pair, fault):
    return dataclasses.replace(pair, unet_ft=_Faulty(pair.unet_ft, fault))


def _fail_on_call(n, exc_factory):
    """A wrapper that calls through, except on the n-th call where it raises."""
    calls = {"n": 0}

    def wrap(real):
        def f(*a, **k):
            calls["n"] += 1
            if calls["n"] == n:
                raise exc_factory()
            return real(*a, **k)
        return f

    return wrap


def _enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# --------------------------------------------------------------------------- bad images in a run


def _mixed_folder(tiny_world, tmp_path) -> Path:
    d = tmp_path / "mixed"
    d.mkdir()
    for p in sorted((tiny_world / "images" / "members").iterdir())[:2]:
        shutil.copy(p, d / p.name)
    (d / "zz_text.png").write_bytes(b"not an image at all")
    (d / "zz_tiny.png").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(d / "zz_small.png")
    Image.new("RGBA", (16, 16), (255, 0, 0, 100)).save(d / "zz_alpha.png")
    return d


def test_bad_images_are_rows_and_the_run_goes_on(pair, tiny_world, tmp_path):
    folder = _mixed_folder(tiny_world, tmp_path)
    summary = authenticate(pair, collect_items(folder), tmp_path / "out", _cfg(batch_size=4), progress=False)
    rows = {r["id"].split("/")[-1]: r for r in _rows(tmp_path / "out")}
    assert len(rows) == 6 and summary["images"] == 6
    assert summary["failed"] == 3 and summary["scored"] == 3
    assert "not an image" in rows["zz_text.png"]["error"]
    assert "not an image" in rows["zz_tiny.png"]["error"]
    assert "too small (4x4)" in rows["zz_small.png"]["error"]
    assert "score" in rows["zz_alpha.png"] and "transparency flattened on white" in rows["zz_alpha.png"]["notes"]
    assert set(summary["errors"]) == {"image/zz_text.png", "image/zz_tiny.png", "image/zz_small.png"}


def test_cli_exit_1_and_failures_printed(tiny_world, tmp_path, capsys):
    folder = _mixed_folder(tiny_world, tmp_path)
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--images", str(folder), "--out", str(tmp_path / "out"), "--steps", "2", "-q"])
    printed = capsys.readouterr().out
    assert code == cli.EXIT_SOME_FAILED
    assert "failed: 3" in printed and "failed image/zz_small.png: too small" in printed


# --------------------------------------------------------------------------- numerics


def test_non_finite_steps_are_skipped_and_counted():
    torch.manual_seed(0)
    x0 = torch.randn(2, 3, 8, 8)
    mask = torch.zeros(3, 8, 8)
    mask[:, ::2] = 1
    cond = torch.zeros(1, 4, 8)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    calls = {"n": 0}
    bad = {2: "nan", 4: "inf", 5: "img1"}

    def eps_ft(x_t, t, c):
        # multiplied in, as a real model's overflow would be: it reaches the gradient
        calls["n"] += 1
        scale = torch.ones_like(x_t)
        kind = bad.get(calls["n"])
        if kind == "nan":
            scale.fill_(float("nan"))
        elif kind == "inf":
            scale[:, 0, 0, 0] = float("inf")
        elif kind == "img1":
            scale[1] = float("nan")
        return 0.9 * x_t * scale

    def eps_pre(x_t, t, c):
        return 0.5 * x_t

    cfg = PGDConfig(steps=6, alpha=0.5, eps=5.0)
    res = invert(eps_ft, eps_pre, x0, x0.clone(), mask, cond, cond, abar, cfg, keys=[0, 1])
    assert res.skipped_steps.tolist() == [2, 3]
    assert torch.isfinite(res.x_rec).all() and torch.isfinite(res.delta).all()
    assert not torch.equal(res.delta, torch.zeros_like(res.delta))  # the good steps moved


def test_nan_steps_in_a_run_are_counted_in_the_rows(pair, items, tmp_path):
    nan_calls = {1, 3}
    faulty = _with_faulty_ft(pair, lambda n, out: out * float("nan") if n in nan_calls else out)
    authenticate(faulty, items[:2], tmp_path, _cfg(batch_size=2, steps=4), progress=False)
    rows = _rows(tmp_path)
    assert [r["skipped_steps"] for r in rows] == [2, 2]
    assert all("score" in r and "error" not in r for r in rows)


def test_non_finite_result_is_a_failed_row_not_a_score(pair, items, tmp_path, monkeypatch):
    real = cgidm.batches.recover

    def poisoned(*a, **k):
        res = real(*a, **k)
        res.x_rec[1, 0, 0, 0] = float("nan")
        return res

    monkeypatch.setattr(cgidm.batches, "recover", poisoned)
    summary = authenticate(pair, items[:3], tmp_path, _cfg(batch_size=3), progress=False)
    rows = _rows(tmp_path)  # strict JSON: no NaN written
    assert summary["failed"] == 1 and summary["scored"] == 2
    bad = rows[1]
    assert bad["error"] == "result is not finite" and "score" not in bad and "triptych" not in bad
    assert all("score" in r for r in (rows[0], rows[2]))
    assert summary["errors"] == {bad["id"]: "result is not finite"}


# --------------------------------------------------------------------------- failed writes


def test_row_append_fails_on_the_third_row(pair, items, tmp_path, monkeypatch):
    monkeypatch.setattr(cgidm.api, "append_jsonl", _fail_on_call(3, _enospc)(append_jsonl))
    with pytest.raises(OutputError) as e:
        authenticate(pair, items, tmp_path, _cfg(), progress=False)
    assert e.value.errno == errno.ENOSPC and e.value.path == str(tmp_path / "results.jsonl")
    rows = _rows(tmp_path)
    assert [r["id"] for r in rows] == [it.id for it in items[:2]]
    assert all("score" in r for r in rows)
    _no_temp_files(tmp_path)
    assert not (tmp_path / "summary.json").exists()


def test_half_written_row_is_cut_back(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"id": "a"})
    real_write = os.write

    def short_then_full(fd, data):
        n = real_write(fd, data[: len(data) // 2])
        if n:
            raise _enospc()
        return n

    monkeypatch.setattr(cgidm.files.os, "write", short_then_full)
    with pytest.raises(OutputError, match="No space left"):
        append_jsonl(path, {"id": "b", "payload": "x" * 100})
    monkeypatch.undo()
    assert path.read_text() == '{"id": "a"}\n'
    append_jsonl(path, {"id": "c"})
    assert [r["id"] for r in _rows(tmp_path)] == ["a", "c"]


def test_triptych_rename_fails(pair, items, tmp_path, monkeypatch):
    # the state file is renamed into place first; then each image renames its recovered image, then its
    # triptych: call 5 is the second triptych
    monkeypatch.setattr(cgidm.files.os, "replace", _fail_on_call(5, _enospc)(os.replace))
    with pytest.raises(OutputError) as e:
        authenticate(pair, items, tmp_path, _cfg(), progress=False)
    assert "triptychs" in e.value.path
    rows = _rows(tmp_path)
    assert [r["id"] for r in rows] == [items[0].id]
    assert (tmp_path / rows[0]["triptych"]).is_file()
    _no_temp_files(tmp_path)


def test_permission_error_on_summary_keeps_every_row(pair, items, tmp_path, monkeypatch):
    real = os.replace

    def denied(src, dst):
        if Path(dst).name == "summary.json":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real(src, dst)

    monkeypatch.setattr(cgidm.files.os, "replace", denied)
    with pytest.raises(OutputError, match="Permission denied") as e:
        authenticate(pair, items, tmp_path, _cfg(), progress=False)
    assert e.value.path == str(tmp_path / "summary.json")
    assert [r["id"] for r in _rows(tmp_path)] == [it.id for it in items]
    _no_temp_files(tmp_path)


def test_atomic_write_keeps_the_old_file_when_it_fails(tmp_path, monkeypatch):
    path = tmp_path / "results.jsonl"
    path.write_text("old\n")
    monkeypatch.setattr(cgidm.files.os, "replace", _fail_on_call(1, _enospc)(os.replace))
    with pytest.raises(OutputError) as e:
        atomic_write_text(path, "new\n")
    assert e.value.path == str(path)
    assert path.read_text() == "old\n"
    _no_temp_files(tmp_path)


def test_cli_full_disk_exits_3_naming_the_file(tiny_world, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cgidm.api, "append_jsonl", _fail_on_call(2, _enospc)(append_jsonl))
    out = tmp_path / "out"
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--members", str(tiny_world / "images" / "members"), "--holdouts",
                     str(tiny_world / "images" / "holdouts"), "--out", str(out), "--steps", "2",
                     "--batch-size", "1", "-q"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cgidm:")]
    assert code == cli.EXIT_OUTPUT
    assert len(err) == 1 and str(out / "results.jsonl") in err[0] and "No space left" in err[0]
    assert len(_rows(out)) == 1


# --------------------------------------------------------------------------- an exception inside a step


def _raise_on(call):
    def fault(n, out):
        if n == call:
            raise RuntimeError("injected fault in the UNet forward")
        return out
    return fault


def test_exception_in_a_step_is_isolated_to_its_batch(pair, items, tmp_path):
    # batches of 2, 2 steps each: call 3 is the first step of the second batch; that batch
    # is retried image by image (the fault was transient) and every image is scored
    faulty = _with_faulty_ft(pair, _raise_on(3))
    summary = authenticate(faulty, items, tmp_path, _cfg(batch_size=2), progress=False)
    rows = _rows(tmp_path)
    assert [r["id"] for r in rows] == [it.id for it in items]
    assert all("score" in r for r in rows) and summary["failed"] == 0
    _no_temp_files(tmp_path)


def test_cli_exception_in_a_step_fails_that_image_only(tiny_world, pair, tmp_path, capsys, monkeypatch):
    import cgidm.models

    # batches of 1, 2 steps each: call 5 is the first step of the third image
    monkeypatch.setattr(cgidm.models, "load_pair", lambda *a, **k: _with_faulty_ft(pair, _raise_on(5)))
    out = tmp_path / "out"
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--members", str(tiny_world / "images" / "members"), "--holdouts",
                     str(tiny_world / "images" / "holdouts"), "--out", str(out), "--steps", "2",
                     "--batch-size", "1", "-q"])
    assert code == cli.EXIT_SOME_FAILED
    rows = _rows(out)
    assert len(rows) == 12
    failed = [r for r in rows if "error" in r]
    assert len(failed) == 1 and "RuntimeError: injected" in failed[0]["error"]
    assert failed[0]["id"] == rows[2]["id"]


# --------------------------------------------------------------------------- SIGKILL


def test_sigkill_between_steps_leaves_only_complete_rows(tiny_world, tmp_path):
    out = tmp_path / "out"
    imgs = tiny_world / "images"
    demo = PRESETS["demo"]
    cmd = [sys.executable, "-m", "cgidm.cli", "authenticate", "--base", str(tiny_world / "base"),
           "--finetuned", str(tiny_world / "finetuned"), "--members", str(imgs / "members"),
           "--holdouts", str(imgs / "holdouts"), "--out", str(out), "--batch-size", "1",
           "--steps", "40", "--prompt", INSTANCE_PROMPT, "--step-size", str(demo["alpha"]),
           "--radius", str(demo["eps"]), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    results = out / "results.jsonl"
    try:
        while proc.poll() is None and not (results.exists() and results.stat().st_size > 0):
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    rows = _rows(out)
    assert 1 <= len(rows) < 12
    for r in rows:
        with Image.open(out / r["triptych"]) as im:
            im.verify()
    # temporary files may survive a SIGKILL, but hidden and never taken for inputs or results
    assert all(p.name.startswith(".") for p in out.rglob("*") if ".tmp" in p.name)


def test_out_of_memory_is_seen_behind_the_error_it_caused():
    """A fault that broke a CUDA-graph capture ends with the capture's own error; the
    out-of-memory below it (cause or context) still halves the batch. cuBLAS's failed
    allocation counts too; an unrelated error does not."""
    import torch

    from cgidm.batches import is_out_of_memory

    def raised(make):
        try:
            make()
        except Exception as e:  # noqa: BLE001
            return e

    def capture_broken():
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except torch.cuda.OutOfMemoryError:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def chained():
        raise RuntimeError("capture failed") from MemoryError()

    assert is_out_of_memory(raised(capture_broken)) and is_out_of_memory(raised(chained))
    assert is_out_of_memory(RuntimeError("CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate(handle)"))
    assert not is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_out_of_memory(raised(lambda: 1 / 0))


def test_halving_batches_covers_every_row_once_at_the_size_that_fits(caplog):
    """The loop sampling and decoding share: a batch that runs out of memory is run again at
    half the size (``on_halve`` first, here also failing on its first build), the rest of
    the run keeps that size, every row is done once and in order; other errors, and out of
    memory at size 1, are raised."""
    from cgidm.batches import halving_batches

    runs, halved = [], []

    def run(lo, size):
        runs.append((lo, size))
        if size > 3 or (size == 3 and len(halved) == 1 and len(runs) == 2):  # 3 fails once more
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return list(range(lo, min(lo + size, 11)))

    got = list(halving_batches(11, 7, run, what="testing", on_halve=halved.append))
    assert halved == [3, 1] and runs == [(0, 7), (0, 3), (0, 1), (1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 1),
                                         (7, 1), (8, 1), (9, 1), (10, 1)]
    assert [lo for lo, _ in got] == list(range(11)) and sum((x for _, x in got), []) == list(range(11))
    assert "out of memory testing a batch of 7; going on with batches of 3" in caplog.text
    assert [x for _, x in halving_batches(5, 2, lambda lo, size: [lo, size], what="t")] == [[0, 2], [2, 2], [4, 2]]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        list(halving_batches(2, 1, lambda lo, size: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("o")),
                             what="t"))
    with pytest.raises(ZeroDivisionError):
        list(halving_batches(4, 4, lambda lo, size: 1 / 0, what="t", on_halve=halved.append))
    assert halved == [3, 1]


def test_a_killed_runs_temporaries_are_removed_by_the_next_run(pair, items, tmp_path):
    """Half-written files a SIGKILL left (hidden ``.name.tmpPID-...``) do not ship with the
    evidence: the next run into the folder removes them, in every folder a run writes."""
    from cgidm.resume import remove_stale_temporaries

    planted = [tmp_path / d / ".image__x.png.tmp999-1" for d in (".", "triptychs", "recovered")]
    for p in planted:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"half")
    keep = tmp_path / "recovered" / "mine.png"
    keep.write_bytes(b"not ours to remove")
    authenticate(pair, items[:1], tmp_path, _cfg(steps=1), progress=False)
    assert not [p for p in planted if p.exists()] and keep.exists()
    # screen's shards and protect's folders are covered the same way
    extra = tmp_path / "protected" / "sub"
    extra.mkdir(parents=True)
    (extra / ".a.png.tmp1-2").write_bytes(b"half")
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / ".r.jsonl.tmp3-4").write_bytes(b"half")
    remove_stale_temporaries(tmp_path, [extra])
    assert not list(tmp_path.rglob("*.tmp*"))


def test_sigterm_stops_a_run_as_ctrl_c_does(tiny_world, tmp_path):
    """SIGTERM (timeout, a batch scheduler, docker stop) is taken as Ctrl-C: extract keeps
    the samples it drew for the same command to finish, says so, and exits with 143."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "cgidm.cli", "extract", "--base", str(tiny_world / "base"),
           "--finetuned", str(tiny_world / "finetuned"), "--out", str(out), "--samples", "4000",
           "--batch-size", "4", "--steps", "20", "--prompt", INSTANCE_PROMPT, "-q"]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        while proc.poll() is None and not (out / ".extract-new").exists():  # sampling has begun
            time.sleep(0.05)
        time.sleep(1.0)
        assert proc.poll() is None, f"the run ended before it could be stopped: {proc.stderr.read().decode()}"
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.returncode == 143, err
    assert "cgidm: stopped by SIGTERM; extract writes its outputs at the end" in err
    assert (out / ".extract-partial.safetensors").is_file() and not (out / ".extract-new").exists()


def test_a_second_sigterm_waits_for_the_first_to_be_handled():
    """The first SIGTERM raises Terminated; one more while the run saves is ignored; the
    handler before is back afterwards. Off the main thread nothing is taken."""
    import threading

    from cgidm.progress import Terminated, term_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        with term_as_interrupt():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1)
            finally:
                os.kill(os.getpid(), signal.SIGTERM)  # ignored: the cleanup runs to its end
                time.sleep(0.2)
    assert signal.getsignal(signal.SIGTERM) == before
    seen = []

    def off_main():
        with term_as_interrupt():
            seen.append(signal.getsignal(signal.SIGTERM))
            try:  # an error of the command's: not chained to the refusal to take the signal
                raise RuntimeError("x")
            except RuntimeError as e:
                seen.append(e.__context__)

    t = threading.Thread(target=off_main)
    t.start()
    t.join()
    assert seen == [before, None]
