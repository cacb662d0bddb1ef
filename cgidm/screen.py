"""``screen``: the many-pair runner. Many images against one or many model pairs,
resumable, sharded across ``torchrun`` ranks, with a report (docs/architecture.md,
"Runners").

A manifest row names an image, an optional label and the model pair to test it against
(``cgidm.manifest``). Each image gets a stable id, ``<pair key>/<path>``, and every random
draw of it is keyed by that id, so a resumed, re-batched or sharded run scores every image
as one uninterrupted run does, in both noise modes. Finished images are appended one
complete line at a time to ``OUT/results.jsonl`` (``OUT/shards/rank-<r>.jsonl`` under
torchrun, merged by rank 0 at the end); a restarted run skips the ids already there.
"""
from __future__ import annotations

import collections
import gc
import hashlib
import itertools
import json
import logging
import os
import sys
import time
import types
from pathlib import Path
from typing import Optional, Sequence

from cgidm import provenance
from cgidm.images import refuse_images_inside
from cgidm.batches import PairStats, RowWriter, run_pair
from cgidm.config import EMBED_FIELDS, AuthConfig, check_impl, dtype_name, library_runtime
from cgidm.distributed import all_gather, dist_info
from cgidm.files import (OutputError, append_jsonl, atomic_write_json, atomic_write_jsonl, counted, json_values,
                         output_dirs, shown)
from cgidm.manifest import Entry, model_files
from cgidm.models import ModelLoadError
from cgidm.pipeline import resolve_prompt
from cgidm.progress import LineCounter, Progress, first_steps_estimate
from cgidm.report import write_report
from cgidm.resume import (
    REMOVED, RESULTS, SHARDS, DigestCache, OutputLock, check_run_kind, check_state, clear_retry, done_rows, drop_rows,
    read_jsonl, remove_stale_temporaries, repair_jsonl, result_files, same_source, settings_of,
)
from cgidm.rows import error_row
from cgidm.evidence import EVIDENCE, drop_card, write_cards
from cgidm.rows import RECOVERED, TRIPTYCHS
from cgidm.embed_scores import add_embedding_scores, check_embedder, drop_stale_official
from cgidm.summary import VERDICT_FIELDS, runtime, summarize_pairs, timing

log = logging.getLogger(__name__)


def _counts(todo: Sequence[Entry], entries: Sequence[Entry]) -> dict[str, tuple[int, int]]:
    """``{pair key: (images left to screen, images listed)}``."""
    left = collections.Counter(e.pair.key for e in todo)
    return {k: (left[k], n) for k, n in collections.Counter(e.pair.key for e in entries).items()}


def _screen_rank(mine: Sequence[Entry], out: Path, sink: Path, cfg: AuthConfig, *, device, dtype,
                 allow_pickle: bool, allow_partial_lora: bool, prefetch_depth: int,
                 progress: Progress, stamps: Optional[dict[str, str]] = None,
                 counts: Optional[dict[str, tuple[int, int]]] = None) -> dict:
    """Screen this rank's entries, pair by pair; returns its timings. Each row records its
    image file (``resume.source``) and its pair's model files (``stamps``, by pair key),
    so that a resume can tell a file saved over at the same path. ``counts``: each pair's
    images left to screen on every rank and in the manifest (said in the pair's line)."""
    import torch

    stats = PairStats()
    load_s = 0.0
    prompts: dict[str, str] = {}
    models: dict[str, dict] = {}  # what loading each pair found (family, format, LoRA match)
    writer = RowWriter(threaded=prefetch_depth > 0)
    # on a CPU, one line from the first batch's steps: how long this rank's images will take
    batches = sum(-(-len(list(g)) // cfg.batch_size) for _, g in itertools.groupby(mine, key=lambda e: e.pair.key))
    first = (first_steps_estimate(cfg.pgd.steps, len(mine), batches, cfg.batch_size,
                                  lambda text: progress.say(f"{progress.label}: {text}" if progress.label else text),
                                  padded=cfg.engine == "engine", baselines=bool(cfg.baseline_names))
             if not progress.bar.disable and torch.device(device).type == "cpu" else None)

    def emit(row):
        if stamps and row.get("pair") in stamps:
            row["pair_files"] = stamps[row["pair"]]
        append_jsonl(sink, row)
        stats.images += 1
        progress.row_done(row)

    def fail_all(group, reason):
        def job():
            for e in group:
                emit(error_row(e, reason))

        writer.submit(job)

    try:
        for key, group in itertools.groupby(mine, key=lambda e: e.pair.key):
            group = list(group)
            spec = group[0].pair
            t0 = time.perf_counter()
            try:
                pair = spec.load(device, dtype, allow_pickle, allow_partial_lora)
                pair_cfg, where = resolve_prompt(cfg, pair)
                prompts[key] = {"prompt": pair_cfg.prompt, "from": where}
                models[key] = {k: pair.info[k] for k in LOADED_FACTS if k in pair.info}
                todo, total = (counts or {}).get(key, (len(group), len(group)))
                left = (f"{todo} of {total} images to screen" if todo != total else counted(total, "image")) + (
                    f" ({len(group)} on this rank)" if len(group) != todo else "")
                progress.say(f"pair {shown(key)}: {left}; {pair.info.get('family')}; "
                             f"prompt {pair_cfg.prompt!r} ({shown(where)})")
            except (ModelLoadError, OSError, ValueError) as e:
                # the other pairs still run; --retry-failed takes these images again
                reason = "model pair failed to load: " + " ".join(str(e).split())
                log.error("%s: %s", key, reason)
                fail_all(group, reason)
                continue
            load_s += time.perf_counter() - t0
            run_pair(pair, group, pair_cfg, out, emit, writer, prefetch_depth=prefetch_depth, stats=stats,
                     step_callback=first)
            del pair
            # the pair's engines and closures refer to each other: only a collection frees
            # the UNets and graph pools before the next pair loads beside them
            gc.collect()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
    finally:
        writer.close()
    return {"images": stats.images, "engine_s": stats.engine_s, "load_s": load_s, "wait_s": stats.wait_s,
            "batch_retries": stats.retries, "low_memory_fallback": bool(stats.extra.get("low_memory_fallback")),
            "prompts": prompts, "models": models}


# the facts load_pair records that a screen keeps per pair (authenticate keeps the whole info)
LOADED_FACTS = ("family", "finetuned_format", "lora_match", "finetuned_uses_base", "same_as_base")


PREVIOUS = ".summary.previous.json"  # an earlier run's summary while this one runs


def _changed_files(out: Path, entries: Sequence[Entry], done: dict, gone: set,
                   rank: int) -> tuple[dict, set, dict]:
    """``(stamps, changed, files)``, decided on rank 0 and handed to every rank: each pair's
    model files stamp (``PairSpec.files_stamp``), the ids of finished rows whose image or
    model files were saved over since (rows from before these were recorded are taken as
    made from the files there now), and every pair's model files by digest
    (``provenance.record``, for the summary). Contents are read through ``OUT/.cgidm-digests.json``: again only
    where a file's size or time changed."""
    decided = None
    if rank == 0:
        try:
            digests = DigestCache(out)
            pairs = [e.pair for e in {e.pair.key: e for e in entries}.values()]
            digests.warm(f for pair in pairs for path in {pair.base, pair.finetuned, pair.lora} - {None}
                         for _, f in model_files(Path(path)))
            stamps = {pair.key: pair.files_stamp(digests.sha256) for pair in pairs}
            files = provenance.record((m for pair in pairs for m in provenance.pair_models(pair.info())),
                                      digests.sha256)
            changed = sorted(e.id for e in entries if e.id in done and e.id not in gone
                             and (not same_source(done[e.id].get("source"), e.path, digests)
                                  or done[e.id].get("pair_files", stamps[e.pair.key]) != stamps[e.pair.key]))
            digests.save()
            decided = (stamps, changed, files)
        except Exception as e:  # every rank must reach the gather, and then stop with it
            decided = f"{type(e).__name__}: {e}"
    decided = all_gather(decided)[0]
    if isinstance(decided, str):
        raise RuntimeError(f"rank 0 could not check the files of the finished rows: {decided}")
    stamps, changed, files = decided
    return stamps, set(changed), files


def _set_aside(out: Path, done: dict) -> None:
    """Before a resume writes its first row: the earlier run's summary and report no
    longer match ``results.jsonl``. The summary is set aside (its facts about the pairs
    are merged at the end, ``_previous``), the report and the evidence cards removed (the
    end draws those still flagged again), and the rows' verdicts taken out, in ``done`` and
    in the file: a run stopped before its end leaves none of them to be taken for its own."""
    if (out / "summary.json").exists():
        os.replace(out / "summary.json", out / PREVIOUS)
    (out / "report.html").unlink(missing_ok=True)
    for row in done.values():  # the cards the finished rows name, nothing else in the folder
        drop_card(out, row)
        for k in VERDICT_FIELDS:
            row.pop(k, None)
    judged = (*VERDICT_FIELDS, EVIDENCE)
    rows = read_jsonl(out / RESULTS)
    if any(k in r for r in rows for k in judged):  # judged against the earlier run's whole set
        atomic_write_jsonl(out / RESULTS, [{k: v for k, v in r.items() if k not in judged} for r in rows])


def _previous(out: Path) -> dict:
    """The dict entries of an earlier run's ``summary.json`` in ``out``, or the one set
    aside by ``_set_aside`` ({} when there is none)."""
    try:
        path = out / "summary.json"
        summary = json.loads((path if path.exists() else out / PREVIOUS).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in summary.items() if isinstance(v, dict)} if isinstance(summary, dict) else {}


def _lock(out: Path, rank: int, error: Optional[str] = None) -> Optional[OutputLock]:
    """Rank 0 holds the folder's lock for the whole run; every rank learns whether it got
    it, or rank 0's ``error`` (a reason found before it to stop: every rank stops with it)."""
    lock = None
    if rank == 0 and error is None:
        try:
            lock = OutputLock(out).acquire()
            check_run_kind(out, "screen")
        except (ValueError, OutputError) as e:  # every rank stops, not only rank 0
            error = str(e)
    errors = [e for e in all_gather(error) if e]
    if errors:
        if lock is not None:
            lock.release()
        raise ValueError(errors[0])
    return lock


def screen(
    entries: Sequence[Entry],
    out: str | Path,
    cfg: Optional[AuthConfig] = None,
    *,
    device="cpu",
    dtype=None,
    allow_pickle: bool = False,
    allow_partial_lora: bool = False,
    embedder=None,
    progress: bool = True,
    retry_failed: bool = False,
    prefetch_depth: int = 2,
    embedder_error: Optional[str] = None,
) -> Optional[dict]:
    """Screen ``entries`` into ``out``: skips the ids already finished there, shards the
    rest over the ranks of an initialised process group, and on rank 0 merges the rows and
    writes ``results.jsonl``, ``summary.json`` and ``report.html``. ``device``/``dtype``:
    this rank's, as ``config.resolve_runtime`` decided. Returns the summary on rank 0 and
    None on the other ranks. ``embedder`` (for an embedding metric's scores): rank 0's;
    the other ranks may pass None. ``embedder_error``: rank 0's reason it has none (a
    load that failed): every rank stops with it before any work."""
    import torch

    cfg = cfg or AuthConfig()
    if str(device) == "auto":  # as the CLI's default resolves it
        from cgidm.config import resolve_runtime

        device = resolve_runtime("auto", "fp32").device
    if not isinstance(cfg, AuthConfig):
        raise TypeError(f"cfg must be an AuthConfig, got {type(cfg).__name__}")
    # before any image: in the batch loop a device or step ops that cannot run would make
    # every image an error row, and an error row is final on a resume
    device = library_runtime(device, None)[0]
    check_impl(cfg.impl, device)
    t_start = time.perf_counter()
    out = Path(out).expanduser()
    rank, world = dist_info()
    unusable = None  # rank 0 merges and scores with the embedder; the other ranks need none
    if rank == 0:
        unusable = embedder_error
        try:
            check_embedder(cfg, embedder)
        except ValueError as e:
            unusable = unusable or str(e)
    if unusable is not None and world == 1:  # alone: stop before the folder is made
        raise ValueError(unusable)
    entries = sorted(entries, key=lambda e: e.id)
    if not entries:
        raise ValueError("no images to screen")
    if len({e.id for e in entries}) != len(entries):
        raise ValueError("image ids must be unique (read_manifest drops duplicates)")
    # a CSV or JSON manifest may name images in --out (README), but not the run's own outputs
    refuse_images_inside(out, [e.path for e in entries], only=(TRIPTYCHS, RECOVERED, EVIDENCE, SHARDS))
    output_dirs(out)
    lock = _lock(out, rank, unusable)  # before anything is made inside: a held folder is left as it is
    try:
        output_dirs(out, TRIPTYCHS, RECOVERED, *((SHARDS,) if world > 1 else ()))
        ids = [e.id for e in entries]
        changes = check_state(out, settings_of(cfg, dtype_name(dtype or torch.float32)), ids, rank)
        if all_gather(bool(changes.get("retry")))[0]:  # rank 0's reading: every rank the same todo
            if rank == 0:
                log.warning("%s: the earlier run scored no image under its settings (no row, or every row an "
                            "error); the settings given now replace them and its failed images are screened again",
                            out)
            retry_failed = True
        if rank == 0 and (changes["added"] or changes["removed"]):
            log.warning("the list of images changed since the last run in %s: %d added, %d removed%s", out,
                        len(changes["added"]), len(changes["removed"]),
                        f" (their rows move to {REMOVED})" if changes["removed"] else "")
        sink = out / RESULTS if world == 1 else out / SHARDS / f"rank-{rank}.jsonl"
        repair_jsonl(sink)
        if rank == 0:
            remove_stale_temporaries(out)

        done = done_rows(out)
        # a scored row whose triptych or recovered image has gone is screened again (the same
        # keyed draws: the same files and scores)
        gone = {e.id for e in entries if e.id in done and "error" not in done[e.id]
                and any(isinstance(done[e.id].get(k), str) and not (out / done[e.id][k]).is_file()
                        for k in ("triptych", "recovered"))}
        stamps, changed, files = _changed_files(out, entries, done, gone, rank)
        gone |= changed
        todo = [e for e in entries if e.id not in done or e.id in gone or (retry_failed and "error" in done[e.id])]
        if rank == 0 and changed:
            log.warning("%s: %d finished images have another image or model file at their path since; screening "
                        "them again", out, len(changed))
        if rank == 0 and gone - changed:
            log.warning("%s: %d scored images have lost their triptych or recovered image; screening them again",
                        out, len(gone - changed))
        vanished = [] if rank else [e.id for e in entries if e.id in done and e.id not in gone
                                    and "error" not in done[e.id] and not os.path.lexists(e.path)]
        if vanished:  # a row is kept (it is the evidence of when it was there), but not without a word
            log.warning("%s: %d scored images are no longer at their path (first: %s); their rows are kept from when "
                        "they were screened: take them out of the manifest to drop the rows", out, len(vanished),
                        shown(vanished[0]))
        digest = hashlib.sha256("\n".join(e.id for e in todo).encode("utf-8", "surrogateescape")).hexdigest()
        if len(set(all_gather(digest))) > 1:
            raise RuntimeError(f"ranks see different finished rows in {out}: --out must be a folder every "
                               "rank reads and writes (a shared filesystem across machines)")
        if rank == 0 and todo:
            _set_aside(out, done)
        if gone:  # screened again: the old rows go (each rank its own shard; rank 0 the rest)
            own = [sink] if world > 1 else []
            if rank == 0:
                own = result_files(out) if world == 1 else [
                    out / RESULTS, *own, *(p for p in result_files(out)[1:] if int(p.stem.split("-")[-1]) >= world)]
            drop_rows(own, gone)
            all_gather(None)  # every rank's shard is clean before rank 0 counts its lines
        # counted before any rank starts writing (for rank 0's total bar under torchrun): the
        # bar counts the lines added after this, reading only the bytes added (``LineCounter``)
        lines = LineCounter()
        if rank == 0 and world > 1 and progress:
            for p in (out / SHARDS).glob("rank-*.jsonl"):
                lines.count(p)
        mine = todo[rank::world]
        if rank == 0 and len(todo) < len(entries):
            failed = sum(1 for e in entries if e.id not in gone and "error" in done.get(e.id, {}))
            left = (f" ({failed} of them failed: --retry-failed screens those again)"
                    if failed and not retry_failed else "")
            log.warning("resuming in %s: %d of %d images already done%s, %d to screen",
                        out, len(entries) - len(todo), len(entries), left, len(todo))

        bars = Progress(out, len(mine), len(entries), len(entries) - len(todo), rank, world, progress,
                        lines)
        failure: Optional[BaseException] = None
        try:
            try:
                stats = _screen_rank(mine, out, sink, cfg, device=device, dtype=dtype, allow_pickle=allow_pickle,
                                     allow_partial_lora=allow_partial_lora, prefetch_depth=prefetch_depth,
                                     progress=bars, stamps=stamps,
                                     counts=_counts(todo, entries))
                stats.update(rank=rank, wall_s=time.perf_counter() - t_start)
            except Exception as e:
                if world == 1:
                    raise
                # every rank must reach the gather below: a rank that left for the group's
                # teardown while the others gather would hang them until --dist-timeout
                failure, stats = e, {"error": f"rank {rank}: {type(e).__name__}: {e}"}
            # also the barrier: every rank's shard is complete once this returns
            gathered = all_gather(stats)
        finally:
            bars.close()
        if failure is not None:
            raise failure
        errors = [g["error"] for g in gathered if "error" in g]
        if errors:
            raise RuntimeError(f"another rank failed, so this one stops too ({errors[0]})")
        if rank != 0:
            return None
        return _finish(out, entries, cfg, gathered, embedder, runtime(device, dtype or torch.float32), files)
    finally:
        if lock is not None:
            lock.release()


def _finish(out: Path, entries: Sequence[Entry], cfg: AuthConfig, gathered: list[dict], embedder=None,
            run_on: Optional[dict] = None, files: Optional[dict] = None) -> dict:
    """Rank 0: merge every rank's rows into ``results.jsonl`` (rows of images no longer
    listed move to ``results.removed.jsonl``), then the summary (with ``files``: the
    model files by digest) and the report."""
    t0 = time.perf_counter()
    rows = done_rows(out)
    missing = [e.id for e in entries if e.id not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} images have no row after the run (first: {missing[0]})")
    # also when nothing was screened (a resume with another --level): a stop from here on
    # leaves no summary, report, card or verdict of the earlier run beside the rows
    _set_aside(out, rows)
    listed = {e.id for e in entries}
    removed = [rows[k] for k in sorted(rows) if k not in listed]
    for r in removed:  # kept without a verdict, so without a card
        drop_card(out, r)
    before = {r["id"]: r for r in read_jsonl(out / REMOVED)}
    if removed or listed.intersection(before):
        # an image listed again has its row in results.jsonl only
        kept = {k: r for k, r in before.items() if k not in listed} | {r["id"]: r for r in removed}
        atomic_write_jsonl(out / REMOVED, (kept[k] for k in sorted(kept)))
    run_rows = [rows[e.id] for e in entries]
    # a label changes no score: a manifest corrected since the last run relabels its rows
    relabelled = [e for e in entries if rows[e.id].get("label") != e.label]
    if relabelled:
        first = relabelled[0]
        log.warning("%d rows take the manifest's new label (first: %s, %s -> %s)", len(relabelled), first.id,
                    rows[first.id].get("label"), first.label)
        for e in entries:
            rows[e.id]["label"] = e.label
    # the validator's score is a max over the image's (pair, label) folder: stale where the
    # folder changed (scored again below with --embedder)
    stale = drop_stale_official(run_rows)
    if stale and embedder is None:
        log.warning("%d rows' official_cos dropped: their folder's images changed since it was computed, or "
                    "the row does not record them (an earlier version's); give --embedder to score them again", stale)
    infos = {e.pair.key: e.pair.info() for e in entries}
    previous = _previous(out)
    # what loading found, for the pairs loaded now and those an earlier run loaded
    facts = {k: {f: v[f] for f in LOADED_FACTS if f in v} for k, v in previous.get("pair_models", {}).items()
             if k in infos and isinstance(v, dict)}
    facts.update({k: v for s in gathered for k, v in s.get("models", {}).items()})
    for k, v in facts.items():
        infos[k].update(v)
    # the prompts of the pairs loaded now, over those an earlier run of this folder resolved
    # (a resume loads only the pairs with images left)
    cfg_prompts, old_embedder = previous.get("prompts", {}), previous.get("embedder")
    cfg_prompts = {k: v for k, v in cfg_prompts.items() if k in infos and isinstance(v, dict)}
    cfg_prompts.update({k: v for s in gathered for k, v in s.get("prompts", {}).items()})
    emb_info = add_embedding_scores(run_rows, embedder, out) if embedder is not None else None
    if emb_info is None and any(f in r for r in run_rows for f in EMBED_FIELDS) and isinstance(old_embedder, dict):
        emb_info = old_embedder  # the scores kept were the earlier run's embedder's
    summary = summarize_pairs(run_rows, infos, cfg, emb_info)
    if run_on:
        summary["runtime"] = run_on
    if cfg_prompts:
        summary["prompts"] = cfg_prompts
    if facts:
        summary["pair_models"] = facts
    if files:
        summary["model_files"] = files
        provenance.check_unchanged(summary)
    # a card for each flagged image, none left for those no longer flagged (evidence.py)
    cards = write_cards(out, run_rows, summary)
    if cards:
        summary["evidence_cards"] = cards
    # one row per id, sorted: the same file whatever the ranks, batches or restarts
    atomic_write_jsonl(out / RESULTS, run_rows)
    for p in result_files(out)[1:]:
        p.unlink()
    summary["timing"] = timing(gathered, time.perf_counter() - t0)
    summary = json_values(summary)  # the summary returned is the one written: null, not inf
    atomic_write_json(out / "summary.json", summary)
    (out / PREVIOUS).unlink(missing_ok=True)
    clear_retry(out)
    summary["report"] = str(write_report(out, run_rows, summary))
    return summary


class _CallableModule(types.ModuleType):
    """``cgidm.screen`` is both this module and, as the package's public name, the
    function ``screen``: Python binds the imported submodule to the package's attribute,
    so after any import of ``cgidm.screen`` the attribute is the module. Calling the module
    calls the function, whichever the attribute holds."""

    def __call__(self, *args, **kwargs):
        return screen(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
