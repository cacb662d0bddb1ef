"""``authenticate``: the one-pair runner (``cgidm authenticate`` and ``cgidm demo``).

load -> prepare (encode + mask) -> invert -> score -> rows/summary -> report; the stages
live in their own modules (docs/architecture.md) and ``cgidm.screen`` is the many-pair
runner over the same batch loop. The names researchers use are re-exported here:
``prepare``, ``recover``, ``collect_items``, ``ImageItem``, ``AuthConfig``.
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from cgidm.batches import RowWriter, run_pair
from cgidm.config import AuthConfig, PGDConfig, check_impl, check_t_max, dtype_name  # noqa: F401 (re-exported)
from cgidm.files import (OutputError, append_jsonl, atomic_write_json, atomic_write_jsonl, counted, json_values,
                         output_dirs)
from cgidm.images import refuse_images_inside
from cgidm.manifest import ImageItem, check_items, collect_items  # noqa: F401 (re-exported)
from cgidm.pipeline import Prepared, prepare, recover, resolve_prompt  # noqa: F401 (re-exported)
from cgidm.progress import bar_options, first_steps_estimate
from cgidm.provenance import check_unchanged, model_digests, pair_models
from cgidm.report import write_report
from cgidm import auth_resume
from cgidm.auth_resume import model_stamp
from cgidm.resume import OutputLock, check_run_kind, read_jsonl, remove_stale_temporaries, settings_of
from cgidm.evidence import drop_card, write_cards
from cgidm.rows import RECOVERED, TRIPTYCHS, own_files
from cgidm.embed_scores import add_embedding_scores, check_embedder
from cgidm.summary import runtime, summarize

__all__ = ["AuthConfig", "PGDConfig", "ImageItem", "collect_items", "Prepared", "prepare", "recover", "authenticate"]

log = logging.getLogger(__name__)

RESULTS = "results.jsonl"
OUTPUTS = ("summary.json", "report.html")


def _clear_previous(out: Path) -> None:
    """Outputs of an earlier run into ``out`` that this run will write anew: the rows, the
    summary, the report, and the triptychs and evidence cards of those rows. Nothing else
    is touched."""
    results = out / RESULTS
    cards = 0
    for row in read_jsonl(results):
        for path in own_files(out, row):
            path.unlink(missing_ok=True)
        cards += drop_card(out, row)  # by its id: a run killed before its rows named their cards leaves none
    if cards:  # evidence someone may have meant to keep: said, not gone without a word
        log.warning("%s: the earlier run's %s removed: a new authenticate run into the same --out replaces the "
                    "earlier one (another --out keeps both)", out, counted(cards, "evidence card"))
    for name in (RESULTS, *OUTPUTS):
        (out / name).unlink(missing_ok=True)
    remove_stale_temporaries(out)  # a killed run's half-written files


def authenticate(
    pair,
    items: Sequence[ImageItem],
    out: str | Path,
    cfg: AuthConfig = AuthConfig(),
    embedder=None,
    progress: bool = True,
    prefetch_depth: int = 2,
    prompt_from: str | None = None,
    hash_models: bool = False,
    model_files: Optional[dict] = None,
    resume: bool = False,
) -> dict:
    """Authenticate images against a model pair; writes ``out/results.jsonl``,
    ``out/triptychs/*.png``, ``out/summary.json`` and ``out/report.html``. With
    ``hash_models`` the summary names every model file read by its SHA-256 (``provenance``),
    hashed when the run starts; ``model_files``: such a record made before the pair was
    loaded (``provenance.model_digests``, what the CLI does), so that it is of the bytes
    loaded: a file saved over since is named at the end (``model_files_changed``).
    Returns the summary. Raises ``OutputError`` when an output cannot be written; the
    rows finished before it stay complete in ``results.jsonl``. Without ``cfg.prompt`` the
    checkpoint's instance prompt is used (``pipeline.resolve_prompt``); ``prompt_from``
    records where a given prompt came from. With ``resume`` a stopped run in ``out`` goes on:
    its finished rows are kept where the settings and model files are the same
    (``auth_resume.plan``; ``ValueError`` where they are not); without it, an earlier run's
    outputs are replaced."""
    from tqdm.auto import tqdm

    if not isinstance(cfg, AuthConfig):
        raise TypeError(f"cfg must be an AuthConfig, got {type(cfg).__name__}")
    if not isinstance(getattr(pair, "device", None), torch.device):  # a path, or anything but a loaded pair
        raise TypeError(f"pair: a loaded model pair (cgidm.load_pair(base, finetuned)), got {type(pair).__name__}"
                        + (f" {str(pair)!r}" if isinstance(pair, (str, Path)) else ""))
    check_impl(cfg.impl, pair.device)  # before any image: in the batch loop each would be an error row
    out = Path(out).expanduser()
    if isinstance(items, (str, Path)):
        raise TypeError(f"items: a list of ImageItem, got the path {str(items)!r} (collect_items(folder) lists a "
                        "folder's images)")
    if isinstance(items, ImageItem):
        raise TypeError("items: a list of ImageItem, got one ImageItem: wrap it in a list")
    items = list(items)
    if not items:
        raise ValueError("no images to authenticate")
    check_items(items)
    refuse_images_inside(out, [it.path for it in items])
    check_embedder(cfg, embedder)
    check_t_max(cfg.pgd.t_max, len(pair.abar))
    cfg, found_from = resolve_prompt(cfg, pair)
    prompt_from = prompt_from or found_from
    output_dirs(out)
    with OutputLock(out):  # taken before anything is made inside: a held folder is left as it is
        check_run_kind(out, "authenticate")
        # before the previous run's outputs go (a stop while hashing leaves them) and the run
        files = model_files if model_files is not None else (
            model_digests(pair_models(pair.info), out, progress) if hash_models else None)
        settings = auth_resume.run_settings(settings_of(cfg, dtype_name(next(pair.unet_ft.parameters()).dtype)),
                                            pair.info)
        stamp = model_stamp(pair.info, files)
        found = resume and (out / auth_resume.STATE).is_file()
        kept, todo = auth_resume.plan(out, items, settings, stamp) if resume else ([], items)
        output_dirs(out, TRIPTYCHS, RECOVERED)  # a refused resume makes nothing
        try:
            if resume:
                auth_resume.set_aside(out, kept)
                remove_stale_temporaries(out)
            else:
                _clear_previous(out)
            auth_resume.write_state(out, settings, stamp)
        except OSError as e:
            raise OutputError(out, e) from e
        if resume:  # said with -q too: a resume into the wrong folder starts afresh
            print(f"resuming: {counted(len(kept), 'finished image')} kept, {len(todo)} to authenticate" if found
                  else f"resuming: no stopped run in {out}; {counted(len(todo), 'image')} to authenticate", flush=True)
        results = out / RESULTS
        rows: list[dict] = list(kept)
        every = bar_options()  # in a log file (not a terminal) a line every 30 s instead of a redraw
        bar = tqdm(total=len(items), initial=len(rows), desc="images", unit="img", disable=not progress, **every)

        def emit(row: dict) -> None:
            try:
                append_jsonl(results, row)
            except OutputError:
                raise
            except OSError as e:
                raise OutputError(e.filename or results, e) from e
            rows.append(row)
            bar.update(1)

        # on a CPU, one line from the first batch's steps: how long the run will take
        first = (first_steps_estimate(cfg.pgd.steps, len(todo), -(-len(todo) // cfg.batch_size), cfg.batch_size,
                                      lambda text: tqdm.write(text, file=sys.stderr), padded=cfg.engine == "engine",
                                      baselines=bool(cfg.baseline_names))
                 if progress and pair.device.type == "cpu" else None)

        pgd_bars: list = []  # closed when the run stops too: a stop's message is not printed over one

        def step_bar(n=None):
            timed = first(n) if first else None
            if "file" in every:  # a log file gets the images bar only: a PGD bar's lines would drown it
                return timed
            pgd = tqdm(total=cfg.pgd.steps, desc="  PGD", unit="step", leave=False, **every)
            pgd_bars[:] = [pgd]

            def cb(step, loss):
                if timed:
                    timed(step, loss)
                pgd.update(1)
                if step % 10 == 0:
                    pgd.set_postfix(contrast=f"{loss:+.4f}")
                if step == cfg.pgd.steps - 1:
                    pgd.close()

            return cb

        writer = RowWriter(threaded=prefetch_depth > 0)
        try:
            # the step bar reads each step's loss (a device sync a step): only when it is shown
            stats = run_pair(pair, todo, cfg, out, emit, writer, prefetch_depth=prefetch_depth,
                             step_callback=step_bar if progress and (first or "file" not in every) else None)
        finally:
            try:
                writer.close()
            finally:
                for b in (*pgd_bars, bar):
                    b.close()
        order = {it.id: i for i, it in enumerate(items)}
        rows.sort(key=lambda r: order.get(r["id"], len(order)))
        emb_info = add_embedding_scores(rows, embedder, out) if embedder is not None else None
        summary = summarize(rows, cfg, pair.info, emb_info)
        summary["runtime"] = runtime(pair.device, next(pair.unet_ft.parameters()).dtype)
        summary["prompt_from"] = prompt_from
        if files is not None:
            summary["model_files"] = files
            check_unchanged(summary)
        if stats.extra.get("low_memory_fallback"):
            summary["low_memory_fallback"] = ("one image did not fit in memory: the run went on with --low-memory "
                                              "(the same scores)")
        if summary.get("flagged"):
            summary["evidence_cards"] = write_cards(out, rows, summary)
        # rows again, in input order and with their verdicts (and their evidence cards)
        atomic_write_jsonl(results, rows)
        summary = json_values(summary)  # the summary returned is the one written: null, not inf
        atomic_write_json(out / "summary.json", summary)
        summary["report"] = str(write_report(out, rows, summary))
    return summary


