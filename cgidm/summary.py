"""What a set of rows says: counts, member-vs-holdout metrics for every score, verdicts
against controls, per pair and over all pairs (docs/architecture.md, "Stages")."""
from __future__ import annotations

import math
from typing import Optional, Sequence

from cgidm.config import METRICS, departures
from cgidm.score import calibrate, set_metrics

VERDICT_FIELDS = ("p_value", "z", "verdict")
PAIR_SUMMARY_FIELDS = ("images", "scored", "failed", "auc", "accuracy", "tpr_at_1fpr", "threshold",
                       "controls", "flagged", "calibration_warning", "calibration_error")


def summarize(rows: Sequence[dict], cfg, info: Optional[dict] = None) -> dict:
    """Counts, member-vs-holdout metrics for every score field, verdicts against controls
    (written into the rows)."""
    good = [r for r in rows if "error" not in r]
    summary: dict = {
        "images": len(rows),
        "scored": len(good),
        "failed": len(rows) - len(good),
        "metric": cfg.metric,
        "errors": {r["id"]: r["error"] for r in rows if "error" in r},
        "auc": None,  # set below when there are labelled images; the report reads it always
        "config": cfg.to_json(),
    }
    if cfg.preset:
        summary["preset"] = {"name": cfg.preset, "departures": departures(cfg)}
    if info:
        summary["models"] = info
    labelled = [r for r in good if r.get("label") in ("member", "holdout")]
    if labelled:
        y = [r["label"] == "member" for r in labelled]
        per = {m: set_metrics([r[m] for r in labelled], y, m) for m in METRICS if all(m in r for r in labelled)}
        main = per[cfg.metric]
        summary.update({k: main.get(k) for k in ("auc", "accuracy", "tpr_at_1fpr", "threshold")})
        summary["roc"] = main.get("roc")
        summary["by_metric"] = {m: {k: v for k, v in d.items() if k != "roc"} for m, d in per.items()}
    controls = [r["score"] for r in good if r.get("label") == "control"]
    if controls:
        try:
            cal = calibrate(controls, cfg.metric, cfg.level)
        except ValueError as e:
            summary["calibration_error"] = str(e)
        else:
            summary["controls"] = len(cal.scores)
            if cal.min_p() > cfg.level:
                summary["calibration_warning"] = (
                    f"{len(cal.scores)} controls cannot give p <= {cfg.level}: "
                    f"use at least {math.ceil(1 / cfg.level) - 1}"
                )
            verdicts = {}
            for r in good:
                if r.get("label") != "control":
                    r.update(cal.judge(r["score"]))
                    verdicts[r["id"]] = {k: r[k] for k in VERDICT_FIELDS}
            summary["verdicts"] = verdicts
            summary["flagged"] = sum(v["verdict"] == "fine-tuned on" for v in verdicts.values())
    return summary


def summarize_pairs(rows: Sequence[dict], infos: dict, cfg) -> dict:
    """``summarize`` per pair (controls calibrate the images of their own pair), and over
    all pairs when there are several. ``infos``: ``{pair key: models info}``."""
    by_pair: dict[str, list[dict]] = {}
    for r in rows:
        by_pair.setdefault(r["pair"], []).append(r)
    per = {key: summarize(prs, cfg, infos[key]) for key, prs in sorted(by_pair.items())}
    if len(per) == 1:
        summary = dict(next(iter(per.values())))
    else:
        # AUC over every pair's members and hold-outs; verdicts stay those of each pair
        summary = summarize([r for r in rows if r.get("label") != "control"], cfg)
        good = [r for r in rows if "error" not in r]
        summary.update(images=len(rows), scored=len(good), failed=len(rows) - len(good))
        summary["errors"] = {k: v for s in per.values() for k, v in s.get("errors", {}).items()}
        summary["models"] = {k: " ".join(f"{a}={b}" for a, b in infos[k].items()) for k in per}
        verdicts = {k: v for s in per.values() for k, v in s.get("verdicts", {}).items()}
        if verdicts:
            summary["verdicts"] = verdicts
            summary["flagged"] = sum(s.get("flagged", 0) for s in per.values())
            summary["controls"] = sum(s.get("controls", 0) for s in per.values())
        warnings = [f"{k}: {s['calibration_warning']}" for k, s in per.items() if s.get("calibration_warning")]
        if warnings:
            summary["calibration_warning"] = "; ".join(warnings)
    summary["pairs"] = {k: {**infos[k], **{f: s[f] for f in PAIR_SUMMARY_FIELDS if f in s}} for k, s in per.items()}
    return summary


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
        "per_rank": stats,
    }
