"""Screening at scale: many images against one or many model pairs, resumable, sharded
across ``torchrun`` ranks, with a report.

A manifest row names an image, an optional label and the model pair to test it against.
Each image gets a stable id, ``<pair key>/<path>``, and its seeds come from that id
(``api.image_seed``): a resumed or sharded run scores every image as one uninterrupted
run does. Finished images are appended one complete line at a time to
``OUT/results.jsonl`` (``OUT/shards/rank-<r>.jsonl`` under torchrun, merged by rank 0 at
the end); a restarted run skips the ids already there.

Only the standard library is imported here at module level: ``cgidm.cli`` imports this
module, and ``cgidm --help`` should not pay for torch.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import logging
import math
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Iterator, Optional, Sequence

from cgidm.files import append_jsonl, atomic_save_image, atomic_write_text, output_path

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
SHARDS = "shards"
STATE = "screen.json"
# Settings that decide a score: a resume with other values would mix two experiments.
# batch_size and impl change only the last bits; metric and alpha only the summary.
SCORE_SETTINGS = ("prompt", "pgd", "blocks_per_side", "pass_rate", "seed")
VERDICT_FIELDS = ("p_value", "z", "verdict")
FOLDER_LABELS = {"member": "member", "members": "member", "holdout": "holdout", "holdouts": "holdout",
                 "control": "control", "controls": "control"}
PAIR_SUMMARY_FIELDS = ("images", "scored", "failed", "auc", "accuracy", "tpr_at_1fpr", "threshold",
                       "controls", "flagged", "calibration_warning", "calibration_error")


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class PairSpec:
    """The models one image is tested against; paths are absolute."""

    base: str
    finetuned: Optional[str] = None
    lora: Optional[str] = None
    lora_scale: float = 1.0

    @property
    def key(self) -> str:
        """Readable and unique: the suspect model's file name and a hash of the whole spec."""
        name = Path(self.lora or self.finetuned or self.base).name
        stem = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in name)[:40]
        blob = json.dumps([self.base, self.finetuned, self.lora, self.lora_scale])
        return f"{stem.strip('.') or 'pair'}-{hashlib.sha256(blob.encode()).hexdigest()[:8]}"

    def info(self) -> dict:
        d = {"base": self.base}
        if self.finetuned:
            d["finetuned"] = self.finetuned
        if self.lora:
            d["lora"] = self.lora
            d["lora_scale"] = self.lora_scale
        return d

    def load(self, device, dtype=None, allow_pickle: bool = False):
        from cgidm.models import load_pair

        return load_pair(self.base, self.finetuned, self.lora, allow_pickle=allow_pickle,
                         lora_scale=self.lora_scale, device=device, dtype=dtype)


@dataclass(frozen=True)
class Entry:
    """One image to screen against one pair."""

    id: str
    path: Path
    label: Optional[str]
    pair: PairSpec


def _resolve(value: Optional[str], root: Path) -> Optional[str]:
    if value is None or not str(value).strip():
        return None
    p = Path(str(value).strip()).expanduser()
    # abspath, not resolve: an image reached through a symlinked folder keeps its name
    return os.path.abspath(p if p.is_absolute() else root / p)


def _relative_name(path: Path, root: Path) -> str:
    """The image part of an id: relative to the manifest's folder when inside it, so that
    the whole tree can move without changing ids."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _read_records(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` of a CSV (with a header) or JSON Lines manifest."""
    text = path.read_text(encoding="utf-8-sig")
    jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or (
        path.suffix.lower() != ".csv" and text.lstrip().startswith("{"))
    records = []
    if jsonl:
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: not a JSON object ({e})") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{n}: not a JSON object")
            records.append((n, {str(k).strip().lower(): v for k, v in rec.items()}))
        return records
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise ValueError(f"{path}: empty manifest (a CSV needs a header line: image,label,base,finetuned,lora)")
    for rec in reader:
        rec = {str(k).strip().lower(): v for k, v in rec.items() if k is not None}
        if any(v not in (None, "") for v in rec.values()):
            records.append((reader.line_num, rec))
    return records


def _cell(rec: dict, *names: str) -> Optional[str]:
    for name in names:
        v = rec.get(name)
        if v is not None and str(v).strip():
            return str(v).strip()
    return None


def _image_files(folder: Path) -> list[Path]:
    from cgidm.images import IMAGE_SUFFIXES

    # hidden files and folders: macOS resource forks, cgidm's own temporary files
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def read_manifest(
    source: str | Path,
    base: Optional[str] = None,
    finetuned: Optional[str] = None,
    lora: Optional[str] = None,
    lora_scale: float = 1.0,
) -> list[Entry]:
    """Entries of a manifest (CSV or JSONL: ``image``, ``label``, ``base``, ``finetuned``,
    ``lora``, ``lora_scale``; other columns are ignored) or of an image folder, sorted by id.

    ``base``/``finetuned``/``lora`` fill empty cells (a folder takes them for every image).
    Relative paths in a manifest are relative to the manifest's folder. In a folder, images
    under ``members/``, ``holdouts/`` or ``controls/`` get that label.
    """
    from cgidm.api import LABELS

    source = Path(source).expanduser()
    cwd = Path.cwd()
    defaults = {"base": _resolve(base, cwd), "finetuned": _resolve(finetuned, cwd), "lora": _resolve(lora, cwd)}
    if source.is_dir():
        root = Path(os.path.abspath(source))
        files = _image_files(root)
        if not files:
            raise FileNotFoundError(f"no images in {source}")
        records = [(0, {"image": str(p), "label": FOLDER_LABELS.get(p.relative_to(root).parts[0])
                        if len(p.relative_to(root).parts) > 1 else None}) for p in files]
        where = str(source)
    elif source.is_file():
        root = Path(os.path.abspath(source)).parent
        records = _read_records(source)
        where = str(source)
    else:
        raise FileNotFoundError(f"manifest not found: {source}")
    if not records:
        raise ValueError(f"{where}: no images listed")

    entries: dict[str, Entry] = {}
    specs: dict[PairSpec, PairSpec] = {}
    for n, rec in records:
        at = f"{where}:{n}" if n else where
        image = _cell(rec, "image", "path")
        if image is None:
            raise ValueError(f"{at}: no image (columns: image,label,base,finetuned,lora)")
        label = _cell(rec, "label")
        label = label.lower() if label else None
        if label is not None and label not in LABELS:
            raise ValueError(f"{at}: label must be one of {', '.join(LABELS)} or empty, got {label!r}")
        models = {k: _resolve(_cell(rec, k), root) or defaults[k] for k in ("base", "finetuned", "lora")}
        if models["base"] is None:
            raise ValueError(f"{at}: no base model (a 'base' column or --base)")
        if models["finetuned"] is None and models["lora"] is None:
            raise ValueError(f"{at}: no suspect model (a 'finetuned' or 'lora' column, or --finetuned/--lora)")
        for what, p in models.items():
            if p is not None and not Path(p).exists():
                raise FileNotFoundError(f"{at}: {what} model not found: {p}")
        scale_cell = _cell(rec, "lora_scale")
        try:
            scale = float(scale_cell) if scale_cell is not None else float(lora_scale)
        except ValueError as e:
            raise ValueError(f"{at}: lora_scale is not a number: {scale_cell!r}") from e
        spec = PairSpec(models["base"], models["finetuned"], models["lora"], scale if models["lora"] else 1.0)
        spec = specs.setdefault(spec, spec)
        path = Path(_resolve(image, root))
        entry = Entry(f"{spec.key}/{_relative_name(path, root)}", path, label, spec)
        old = entries.get(entry.id)
        if old is not None:
            if old.label != entry.label:
                raise ValueError(f"{at}: {image} is listed twice for the same models with labels "
                                 f"{old.label!r} and {entry.label!r}")
            log.warning("%s: %s is listed twice for the same models; screened once", at, image)
            continue
        entries[entry.id] = entry
    return [entries[k] for k in sorted(entries)]


def shard(entries: Sequence[Entry], rank: int, world: int) -> list[Entry]:
    """Rank ``rank``'s share: every ``world``-th entry of the id-sorted list, so shares
    differ by at most one image and every rank sees every pair's ids in the same order."""
    return sorted(entries, key=lambda e: e.id)[rank::world]


# --------------------------------------------------------------------------- resume


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
            log.warning("%s:%d: not a JSON row, ignored (its image will be screened again)", path, n)
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
    """Every finished row in ``out`` (results file and rank shards), one per id; a scored
    row wins over an error row of the same id (a ``--retry-failed`` run appends it later)."""
    rows: dict[str, dict] = {}
    for path in result_files(Path(out)):
        for row in read_jsonl(path):
            old = rows.get(row["id"])
            if old is None or ("error" in old and "error" not in row):
                rows[row["id"]] = row
    return rows


def _check_settings(out: Path, cfg, rank: int) -> None:
    """Refuse to resume with settings that would give other scores."""
    now = {}
    for k, v in cfg.to_json().items():
        if k in SCORE_SETTINGS:
            now.update({f"{k}.{kk}": vv for kk, vv in v.items()} if isinstance(v, dict) else {k: v})
    now = json.loads(json.dumps(now))
    path = out / STATE
    if path.exists():
        try:
            before = json.loads(path.read_text()).get("settings")
        except ValueError:
            before = None
        if before is not None and before != now:
            diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
            changes = ", ".join(f"{k} {before.get(k)!r} there, {now.get(k)!r} now" for k in diff)
            raise ValueError(f"{out} holds a screen run with other settings ({changes}); "
                             "resume with the same settings or use another --out")
    if rank == 0 and not path.exists():
        atomic_write_text(path, json.dumps({"settings": now}, indent=2, sort_keys=True) + "\n")


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files of a killed run (never renamed into place)."""
    for folder in (out, out / "triptychs", out / SHARDS):
        for p in folder.glob(".*.tmp*"):
            with contextlib.suppress(OSError):
                p.unlink()


# --------------------------------------------------------------------------- distributed


def dist_info() -> tuple[int, int]:
    """``(rank, world size)``; ``(0, 1)`` without an initialised process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str, timeout_min: float = 120.0) -> tuple[str, bool]:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1): gloo on
    CPU, NCCL on GPUs, one GPU per local rank. Returns ``(device, started)``."""
    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return device, False
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    else:
        backend = "gloo"
    # ranks wait for each other only at the start and at the end; the end waits for the
    # slowest rank's last batch, minutes on a GPU and longer on CPU
    dist.init_process_group(backend, timeout=timedelta(minutes=timeout_min))
    return device, True


def _all_gather(obj) -> list:
    import torch.distributed as dist

    rank, world = dist_info()
    if world == 1:
        return [obj]
    got: list = [None] * world
    dist.all_gather_object(got, obj)
    return got


# --------------------------------------------------------------------------- the pipeline


@dataclass
class Loaded:
    """A batch ready for the engine: ``prep`` is None when no image of it could be read."""

    entries: list
    prep: object
    failed: list  # (entry, reason)
    notes: list  # per entry: what loading changed (upscaled, alpha flattened ...)


def _load_batch(pair, batch: Sequence[Entry], cfg, stream=None) -> Loaded:
    import torch

    from cgidm.api import prepare
    from cgidm.images import ImageError, load_image_with_notes

    ok, tensors, failed, notes = [], [], [], []
    for e in batch:
        try:
            x, note = load_image_with_notes(e.path, pair.resolution)
        except ImageError as err:
            failed.append((e, err.reason))
            continue
        tensors.append(x)
        notes.append(note)
        ok.append(e)
    prep = None
    if ok:
        if stream is None:
            prep = prepare(pair, torch.stack(tensors), [e.id for e in ok], cfg)
        else:
            # a side stream, so that the VAE encode runs beside the engine's kernels
            with torch.cuda.stream(stream):
                prep = prepare(pair, torch.stack(tensors), [e.id for e in ok], cfg)
            stream.synchronize()
    return Loaded(ok, prep, failed, notes)


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return True
        except queue.Full:
            continue
    return False


_END = object()


def prefetch(pair, batches: Sequence[Sequence[Entry]], cfg, depth: int = 2) -> Iterator[Loaded]:
    """Batches of ``pair``, read, resized and encoded by a background thread up to
    ``depth`` batches ahead of the consumer (``depth=0``: inline, no thread)."""
    import torch

    if depth <= 0:
        for b in batches:
            yield _load_batch(pair, b, cfg)
        return
    device = pair.device
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work():
        try:
            for b in batches:
                if not _put(q, _load_batch(pair, b, cfg, stream), stop):
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


def _finite_scores(sc: dict) -> dict:
    # NaN is not JSON that other tools read
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in sc.items()}


def _batch_job(pair, loaded: Loaded, result, recovered, embedder, out: Path, sink: Path, cfg, on_row):
    """The writer's job for one inverted batch: scores, triptychs, rows. It runs while the
    engine inverts the next batch; it only reads this batch's tensors."""

    def job():
        import torch

        from cgidm.api import score_batch, triptych

        prep = loaded.prep
        scores = score_batch(pair, prep, result, recovered, embedder)
        images, partials = prep.images.detach().float().cpu(), prep.partial_images.detach().float().cpu()
        recs = recovered.detach().float().cpu()
        finite = torch.isfinite(result.x_rec.detach().flatten(1)).all(1).tolist()
        for i, (e, sc) in enumerate(zip(loaded.entries, scores)):
            base = {"image": str(e.path), "id": e.id, "label": e.label, "pair": e.pair.key}
            if finite[i] and all(math.isfinite(v) for v in sc.values() if isinstance(v, float)):
                path = output_path(out / "triptychs", e.id)
                atomic_save_image(triptych(images[i], partials[i], recs[i]), path)
                row = {**base, "triptych": f"triptychs/{path.name}", "score": sc[cfg.metric], **sc}
            else:
                row = {**base, "error": "result is not finite", **_finite_scores(sc)}
            if loaded.notes[i]:
                row["notes"] = loaded.notes[i]
            append_jsonl(sink, row)
            on_row(row)

    return job


def _error_job(failed, sink: Path, on_row):
    """Rows of images that could not be screened: ``failed`` is ``[(entry, reason)]``."""

    def job():
        for e, reason in failed:
            row = {"image": str(e.path), "id": e.id, "label": e.label, "pair": e.pair.key, "error": reason}
            append_jsonl(sink, row)
            on_row(row)

    return job


class _Progress:
    """This rank's bar (images done, images/hour, ETA) and, on rank 0 of several, a
    total bar fed by counting the lines of every rank's shard."""

    def __init__(self, out: Path, mine: int, total: int, done_before: int, rank: int, world: int,
                 enabled: bool, shard_lines: dict) -> None:
        from tqdm.auto import tqdm

        tty = sys.stderr.isatty()
        # a log file gets a line every 30 s instead of a redraw every 0.1 s
        kw = dict(unit="img", disable=not enabled, mininterval=0.1 if tty else 30, dynamic_ncols=True)
        self.t0 = time.perf_counter()
        self.count = 0
        self.lock = threading.Lock()
        self.bar = tqdm(total=mine, desc=f"rank {rank}/{world}" if world > 1 else "images", position=0, **kw)
        self.total_bar = None
        self.stop = threading.Event()
        if world > 1 and rank == 0 and enabled:
            self.shards = out / SHARDS
            self.base = shard_lines
            self.done_before = done_before
            self.total_bar = tqdm(total=total, initial=done_before, desc="total", position=1, **kw)
            self.thread = threading.Thread(target=self._watch, name="cgidm-progress", daemon=True)
            self.thread.start()

    @staticmethod
    def _rate(n: int, t0: float) -> str:
        dt = time.perf_counter() - t0
        return f"{3600 * n / dt:,.0f} img/h" if dt > 0 and n else "- img/h"

    def row_done(self, row: dict) -> None:
        with self.lock:
            self.count += 1
            self.bar.update(1)
            self.bar.set_postfix_str(self._rate(self.count, self.t0), refresh=False)

    def _refresh_total(self) -> None:
        new = sum(max(0, _count_lines(p) - self.base.get(p, 0)) for p in self.shards.glob("rank-*.jsonl"))
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


def _count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def _screen_rank(mine: Sequence[Entry], out: Path, sink: Path, cfg, *, device, dtype, allow_pickle,
                 embedder, prefetch_depth: int, progress: _Progress) -> dict:
    """Screen this rank's entries, pair by pair; returns its timings."""
    import torch

    from cgidm.api import recover
    from cgidm.models import ModelLoadError

    stats = {"images": 0, "engine_s": 0.0, "load_s": 0.0, "wait_s": 0.0}
    writer = RowWriter(threaded=prefetch_depth > 0)

    def on_row(row):
        stats["images"] += 1
        progress.row_done(row)

    try:
        for key, group in itertools.groupby(mine, key=lambda e: e.pair.key):
            group = list(group)
            spec = group[0].pair
            t0 = time.perf_counter()
            try:
                pair = spec.load(device, dtype, allow_pickle)
            except (ModelLoadError, OSError, ValueError) as e:
                # the other pairs still run; --retry-failed takes these images again
                reason = "model pair failed to load: " + " ".join(str(e).split())
                log.error("%s: %s", key, reason)
                writer.submit(_error_job([(x, reason) for x in group], sink, on_row))
                continue
            stats["load_s"] += time.perf_counter() - t0
            batches = [group[i:i + cfg.batch_size] for i in range(0, len(group), cfg.batch_size)]
            with contextlib.closing(prefetch(pair, batches, cfg, prefetch_depth)) as loader:
                while True:
                    t0 = time.perf_counter()
                    loaded = next(loader, None)
                    stats["wait_s"] += time.perf_counter() - t0
                    if loaded is None:
                        break
                    if loaded.failed:
                        writer.submit(_error_job(loaded.failed, sink, on_row))
                    if loaded.prep is None:
                        continue
                    t0 = time.perf_counter()
                    result = recover(pair, loaded.prep, cfg)
                    if pair.device.type == "cuda":
                        torch.cuda.synchronize(pair.device)
                    stats["engine_s"] += time.perf_counter() - t0
                    recovered = pair.codec.decode(result.x_rec)
                    writer.submit(_batch_job(pair, loaded, result, recovered, embedder, out, sink, cfg, on_row))
            del pair
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
    finally:
        writer.close()
    return stats


def summarize_screen(rows: Sequence[dict], entries: Sequence[Entry], cfg) -> dict:
    """``api.summarize`` per pair (controls calibrate the images of their own pair), and
    over all pairs when there are several."""
    from cgidm.api import summarize

    specs = {e.pair.key: e.pair for e in entries}
    by_pair: dict[str, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    per = {key: summarize(prs, cfg, specs[key].info()) for key, prs in sorted(by_pair.items())}
    if len(per) == 1:
        summary = dict(next(iter(per.values())))
    else:
        # AUC over every pair's members and hold-outs; verdicts stay those of each pair
        summary = summarize([r for r in rows if r.get("label") != "control"], cfg)
        good = [r for r in rows if "error" not in r]
        summary.update(images=len(rows), scored=len(good), failed=len(rows) - len(good))
        if any("errors" in s for s in per.values()):
            summary["errors"] = {k: v for s in per.values() for k, v in s.get("errors", {}).items()}
        summary["models"] = {k: " ".join(f"{a}={b}" for a, b in specs[k].info().items()) for k in per}
        verdicts = {k: v for s in per.values() for k, v in s.get("verdicts", {}).items()}
        if verdicts:
            summary["verdicts"] = verdicts
            summary["flagged"] = sum(s.get("flagged", 0) for s in per.values())
            summary["controls"] = sum(s.get("controls", 0) for s in per.values())
        warnings = [f"{k}: {s['calibration_warning']}" for k, s in per.items() if s.get("calibration_warning")]
        if warnings:
            summary["calibration_warning"] = "; ".join(warnings)
    summary["pairs"] = {k: {**specs[k].info(), **{f: s[f] for f in PAIR_SUMMARY_FIELDS if f in s}}
                        for k, s in per.items()}
    return summary


def _timing(stats: list[dict], finalize_s: float = 0.0) -> dict:
    images = sum(s["images"] for s in stats)
    wall = max(s["wall_s"] for s in stats)
    busy = sum(s["wall_s"] for s in stats)
    load = sum(s["load_s"] for s in stats)
    return {
        "ranks": len(stats),
        "images": images,
        "wall_s": round(wall, 3),
        "images_per_hour": round(3600 * images / wall, 1) if wall > 0 else None,
        "engine_s": round(sum(s["engine_s"] for s in stats), 3),
        "load_s": round(load, 3),
        "wait_s": round(sum(s["wait_s"] for s in stats), 3),
        # time inside the inversion over each rank's wall time, model loading included
        "engine_busy": round(sum(s["engine_s"] for s in stats) / busy, 4) if busy > 0 else None,
        # the same without model loading (and the first import of diffusers it triggers):
        # what a long screen approaches, where each pair loads once for many images
        "engine_busy_after_load": round(sum(s["engine_s"] for s in stats) / (busy - load), 4)
        if busy - load > 0 else None,
        "finalize_s": round(finalize_s, 3),
        "per_rank": stats,
    }


def screen(
    entries: Sequence[Entry],
    out: str | Path,
    cfg=None,
    *,
    device: str = "cpu",
    dtype=None,
    allow_pickle: bool = False,
    embedder=None,
    progress: bool = True,
    retry_failed: bool = False,
    prefetch_depth: int = 2,
) -> Optional[dict]:
    """Screen ``entries`` into ``out``: skips the ids already finished there, shards the
    rest over the ranks of an initialised process group, and on rank 0 merges the rows and
    writes ``results.jsonl``, ``summary.json`` and ``report.html``. Returns the summary on
    rank 0 and None on the other ranks."""
    from cgidm.api import AuthConfig
    from cgidm.report import write_report

    cfg = cfg or AuthConfig()
    t_start = time.perf_counter()
    out = Path(out)
    rank, world = dist_info()
    entries = sorted(entries, key=lambda e: e.id)
    if not entries:
        raise ValueError("no images to screen")
    if len({e.id for e in entries}) != len(entries):
        raise ValueError("image ids must be unique (read_manifest drops duplicates)")
    (out / "triptychs").mkdir(parents=True, exist_ok=True)
    if world > 1:
        (out / SHARDS).mkdir(exist_ok=True)
    _check_settings(out, cfg, rank)
    sink = out / RESULTS if world == 1 else out / SHARDS / f"rank-{rank}.jsonl"
    repair_jsonl(sink)
    if rank == 0:
        _remove_stale_temporaries(out)

    done = done_rows(out)
    todo = [e for e in entries if e.id not in done or (retry_failed and "error" in done[e.id])]
    # counted before any rank can start writing: the total bar counts lines added after this
    shard_lines = {p: _count_lines(p) for p in (out / SHARDS).glob("rank-*.jsonl")} if rank == 0 else {}
    digest = hashlib.sha256("\n".join(e.id for e in todo).encode()).hexdigest()
    if len(set(_all_gather(digest))) > 1:
        raise RuntimeError(f"ranks see different finished rows in {out}: --out must be a folder every "
                           "rank reads and writes (a shared filesystem across machines)")
    mine = shard(todo, rank, world)
    if rank == 0 and len(todo) < len(entries):
        log.warning("resuming in %s: %d of %d images already done, %d to screen",
                    out, len(entries) - len(todo), len(entries), len(todo))

    bars = _Progress(out, len(mine), len(entries), len(entries) - len(todo), rank, world, progress,
                     shard_lines)
    try:
        stats = _screen_rank(mine, out, sink, cfg, device=device, dtype=dtype, allow_pickle=allow_pickle,
                             embedder=embedder, prefetch_depth=prefetch_depth, progress=bars)
        stats.update(rank=rank, wall_s=time.perf_counter() - t_start)
        # also the barrier: every rank's shard is complete once this returns
        gathered = _all_gather(stats)
    finally:
        bars.close()
    if rank != 0:
        return None

    t0 = time.perf_counter()
    rows = done_rows(out)
    missing = [e.id for e in entries if e.id not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no row after the run (first: {missing[0]})")
    for r in rows.values():
        for k in VERDICT_FIELDS:
            r.pop(k, None)
    run_rows = [rows[e.id] for e in entries]
    summary = summarize_screen(run_rows, entries, cfg)
    # one row per id, sorted: the same file whatever the ranks, batches or restarts
    atomic_write_text(out / RESULTS, "".join(json.dumps(rows[k], sort_keys=True) + "\n" for k in sorted(rows)))
    for p in result_files(out)[1:]:
        p.unlink()
    summary["timing"] = _timing(gathered, time.perf_counter() - t0)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    summary["report"] = str(write_report(out, run_rows, summary))
    return summary


# --------------------------------------------------------------------------- command line


def add_screen_parser(sub) -> None:
    from cgidm.cli import _pgd_args

    s = sub.add_parser(
        "screen", help="screen many images against one or many model pairs (resumable; torchrun for many GPUs)",
        description="Screen the images of a manifest (CSV or JSONL) or of a folder. Killed and started again "
                    "with the same command, it finishes the images not yet done. Under torchrun, the images "
                    "are sharded over the ranks.")
    s.add_argument("--manifest", required=True,
                   help="CSV or JSONL with columns image, label (member|holdout|control|empty), base, finetuned, "
                        "lora, lora_scale; or a folder of images (labels from members/ holdouts/ controls/ subfolders)")
    s.add_argument("--out", required=True, help="output folder (the same one to resume)")
    s.add_argument("--base", default=None, help="base model for rows without one (required with a folder)")
    s.add_argument("--finetuned", default=None, help="fine-tuned model for rows without one")
    s.add_argument("--lora", default=None, help="LoRA for rows without one")
    s.add_argument("--lora-scale", type=float, default=1.0)
    s.add_argument("--allow-pickle", action="store_true",
                   help="allow .ckpt/.bin/.pt files (loaded with torch.load(weights_only=True) only)")
    s.add_argument("--retry-failed", action="store_true", help="screen again the images whose row is an error")
    s.add_argument("--prefetch", type=int, default=2,
                   help="batches read and encoded ahead of the inversion (0: no background threads)")
    s.add_argument("--dist-timeout", type=float, default=120.0,
                   help="minutes ranks wait for each other under torchrun (default 120)")
    _pgd_args(s, steps_default=1000)


def cmd_screen(args) -> int:
    import torch
    import torch.distributed as dist

    from cgidm.cli import EXIT_OK, EXIT_SOME_FAILED, _config, _print_summary
    from cgidm.score import Embedder

    cfg = _config(args, {})
    if args.prefetch < 0:
        raise ValueError("--prefetch must be >= 0")
    entries = read_manifest(args.manifest, args.base, args.finetuned, args.lora, args.lora_scale)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if cfg.metric == "embed_cos" and not args.embedder:
        raise ValueError("--metric embed_cos needs --embedder DIR")
    device, started = init_distributed(args.device, args.dist_timeout)
    try:
        dtype = torch.float16 if device.startswith("cuda") else None
        embedder = Embedder(args.embedder, device) if args.embedder else None
        summary = screen(entries, args.out, cfg, device=device, dtype=dtype, allow_pickle=args.allow_pickle,
                         embedder=embedder, progress=not args.quiet, retry_failed=args.retry_failed,
                         prefetch_depth=args.prefetch)
    finally:
        if started:
            dist.destroy_process_group()
    if summary is None:
        return EXIT_OK
    _print_summary(summary)
    t = summary["timing"]
    if t["images"]:
        print(f"this run: {t['images']} images on {t['ranks']} rank(s) in {t['wall_s']:.1f} s, "
              f"{t['images_per_hour']:,.0f} images/hour, engine busy {100 * t['engine_busy']:.0f} % "
              f"({100 * (t['engine_busy_after_load'] or 0):.0f} % after loading the models)")
    return EXIT_SOME_FAILED if summary["failed"] else EXIT_OK
