"""A ``cgidm protect`` run's settings and what it keeps across runs (docs/protect.md,
"Resume and errors"): what the settings alone show (``check_before_loading``), the
settings a resume must share (``check_settings``), each input's record and output
name, and which images a run does (``resume_plan``)."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional, Sequence

from cgidm.config import ProtectConfig
from cgidm.files import atomic_write_json, counted
from cgidm.protect_output import NAME_MAX, output_name
from cgidm.resume import DigestCache, differences, read_jsonl, same_source, sha256_file

log = logging.getLogger("cgidm.protect")

RESULTS = "results.jsonl"
STATE = "protect.json"
PROTECTED = "protected"

# Settings that change a protected file or a row's reported loss (eval_draws); batch_size
# does not (every draw is keyed by the image id). The base model and the target file's
# contents are kept beside them (``kept_settings``).
KEPT_SETTINGS = ("prompt", "steps", "loss", "target", "textural_weight", "k", "t_min", "t_max", "random_start",
                 "seed", "budget_levels", "step_levels", "cover", "eval_draws")


LOUD_LEVELS = 32  # a budget above this many 8-bit levels is said: the papers' is 8 to 16


def check_before_loading(cfg: ProtectConfig) -> None:
    """What the settings alone show, before a model loads or ``--out`` is made: warnings
    for settings that change nothing or a budget far past the papers', and a ``ValueError``
    for a ``--target`` that is not a readable image."""
    from cgidm.images import ImageError, load_image_with_notes

    if cfg.steps == 0 and not cfg.random_start:
        log.warning("--steps 0 without --random-start: the images are written unchanged")
    if cfg.target is not None and not cfg.needs_target:
        log.warning("--target is not used by --loss advdm (only by textural and fused); it is ignored")
    elif cfg.target is not None:
        try:
            load_image_with_notes(cfg.target, 1)  # readable; its size is checked against the model's
        except ImageError as e:
            raise ValueError(f"--target {cfg.target}: {e.reason}") from None
    if cfg.textural_weight is not None and cfg.loss != "fused":
        log.warning("--textural-weight only weighs --loss fused's two terms; with --loss %s it is ignored", cfg.loss)
    levels = cfg.budget_value * 255
    if levels < 1:
        log.warning("--budget %s is under one 8-bit level: 8-bit images are written unchanged (only 16-bit ones "
                    "can hold it)", cfg.budget)
    elif levels > LOUD_LEVELS:
        log.warning("--budget %s lets each pixel move by up to %.0f of 255 levels (1 is the whole range; the papers "
                    "use 8/255 to 16/255): the change will be plain to see", cfg.budget, levels)


def _target_digest(path: str) -> str:
    """The target's identity for a resume: its file's contents, so the same file by another
    path is the same target."""
    try:
        return "sha256:" + sha256_file(Path(path).expanduser())[:16]
    except OSError as e:
        raise ValueError(f"--target: cannot read {path}: {e.strerror or e}") from e


def _same_file(a: str, b: str) -> bool:
    try:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def _base_id(model) -> Optional[str]:
    base = model.info.get("base")
    return None if base is None else str(Path(base).expanduser().resolve())


def kept_settings(cfg: ProtectConfig, model, dtype: str) -> dict:
    now = {k: v for k, v in cfg.to_json().items() if k in KEPT_SETTINGS}
    # a target the loss does not use changes nothing; one it uses is known by its contents
    now["target"] = _target_digest(cfg.target) if cfg.needs_target and cfg.target is not None else None
    if cfg.loss != "fused":  # only fused weighs its two terms (protect_pgd.textural_weight)
        now["textural_weight"] = None
    now.update(dtype=dtype, resolution=model.resolution, base=_base_id(model))
    return json.loads(json.dumps(now))


def check_settings(out: Path, settings: dict, target: Optional[str] = None) -> None:
    """Refuse a resume whose ``settings`` differ from those in ``out``'s state, once it
    has rows; record them. ``target``: the ``--target`` path given now (an old run recorded its path)."""
    path = out / STATE
    if path.exists():
        try:
            old = json.loads(path.read_text()).get("settings")
        except (OSError, ValueError, AttributeError):
            old = None
        if isinstance(old, dict):
            # what a run from before a setting was kept did: --cover covered the centre
            # square; the base, eval_draws and the target's contents were not recorded (a
            # target was recorded by its path: the same path is taken as the same file)
            old.setdefault("cover", "centre")
            for key in ("base", "eval_draws"):
                old.setdefault(key, settings.get(key))
            if old.get("loss") != "fused":  # an unused weight, recorded before it was left out
                old["textural_weight"] = None
            was = old.get("target")
            if old.get("loss") == "advdm":  # an unused target, recorded before it was left out
                old["target"] = None
            elif (isinstance(was, str) and not was.startswith("sha256:") and target is not None
                    and settings["target"] is not None and _same_file(was, target)):
                old["target"] = settings["target"]
        # a run that wrote no row yet (stopped at a bad --target, interrupted before its first
        # image) has nothing to mix up: the new settings replace its record
        what = differences(old, settings) if isinstance(old, dict) else ""
        if what and any(True for _ in read_jsonl(out / RESULTS)):
            raise ValueError(f"{out} holds a protect run with other settings ({what}); "
                             "resume with the same settings or use another --out")
    atomic_write_json(path, {"settings": settings}, sort_keys=True)


def _numbered(name: str, k: int) -> str:
    """``name`` (a path ending in ``.png``) with ``~k`` before its suffix, its last part cut
    to the file system's ``NAME_MAX`` bytes: a 251-byte name and its ``~1`` stopped the whole
    run (the write failed as a full disk does)."""
    head, sep, last = name.rpartition("/")
    stem, tail = last[:-4], f"~{k}{last[-4:]}"
    while len((stem + tail).encode("utf-8", "surrogateescape")) > NAME_MAX:
        stem = stem[:-1]
    return f"{head}{sep}{stem}{tail}"


def _safe(name: str) -> bool:
    """A row's recorded name is one ``output_name`` makes (``output_name`` gives it back as
    it is: relative, no empty or hidden part, ``..`` among them, a ``.png``): a results file
    can be edited, or come with a folder someone else made, and ``../../x.png`` would be
    written outside --out."""
    return output_name(name) == name


def output_names(items: Sequence, done: dict[str, dict]) -> dict[str, Optional[str]]:
    """Each image's protected file under ``OUT/protected`` (``None``: an unsafe path). A
    finished row keeps the name it was written under. Otherwise ``output_name``'s, unless
    another input or another image's row has it (``cat.jpg`` beside an input named
    ``cat.jpg.png``), or a subfolder of the inputs is so named (``cat.jpg.png/x.png``):
    then ``~1``, ``~2``, ... before the ``.png`` until it is free. New names are compared
    without case, as macOS and Windows compare them (``cat.jpg.PNG`` is ``cat.jpg.png``
    there); a row's recorded name is its own (two rows differing only in case were two
    files where they were written)."""
    key = str.casefold
    ids = {key(it.id) for it in items}
    folders = {key("/".join(parts[:n])) for it in items for parts in [it.id.split("/")] for n in range(1, len(parts))}
    prefix = PROTECTED + "/"
    recorded = {i: r["protected"][len(prefix):] for i, r in done.items()
                if isinstance(r.get("protected"), str) and r["protected"].startswith(prefix)
                and _safe(r["protected"][len(prefix):])}
    writer = {name: i for i, name in recorded.items()}  # a name two rows share: its last writer's
    taken = {key(name) for name in recorded.values()}

    def free(name: str, image_id: str) -> bool:
        k = key(name)
        return k not in taken and (k == key(image_id) or k not in ids) and k not in folders

    names: dict[str, Optional[str]] = {}
    for it in items:
        if it.id in recorded and writer[recorded[it.id]] == it.id:
            names[it.id] = recorded[it.id]
            continue
        first = output_name(it.id)
        name, k = first, 0
        while name is not None and not free(name, it.id):
            k += 1
            name = _numbered(first, k)
        if name is not None:
            taken.add(key(name))
        names[it.id] = name
    return names


def resume_plan(items: Sequence, out: Path, retry_failed: bool) -> tuple[list, dict[str, Optional[str]]]:
    """``(todo, names)`` for a run over ``items`` in ``out``: the images to protect (no row,
    a protected file or a panel gone, an input saved over since, or with ``retry_failed`` an error
    row), each said in a warning, and every image's output name (``output_names``). Each
    image's latest row counts (a redone image's new row after its old one)."""
    done = {r["id"]: r for r in read_jsonl(out / RESULTS)}
    names = output_names(items, done)
    finished = [it for it in items if "error" not in done.get(it.id, {"error": None})]
    # a protected file or a panel deleted since: the image again (the same files come back)
    gone = [it for it in finished if not (out / PROTECTED / names[it.id]).is_file()
            or not (isinstance(done[it.id].get("panel"), str) and (out / done[it.id]["panel"]).is_file())]
    # a row written from another file at the same path (one saved over it since)
    gone_ids = {it.id for it in gone}
    digests = DigestCache(out)  # a folder copied without its times is read once, not at every resume
    changed = [it for it in finished
               if it.id not in gone_ids and not same_source(done[it.id].get("source"), it.path, digests)]
    digests.save()
    stale = len(set(done) - {it.id for it in items})
    failed = [it for it in items if "error" in done.get(it.id, {})]
    redo = {it.id for it in gone + changed} | ({it.id for it in failed} if retry_failed else set())
    todo = [it for it in items if it.id not in done or it.id in redo]

    def some(found: list) -> str:
        return ", ".join(it.id for it in found[:5]) + (" ..." if len(found) > 5 else "")

    if gone:
        log.warning("%s: the protected file or panel of %s is missing (%s); protecting %s again", out,
                    counted(len(gone), "image"), some(gone), "them" if len(gone) != 1 else "it")
    if changed:
        log.warning("%s: %s changed since protected (%s); protecting %s again", out, counted(len(changed), "input"),
                    some(changed), "them" if len(changed) != 1 else "it")
    if stale:
        log.warning("%s: %s of images no longer in the image folder; kept in %s, not counted", out,
                    counted(stale, "row"), RESULTS)
    if len(todo) < len(items):
        left = (f" ({len(failed)} of them failed: --retry-failed protects those again)"
                if failed and not retry_failed else "")
        if todo:
            log.warning("%s: %d of %d images already done%s; protecting the other %d", out,
                        len(items) - len(todo), len(items), left, len(todo))
        else:
            log.warning("%s: all %d images already done%s; nothing to protect (the summary and report are "
                        "written again)", out, len(items), left)
    return todo, names
