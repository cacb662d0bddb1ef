"""What a set of rows says: counts, member-vs-holdout metrics for every score, verdicts
against controls, per pair and over all pairs (docs/architecture.md, "Stages")."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

from cgidm.copies import Copies, find_copies, pooled_warning, unlike_controls
from cgidm.config import BASELINE_FIELDS, METRICS, departures, dtype_name
from cgidm.files import fraction, shown
from cgidm.score import calibrate, set_metrics, set_verdict, worse_p

VERDICT_FIELDS = ("p_value", "z", "verdict")
STALLED_VERDICT = {"p_value": None, "z": None, "verdict": "failed"}  # nothing recovered to judge
SUSPECT_LABELS = (None, "member")  # the images the set verdict tests (hold-outs are known clean)
# what looks like a swapped pair: suspects below the controls or members below the
# hold-outs, clearly rather than by chance (the one-sided rank test the other way round)
WORSE_P = 0.01
FEW_LABELLED = 10  # members or hold-outs below which an AUC comes with a warning
PAIR_SUMMARY_FIELDS = ("images", "scored", "failed", "auc", "accuracy", "tpr_at_1fpr", "threshold",
                       "controls", "flagged", "flag_line", "flagged_by_chance", "calibration_warning",
                       "calibration_error", "copies_warning", "copies", "auc_warning", "sample_warning", "set_verdict",
                       "controls_warning")


def runtime(device, dtype) -> dict:
    """How a summary's numbers were computed, beside its settings: the device and the
    weights' dtype (fp16 and bf16 change scores), the versions of cgidm, torch and
    Python, and when (UTC, as the run ends)."""
    import platform
    from datetime import datetime, timezone

    import torch

    import cgidm

    return {"device": str(device), "dtype": dtype if isinstance(dtype, str) else dtype_name(dtype),
            "cgidm": cgidm.__version__, "torch": torch.__version__, "python": platform.python_version(),
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def summarize(rows: Sequence[dict], cfg, info: Optional[dict] = None, embedder_info: Optional[dict] = None,
              copies: bool = True) -> dict:
    """Counts, member-vs-holdout metrics for every score field and every baseline
    (``by_metric``: ``baseline_<name>`` beside CGI-DM's), verdicts against controls
    (written into the rows), and one verdict for the whole suspect set against the controls
    (``set_verdict``). ``copies``: look for copies among the rows (``copy_of`` written into
    them); not across pairs, where one image under two models is two tests."""
    good = [r for r in rows if "error" not in r]
    for r in good:  # the metric's value now, whatever metric a resumed row was scored under
        if cfg.metric in r:
            r["score"] = r[cfg.metric]
    summary: dict = {
        "images": len(rows),
        "scored": len(good),
        "failed": len(rows) - len(good),
        "metric": cfg.metric,
        "errors": {r["id"]: r["error"] for r in rows if "error" in r},
        "auc": None,  # set below when there are labelled images; the report reads it always
        "config": cfg.to_json(),
    }
    departed = departures(cfg)
    if cfg.preset:
        summary["preset"] = {"name": cfg.preset, "departures": departed}
    elif departed:  # a run with fewer steps than the paper's, say, is said to be one
        summary["departures_from_defaults"] = departed
    # a stalled image's score is its starting point's, not a recovery's: no point of the AUC,
    # no control for the null, and no verdict of its own (README.md, "Bad input and untrusted files")
    stuck = set(_stalled(summary, good, cfg, info))
    if info:
        summary["models"] = info
    if embedder_info:
        summary["embedder"] = embedder_info
    found = find_copies(good, SUSPECT_LABELS) if copies else Copies()  # docs/architecture.md, "Copies"
    label_of = {r["id"]: r.get("label") for r in good}
    again = {a for a, b in found.tested if label_of.get(a) == label_of.get(b)}  # one picture, one point of the AUC
    labelled = [r for r in good if r.get("label") in ("member", "holdout") and r["id"] not in again | stuck]
    if labelled:
        y = [r["label"] == "member" for r in labelled]
        per = {m: set_metrics([r[m] for r in labelled], y, m) for m in METRICS if all(m in r for r in labelled)}
        for m in BASELINE_FIELDS:
            # a baseline that failed on some image (null) is left out rather than scored on a subset
            if all(isinstance(r.get(m), (int, float)) for r in labelled):
                per[m] = set_metrics([r[m] for r in labelled], y, m)
        main = per[cfg.metric]
        summary.update({k: main.get(k) for k in ("auc", "accuracy", "tpr_at_1fpr", "threshold")})
        summary["roc"] = main.get("roc")
        n = min(main["n_members"], main["n_holdouts"])
        if main.get("auc") is not None and n < FEW_LABELLED:
            summary["sample_warning"] = (f"AUC from {main['n_members']} members and {main['n_holdouts']} hold-outs: "
                                         f"one image moves it by up to {1 / n:.2f} and the accuracy's threshold is "
                                         f"chosen on these same images; TPR at 1 % FPR needs at least 100 hold-outs")
        if main.get("auc") is not None and main["auc"] < 0.5 and worse_p(
                [r[cfg.metric] for r in labelled if r["label"] == "member"],
                [r[cfg.metric] for r in labelled if r["label"] == "holdout"], cfg.metric) <= WORSE_P:
            summary["auc_warning"] = (f"members recover worse than hold-outs (AUC {fraction(main['auc'])}): are --base "
                                      f"and --finetuned swapped?")
        summary["by_metric"] = {m: {k: v for k, v in d.items() if k != "roc"} for m, d in per.items()}
        if all("official_cos" in r for r in labelled):
            from cgidm.validator import official_auc_accuracy

            members = [r["official_cos"] for r in labelled if r["label"] == "member"]
            holdouts = [r["official_cos"] for r in labelled if r["label"] == "holdout"]
            if members and holdouts:
                # the paper's validator: max over the folder, AUC and accuracy on its grid
                summary["official"] = official_auc_accuracy(members, holdouts)
    given = sum(r.get("label") == "control" for r in rows)
    if copies:
        marks = found.marks()
        alike = found.alike_marks()
        for r in rows:  # as found now (a resumed row may carry an earlier run's)
            for k in ("copy_of", "copy_kind", "looks_like", "looks_bits"):
                r.pop(k, None)
            if "error" not in r and r.get("id") in marks:
                r["copy_of"], r["copy_kind"] = marks[r["id"]]
            elif "error" not in r and r.get("id") in alike:
                r["looks_like"], r["looks_bits"] = alike[r["id"]]
    said = found.warning()
    if said:
        summary["copies_warning"] = said
        summary["copies"] = found.counts()
    controls = [r["score"] for r in good
                if r.get("label") == "control" and r["id"] not in found.left_out and r["id"] not in stuck]
    unlike = unlike_controls([r for r in good if r.get("label") != "control"],
                             [r for r in good if r.get("label") == "control"]) if given else None
    if unlike:
        summary["controls_warning"] = unlike
    if given and cfg.metric == "official_cos":
        # a maximum over its folder: suspects' and controls' folders differ in size, so the
        # null of exchangeable scores fails (a larger folder raises every score in it)
        summary["calibration_error"] = ("official_cos is a maximum over each folder's recoveries and folders of "
                                        "other sizes are not comparable: no p-values or verdicts; use a per-image "
                                        "metric (embed_cos, latent_cos, ...)")
    elif given:
        try:
            if good and len(stuck) == len(good):  # one model twice: no recovery at all
                raise ValueError("every PGD step of every image was skipped, so nothing was recovered to judge")
            cal = calibrate(controls, cfg.metric, cfg.level)
        except ValueError as e:  # too few scored (unreadable files): said, not left out silently
            stalled = sum(r.get("label") == "control" and r["id"] in stuck for r in good)
            summary["calibration_error"] = (f"{given} control image{'s' if given != 1 else ''} given, "
                                            f"{len(controls)} scored and used"
                                            + (f" ({stalled} stalled: every PGD step skipped)" if stalled else "")
                                            + f": {e}; no p-values or verdicts")
        else:
            summary["controls"] = len(cal.scores)
            verdicts = {}
            for r in good:
                if r.get("label") != "control":
                    r.update(cal.judge(r["score"]) if r["id"] not in stuck else STALLED_VERDICT)
                    verdicts[r["id"]] = {k: r[k] for k in VERDICT_FIELDS}
            summary["verdicts"] = verdicts
            summary["flagged"] = sum(v["verdict"] == "fine-tuned on" for v in verdicts.values())
            summary["flag_line"] = cal.flag_line()  # drawn on the report's histogram
            # per-image p-values are not corrected for testing many images: this many of
            # them would be flagged on average were none in the fine-tune (set_verdict is
            # the one test of the whole set)
            judged = sum(v["p_value"] is not None for v in verdicts.values())  # not a stalled or non-finite one
            summary["flagged_by_chance"] = round(chance_rate(len(cal.scores), cfg.level) * judged, 2)
            # the suspect set: members and unlabelled images; hold-outs are known not to be in
            # the fine-tune, so counting them would dilute a set that was trained on
            # (docs/architecture.md, "Where new things plug in")
            suspects = [r["score"] for r in good
                        if r.get("label") in SUSPECT_LABELS and r["id"] not in found.counted_once | stuck]
            set_unreachable = False  # the set verdict cannot reach the level either
            held = sum(r.get("label") == "holdout" for r in good)
            stalled = sum(r.get("label") in SUSPECT_LABELS and r["id"] in stuck for r in good)
            if not suspects and stalled:
                summary["set_verdict"] = {"error": f"every suspect image stalled ({stalled}: every PGD step skipped), "
                                                   "so nothing was recovered to test"}
            elif not suspects and held:
                summary["set_verdict"] = {
                    "error": f"every image besides the controls is a hold-out ({held}), known not to be in the "
                             f"fine-tune; the set verdict tests members and unlabelled images",
                    "holdouts_left_out": held}
            if suspects:
                try:
                    sv = set_verdict(suspects, cal.scores, cfg.metric, cfg.level)
                except ValueError as e:
                    sv = {"error": str(e)}
                else:
                    if sv["min_p"] > cfg.level:
                        set_unreachable = True
                        sv["warning"] = (f"{sv['n_suspect']} suspect and {sv['n_controls']} control images cannot "
                                         f"give p <= {cfg.level}: add images")
                    elif worse_p(suspects, cal.scores, cfg.metric) <= WORSE_P:
                        sv["warning"] = ("the suspect images recover clearly worse than the controls: are --base and "
                                         "--finetuned swapped, or are the controls unlike the suspect images?")
                if held:
                    sv["holdouts_left_out"] = held
                summary["set_verdict"] = sv
            if cal.min_p() > cfg.level:
                used = f"{given} control images given, {len(cal.scores)} used: " if given != len(cal.scores) else ""
                summary["calibration_warning"] = (
                    f"{used}{len(cal.scores)} controls cannot give p <= {cfg.level}: the smallest p-value one image "
                    f"can get is 1/{len(cal.scores) + 1} = {cal.min_p():.3g}, so no image can be flagged on its own "
                    f"(each per-image verdict is 'inconclusive', whatever its z); use at least "
                    f"{math.ceil(1 / cfg.level) - 1} controls"
                ) + ("" if set_unreachable else ", or read the set verdict")
    return summary


def chance_rate(controls: int, level: float) -> float:
    """The chance that an image not in the fine-tune is flagged: its p-value is k/(n+1)
    for n controls, so p <= level is k/(n+1) <= level, with k at most floor(level (n+1))
    and each k equally likely (exchangeable scores, no ties). With 38 controls at 0.05
    that is 1/39, not 0.05; with 12 it is 0."""
    n1 = controls + 1
    k = int(level * n1)
    while (k + 1) / n1 <= level:  # the comparison the p-value's own takes (float division)
        k += 1
    while k > 0 and k / n1 > level:
        k -= 1
    return k / n1


def _stalled(summary: dict, good: Sequence[dict], cfg, info: Optional[dict] = None) -> list[str]:
    """``summary["stalled"]``: the scored images whose every PGD step was skipped (a zero or
    non-finite gradient at every step: a non-finite model, a LoRA scale that breaks it).
    Their scores are those of the starting point, not of a recovery. Returns their ids."""
    ids = [r["id"] for r in good if cfg.pgd.steps > 0 and r.get("skipped_steps", 0) >= cfg.pgd.steps]
    if ids:
        why = ("the fine-tune has the base model's weights exactly (the base itself, or a copy), so there is no "
               "contrast: " if (info or {}).get("same_as_base") else "")
        summary["stalled"] = {"images": len(ids), "ids": ids[:20],
                              "note": f"{why}every PGD step was skipped (zero or non-finite gradient): these scores are "
                                      "of the starting point, not of a recovery, so they are no point of the AUC, get "
                                      "no verdict and calibrate nothing"}
    else:
        summary.pop("stalled", None)
    return ids


def _fact(value) -> str:
    """A model fact in one pair's models line: a LoRA's layer counts as ``matched/total``."""
    if isinstance(value, dict) and {"matched", "total"} <= set(value):
        return f"{value['matched']}/{value['total']}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def summarize_pairs(rows: Sequence[dict], infos: dict, cfg, embedder_info: Optional[dict] = None) -> dict:
    """``summarize`` per pair (controls calibrate the images of their own pair), and over
    all pairs when there are several. ``infos``: ``{pair key: models info}``."""
    by_pair: dict[str, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    per = {key: summarize(prs, cfg, infos[key], embedder_info) for key, prs in sorted(by_pair.items())}
    if len(per) == 1:
        summary = dict(next(iter(per.values())))
    else:
        # AUC over every pair's members and hold-outs; verdicts stay those of each pair
        summary = summarize([r for r in rows if r.get("label") != "control"], cfg, None, embedder_info, copies=False)
        good = [r for r in rows if "error" not in r]
        summary.update(images=len(rows), scored=len(good), failed=len(rows) - len(good))
        _stalled(summary, good, cfg)
        summary["errors"] = {k: v for s in per.values() for k, v in s.get("errors", {}).items()}
        summary["models"] = {k: " ".join(f"{a}={_fact(b)}" for a, b in infos[k].items()) for k in per}
        verdicts = {k: v for s in per.values() for k, v in s.get("verdicts", {}).items()}
        if verdicts:
            summary["verdicts"] = verdicts
            summary["flagged"] = sum(s.get("flagged", 0) for s in per.values())
            summary["flagged_by_chance"] = round(sum(s.get("flagged_by_chance", 0) for s in per.values()), 2)
            summary["controls"] = sum(s.get("controls", 0) for s in per.values())
        calibrated = {k for k, s in per.items() if s.get("controls") or s.get("calibration_error")}
        if calibrated:
            # pairs without controls of their own: their images get no p-value and no verdict;
            # pairs with controls and nothing else: their controls calibrate no image
            tested = {k: sum(1 for r in by_pair[k] if "error" not in r and r.get("label") != "control") for k in per}
            bare = {k: n for k, n in tested.items() if n and k not in calibrated}
            if bare:
                summary["pairs_without_controls"] = bare
            idle = {k: per[k].get("controls", 0) for k in sorted(calibrated) if not tested[k]}
            if idle:
                summary["pairs_with_only_controls"] = idle
        # a pair's messages, said with its keys (a swapped pair among good ones hides in the
        # pooled AUC: its own warning is said); the pooled sample warning stays the pooled one's
        for key in ("calibration_error", "calibration_warning", "copies_warning", "auc_warning",
                    "set_verdict_warning", "controls_warning"):
            by_message: dict[str, list[str]] = {}
            for k, s in per.items():
                said = (s.get("set_verdict") or {}).get("warning") if key == "set_verdict_warning" else s.get(key)
                if said:
                    by_message.setdefault(said, []).append(k)
            if by_message:  # one sentence per message, not one per pair (a screen may have hundreds)
                summary[key] = ((key == "copies_warning" and pooled_warning(per))
                                or "; ".join(f"{_some(keys)}: {m}" for m, keys in by_message.items()))
    summary["pairs"] = {k: {**infos[k], **{f: s[f] for f in PAIR_SUMMARY_FIELDS if f in s}} for k, s in per.items()}
    return summary


def controls_hint(summary: dict) -> str:
    """How this run's command takes control images: a screen (its summary has ``timing``)
    from its manifest, authenticate from ``--controls``, the demo from ``--with-controls``."""
    if isinstance(summary.get("timing"), dict):
        how = "in the manifest, the label control, or a controls/ subfolder of a folder manifest"
    elif isinstance(summary.get("preset"), dict) and summary["preset"].get("name") == "demo":
        how = "cgidm demo --with-controls; cgidm authenticate --controls DIR"
    else:
        how = "--controls DIR"
    return f"control images (like these, known not to be in the fine-tune: {how})"


def unjudged(summary: dict) -> list[str]:
    """What the summary cannot judge and why, as the CLI prints it and the report shows it:
    no verdict at all (no controls, no labels), or the pairs without controls of their own
    (their images have no p-value and no verdict, whatever the other pairs' cards say)."""
    lines = []
    if summary.get("scored") and (summary.get("stalled") or {}).get("images") == summary["scored"]:
        return ["no AUC and no verdict: every image stalled (every PGD step skipped), so nothing was recovered; "
                "is --finetuned the base itself, or a copy of it?"]
    uncalibrated = (summary.get("scored") and "verdicts" not in summary and not summary.get("calibration_error")
                    and not summary.get("pairs_without_controls"))
    if uncalibrated and summary.get("auc") is None:
        lines.append(f"no verdict: scores alone say little; give {controls_hint(summary)} for p-values and a "
                     "verdict, or members and hold-outs for AUC")
    elif uncalibrated:
        lines.append("no verdict on whether the model was fine-tuned on these images: the AUC says how well CGI-DM "
                     f"tells the known members from the hold-outs here; give {controls_hint(summary)} for p-values "
                     "and a verdict")
    idle = summary.get("pairs_with_only_controls") or {}
    if idle:  # controls calibrate the images of their own pair only
        lines.append(f"warning: {len(idle)} pair{'s' if len(idle) > 1 else ''} ({_some([shown(k) for k in idle])}) "
                     f"{'have' if len(idle) > 1 else 'has'} control images and no scored image to test: controls count "
                     "only for images on the same base, fine-tune, LoRA and lora_scale")
    bare = summary.get("pairs_without_controls") or {}
    if len(bare) > 3:
        lines.append(f"warning: {len(bare)} pairs have no control images ({_some([shown(k) for k in bare])}): their "
                     f"{sum(bare.values())} images get no p-value or verdict (summary.json: pairs_without_controls)")
    else:
        lines += [f"warning: pair {shown(key)} has no control images: its {n} images get no p-value or verdict"
                  for key, n in bare.items()]
    return lines


def _some(keys: Sequence[str], first: int = 3) -> str:
    """Pair keys in a line: the ``first`` few and how many more."""
    return ", ".join(keys[:first]) + (f" and {len(keys) - first} more" if len(keys) > first else "")


def timing(stats: list[dict], finalize_s: float = 0.0) -> dict:
    """Throughput of a run over its ranks: images/hour and the share of time in the engine."""
    images = sum(s["images"] for s in stats)
    wall = max(s["wall_s"] for s in stats)
    busy = sum(s["wall_s"] for s in stats)
    load = sum(s["load_s"] for s in stats)
    engine = sum(s["engine_s"] for s in stats)
    return {
        "ranks": len(stats),
        "images": images,
        "wall_s": round(wall, 3),
        "images_per_hour": round(3600 * images / wall, 1) if wall > 0 else None,
        "engine_s": round(engine, 3),
        "load_s": round(load, 3),
        "wait_s": round(sum(s["wait_s"] for s in stats), 3),
        # time inside the inversion over each rank's wall time, model loading included
        "engine_busy": round(engine / busy, 4) if busy > 0 else None,
        # the same without model loading (and the first import of diffusers it triggers):
        # what a long screen approaches, where each pair loads once for many images
        "engine_busy_after_load": round(engine / (busy - load), 4) if busy - load > 0 else None,
        "finalize_s": round(finalize_s, 3),
        # one image did not fit in memory, so a rank went on with --low-memory (same scores)
        "low_memory_fallback": any(s.get("low_memory_fallback", False) for s in stats),
        "per_rank": stats,
    }


def _print_pairs(pairs: dict, most: int = 20) -> None:
    """A line per pair of a screen (a swapped or unrelated pair hides in the pooled AUC):
    its AUC, flagged images and set verdict, as ``summary.json``'s ``pairs`` has them."""
    for key, p in list(pairs.items())[:most]:
        bits = [f"{p.get('scored', 0)} scored" + (f", {p['failed']} failed" if p.get("failed") else "")]
        if p.get("auc") is not None:
            bits.append(f"AUC {fraction(p['auc'])}" + (" (few labelled images)" if p.get("sample_warning") else ""))
        if p.get("flagged") is not None:
            bits.append(f"flagged {p['flagged']}")
        sv = p.get("set_verdict") or {}
        if sv.get("p_value") is not None:
            bits.append(f"set verdict: {sv['verdict']} (p = {sv['p_value']:.3g})")
        print(f"  pair {shown(key)}: " + "; ".join(bits))
    if len(pairs) > most:
        print(f"  ... and {len(pairs) - most} more pairs (summary.json: pairs)")


def print_summary(summary: dict) -> None:
    """The summary as the CLI prints it after authenticate, screen and the demo."""
    print(f"images: {summary['images']}  scored: {summary['scored']}  failed: {summary['failed']}")
    errors = list(summary.get("errors", {}).items())
    for image_id, reason in errors[:10]:
        print(f"  failed {shown(image_id)}: {shown(reason)}")
    if len(errors) > 10:
        print(f"  ... and {len(errors) - 10} more (see results.jsonl)")
    pairs = summary.get("pairs") or {}
    if summary.get("auc") is not None:
        pooled = f" pooled over {len(pairs)} pairs" if len(pairs) > 1 else ""
        print(f"AUC ({summary['metric']}){pooled}: {fraction(summary['auc'])}  "
              f"accuracy: {fraction(summary['accuracy'])}  TPR@1%FPR: {fraction(summary['tpr_at_1fpr'])}")
    if len(pairs) > 1:
        _print_pairs(pairs)
    if summary.get("official"):
        e = summary.get("embedder", {})
        o, kind = summary["official"], e.get("label") or e.get("kind", "?")
        auc = "n/a" if o["auc"] is None else fraction(o["auc"])
        print(f"official validator ({kind}, max over the folder): AUC {auc}  accuracy: {fraction(o['accuracy'])}  "
              f"(exact AUC {fraction(o['exact_auc'])})")
    for name, m in summary.get("by_metric", {}).items():
        if name.startswith("baseline_") and m.get("auc") is not None:
            print(f"  baseline {name[len('baseline_'):]}: AUC {fraction(m['auc'])}  accuracy: {fraction(m['accuracy'])}")
    sv = summary.get("set_verdict")
    if sv and sv.get("p_value") is not None:
        held = sv.get("holdouts_left_out")
        print(f"set verdict: {sv['verdict']} (p = {sv['p_value']:.3g}; {sv['n_suspect']} suspect vs "
              f"{sv['n_controls']} control images, one-sided Mann-Whitney U"
              + (f"; {held} hold-out{'s' if held != 1 else ''}, known not trained on, left out" if held else "") + ")")
        if sv.get("warning"):
            print(f"warning: {sv['warning']}")
    elif sv and sv.get("error"):
        print(f"no set verdict: {sv['error']}")
    if summary.get("preset"):
        p = summary["preset"]
        gone = ", ".join(f"{k} {v['given']} (preset {v['preset']})" for k, v in p["departures"].items())
        print(f"preset {p['name']}" + (f"; departures: {gone}" if gone else ": no departures"))
    elif summary.get("departures_from_defaults"):
        gone = ", ".join(f"{k} {v['given']} (default {v['preset']})"
                         for k, v in summary["departures_from_defaults"].items())
        print(f"settings that differ from the defaults (the paper's): {gone}")
    if "flagged" in summary:
        chance = summary.get("flagged_by_chance") or 0
        print(f"flagged as fine-tuned on (p <= {summary['config']['level']}): {summary['flagged']} "
              f"of {len(summary['verdicts'])}" + (f" (about {chance:g} would be by chance were none of them in the "
                                                  f"fine-tune: each image is tested on its own; the set verdict "
                                                  f"is one test of the suspect images together)" if chance else ""))
        named = [k for k, v in summary["verdicts"].items() if v.get("verdict") == "fine-tuned on"]
        for image_id in named[:10]:  # which ones, not only how many
            print(f"  flagged: {shown(image_id)}")
        if len(named) > 10:
            print(f"  ... and {len(named) - 10} more (the report lists them first)")
    if summary.get("evidence_cards"):
        where = Path(summary["report"]).parent / "evidence" if summary.get("report") else Path("evidence")
        print(f"evidence cards: {summary['evidence_cards']} in {shown(where)}/ (each flagged image's triptych with "
              f"its verdict, score, models and settings written under it)")
    for line in unjudged(summary):
        print(line)
    for key in ("controls_warning", "calibration_error", "calibration_warning", "copies_warning", "sample_warning",
                "auc_warning", "set_verdict_warning"):
        if summary.get(key):
            print(f"warning: {summary[key]}")
    if summary.get("stalled"):
        print(f"warning: {summary['stalled']['images']} images: {summary['stalled']['note']}")
    if summary.get("model_files"):
        from cgidm.provenance import said

        print(said(summary))
    print(f"report: {summary['report']}")
