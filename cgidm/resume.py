"""The state of an output folder between runs: finished rows (one JSON line each), the
settings they were computed with, the lock that keeps two runs apart, and what a killed
run left behind (docs/architecture.md, "Runners").
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from cgidm.files import OutputError, atomic_write_jsonl, atomic_write_text, regular_file

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
REMOVED = "results.removed.jsonl"
SHARDS = "shards"
STATE = "screen.json"
LOCK = ".cgidm.lock"
# Settings that decide a score, or the code path that computes it: a resume with other
# values would mix two experiments in one file. batch_size changes nothing (every draw
# is keyed by the image id); metric and level only change the summary.
SCORE_SETTINGS = ("prompt", "pgd", "blocks_per_side", "pass_rate", "seed", "engine", "impl", "baselines")


_SAID: set = set()


def read_jsonl(path: Path) -> list[dict]:
    """Complete rows of a results file. A last line without its newline is what a kill
    during a write leaves: it is skipped here and cut off by ``repair_jsonl``."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    rows = []
    for n, line in enumerate(data.split(b"\n")[:-1], 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            if (str(path), n, line) not in _SAID:  # a file read several times in one run: said once
                _SAID.add((str(path), n, line))
                log.warning("%s:%d: not a JSON row, ignored (its image is done again)", path, n)
            continue
        if isinstance(row, dict) and isinstance(row.get("id"), str):
            rows.append(row)
    return rows


def repair_jsonl(path: Path) -> int:
    """Cut a partial last line off ``path`` so that the next append starts a new line;
    returns the bytes removed."""
    try:
        f = open(path, "rb+")
    except FileNotFoundError:
        return 0
    except OSError as e:  # a results file that cannot be written: the run could not append its rows
        raise OutputError(path, e) from e
    with f:
        size = f.seek(0, os.SEEK_END)
        pos, keep = size, 0
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            i = f.read(pos - start).rfind(b"\n")
            if i >= 0:
                keep = start + i + 1
                break
            pos = start
        if keep < size:
            log.warning("%s: cut %d bytes of a partial last line (a run was killed mid-write)", path, size - keep)
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return size - keep


def result_files(out: Path) -> list[Path]:
    return [out / RESULTS, *sorted((out / SHARDS).glob("rank-*.jsonl"))]


def done_rows(out: Path) -> dict[str, dict]:
    """Every finished row in ``out`` (results file and rank shards), one per id; a later row
    of an id wins (a ``--retry-failed`` run appends the new outcome after the old error)."""
    rows: dict[str, dict] = {}
    for path in result_files(Path(out)):
        for row in read_jsonl(path):
            old = rows.get(row["id"])
            if old is None or "error" in old:
                rows[row["id"]] = row
    return rows


def drop_rows(paths: Sequence[Path], ids: set[str]) -> None:
    """The rows of ``ids`` taken out of the results files ``paths`` (rewritten atomically):
    rows made from a file saved over since, which must not stand beside the new ones."""
    for path in paths:
        rows = read_jsonl(path)
        kept = [r for r in rows if r.get("id") not in ids]
        if len(kept) != len(rows):
            atomic_write_jsonl(path, kept)


def settings_of(cfg, dtype_name: str) -> dict:
    """The flat ``{name: value}`` of the settings a resume must keep."""
    now = {}
    for k, v in cfg.to_json().items():
        if k in SCORE_SETTINGS:
            now.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    now["dtype"] = dtype_name
    return json.loads(json.dumps(now))


def _shown(value, other) -> str:
    """A setting beside the ``other`` value it differs from: a float to 6 digits (a budget
    of 0.03 is 7.65 levels, not 7.6499999999999995), or in full where 6 digits would show
    the two alike; anything else as its repr."""
    if not isinstance(value, float):
        return repr(value)
    short = f"{value:.6g}"
    return repr(value) if isinstance(other, (int, float)) and f"{other:.6g}" == short else short


def _same(a, b, exact: bool = False) -> bool:
    if not exact and isinstance(a, float) and isinstance(b, float):
        return a == b or math.isclose(a, b, rel_tol=1e-9)
    return a == b


def differences(old: dict, new: dict, said=None, exact: bool = False) -> str:
    """What differs between a stopped run's settings and this run's, as each command's
    refusal to resume says it: ``key A there, B now`` for every key that differs, a nested
    dict's by its own keys (``scheduler steps_offset 1 there, 0 now``); ``said(key, value)``
    words a value its own way (or None for the usual). Empty when nothing differs; numbers
    within a relative 1e-9 are the same (``--budget 8/255`` and ``0.0313725490196``) unless
    ``exact``."""
    diff = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += [(f"{k} {sub}", a.get(sub), b.get(sub)) for sub in sorted(set(a) | set(b), key=str)
                     if not _same(a.get(sub), b.get(sub), exact)]
        elif not _same(a, b, exact):
            diff.append((k, a, b))

    def word(k, v, other):
        return (said and said(k, v)) or _shown(v, other)

    return "; ".join(f"{k} {word(k, a, b)} there, {word(k, b, a)} now" for k, a, b in diff)


def check_state(out: Path, settings: dict, ids: Sequence[str], rank: int) -> dict:
    """Refuse to resume with settings that would give other scores; say what changed in
    the list of images since the last run. Returns ``{"added": [...], "removed": [...]}``
    (empty on a first run) and, on rank 0, records the current state. An earlier run that
    scored no image (every row an error: a pair that could not load without --prompt) has
    no score to mix up: its settings are replaced, and ``"retry": True`` says that its
    failed images are to be screened again; the state keeps ``retry_pending`` until the run
    finishes (``clear_retry``), so that a retry stopped part way is taken up again."""
    path = out / STATE
    before: Optional[dict] = None
    if path.exists():
        try:
            before = json.loads(path.read_text())
        except ValueError:
            before = None
    changes = {"added": [], "removed": []}
    if before is not None:
        old = before.get("settings")
        differs = isinstance(old, dict) and bool(differences(old, settings))
        if differs and not any("error" not in r for r in done_rows(out).values()):
            changes["retry"] = True
        elif not differs and before.get("retry_pending") is True:
            changes["retry"] = True
        elif differs:
            what = differences(old, settings, lambda k, v: "read from each checkpoint" if k == "prompt" and v is None
                               else None)
            hint = (" (a prompt given now is another setting even where a checkpoint names the same one: resume "
                    "without --prompt, or with the one given before)" if old.get("prompt") != settings.get("prompt")
                    else "")
            raise ValueError(f"{out} holds a screen run with other settings ({what}){hint}; "
                             "resume with the same settings or use another --out")
        if isinstance(before.get("ids"), list):
            old_ids, new_ids = set(before["ids"]), set(ids)
            changes.update(added=sorted(new_ids - old_ids), removed=sorted(old_ids - new_ids))
    if rank == 0:
        state = {"settings": settings, "ids": sorted(ids), **({"retry_pending": True} if changes.get("retry") else {})}
        atomic_write_text(path, json.dumps(state, indent=1, sort_keys=True) + "\n")
    return changes


def clear_retry(out: Path) -> None:
    """The run finished: a retry ``check_state`` asked for is done."""
    path = out / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if isinstance(state, dict) and state.pop("retry_pending", None) is not None:
        atomic_write_text(path, json.dumps(state, indent=1, sort_keys=True) + "\n")


# The file each command keeps in its output folder (authenticate and the demo: also rows or
# a summary with none of these beside them, as a cgidm before 0.1.2 left them). Another command in that folder would clear or
# mix its outputs (results.jsonl, summary.json, report.html), so it is refused.
RUN_STATES = (("protect", "protect.json"), ("extract", "extract.json"), ("screen", STATE),
              ("authenticate", "authenticate.json"))


def run_in(out: Path) -> Optional[str]:
    """The command whose run ``out`` holds, or None (an empty or unknown folder)."""
    for kind, name in RUN_STATES:
        if (out / name).is_file():
            return kind
    return "authenticate" if (out / RESULTS).is_file() or (out / "summary.json").is_file() else None


def check_run_kind(out: Path, kind: str, outputs: Sequence[str] = ()) -> None:
    """``ValueError`` when ``out`` holds another command's run than ``kind``'s, or no run of
    cgidm's yet (no state file, no results) but some of the files or non-empty folders
    ``outputs`` that a run of ``kind`` writes: someone else's, which it would write over."""
    there = run_in(out)
    if there is not None and there != kind:
        state = next(n for k, n in RUN_STATES if k == there)
        found = state if (out / state).is_file() else " or ".join(
            n for n in (RESULTS, "summary.json") if (out / n).is_file())
        raise ValueError(f"{out} holds {found}, of a cgidm {there} run"
                         + ("" if (out / state).is_file() else " or another program's")
                         + f"; {kind} would overwrite its outputs: use another --out")
    mine = dict(RUN_STATES).get(kind)
    if there == kind == "authenticate" and not (out / mine).is_file() and (foreign := _not_cgidm(out)):
        raise ValueError(f"{out} holds {foreign} and no {mine}: not a cgidm run's, and {kind} would replace it: "
                         "use another --out")
    if there is None and mine:
        found = [n for n in outputs if (out / n).is_file() or ((out / n).is_dir() and any((out / n).iterdir()))]
        if found:
            raise ValueError(f"{out} already holds {', '.join(found)} and no {mine}: not a cgidm {kind} run's, "
                             f"and {kind} would write over them: use another --out")


def _not_cgidm(out: Path) -> Optional[str]:
    """The name of a ``results.jsonl`` or ``summary.json`` in ``out`` that no cgidm run wrote
    (its rows as far as the first 64 KiB): a row that is not a JSON object with an ``id`` and an
    ``image`` (a partial last line is what a killed run leaves, and passes), a summary that
    is not one with ``images``. None when both are cgidm's or absent."""
    try:
        with open(out / RESULTS, "rb") as f:
            lines = f.read(1 << 16).split(b"\n")[:-1]
        for line in filter(bytes.strip, lines):
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row.get("id"), str) and "image" in row):
                return RESULTS
    except FileNotFoundError:
        pass
    except (OSError, ValueError):
        return RESULTS
    try:
        summary = json.loads((out / "summary.json").read_bytes())
        return None if isinstance(summary, dict) and "images" in summary else "summary.json"
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return "summary.json"


def sha256_file(path: Path) -> str:
    """The hex SHA-256 of a file's contents, read in 1 MiB blocks (``OSError`` for a pipe or
    a device: read, they would block or never end)."""
    regular_file(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


DIGESTS = ".cgidm-digests.json"


class DigestCache:
    """Files' SHA-256 by path, size and times, kept in ``OUT/.cgidm-digests.json``
    across runs: a resume reads a file's contents again only when one of those changed
    (a model of GBs once; a folder copied without its times once, not at every resume)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / DIGESTS
        try:
            entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            entries = {}
        self.entries = entries if isinstance(entries, dict) else {}
        self.changed = False

    def sha256(self, path: Path) -> str:
        """The file's digest, read again unless its size and modification and change times
        are those it was read with: a file saved over with its old size and time (``cp -p``,
        ``touch -d``, or another file renamed into its place) still has a new change time,
        which no call sets. (Not the inode: some network and FUSE file systems number files
        anew at each mount, which would read every model again at every resume.)"""
        st = Path(path).stat()
        key = os.path.abspath(path)
        kept = self.entries.get(key)
        stamp = [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        if (isinstance(kept, list) and len(kept) == 4 and kept[:3] == stamp
                and isinstance(kept[3], str) and len(kept[3]) == 64):  # a damaged or older entry is read again
            return kept[3]
        digest = sha256_file(path)
        self.entries[key] = [*stamp, digest]
        self.changed = True
        return digest

    def warm(self, paths, workers: Optional[int] = None, done: Optional[Callable[[str], None]] = None) -> None:
        """Digest ``paths`` (each once) on several threads ahead of ``sha256`` calls that
        then find them known: hashlib lets go of the GIL while it hashes, so a screen of
        many pairs reads its model files in parallel, not one after another. A file that
        cannot be read is left for the caller to meet. ``done(path)``: called after each
        (a progress bar)."""
        from concurrent.futures import ThreadPoolExecutor

        def one(path) -> None:
            try:
                self.sha256(path)
            except OSError:
                pass
            if done is not None:
                done(path)

        unique = list(dict.fromkeys(os.path.abspath(p) for p in paths))
        workers = workers or min(8, os.cpu_count() or 1)
        if len(unique) < 2 or workers < 2:
            for path in unique:
                one(path)
            return
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cgidm-digest") as pool:
            list(pool.map(one, unique))

    def save(self) -> None:
        """Write the cache, without the entries of files that are gone (a cache kept across
        many resumes would otherwise grow with every file ever renamed); one that cannot be
        written costs only time at the next resume."""
        if self.changed:
            self.entries = {k: v for k, v in self.entries.items() if os.path.lexists(k)}
            try:
                atomic_write_text(self.path, json.dumps(self.entries, sort_keys=True) + "\n")
            except OutputError as e:
                log.warning("%s (file digests are read again at the next resume)", e)
            self.changed = False


def source(path: Path) -> Optional[dict]:
    """What a resume checks to tell that an input is the file a row was made from: its
    size, modification and change times, and its contents' digest."""
    try:
        st = Path(path).stat()
        return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
                "sha256": sha256_file(path)}
    except OSError:
        return {"missing": True}  # not there or not readable: a resume tries it again once it is


def same_source(recorded, path: Path, digests: Optional[DigestCache] = None) -> bool:
    """Whether ``path`` is the file a row recorded (``source``): the same size and times
    (the change time too where recorded: a file saved over with its old size and time put
    back by ``cp -p`` or ``touch -d`` has a new one), or else the same contents (a copy of
    the folder that did not keep the times is the same file; one saved over it is not). A
    row without a record is taken as the same."""
    if not isinstance(recorded, dict):
        return True
    if recorded.get("missing"):  # still missing, unreadable or not a file (a pipe): the same
        return not (os.access(path, os.R_OK) and os.path.isfile(path))
    try:
        st = Path(path).stat()
        if ((st.st_size, st.st_mtime_ns) == (recorded.get("bytes"), recorded.get("mtime_ns"))
                and recorded.get("ctime_ns", st.st_ctime_ns) == st.st_ctime_ns):
            return True
        if st.st_size != recorded.get("bytes"):
            return False
        return (digests.sha256(path) if digests is not None else sha256_file(path)) == recorded.get("sha256")
    except OSError:
        return True  # unreadable now: the run's loading says so


def remove_stale_temporaries(out: Path, folders: Sequence[Path] = ()) -> None:
    """Temporary files of a killed run (never renamed into place) in ``out``, the folders
    authenticate and screen write (triptychs, recovered images, evidence cards, shards) and ``folders``.
    Only called by the holder of the folder's lock, so no live run's temporaries are touched."""
    for folder in (out, out / "triptychs", out / "recovered", out / "evidence", out / SHARDS, *folders):
        for p in folder.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                p.unlink()


class OutputLock:
    """An exclusive lock on an output folder (``flock`` on ``OUT/.cgidm.lock``, released by
    the kernel when the process dies, so a killed run never leaves it held). A second run on
    the same folder says who holds it and stops."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK
        self.fd: Optional[int] = None

    def acquire(self) -> "OutputLock":
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:  # a folder that cannot be written: the output error every run reports
            raise OutputError(self.path.parent, e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise ValueError(f"{self.path.parent} is in use by another cgidm run ({holder}); "
                             "wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        """Unlock; the holder's line (pid, host name) is cleared, so a folder handed on
        does not carry it."""
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def out_folder(out: str, kind: str) -> Path:
    """``--out`` as a path, ``~`` expanded (a quoted ``"~/x"`` too); a file there, a broken link, a folder
    that cannot be written or one holding another command's run (``check_run_kind``): refused."""
    from cgidm.files import unwritable_reason

    path = Path(out).expanduser()
    if path.is_symlink() and not path.exists():
        raise ValueError(f"--out {out}: a link to {os.readlink(path)}, which does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    above = next((p for p in path.absolute().parents if p.exists()), path)  # where it would be made
    if not path.exists() and not (above.is_dir() and os.access(above, os.W_OK | os.X_OK)):
        raise ValueError(f"--out {out}: cannot be made in {above} ("
                         f"{unwritable_reason(above) if above.is_dir() else 'a file, not a folder'})")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):  # found before the models load, not after
        raise ValueError(f"--out {out}: this folder cannot be written to ({unwritable_reason(path)})")
    check_run_kind(path, kind)
    return path
