"""Evidence cards (docs/architecture.md, "Evidence cards"): for each image flagged as
fine-tuned on, ``evidence/<its triptych's name>``, the triptych with the finding written
under it: the verdict and its p-value against how many controls, the image's score beside
the score it had to beat, the models (with a digest where the run recorded one) and the
settings. A rights holder passes one picture on; it says on its own what was found, and
how, where a triptych alone shows only a recovery.

Cards are drawn once the run's verdicts are known (at its end: a resume with more controls
can change them) and are the run's own files: a row that has one names it (``evidence``),
and a card whose image is no longer flagged is removed, as is every card a new run into
the same folder replaces (``api._clear_previous``).
"""
from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Optional, Sequence

from cgidm.captions import Label, Name, caption_size, lines_under
from cgidm.config import HIGHER_IS_BETTER
from cgidm.copies import digest
from cgidm.files import OutputError, atomic_save_image, output_path, shown
from cgidm.rows import TRIPTYCHS
from cgidm.score import SET_VERDICTS, VERDICTS

log = logging.getLogger(__name__)

EVIDENCE = "evidence"


def card_path(row: dict) -> Optional[str]:
    """``evidence/<name>``: the name ``files.output_path`` gives the row's id, as it gives
    its triptych (``triptychs/<name>``); None for a row without a usable id. Taken from the
    id, never from a path a row holds (a results file can be edited)."""
    try:
        return f"{EVIDENCE}/{output_path(EVIDENCE, row['id']).name}" if isinstance(row.get("id"), str) else None
    except ValueError:
        return None


def _digest(where: str, files: dict) -> str:
    """`` (sha256 1a2b...)`` for a model recorded as one file; for a folder, its files'
    count and ``provenance.folder_digest`` (each file's SHA-256 is in the run's summary,
    ``model_files``, keyed by absolute path as ``where`` is)."""
    from cgidm.provenance import folder_digest

    listed = files.get(where) if isinstance(files, dict) else None
    whole = folder_digest(listed)
    if whole is None:
        return ""
    if len(listed) == 1 and not listed[0].get("file"):
        return f" (sha256 {listed[0]['sha256'][:16]}...)"
    return f" ({len(listed)} files, folder digest {whole[:16]}...)"


def _apart(score, line, least: int = 4) -> int:
    """Significant digits that show ``score`` and the flag ``line`` apart (the score is
    strictly beyond the line: at 4 digits two close values would read alike)."""
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (score, line)):
        return least
    for digits in range(least, 17):
        if f"{score:.{digits}g}" != f"{line:.{digits}g}":
            return digits
    return 17


def card_lines(row: dict, summary: dict) -> list[Label]:
    """What a card says under the triptych, a line each."""
    pair = (summary.get("pairs") or {}).get(row.get("pair")) if row.get("pair") else None
    ctx = pair if isinstance(pair, dict) else summary
    models = ctx if ctx is pair else summary.get("models") or {}
    cfg = summary.get("config") or {}
    metric, level = summary.get("metric") or cfg.get("metric"), cfg.get("level")
    sha = digest(row)
    lines: list[Label] = [Name(f"image{f' (sha256 {sha[:16]}...)' if isinstance(sha, str) else ''}: ",
                               str(row.get("id")))]
    copy_of = row.get("copy_of")
    kind, holdout = row.get("copy_kind"), row.get("label") == "holdout"
    if isinstance(copy_of, str) and kind == "conflicts":  # copies.py: one picture, not two findings
        lines.append(Name(f"the same picture (SHA-256) as {'a member' if holdout else 'a hold-out'}, labels "
                          "contradicting: ", copy_of))
    else:
        if isinstance(copy_of, str):
            lines.append(Name({"of_holdouts": "the same picture (SHA-256) as an unlabelled image: " if holdout
                               else "the same picture (SHA-256) as a hold-out, known not trained on: "}.get(
                kind, "the same picture (SHA-256) as an earlier image here, counted once: "), copy_of))
        elif isinstance(row.get("looks_like"), str):  # said, not acted on: a hash cannot tell
            lines.append(Name(f"looks like ({row.get('looks_bits')} hash bits apart; counted apart): ",
                              row["looks_like"]))
        if holdout:  # flagged all the same: the card says what is known of it
            lines.append("labelled a hold-out, known not to be in the fine-tune: a false positive")
    p, n = row.get("p_value"), ctx.get("controls")
    lines.append((f"verdict: {row.get('verdict')} (p = {p:.3g} <= {level}, against {n} control images)",
                  f"{row.get('verdict')}: p = {p:.3g} <= {level}, {n} controls"))
    score, line = row.get("score"), ctx.get("flag_line")
    above = "above" if HIGHER_IS_BETTER.get(metric, True) else "below"
    digits = _apart(score, line)
    said = f"{metric} {score:.{digits}g}" if isinstance(score, (int, float)) else f"{metric} -"
    if isinstance(line, (int, float)):
        said += f"; flagged {above} {line:.{digits}g}, the control it had to beat"
    if isinstance(row.get("z"), (int, float)):
        said += f"; z = {row['z']:.2f}"
    lines.append(said)
    sv = ctx.get("set_verdict") or {}
    if isinstance(sv.get("p_value"), (int, float)):
        whose = "this pair's" if ctx is pair else "the run's"
        lines.append(f"set verdict on {whose} {sv.get('n_suspect')} suspect images: {sv.get('verdict')} "
                     f"(p = {sv['p_value']:.3g})")
        if sv.get("verdict") != SET_VERDICTS[0]:  # read beside it, not alone: one image's test of many
            chance = ctx.get("flagged_by_chance")
            lines.append("CAUTION: the set verdict does not find the fine-tune trained on these images; this image's "
                         "own p-value is one test of many" + (f" (about {chance:g} would be flagged by chance)"
                                                               if isinstance(chance, (int, float)) and chance else ""))
    if isinstance(sv.get("warning"), str):  # a swapped pair, too few images: said where the card is read
        lines.append(f"CAUTION: {sv['warning']}")
    if isinstance(ctx.get("controls_warning"), str):
        lines.append(f"CAUTION: {ctx['controls_warning']}")
    files = summary.get("model_files") or {}
    scale = models.get("lora_scale")
    scaled = f" at scale {scale:g}" if isinstance(scale, (int, float)) and scale != 1 else ""
    # the scale is the LoRA's: the --lora one, or the fine-tune itself when it is a LoRA
    on = "lora" if models.get("lora") else "finetuned" if models.get("finetuned_format") == "lora" else None
    moved = [str(m) for m in summary.get("model_files_changed") or []]
    for key in ("finetuned", "lora", "base"):
        if models.get(key):
            where = os.path.abspath(os.path.expanduser(str(models[key])))
            what = {"finetuned": "fine-tune"}.get(key, key) + (scaled if key == on else "")
            if any(m == where or m.startswith(where.rstrip(os.sep) + os.sep) for m in moved):
                what += " (CHANGED during the run: the digest may not be of the bytes used)"
            lines.append(Name(f"{what}{_digest(where, files)}: ", where))
    if not files:  # named by path only, which anyone can save over
        lines.append("models named by path only: --hash-models names them by the SHA-256 of their files")
    prompt = ((summary.get("prompts") or {}).get(row.get("pair")) or {}).get("prompt") if row.get("pair") else None
    prompt = prompt if prompt is not None else cfg.get("prompt")
    if isinstance(prompt, str):
        lines.append(Name("prompt: ", repr(prompt)))
    pgd, run = cfg.get("pgd") or {}, summary.get("runtime") or {}
    preset = (summary.get("preset") or {}).get("name") if isinstance(summary.get("preset"), dict) else None
    settings = [f"cgidm {run['cgidm']}" if run.get("cgidm") else "cgidm",
                f"preset {preset}" if preset else None,
                f"{pgd.get('steps')} PGD steps" + (f" of {pgd['alpha']:g} within {pgd['eps']:g}" if isinstance(
                    pgd.get("alpha"), (int, float)) and isinstance(pgd.get("eps"), (int, float)) else "")
                if pgd.get("steps") else None,
                f"noise {pgd['noise']}" if pgd.get("noise") else None,
                f"seed {cfg['seed']}" if cfg.get("seed") is not None else None,
                f"judged {str(run['time'])[:10]}" if run.get("time") else None]
    lines.append(", ".join(s for s in settings if s))
    return lines


def drop_card(out: str | Path, row: dict) -> bool:
    """``row`` without its card: the key gone, and the card its id names removed (True
    when there was one)."""
    row.pop("evidence", None)
    rel = card_path(row)
    if rel is not None:
        path = Path(out) / rel
        if path.is_file() or path.is_symlink():
            path.unlink(missing_ok=True)
            return True
    return False


def write_cards(out: str | Path, rows: Sequence[dict], summary: dict) -> int:
    """A card for every row flagged as fine-tuned on (``row["evidence"]`` set to it), and
    none for the others (an earlier card of theirs removed, failed rows' too); returns how
    many were drawn. A triptych that cannot be read leaves its row without a card, said in
    the log."""
    from PIL import Image

    out = Path(out)
    drawn = 0
    for row in rows:
        drop_card(out, row)
        rel = card_path(row)
        if rel is None or row.get("verdict") != VERDICTS[0]:
            continue
        try:  # the triptych the id names, not whatever path the row holds
            with Image.open(output_path(out / TRIPTYCHS, row["id"])) as im:
                picture = im.convert("RGB")
        except (OSError, ValueError) as e:
            log.warning("no evidence card for %s: its triptych could not be read (%s)", shown(row["id"]), e)
            continue
        card = lines_under(picture, card_lines(row, summary), caption_size(picture.size[1]))
        try:
            (out / EVIDENCE).mkdir(exist_ok=True)
            atomic_save_image(card, out / rel)
        except OSError as e:
            raise OutputError(out / rel, e) from e
        row["evidence"] = rel
        drawn += 1
    return drawn
