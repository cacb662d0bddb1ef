"""The batch loop both runners share: read and encode batches ahead of the engine,
invert them, and hand their rows to a writer thread; a fault inside a batch costs only
the images that cause it (docs/architecture.md, "Runners").

- Reading, resizing and encoding run on a background thread (``prefetch``) while the
  engine inverts the previous batch; scoring, triptychs and row appends run on another
  (``RowWriter``). ``prefetch_depth=0`` runs everything inline.
- An unreadable image becomes an error row before the batch is formed.
- An out-of-memory error halves the batch and tries again; any other exception retries
  the batch's images one at a time, and an image that still fails gets an error row. An
  ``OutputError`` (disk full, permission) is not a fault of the images: it stops the run.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from cgidm.baselines import score_batch as score_baselines
from cgidm.copies import fingerprint
from cgidm.files import OutputError
from cgidm.images import ImageError, load_image_with_notes
from cgidm.pipeline import make_mask, prepare, recover, shrink_engines
from cgidm.resume import source
from cgidm.rows import batch_rows, error_row

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """A batch ready for the engine: ``items`` with their image tensors and notes;
    ``prep`` is None when encoding failed (``error``) or no image could be read."""

    items: list
    tensors: list
    notes: list
    failed: list  # (item, reason)
    prep: object = None
    error: Optional[BaseException] = None


def load_batch(pair, batch: Sequence, cfg, stream=None) -> Loaded:
    """Read the images of ``batch`` and encode those that could be read."""
    ok, tensors, notes, failed = [], [], [], []
    for it in batch:
        # the file as it is read (size, time, SHA-256), which its row records: the evidence
        # names the image by its contents, and a screen's resume tells a file saved over
        # since (``resume.same_source``)
        object.__setattr__(it, "source", source(it.path))
        object.__setattr__(it, "fingerprint", None)  # an earlier load's, of a file since replaced
        try:
            x, note = load_image_with_notes(it.path, pair.resolution)
        except ImageError as e:
            failed.append((it, e.reason))
            continue
        # the pixels the model is given (copies.py): the same picture in another file is one
        object.__setattr__(it, "fingerprint", fingerprint(x))
        ok.append(it)
        tensors.append(x)
        notes.append(note)
    loaded = Loaded(ok, tensors, notes, failed)
    if ok:
        try:
            if stream is None:
                loaded.prep = prepare(pair, torch.stack(tensors), [it.id for it in ok], cfg)
            else:
                # a side stream, so that the VAE encode runs beside the engine's kernels
                with torch.cuda.stream(stream):
                    loaded.prep = prepare(pair, torch.stack(tensors), [it.id for it in ok], cfg)
                stream.synchronize()
        except OutputError:
            raise
        except Exception as e:  # noqa: BLE001 - retried image by image by the consumer
            # without its traceback: the frames hold the failed encode's tensors, on the GPU
            # through the retries
            loaded.error = e.with_traceback(None)
    return loaded


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


_END = object()


def prefetch(pair, batches: Sequence[Sequence], cfg, depth: int = 2) -> Iterator[Loaded]:
    """Batches of ``pair``, read, resized and encoded by a background thread up to
    ``depth`` batches ahead of the consumer (``depth=0``: inline, no thread)."""
    if depth <= 0:
        for b in batches:
            yield load_batch(pair, b, cfg)
        return
    device = pair.device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                if not _put(q, load_batch(pair, b, cfg, stream), stop):
                    return
        except BaseException as e:  # handed to the consumer, which raises it
            _put(q, e, stop)
        _put(q, _END, stop)

    thread = threading.Thread(target=work, name="cgidm-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            if stream is not None and item.prep is not None:
                # tensors made on the side stream and used on this one: tell the allocator
                cur = torch.cuda.current_stream(device)
                for t in (item.prep.x0, item.prep.x_init, item.prep.mask, item.prep.partial_images):
                    if t.is_cuda:
                        t.record_stream(cur)
            yield item
    finally:
        stop.set()
        thread.join()


class RowWriter:
    """Runs output jobs (triptychs, then the row) in order on a background thread, so that
    PNG encoding and fsync overlap with the next inversion. A job's row is appended only
    after its triptych is on disk: a row in the file means the image is complete."""

    def __init__(self, threaded: bool = True, depth: int = 2) -> None:
        self.error: Optional[BaseException] = None
        self.thread = None
        if threaded:
            self.q: queue.Queue = queue.Queue(maxsize=depth)
            self.thread = threading.Thread(target=self._work, name="cgidm-writer", daemon=True)
            self.thread.start()

    def _work(self) -> None:
        while True:
            job = self.q.get()
            if job is _END:
                return
            if self.error is None:
                try:
                    job()
                except BaseException as e:
                    self.error = e

    def submit(self, job) -> None:
        if self.error is not None:
            raise self.error
        if self.thread is None:
            job()
        else:
            self.q.put(job)

    def close(self) -> None:
        """Finish the queued jobs (rows computed before an error are still written)."""
        if self.thread is not None:
            self.q.put(_END)
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error


def is_out_of_memory(e: BaseException) -> bool:
    """An out-of-memory fault, also where it is the cause or context of the error raised
    (a capture it broke ends with another error) or cuBLAS's failed allocation."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, (MemoryError, getattr(torch.cuda, "OutOfMemoryError", MemoryError))):
            return True
        text = str(e).lower()
        if isinstance(e, RuntimeError) and any(s in text for s in ("out of memory", "can't allocate memory",
                                                                     "alloc_failed")):
            return True
        e = e.__cause__ or e.__context__
    return False


def halving_batches(total: int, batch_size: int, run: Callable[[int, int], object], *, what: str,
                    device=None, on_halve: Optional[Callable[[int], None]] = None) -> Iterator[tuple[int, object]]:
    """``(lo, run(lo, size))`` for consecutive batches covering ``0 .. total``: ``run`` does
    rows ``lo .. lo + size`` (or up to ``total``). A batch that runs out of memory is run
    again at half the size (``on_halve(new_size)`` first, to rebuild what was sized for the
    old one), after the except block has let the failed batch's tensors go; any other error,
    or out of memory at size 1, is raised. ``what``: for the warning ("sampling")."""
    lo = 0
    while lo < total:
        n = min(batch_size, total - lo)
        x = None
        try:
            x = run(lo, batch_size)
        except Exception as e:  # noqa: BLE001 - only out of memory is retried
            if batch_size == 1 or not is_out_of_memory(e):
                raise
        if x is None:
            batch_size //= 2
            if on_halve is not None:
                on_halve(batch_size)
            if device is not None and torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            log.warning("out of memory %s a batch of %d; going on with batches of %d", what, n, batch_size)
            continue
        yield lo, x
        lo += n


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"[:500]


@dataclass
class PairStats:
    images: int = 0
    engine_s: float = 0.0
    wait_s: float = 0.0
    retries: int = 0
    extra: dict = field(default_factory=dict)


def run_pair(
    pair,
    items: Sequence,
    cfg,
    out: Path,
    emit: Callable[[dict], None],
    writer: RowWriter,
    *,
    prefetch_depth: int = 2,
    stats: Optional[PairStats] = None,
    step_callback: Optional[Callable[[int], Optional[Callable]]] = None,
) -> PairStats:
    """Authenticate ``items`` against one loaded ``pair`` in batches of ``cfg.batch_size``;
    every item ends as exactly one row handed to ``emit`` (on the writer's thread). A mask
    the pair's latent cannot hold (``--blocks-per-side``, ``--pass-rate``) raises
    ``ValueError`` here, before any image is read."""
    make_mask(pair, cfg)
    stats = stats or PairStats()
    run_cfg = [cfg]  # becomes --low-memory when one image alone runs out of memory
    batches = [list(items[i:i + cfg.batch_size]) for i in range(0, len(items), cfg.batch_size)]

    def emit_errors(failed):
        def job():
            for it, reason, notes in failed:
                emit(error_row(it, reason, notes))

        writer.submit(job)

    def retry(its, tensors, notes, prep, reason: str, oom: bool):
        """After a fault: out of memory halves the batch (one image that does not fit turns
        --low-memory on and is tried again); any other fault goes image by image; one image
        that still fails is an error row."""
        if oom:
            shrink_engines(pair, max(1, len(its) // 2))
            if pair.device.type == "cuda":
                torch.cuda.empty_cache()
        if oom and len(its) == 1 and not run_cfg[0].low_memory:
            # one image does not fit: recompute activations (--low-memory, the same
            # scores) from here on, and try it again
            log.warning("out of memory for one image; recomputing the UNets' activations in the backward pass "
                        "(--low-memory) from now on")
            run_cfg[0] = run_cfg[0].replace(low_memory=True)
            stats.extra["low_memory_fallback"] = True
            stats.retries += 1
            pair.__dict__.pop("_max_bucket", None)  # recomputing, larger batches may fit again
            pair.__dict__.get("_engines", {}).clear()  # their buffers and graph pools are freed
            if pair.device.type == "cuda":
                torch.cuda.empty_cache()
            invert(its, tensors, notes, prep)
            return
        if len(its) == 1:
            log.error("%s: %s", its[0].id, reason)
            emit_errors([(its[0], ("out of memory: " if oom else "failed: ") + reason, notes[0])])
            return
        stats.retries += 1
        if oom:
            half = len(its) // 2
            log.warning("out of memory on a batch of %d; trying %d and %d", len(its), half, len(its) - half)
            parts = [slice(0, half), slice(half, None)]
        else:
            log.warning("a batch of %d failed (%s); trying its images one at a time", len(its), reason)
            parts = [slice(i, i + 1) for i in range(len(its))]
        prep = None  # noqa: F841 - the whole batch's prepared tensors: the parts prepare their own
        for s in parts:
            invert(its[s], tensors[s], notes[s])

    def invert(its, tensors, notes, prep=None, error=None):
        """Invert one batch; a fault goes to ``retry``."""
        fault = None
        try:
            if error is not None:
                raise error
            if prep is None:
                prep = prepare(pair, torch.stack(tensors), [it.id for it in its], cfg)
            t0 = time.perf_counter()
            result = recover(pair, prep, run_cfg[0], callback=step_callback(len(its)) if step_callback else None)
            if pair.device.type == "cuda":
                torch.cuda.synchronize(pair.device)
            stats.engine_s += time.perf_counter() - t0
            recovered = pair.codec.decode(result.x_rec)
            # baselines on the same images (cfg.baselines; none by default), inside the fault
            # isolation: out of memory halves the batch as for the inversion
            extra = {}
            if cfg.baseline_names:
                extra = score_baselines(pair, prep, cfg, timings=stats.extra.setdefault("baselines_s", {}))
        except (OutputError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - isolated to the images of this batch
            # only noted here: the retries run after the except block, once the exception and
            # its traceback (which holds the failed step's tensors) are gone
            fault = (_reason(e), is_out_of_memory(e))
        if fault is not None:
            result = recovered = extra = error = None  # noqa: F841 - the failed batch's tensors, freed
            retry(its, tensors, notes, prep, *fault)
            return

        def job():
            for row in batch_rows(its, notes, prep, result, recovered, cfg.metric, out):
                row.update(extra.get(row["id"], {}))
                emit(row)

        writer.submit(job)

    with_loader = prefetch(pair, batches, cfg, prefetch_depth)
    try:
        while True:
            t0 = time.perf_counter()
            loaded = next(with_loader, None)
            stats.wait_s += time.perf_counter() - t0
            if loaded is None:
                break
            if loaded.failed:
                emit_errors([(it, reason, None) for it, reason in loaded.failed])
            if loaded.items:
                invert(loaded.items, loaded.tensors, loaded.notes, loaded.prep, loaded.error)
    finally:
        with_loader.close()
    return stats
