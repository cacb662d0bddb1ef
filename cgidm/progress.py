"""Progress of a run: images done, images/hour and the ETA, for one rank and, on rank 0
of several, for all of them (fed by counting the lines of every rank's shard). In a log
file (not a terminal) a bar prints a line every 30 s instead of redrawing. And how a run
is stopped: SIGTERM is taken as Ctrl-C (``term_as_interrupt``)."""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

from cgidm.resume import SHARDS


class Terminated(KeyboardInterrupt):
    """SIGTERM: what ``timeout``, a batch scheduler or ``docker stop`` send, taken as Ctrl-C,
    so a run keeps what it finished (rows, an extract's samples) and says so."""


@contextlib.contextmanager
def term_as_interrupt():
    """Inside, SIGTERM raises ``Terminated`` in the main thread (elsewhere nothing changes),
    once: a second SIGTERM (a process group's, a scheduler's again) is ignored while the run
    saves what it finished; the handler before is put back after."""
    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    try:
        before = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to take
        before = False
    if before is False:
        yield
        return
    try:
        yield
    finally:  # None: a handler not set from Python, which cannot be put back; the default then
        signal.signal(signal.SIGTERM, signal.SIG_DFL if before is None else before)


class _NoEmptyFloat32List(logging.Filter):
    """diffusers' ``ModelMixin.to`` warns on every dtype cast that the model has modules
    that "should be kept in float32: []", the list empty (nothing to keep): dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


# by name: diffusers asks logging for the same logger when it is imported
logging.getLogger("diffusers.models.modeling_utils").addFilter(_NoEmptyFloat32List())


class _LogLines:
    """tqdm's file in a log (not a terminal): each refresh a line of its own, with no
    carriage return or cursor move, so ``tail -f``, ``grep`` and line-based log
    collectors see the run's progress as it goes."""

    def __init__(self, stream) -> None:
        self.stream, self.last = stream, None

    def write(self, text: str) -> None:
        for part in text.replace("\x1b[A", "").replace("\r", "\n").split("\n"):
            line = part.strip()
            if line and line != self.last:
                self.stream.write(line + "\n")
                self.last = line

    def flush(self) -> None:
        self.stream.flush()


def bar_options() -> dict:
    """tqdm keywords for a bar on this process's stderr: in a terminal a redraw every
    0.1 s; in a log file a line of its own every 30 s."""
    if sys.stderr.isatty():
        return {"mininterval": 0.1}
    # maxinterval too: tqdm's monitor redraws every maxinterval (10 s by default) otherwise
    return {"mininterval": 30, "maxinterval": 30, "file": _LogLines(sys.stderr)}


def _duration(seconds: float) -> str:
    return ("under 1 s" if seconds < 1 else f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
            if seconds < 5400 else f"{seconds / 3600:.1f} h")


def first_steps_estimate(steps: int, images: int, batches: int, batch: int, say: Callable[[str], None], *,
                         padded: bool = True, baselines: bool = False):
    """A ``step_callback`` factory for ``batches.run_pair`` (called with each batch's image
    count) that times the first PGD steps and says once, after 30 s of them or at the end of
    a batch, about how long a batch and the run (``batches`` batches of up to ``batch`` for
    ``images`` images) take: on a CPU the paper's 1000 steps take long, and no bar says how
    long before the first batch ends. ``padded``: a smaller batch costs a whole one (the
    engine pads it to its bucket); else the cost is per image (the reference). Timed from a
    batch's second step (past the first step's warm-up); a batch retried, or run in chunks,
    times again until the line is said; then no callback is given (it reads each step's
    loss: a device sync). The figure is the search's alone: ``baselines`` says so."""
    said: list[bool] = []

    def factory(n: Optional[int] = None) -> Optional[Callable[[int, float], None]]:
        if said:
            return None
        start: list[float] = []
        size = n or batch

        def cb(step: int, loss: float) -> None:
            if said:
                return
            now = time.perf_counter()
            if step == 0 or not start:
                start[:] = [now, step]
            elif now - start[0] >= 30 or step == steps - 1:
                per = (now - start[0]) / (step - start[1])
                one, run = (per * steps, per * steps * batches) if padded else (
                    per / size * batch * steps, per / size * images * steps)
                said.append(True)
                say(f"estimate: the PGD search takes {per:.3g} s a step for {size} image{'s' if size != 1 else ''} "
                    f"(timed over steps {start[1] + 2} to {step + 1} of {steps}): about {_duration(one)} a batch of "
                    f"up to {batch}, {_duration(run)} for {images} image{'s' if images != 1 else ''}"
                    + (", besides the baselines" if baselines else ""))

        return cb

    return factory


class Progress:
    """This rank's bar (images done, images/hour, ETA) and, on rank 0 of several, a
    total bar fed by counting the lines of every rank's shard."""

    def __init__(self, out: Path, mine: int, total: int, done_before: int, rank: int, world: int,
                 enabled: bool, lines: Optional[LineCounter] = None) -> None:
        from tqdm.auto import tqdm

        kw = dict(unit="img", disable=not enabled, dynamic_ncols=True, **bar_options())
        self.t0 = time.perf_counter()
        self.count = 0
        self.lock = threading.Lock()
        self.label = f"rank {rank}/{world}" if world > 1 else None  # said before this rank's own lines
        self.bar = tqdm(total=mine, desc=self.label or "images", position=0, **kw)
        self.total_bar = None
        self.stop = threading.Event()
        if world > 1 and rank == 0 and enabled:
            self.shards = out / SHARDS
            # ``lines``: the counter that counted the shards before any rank wrote; those
            # lines are the base, and it goes on reading only what is appended
            self.lines = lines if lines is not None else LineCounter()
            self.base = {path: n for path, (_, n) in self.lines.seen.items()}
            self.done_before = done_before
            self.total_bar = tqdm(total=total, initial=done_before, desc="total", position=1, **kw)
            self.thread = threading.Thread(target=self._watch, name="cgidm-progress", daemon=True)
            self.thread.start()

    @staticmethod
    def _rate(n: int, t0: float) -> str:
        dt = time.perf_counter() - t0
        return f"{3600 * n / dt:,.0f} img/h" if dt > 0 and n else "- img/h"

    def say(self, text: str) -> None:
        """A line above the bar (to stderr, where the bar is), when the bar shows."""
        if not self.bar.disable:
            with self.lock:
                self.bar.write(text, file=sys.stderr)

    def row_done(self, row: dict) -> None:
        with self.lock:
            self.count += 1
            self.bar.update(1)
            self.bar.set_postfix_str(self._rate(self.count, self.t0), refresh=False)

    def _refresh_total(self) -> None:
        new = sum(max(0, self.lines.count(p) - self.base.get(p, 0)) for p in self.shards.glob("rank-*.jsonl"))
        self.total_bar.update(self.done_before + new - self.total_bar.n)
        self.total_bar.set_postfix_str(self._rate(new, self.t0), refresh=False)

    def _watch(self) -> None:
        while not self.stop.wait(2.0):
            self._refresh_total()

    def close(self) -> None:
        self.stop.set()
        if self.total_bar is not None:
            self.thread.join()
            self._refresh_total()
            self.total_bar.close()
        self.bar.close()


class LineCounter:
    """Lines of files that only grow, each read once: every call reads only the bytes
    appended since the last (the total bar counts the shards every 2 s; reading them whole
    each time grew with the square of a long run's rows). A file that shrank is counted
    again from its start."""

    def __init__(self) -> None:
        self.seen: dict[Path, tuple[int, int]] = {}  # path -> (bytes read, lines in them)

    def count(self, path: Path) -> int:
        offset, lines = self.seen.get(path, (0, 0))
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:
                    offset, lines = 0, 0
                f.seek(offset)
                while chunk := f.read(1 << 20):
                    offset += len(chunk)
                    lines += chunk.count(b"\n")
        except FileNotFoundError:
            offset, lines = 0, 0
        self.seen[path] = (offset, lines)
        return lines


@contextlib.contextmanager
def library_bars_off():
    """transformers' and diffusers' own bars ("Loading weights ...") off while a model
    loads: a cgidm run says what it loads in its own lines. The libraries' settings are
    restored after (a notebook's choice stays)."""
    switches = []
    for name in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        switches.append((mod, mod.is_progress_bar_enabled()))
        mod.disable_progress_bar()
    try:
        yield
    finally:
        for mod, was in switches:
            if was:
                mod.enable_progress_bar()


_LIBRARY_LOGGERS = ("diffusers", "peft", "transformers")


@contextlib.contextmanager
def library_quiet():
    """Collect instead of print what diffusers, peft and transformers log (warning and
    above) or warn while a model or a LoRA loads: one that does not fit makes them print
    dozens of lines of key names; cgidm says it in one. Yields the list of messages."""
    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    keep = _Keep(logging.WARNING)
    saved = []
    for name in _LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [keep]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate
