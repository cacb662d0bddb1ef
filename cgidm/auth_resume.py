"""What ``cgidm authenticate --resume`` keeps of a stopped run (docs/architecture.md,
"Runners"). Every authenticate run records in ``OUT/authenticate.json`` the settings that
decide a score (``resume.settings_of``, as screen's) and its model files by size and
modification time (and SHA-256 with ``--hash-models``). A resume takes the finished rows of
a run with the same settings and the same model files, of images still given and still
the file their row was made from (``resume.same_source``), whose recovered image and
triptych are still there; every other image is authenticated again. The set verdict,
report and evidence cards are always made anew over all the rows.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

from cgidm import provenance
from cgidm.evidence import EVIDENCE, drop_card
from cgidm.files import atomic_write_jsonl, atomic_write_text, counted
from cgidm.resume import RESULTS, differences, read_jsonl, same_source
from cgidm.rows import own_files
from cgidm.summary import VERDICT_FIELDS

log = logging.getLogger(__name__)

STATE = "authenticate.json"
JUDGED = (*VERDICT_FIELDS, EVIDENCE)  # given against the whole set: made again at the end
# the validator's scores: a maximum over each folder, given again (with --embedder) over the rows of this run
EMBEDDED = ("embed_cos", "official_cos", "official_folder")


def run_settings(settings: dict, info: Optional[dict]) -> dict:
    """``settings`` (``resume.settings_of``) with what else decides a score in a one-pair
    run: which model is on which side, and the LoRA's strength (screen has both in its pair
    key)."""
    info = info if isinstance(info, dict) else {}
    return {**settings, "models": {role: info.get(role) for role in provenance.ROLES},
            "lora_scale": info.get("lora_scale")}


def model_stamp(info: Optional[dict], files: Optional[dict] = None) -> dict:
    """``{model path: [{"file", "bytes", "mtime_ns", "ctime_ns", "sha256"}]}`` of the pair's
    model files: what a resume compares to tell a model saved over since. Only sizes and
    times are read; ``sha256`` is taken from ``files`` (a ``provenance.record`` of them, with
    ``--hash-models``) and is None without it."""
    digests = {(r["model"], r.get("file")): r.get("sha256") for r in provenance.rows(files)}
    return {model: [{**e, "sha256": digests.get((model, e.get("file")))} for e in entries]
            for model, entries in provenance.record(provenance.pair_models(info), lambda f: None).items()}


def _moved(old: dict, now: dict) -> list[str]:
    """The model files of ``old`` (a stamp) that are not those of ``now``: another size,
    another SHA-256 where both sides have one (``--hash-models``), else another modification
    or change time (a ``chmod`` too: without digests the contents cannot tell); a file
    added or gone."""
    def flat(stamp):
        return {(m, e.get("file")): e for m, entries in stamp.items() if isinstance(entries, list)
                for e in entries if isinstance(e, dict)} if isinstance(stamp, dict) else {}

    a, b = flat(old), flat(now)
    return [os.path.join(m, f) if f else m for m, f in sorted(set(a) | set(b), key=str)
            if not _same_file(a.get((m, f)), b.get((m, f)))]


def _same_file(x: Optional[dict], y: Optional[dict]) -> bool:
    if x is None or y is None:  # added or gone
        return False
    if "error" in x or "error" in y:  # unreadable then and now (a dangling link the loaders pass over): the same
        return "error" in x and "error" in y
    if x.get("bytes") != y.get("bytes"):
        return False
    if x.get("sha256") is not None and y.get("sha256") is not None:
        return x["sha256"] == y["sha256"]
    # a file saved over with its old modification time put back has a new change time
    return (x.get("mtime_ns"), x.get("ctime_ns")) == (y.get("mtime_ns"), y.get("ctime_ns"))


def _said(key: str, value) -> Optional[str]:
    """A recorded setting's None in words, as the options say it."""
    if value is not None:
        return None
    return {"prompt": "read from the checkpoint", "lora_scale": "none (no LoRA)"}.get(key, "none")


def write_state(out: Path, settings: dict, stamp: dict) -> None:
    atomic_write_text(out / STATE, json.dumps({"settings": settings, "models": stamp}, indent=1, sort_keys=True) + "\n")


def plan(out: Path, items: Sequence, settings: dict, stamp: dict) -> tuple[list[dict], list]:
    """``(rows kept, items to authenticate)`` for ``--resume`` into ``out``, the kept rows
    without their verdicts, cards and validator scores (made again). ``ValueError``
    when ``out`` holds a run with other settings or other model files (nothing is touched);
    a folder with no run in it resumes nothing."""
    rows = read_jsonl(out / RESULTS)
    try:
        state = json.loads((out / STATE).read_text())
    except FileNotFoundError:
        state = None
    except (OSError, ValueError) as e:
        raise ValueError(f"{out / STATE} cannot be read ({e}): run without --resume to start over") from e
    if state is None:
        if rows:
            raise ValueError(f"{out} holds rows but no {STATE} (a run of a cgidm before 0.1.2, or another "
                             "program's): nothing tells what settings they were made with; run without --resume "
                             "to start over, or use another --out")
        return [], list(items)
    if not isinstance(state, dict) or not isinstance(state.get("settings"), dict):
        raise ValueError(f"{out / STATE} is not an authenticate run's state: run without --resume to start over")
    what = differences(state["settings"], settings, _said)
    moved = [] if what else _moved(state.get("models"), stamp)
    if (what or moved) and not any("error" not in r for r in rows):  # nothing scored: nothing to mix up
        log.warning("%s: the stopped run scored no image; its settings are replaced by these", out)
        return [], list(items)
    if what:
        raise ValueError(f"{out} holds an authenticate run with other settings ({what}); resume with the same "
                         "settings, or run without --resume to start over")
    if moved:
        raise ValueError(f"{out} holds an authenticate run of other model files: {counted(len(moved), 'file')} "
                         f"changed since, or touched (first: {provenance.shown(moved[0])}; with --hash-models on "
                         "both runs their contents are compared instead); run without --resume to start over")
    done = {r["id"]: r for r in rows}  # a later row of an id wins; an error is done again
    kept, todo = [], []
    for it in items:
        r = done.get(it.id)
        if (r is not None and "error" not in r and r.get("label") == it.label and _files_there(out, r)
                and same_source(r.get("source"), it.path)):  # a label given otherwise now (the API's own ids)
            # without what is given again over the whole set; the file as given now (the same: a
            # folder moved since is read there)
            kept.append({**{k: v for k, v in r.items() if k not in (*JUDGED, *EMBEDDED)}, "image": str(it.path)})
        else:
            todo.append(it)
    redone = sum(1 for it in todo if it.id in done)
    if redone:
        log.warning("%s of finished rows authenticated again: an error, or an image or output file changed since",
                    counted(redone, "image"))
    return kept, todo


def _files_there(out: Path, row: dict) -> bool:
    files = own_files(out, row)
    return len(files) == 2 and all(f.is_file() for f in files)


def set_aside(out: Path, kept: Sequence[dict]) -> int:
    """Before the resumed run writes a row: the stopped (or finished) run's summary, report
    and evidence cards go, and ``results.jsonl`` holds only the ``kept`` rows (``plan``'s,
    without the verdicts they were given against the earlier set). Returns how many rows were dropped
    (their images are done again, or no longer given: their outputs are removed)."""
    keep = {r["id"] for r in kept}
    theirs = {path for r in kept for path in own_files(out, r)}  # never removed for another row naming them
    before = read_jsonl(out / RESULTS)
    for r in before:
        drop_card(out, r)
        if r["id"] not in keep:
            for path in set(own_files(out, r)) - theirs:
                path.unlink(missing_ok=True)
    for name in ("summary.json", "report.html"):
        (out / name).unlink(missing_ok=True)
    atomic_write_jsonl(out / RESULTS, kept)
    return len({r["id"] for r in before} - keep)
