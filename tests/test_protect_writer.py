"""``cgidm protect``'s writer threads (docs/protect.md, "How it runs"): a protected file's
PNG, scores and panel are written beside the next batch's steps; the rows come out in the
images' order (error rows too), with the content one thread gives (``WRITERS = 0``); a file
that does not write back is an error row and the run goes on; an output that cannot be
written stops the run with the rows before it complete and no writer thread left; Ctrl-C
keeps the rows of the images whose files were written."""
from __future__ import annotations

import json
import shutil
import threading
import time

import pytest

import cgidm.protect as P
from cgidm.config import ProtectConfig
from cgidm.files import OutputError
from cgidm.protect import collect_protect_items, protect
from cgidm.protect_pgd import load_base

FAST = dict(steps=2, eval_draws=2, batch_size=1)


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_base(tiny_world / "base")


def _folder(tiny_world, tmp_path, n=3):
    folder = tmp_path / "art"
    folder.mkdir()
    for p in sorted((tiny_world / "images" / "members").glob("*.png"))[:n]:
        shutil.copy(p, folder / p.name)
    return folder


def _rows(out):
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def _same(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k != "source"} == {k: v for k, v in b.items() if k != "source"}


def test_files_are_written_beside_the_next_batch_and_rows_keep_their_order(base, tiny_world, tmp_path, monkeypatch):
    """With two writers, the first image's file waits until the second image's steps have
    begun: one thread (writing before protecting the next) would time out here. The rows
    and files equal those of a run that finishes each file before going on (``WRITERS = 0``)."""
    folder = _folder(tiny_world, tmp_path)
    items = collect_protect_items(folder)
    one = tmp_path / "one"
    monkeypatch.setattr(P, "WRITERS", 0)
    protect(base, items, one, ProtectConfig(**FAST), progress=False)

    started = [threading.Event() for _ in items]
    protected, overlapped, threads = [], [], []
    real_protect, real_file = P._Run._protect, P.protect_file

    def counting(self, its, images):
        for it in its:
            started[[i.id for i in items].index(it.id)].set()
        protected.append([it.id for it in its])
        return real_protect(self, its, images)

    def waiting(src, *a, **k):
        i = [it.path for it in items].index(src)
        threads.append(threading.current_thread().name)
        if i + 1 < len(items):
            overlapped.append(started[i + 1].wait(timeout=60))
        return real_file(src, *a, **k)

    monkeypatch.setattr(P, "WRITERS", 2)
    monkeypatch.setattr(P._Run, "_protect", counting)
    monkeypatch.setattr(P, "protect_file", waiting)
    two = tmp_path / "two"
    protect(base, items, two, ProtectConfig(**FAST), progress=False)
    assert overlapped == [True] * (len(items) - 1)
    assert all(name.startswith("cgidm-write") for name in threads)
    a, b = _rows(one), _rows(two)
    assert [r["id"] for r in b] == [it.id for it in items]
    assert all(_same(x, y) for x, y in zip(a, b))
    for r in a:
        assert (one / r["protected"]).read_bytes() == (two / r["protected"]).read_bytes()
        assert (one / r["panel"]).read_bytes() == (two / r["panel"]).read_bytes()
    assert not [t for t in threading.enumerate() if t.name.startswith("cgidm-write")]


def test_a_file_that_does_not_write_back_is_an_error_row(base, tiny_world, tmp_path, monkeypatch):
    folder = _folder(tiny_world, tmp_path)
    items = collect_protect_items(folder)
    real_file = P.protect_file

    def failing(src, *a, **k):
        if src == items[1].path:
            raise ValueError("an unusual file")
        return real_file(src, *a, **k)

    monkeypatch.setattr(P, "protect_file", failing)
    out = tmp_path / "out"
    summary = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert summary["protected"] == 2 and summary["failed"] == 1
    rows = {r["id"]: r for r in _rows(out)}
    assert rows[items[1].id]["error"] == "failed: ValueError: an unusual file"
    assert all("error" not in rows[it.id] for it in (items[0], items[2]))


def test_an_output_that_cannot_be_written_stops_the_run_with_the_rows_before_it_complete(base, tiny_world, tmp_path,
                                                                                        monkeypatch):
    folder = _folder(tiny_world, tmp_path)
    items = collect_protect_items(folder)
    real_file = P.protect_file

    def full_disk(src, dst, *a, **k):
        if src == items[1].path:
            raise OutputError(dst, OSError(28, "No space left on device"))
        return real_file(src, dst, *a, **k)

    monkeypatch.setattr(P, "WRITERS", 2)
    monkeypatch.setattr(P, "protect_file", full_disk)
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="No space left"):
        protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert [r["id"] for r in _rows(out)] == [items[0].id] and "error" not in _rows(out)[0]
    assert not [t for t in threading.enumerate() if t.name.startswith("cgidm-write")]
    monkeypatch.setattr(P, "protect_file", real_file)  # the disk has room again: the same command finishes
    summary = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert summary["protected"] == 3 and sorted(r["id"] for r in _rows(out)) == sorted(it.id for it in items)


def test_error_rows_keep_their_place_among_rows_still_being_written(base, tiny_world, tmp_path, monkeypatch):
    folder = _folder(tiny_world, tmp_path, n=2)
    (folder / "member_000b.png").write_text("not an image")  # sorted between the two members
    items = collect_protect_items(folder)
    assert [it.id for it in items][1] == "member_000b.png"
    monkeypatch.setattr(P, "WRITERS", 2)
    out = tmp_path / "out"
    protect(base, items, out, ProtectConfig(**FAST), progress=False)
    rows = _rows(out)
    assert [r["id"] for r in rows] == [it.id for it in items] and "error" in rows[1]


def test_ctrl_c_keeps_the_rows_of_the_images_whose_files_were_written(base, tiny_world, tmp_path, monkeypatch):
    """Stopped while the third image is protected: the first two images' files are written
    (or finish writing), so they get their rows and a resume protects only the third; the
    finished folder equals an uninterrupted run's."""
    folder = _folder(tiny_world, tmp_path)
    items = collect_protect_items(folder)
    monkeypatch.setattr(P, "WRITERS", 2)
    real_protect = P._Run._protect
    calls = []

    def stopped(self, its, images):
        calls.append(its)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_protect(self, its, images)

    real_file = P.protect_file

    def slow(src, *a, **k):  # the second image's file is still being written at the stop
        if src == items[1].path:
            time.sleep(1.0)
        return real_file(src, *a, **k)

    monkeypatch.setattr(P._Run, "_protect", stopped)
    monkeypatch.setattr(P, "protect_file", slow)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert [r["id"] for r in _rows(out)] == [it.id for it in items[:2]]
    assert not [t for t in threading.enumerate() if t.name.startswith("cgidm-write")]
    monkeypatch.setattr(P._Run, "_protect", real_protect)
    monkeypatch.setattr(P, "protect_file", real_file)
    summary = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert summary["timing"]["images"] == 1 and summary["protected"] == 3
    whole = tmp_path / "whole"
    protect(base, items, whole, ProtectConfig(**FAST), progress=False)
    assert all(_same(x, y) for x, y in zip(sorted(_rows(out), key=lambda r: r["id"]), _rows(whole)))


def test_ctrl_c_while_a_row_is_made_keeps_that_row(base, tiny_world, tmp_path, monkeypatch):
    """Ctrl-C while the main thread waits on a write or makes its row (the read-back and
    the loss): that image's file is written, so its row is kept by the stop, in order."""
    folder = _folder(tiny_world, tmp_path)
    items = collect_protect_items(folder)
    monkeypatch.setattr(P, "WRITERS", 1)
    real_row = P._Run._row
    calls = []

    def interrupted(self, item, *a):
        calls.append(item.id)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_row(self, item, *a)

    monkeypatch.setattr(P._Run, "_row", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        protect(base, items, out, ProtectConfig(**FAST), progress=False)
    kept = [r["id"] for r in _rows(out)]
    assert kept[0] == items[0].id and kept == [it.id for it in items[:len(kept)]]
    monkeypatch.setattr(P._Run, "_row", real_row)
    summary = protect(base, items, out, ProtectConfig(**FAST), progress=False)
    assert summary["timing"]["images"] == len(items) - len(kept) and summary["protected"] == 3
    assert [r["id"] for r in _rows(out)] == [it.id for it in items]


def test_the_panel_shows_a_transparent_picture_on_white_not_the_colours_it_hides():
    import numpy as np

    from cgidm.protect_output import _display

    colour = np.zeros((5, 7, 3), dtype=np.uint8)
    colour[..., 0] = 200  # red under every pixel
    alpha = np.full((5, 7), 255, dtype=np.uint8)
    alpha[:, :3] = 0  # the left three columns transparent
    alpha[:, 3] = 51  # one column at 20 %
    shown = np.asarray(_display(colour, 255, alpha))
    assert (shown[:, :3] == 255).all()  # white, not the red hidden there
    assert (shown[:, 4:] == (200, 0, 0)).all()
    assert tuple(shown[0, 3]) == (round(200 * 0.2 + 255 * 0.8), 204, 204)
    grey = np.asarray(_display(colour[..., 0], 255, alpha))  # LA: one channel
    assert (grey[:, :3] == 255).all() and (grey[:, 4:] == 200).all()
    assert (np.asarray(_display(colour, 255)) == np.asarray(_display(colour, 255, np.full((5, 7), 255, np.uint8)))).all()
