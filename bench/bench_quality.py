"""Quality of CGI-DM on the study world (cgidm/testing/study.py; issue 14): how well it
tells members from hold-outs as the fine-tune grows stronger, against the baselines, and
what it costs.

For each fine-tune kind (full, LoRA) and grade (fine-tune steps) of the study world, and
each seed (the run seed of ``AuthConfig``: it keys the PGD draws and loss_diff's draws;
the fine-tunes, the mask and the identity codec do not change with it, so ``masked``,
``pia`` and ``secmi`` have sd 0), ``cgidm.api.authenticate`` runs CGI-DM (shared noise,
K = 1, the ``demo`` preset's step and radius, ``--steps`` PGD steps) with every baseline
(``AuthConfig(baselines="all")``) on members, hold-outs and controls. Per method:

- AUC of members against hold-outs (``cgidm.score.set_metrics``), mean ± sd over seeds;
- TPR at 1 % FPR with the threshold fixed on the controls alone (the largest control
  score, so no control is flagged: FPR on controls 0 <= 1 %), never on the test labels;
  the hold-outs' false-positive rate at that threshold is reported beside it;
- UNet evaluations per image (forward passes, and backward passes to the input), counted
  from the method's definition (cgidm/baselines.py).

Budget: on one pair (``--budget-kind``/``--budget-grade``) CGI-DM alone at PGD steps x K
timesteps, shared noise and the paper's independent noise: AUC against UNet evaluations.

``--robustness``: the suspect images (members and hold-outs; the controls too, as they
would be posted the same way) are downscaled by half, centre-cropped to 90 %, resized
back to the model's resolution (the loader refuses images under 8 px) and re-saved as
JPEG at quality 75 before authentication.

One JSON row to ``bench/results/quality-<device>.json`` (``$CGIDM_BENCH_RESULTS`` sends it
elsewhere); ``--grade-figure``/``--budget-figure`` draw the two plots.

    python bench/bench_quality.py                      # the full run (docs/evidence.md)
    python bench/bench_quality.py --quick --no-figures # the smoke test of the suite
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import append_row, provenance  # noqa: E402

from cgidm.config import (  # noqa: E402
    BASELINE_DRAWS, BASELINES, HIGHER_IS_BETTER, SECMI_INTERVAL, SECMI_T, baseline_field, preset_config,
)
from cgidm.manifest import ImageItem  # noqa: E402
from cgidm.score import set_metrics  # noqa: E402
from cgidm.testing.study import KINDS, SETS, build_study_world, checkpoint_paths  # noqa: E402
from cgidm.testing.tiny import INSTANCE_PROMPT  # noqa: E402

CGIDM = "cgidm"
METHODS = (CGIDM, *BASELINES)
DOCS = Path(__file__).resolve().parent.parent / "docs"


@dataclass(frozen=True)
class Config:
    quick: bool = False
    kinds: tuple = KINDS
    grades: Optional[tuple] = None  # None: every grade of the world
    seeds: tuple = (0, 1, 2)
    steps: int = 20  # PGD steps of CGI-DM and of the recovery baselines
    baselines: str = "all"
    budget_kind: str = "full"
    budget_grade: Optional[int] = None  # None: the middle grade
    budget_steps: tuple = (10, 20, 40)
    budget_k: tuple = (1, 2)
    budget_seeds: tuple = (0, 1)
    budget_noise: tuple = ("shared", "paper")  # the noise modes the budget sweeps
    paper_steps: int = 1000  # the paper setting's reference point in the budget sweep (0: none)
    p_draws: int = 200  # random member subsets per size for the images-needed-for-p<0.01 count
    robustness: bool = False
    reduced: bool = False
    world: dict = field(default_factory=dict)


def unet_evals(method: str, steps: int, k: int = 1) -> dict:
    """Forward passes and backward passes (to the input) of a UNet per image."""
    if method == CGIDM:
        return {"forward": 2 * steps * k, "backward": 2 * steps * k}
    if method in ("ft_only", "pre_only"):
        return {"forward": steps, "backward": steps}
    if method == "loss_diff":
        return {"forward": 2 * BASELINE_DRAWS, "backward": 0}
    if method == "masked":
        return {"forward": 0, "backward": 0}
    if method == "pia":
        return {"forward": 2, "backward": 0}
    if method == "secmi":
        return {"forward": len(range(SECMI_INTERVAL, SECMI_T, SECMI_INTERVAL)) + 2, "backward": 0}
    raise ValueError(method)


def field_of(method: str, metric: str) -> str:
    return metric if method == CGIDM else baseline_field(method)


def tpr_at_control_threshold(rows: list[dict], fld: str) -> dict:
    """TPR of members and FPR of hold-outs at the threshold fixed on the controls: an
    image is flagged when its (oriented) score is above every control's."""
    sign = 1.0 if HIGHER_IS_BETTER[fld] else -1.0
    val = {lab: [sign * r[fld] for r in rows if r.get("label") == lab and isinstance(r.get(fld), (int, float))]
           for lab in ("member", "holdout", "control")}
    if not val["control"] or not val["member"]:
        return {"tpr_at_1fpr_controls": None, "holdout_fpr": None}
    thr = max(val["control"])
    return {"tpr_at_1fpr_controls": sum(v > thr for v in val["member"]) / len(val["member"]),
            "holdout_fpr": sum(v > thr for v in val["holdout"]) / max(len(val["holdout"]), 1)}


def degrade(src: Path, dst: Path) -> None:
    """Downscale by half, centre-crop to 90 %, back to the original size, JPEG q75."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        im = im.resize((max(1, w // 2), max(1, h // 2)), Image.BICUBIC)
        cw, ch = max(1, round(im.width * 0.9)), max(1, round(im.height * 0.9))
        left, top = (im.width - cw) // 2, (im.height - ch) // 2
        im = im.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=75)
    dst.write_bytes(buf.getvalue())


def study_items(root: Path, work: Path, robustness: bool) -> list[ImageItem]:
    items = []
    for folder, label in SETS.items():
        for p in sorted((root / "images" / folder).glob("*.png")):
            if robustness:
                d = work / "degraded" / folder
                d.mkdir(parents=True, exist_ok=True)
                q = d / (p.stem + ".jpg")
                if not q.exists():
                    degrade(p, q)
                p = q
            items.append(ImageItem(p, label))
    return items


def run_auth(pair, items, out: Path, cfg) -> list[dict]:
    from cgidm.api import authenticate

    authenticate(pair, items, out, cfg, progress=False, prefetch_depth=0)
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines() if line.strip()]


def method_metrics(rows: list[dict], method: str, metric: str) -> Optional[dict]:
    fld = field_of(method, metric)
    labelled = [r for r in rows if r.get("label") in ("member", "holdout") and isinstance(r.get(fld), (int, float))]
    if len(labelled) != sum(r.get("label") in ("member", "holdout") for r in rows):
        return None
    m = set_metrics([r[fld] for r in labelled], [r["label"] == "member" for r in labelled], fld)
    return {"auc": m["auc"], **tpr_at_control_threshold(rows, fld)}


P_LEVEL = 0.01


def images_for_p(rows: list[dict], fld: str, draws: int, seed: int) -> Optional[int]:
    """How many member images a suspect set needs for the set verdict (one-sided
    Mann-Whitney U of the suspects against every control, ``cgidm.score.set_verdict``) to
    reach p < 0.01 in at least half of ``draws`` random member subsets of that size;
    ``None`` when even every member together does not."""
    import random

    from cgidm.score import set_verdict

    members = [r[fld] for r in rows if r.get("label") == "member" and isinstance(r.get(fld), (int, float))]
    controls = [r[fld] for r in rows if r.get("label") == "control" and isinstance(r.get(fld), (int, float))]
    if not members or len(controls) < 2:
        return None
    rng = random.Random(seed)

    def passes(n: int) -> bool:
        subsets = [members] if n == len(members) else [rng.sample(members, n) for _ in range(draws)]
        hits = sum(set_verdict(sub, controls, fld, P_LEVEL)["p_value"] < P_LEVEL for sub in subsets)
        return 2 * hits >= len(subsets)

    if not passes(len(members)):
        return None
    lo, hi = 1, len(members)  # passes(hi); the pass rate rises with n (more suspects, more power)
    while lo < hi:
        mid = (lo + hi) // 2
        if passes(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def cheapest(budget_rows: list[dict], paper_steps: int) -> Optional[dict]:
    """The budget point with the fewest UNet forward passes whose mean AUC is within the
    paper setting's seed spread (at least its mean minus one sd), and its cost as a
    fraction of the paper setting's."""
    ref = next((r for r in budget_rows if r["noise"] == "paper" and r["steps"] == paper_steps), None)
    if ref is None or ref["auc"]["mean"] is None:
        return None
    floor = ref["auc"]["mean"] - (ref["auc"]["sd"] or 0.0)
    ok = [r for r in budget_rows if r is not ref and r["auc"]["mean"] is not None and r["auc"]["mean"] >= floor]
    if not ok:
        return {"paper": ref, "floor": floor, "match": None}
    best = min(ok, key=lambda r: (r["unet_evals_per_image"]["forward"], -r["auc"]["mean"]))
    return {"paper": {k: ref[k] for k in ("noise", "steps", "k", "auc", "unet_evals_per_image")}, "floor": floor,
            "match": {k: best[k] for k in ("noise", "steps", "k", "auc", "unet_evals_per_image")},
            "fraction_of_paper_evals": best["unet_evals_per_image"]["forward"] / ref["unet_evals_per_image"]["forward"]}


def mean_sd(values: list) -> dict:
    vals = [v for v in values if v is not None]
    if not vals:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else 0.0, "n": len(vals)}


def run(cfg: Config, world: Path, work: Path, log=print) -> dict:
    from cgidm.models import load_pair

    stamp = json.loads((world / "study.json").read_text())
    grades = tuple(cfg.grades or stamp["grades"])
    items = study_items(world, work, cfg.robustness)
    base_auth = preset_config("demo", prompt=INSTANCE_PROMPT, steps=cfg.steps, noise="shared", k=1,
                              engine="engine", batch_size=len(items))
    metric = base_auth.metric
    grade_rows = []
    for kind in cfg.kinds:
        for grade in grades:
            pair = load_pair(**checkpoint_paths(world, kind, grade))
            per_seed = {m: [] for m in METHODS}
            needed = {m: [] for m in METHODS}
            t0 = time.perf_counter()
            for seed in cfg.seeds:
                auth = base_auth.replace(seed=seed, baselines=cfg.baselines)
                rows = run_auth(pair, items, work / f"{kind}-{grade}-{seed}", auth)
                for m in METHODS:
                    mm = method_metrics(rows, m, metric)
                    if mm is not None:
                        per_seed[m].append(mm)
                        needed[m].append(images_for_p(rows, field_of(m, metric), cfg.p_draws, seed))
            took = time.perf_counter() - t0
            for m, vals in per_seed.items():
                if not vals:
                    continue
                rec = {"kind": kind, "grade": grade, "method": m, "seeds": len(vals),
                       "auc": mean_sd([v["auc"] for v in vals]),
                       "tpr_at_1fpr_controls": mean_sd([v["tpr_at_1fpr_controls"] for v in vals]),
                       "holdout_fpr": mean_sd([v["holdout_fpr"] for v in vals]),
                       "unet_evals_per_image": unet_evals(m, cfg.steps),
                       "members_for_p01": needed[m]}
                grade_rows.append(rec)
            log(f"{kind:4s} grade {grade:4d}: " + "  ".join(
                f"{r['method']} {r['auc']['mean']:.3f}±{r['auc']['sd']:.3f}" for r in grade_rows
                if r["kind"] == kind and r["grade"] == grade and r["auc"]["mean"] is not None)
                + f"  ({took:.0f} s)")

    budget_rows = []
    bgrade = cfg.budget_grade if cfg.budget_grade is not None else grades[len(grades) // 2]
    if cfg.budget_steps:
        pair = load_pair(**checkpoint_paths(world, cfg.budget_kind, bgrade))
        points = [("shared", s, k) for s in cfg.budget_steps for k in cfg.budget_k] if "shared" in cfg.budget_noise else []
        points += [("paper", s, 1) for s in cfg.budget_steps] if "paper" in cfg.budget_noise else []
        if cfg.paper_steps:
            points.append(("paper", cfg.paper_steps, 1))
        for noise, steps, k in points:
            aucs, tprs = [], []
            t0 = time.perf_counter()
            for seed in cfg.budget_seeds:
                auth = base_auth.replace(seed=seed, steps=steps, k=k, noise=noise)
                rows = run_auth(pair, items, work / f"budget-{noise}-{steps}-{k}-{seed}", auth)
                mm = method_metrics(rows, CGIDM, metric)
                aucs.append(mm["auc"])
                tprs.append(mm["tpr_at_1fpr_controls"])
            took = time.perf_counter() - t0
            ev = unet_evals(CGIDM, steps, k)
            budget_rows.append({"kind": cfg.budget_kind, "grade": bgrade, "noise": noise, "steps": steps, "k": k,
                                "unet_evals_per_image": ev, "auc": mean_sd(aucs),
                                "tpr_at_1fpr_controls": mean_sd(tprs), "seconds": round(took, 1)})
            log(f"budget {noise:6s} steps {steps:4d} K {k}: UNet forwards {ev['forward']:5d}  "
                f"AUC {mean_sd(aucs)['mean']:.3f}  ({took:.0f} s)")
    return {"grades": grade_rows, "budget": budget_rows, "cheapest": cheapest(budget_rows, cfg.paper_steps),
            "metric": metric, "n_images": {
        lab: sum(it.label == lab for it in items) for lab in SETS.values()}}


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grades(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({r["kind"] for r in result["grades"]})
    fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        for m in METHODS:
            rs = [r for r in result["grades"] if r["kind"] == kind and r["method"] == m and r["auc"]["mean"] is not None]
            if not rs:
                continue
            ax.errorbar([r["grade"] for r in rs], [r["auc"]["mean"] for r in rs], yerr=[r["auc"]["sd"] for r in rs],
                        marker="o", capsize=3, label=m, lw=2.5 if m == CGIDM else 1.2)
        ax.set_xscale("log", base=2)
        ax.axhline(0.5, color="grey", lw=0.8, ls=":")
        ax.set_xlabel("fine-tune steps (grade)")
        ax.set_ylabel("AUC members vs hold-outs")
        ax.set_ylim(0.3, 1.02)
        ax.set_title(f"{kind} fine-tune")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)


def plot_budget(result: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (noise, k), marker in ((("shared", 1), "o"), (("shared", 2), "s"), (("shared", 4), "D"), (("paper", 1), "^")):
        rs = sorted((r for r in result["budget"] if r["noise"] == noise and r["k"] == k), key=lambda r: r["steps"])
        if rs:
            ax.plot([r["unet_evals_per_image"]["forward"] for r in rs], [r["auc"]["mean"] for r in rs],
                    marker=marker, label=f"CGI-DM {noise} noise, K={k}")
    for r in result["grades"]:
        if r["kind"] == (result["budget"] or [{}])[0].get("kind") and r["grade"] == (result["budget"] or [{}])[0].get(
                "grade") and r["method"] != CGIDM and r["auc"]["mean"] is not None:
            x = max(r["unet_evals_per_image"]["forward"], 1)
            ax.scatter([x], [r["auc"]["mean"]], marker="x")
            ax.annotate(r["method"], (x, r["auc"]["mean"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("UNet forward passes per image (masked: plotted at 1)")
    ax.set_ylabel("AUC members vs hold-outs")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    _save(fig, path)


def ints_of(text: str) -> tuple:
    return tuple(int(x) for x in text.split(",") if x.strip())


def plot_rows(numbers: tuple, path: Path) -> dict:
    """The budget figure of rows ``numbers`` of ``quality-<device>.json``, measuring nothing:
    their budget points together (a sweep measured in more than one run: the paper setting
    in one, shared noise at larger budgets in another) and, of each baseline, the entry with
    the most seeds among the rows (the full study's)."""
    from common import RESULTS

    lines = (RESULTS / "quality-cpu.json").read_text().splitlines()
    if not numbers or any(not 1 <= n <= len(lines) for n in numbers):
        sys.exit(f"--plot-rows: rows are numbered 1 to {len(lines)}, got {numbers}")
    rows = [json.loads(lines[n - 1]) for n in numbers]
    budget = [b for r in rows for b in r.get("budget") or []]
    if not budget:
        sys.exit(f"--plot-rows {numbers}: none of these rows has budget points")
    best: dict = {}
    for g in (g for r in rows for g in r.get("grades") or []):
        key = (g["kind"], g["grade"], g["method"])
        if g["auc"]["mean"] is not None and (key not in best or g["auc"]["n"] > best[key]["auc"]["n"]):
            best[key] = g
    result = {"budget": budget, "grades": list(best.values())}
    kind, grade = budget[0]["kind"], budget[0]["grade"]
    cgidm = "/".join(map(str, sorted({b["auc"]["n"] for b in budget})))
    base = "/".join(map(str, sorted({g["auc"]["n"] for (k, gr, m), g in best.items()
                                      if (k, gr) == (kind, grade) and m != CGIDM})))
    plot_budget(result, path, f"study world, {kind} fine-tune, grade {grade}: CGI-DM {cgidm} seeds, "
                              f"baselines {base} seeds\n(rows {', '.join(map(str, numbers))} of quality-cpu.json)")
    print(f"budget figure of rows {numbers} written to {path}")
    return result


def print_table(result: dict) -> None:
    print(f"\n{'kind':5s} {'grade':>5s} {'method':10s} {'AUC mean±sd':>14s} {'TPR@1%FPR(ctl)':>15s} "
          f"{'holdout FPR':>11s} {'fwd/img':>8s} {'bwd/img':>8s}  members for p<0.01 (per seed)")
    for r in result["grades"]:
        a, t, f = r["auc"], r["tpr_at_1fpr_controls"], r["holdout_fpr"]
        print(f"{r['kind']:5s} {r['grade']:5d} {r['method']:10s} {a['mean']:8.3f}±{a['sd']:.3f} "
              f"{t['mean'] if t['mean'] is not None else float('nan'):15.3f} "
              f"{f['mean'] if f['mean'] is not None else float('nan'):11.3f} "
              f"{r['unet_evals_per_image']['forward']:8d} {r['unet_evals_per_image']['backward']:8d}  "
              + ",".join("-" if n is None else str(n) for n in r.get("members_for_p01", [])))
    c = result.get("cheapest")
    if c and c.get("match"):
        m, ref = c["match"], c["paper"]
        print(f"\ncheapest within the paper setting's spread (AUC >= {c['floor']:.3f}): {m['noise']} noise, "
              f"{m['steps']} steps, K {m['k']}: AUC {m['auc']['mean']:.3f}, {m['unet_evals_per_image']['forward']} "
              f"forwards = {c['fraction_of_paper_evals']:.3f} of the paper setting's "
              f"({ref['steps']} steps, AUC {ref['auc']['mean']:.3f}±{ref['auc']['sd']:.3f})")
    elif c:
        print(f"\nno budget point reaches the paper setting's spread (AUC >= {c['floor']:.3f})")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick study world, 1 seed, few steps (smoke test)")
    p.add_argument("--world", default=None, help="study world folder (default: the cache)")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--grades", default=None, help="comma-separated fine-tune steps (default: every grade)")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=Config().steps)
    p.add_argument("--baselines", default="all")
    p.add_argument("--budget-kind", default="full", choices=KINDS)
    p.add_argument("--budget-grade", type=int, default=None)
    p.add_argument("--budget-steps", default=",".join(map(str, Config().budget_steps)),
                   help="comma-separated PGD steps of the budget sweep ('' for none)")
    p.add_argument("--budget-k", default=",".join(map(str, Config().budget_k)))
    p.add_argument("--budget-seeds", type=int, default=len(Config().budget_seeds))
    p.add_argument("--budget-noise", default=",".join(Config().budget_noise), help="noise modes of the budget sweep")
    p.add_argument("--paper-steps", type=int, default=Config().paper_steps,
                   help="the paper setting (independent noise) as the budget's reference point; 0: none")
    p.add_argument("--robustness", action="store_true", help="JPEG q75, half-size, 90 %% crop before authenticating")
    p.add_argument("--reduced", action="store_true", help="label the row as a reduced configuration")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--grade-figure", default=None, help=f"default: {DOCS / 'quality-grade.png'}")
    p.add_argument("--budget-figure", default=None, help=f"default: {DOCS / 'quality-budget.png'}")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--plot-rows", default=None,
                   help="draw the budget figure from these rows of the results file (1-based, comma-separated; "
                        "their budget points and baselines together) and run nothing")
    args = p.parse_args(argv)
    if args.plot_rows:
        return plot_rows(ints_of(args.plot_rows), Path(args.budget_figure or DOCS / "quality-budget.png"))
    if args.threads:
        torch.set_num_threads(args.threads)
    ints = lambda s: tuple(int(x) for x in s.split(",") if x.strip())  # noqa: E731
    t_start = time.perf_counter()
    t0 = time.perf_counter()
    if args.world and (Path(args.world) / "study.json").is_file():
        world = Path(args.world)  # a world built with another StudyConfig (a reduced run) is used as it is
    else:
        world = build_study_world(args.world, quick=args.quick)
    build_s = time.perf_counter() - t0
    stamp = json.loads((world / "study.json").read_text())
    cfg = Config(
        quick=args.quick, kinds=tuple(k for k in args.kinds.split(",") if k), grades=ints(args.grades) if args.grades
        else None, seeds=tuple(range(1 if args.quick else args.seeds)), steps=2 if args.quick else args.steps,
        baselines=args.baselines, budget_kind=args.budget_kind, budget_grade=args.budget_grade,
        budget_steps=(1, 2) if args.quick else ints(args.budget_steps), budget_k=(1,) if args.quick
        else ints(args.budget_k), budget_seeds=tuple(range(1 if args.quick else args.budget_seeds)),
        paper_steps=3 if args.quick else args.paper_steps,
        budget_noise=tuple(n for n in args.budget_noise.split(",") if n), p_draws=20 if args.quick else Config().p_draws,
        robustness=args.robustness, reduced=args.reduced or args.quick,
        world={k: v for k, v in stamp.items() if k not in ("checkpoints",)},
    )
    with tempfile.TemporaryDirectory(prefix="cgidm-quality-") as tmp:
        result = run(cfg, world, Path(tmp))
    total_s = time.perf_counter() - t_start
    print_table(result)
    label = ("robustness: JPEG q75 + half size + 90 % crop; " if cfg.robustness else "") + (
        "REDUCED configuration; " if cfg.reduced else "")
    title = f"study world, {label}PGD {cfg.steps} steps, {len(cfg.seeds)} seeds"
    figures = {}
    if not args.no_figures:
        suffix = "-robust" if cfg.robustness else ""
        gpath = Path(args.grade_figure or DOCS / f"quality-grade{suffix}.png")
        bpath = Path(args.budget_figure or DOCS / f"quality-budget{suffix}.png")
        if result["grades"]:  # a budget-only run (--kinds '') has no grade to plot
            plot_grades(result, gpath, title)
            figures["grade"] = str(gpath)
        if result["budget"]:
            plot_budget(result, bpath, title)
            figures["budget"] = str(bpath)
    device = torch.device("cpu")
    row = {"bench": "quality", **provenance(device), "config": {k: v for k, v in asdict(cfg).items()},
           "reduced": cfg.reduced, "robustness": cfg.robustness, "build_world_s": round(build_s, 1),
           "total_s": round(total_s, 1), "figures": figures, **result}
    path = append_row("quality", device, row)
    print(f"\nrow appended to {path} ({total_s:.0f} s in all, world {build_s:.0f} s)")
    return row


if __name__ == "__main__":
    main()
