"""Extraction of fine-tuning images (``cgidm extract``): a second, gradient-free line of
evidence beside CGI-DM, after FineXtract (Wu, Zhang, Wu, "Revealing the Unseen: Guiding
Personalized Diffusion Models to Expose Training Data", arXiv 2410.03039; ICML 2025 as
"Leveraging Model Guidance to Extract Training Data from Personalized Diffusion Models").

The runner (docs/extract.md) over two stages:

1. **Sampling** (``cgidm.guidance``) with the guidance extrapolated from the pretrained
   model toward the fine-tune, ``eps = eps_pre + w (eps_ft - eps_pre) + k eps_pre`` (on
   noise predictions; a v-prediction pair hands the scheduler the v that stands for it,
   ``guidance.guided_output``), both UNets evaluated on the same latent every step through a pair pass
   (``cgidm.pairpass``; on a GPU captured once in a CUDA graph, ``guidance.StaticPairCall``),
   a diffusers scheduler built from the base's scheduler config (DDIM), no gradients.
   Sample ``i`` starts from noise keyed by ``(seed, i)``, so a sample does not depend on
   the batch it ran in.
2. **Clustering** (``cgidm.cliques``): cliques of similar samples; each clique's
   representative is a candidate, densest cliques first.

``extract`` runs both for a ``ModelPair`` and writes the candidates, a grid,
``extract.json`` and ``report.html``; ``extract_compare.compare_images`` puts each candidate
beside its nearest image in a folder. Nothing here tests which model family it runs: the
conditioning comes from ``ModelPair.encode_prompt``, the latent shape from the UNet, the
sampler and its ``prediction_type`` from the base's scheduler config.
"""
from __future__ import annotations

import decimal
import errno
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from cgidm.cliques import cluster, said_of
from cgidm.config import ExtractConfig
from cgidm.extract_compare import (COMPARE, PIXEL_FEATURE_SIDE, check_readable, compare_images,  # noqa: F401
                                     extraction_metrics, features_of, grid, nearest, pixel_features)
from cgidm.extract_samples import SAMPLES, decode, describe_samples, thumbnails
from cgidm.extract_resume import PARTIAL, PartialSaver, load_partial, sampling_digest, sampling_settings
from cgidm.checkpoints import SAME_AS_BASE
from cgidm.files import atomic_save_image, atomic_write_json, atomic_write_text, counted, shown
from cgidm.graphs import graph_wanted
from cgidm.guidance import load_scheduler, sample, sample_keys
from cgidm.images import to_pil
from cgidm.provenance import check_unchanged, model_digests, pair_models
from cgidm.resume import OutputLock, check_run_kind, remove_stale_temporaries
from cgidm.summary import runtime

log = logging.getLogger(__name__)

CANDIDATES = "candidates"
# a run's outputs are written here, then moved into --out in place of the last run's: a run
# that stops (an error, Ctrl-C, a kill) leaves the last run's outputs as they were
STAGE = ".extract-new"
# bytes per pair of samples the clustering holds at once (``cliques.cluster``: the float64
# similarity matrix, its boolean graph, the upper triangle's indices and values)
CLUSTER_BYTES = 30


# --------------------------------------------------------------------------- features and comparison


def feature_kind(cfg: ExtractConfig, embedder) -> str:
    if cfg.features == "auto":
        return "embed" if embedder is not None else "latent"
    if cfg.features == "embed" and embedder is None:
        raise ValueError("--features embed needs --embedder DIR (a local CLIP or DINO model folder)")
    return cfg.features


def list_compare_images(folder: str | Path, exclude: Sequence[str | Path] = ()) -> list[tuple[Path, Optional[str]]]:
    """The images under ``folder`` (recursively) with their label: ``member``/``holdout``/
    ``control`` for images under a ``members/``, ``holdouts/`` or ``controls/`` subfolder
    (as ``cgidm screen`` reads a folder), else ``None``. ``ValueError`` for a folder that
    is missing or holds no image."""
    from cgidm.images import list_images
    from cgidm.manifest import folder_label

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise ValueError(f"--compare {folder}: not a folder")
    paths = list_images(root, recursive=True, exclude=exclude)
    if not paths:
        raise ValueError(f"--compare {folder}: no images in it")
    return [(p, folder_label(p, root)) for p in paths]


# --------------------------------------------------------------------------- the runner


def pair_pass(pair):
    """The pair's pair pass (``cgidm.pairpass``), chosen as the engine chooses it, and
    ``{"name", "why", "kind"}``."""
    from cgidm import pairpass

    kind, shared = pairpass.pair_kind(pair.unet_ft, pair.unet_pre)
    name, why = pairpass.choose(kind, pair.device, pairpass.measured_here())
    fn = pairpass.build(name, *((pair.unet_ft,) if shared else (pair.unet_ft, pair.unet_pre)))
    return fn, {"name": name, "why": why, "kind": kind}


def conditioning(pair, cfg: ExtractConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cond_ft, cond_pre)`` ``[1, L, D]``: the fine-tune's encoding of the prompt, and
    the pretrained model's of the prompt (``same``) or its unconditional input (``empty``:
    the empty prompt's encoding, or on SDXL zeros where its pipeline says so, as its
    classifier-free guidance has it: ``families.zero_text``)."""
    from cgidm import families

    c_ft, c_pre = pair.encode_prompt(cfg.prompt)
    if cfg.pretrained_prompt == "empty":
        c_pre = pair.encode_prompt("")[1]
        width = next((m.pooled_width for m in pair.unet_pre.modules() if isinstance(m, families.TextTimeUNet)), None)
        if width is not None and families.zeros_for_empty_prompt(pair.info["base"]):
            c_pre = families.zero_text(c_pre, width)
    return c_ft, c_pre


def on_step(threshold: Optional[float], step: float) -> Optional[float]:
    """A threshold of the scan (a multiple of ``step``, computed as ``i * step``) rounded
    to the decimals of ``step``: 0.41, not 0.41000000000000003. ``None`` (one sample, no
    threshold) stays ``None``."""
    if threshold is None:
        return None
    places = max(0, -decimal.Decimal(repr(float(step))).normalize().as_tuple().exponent)
    return round(float(threshold), places)


def _uses_lora(pair) -> bool:
    return "lora" in pair.info or pair.info.get("finetuned_format") == "lora"


def extract(
    pair,
    out: str | Path,
    cfg: ExtractConfig,
    *,
    compare: Optional[str | Path] = None,
    embedder=None,
    progress: bool = True,
    prompt_from: str = "given",
    scheduler=None,
    hash_models: bool = False,
    model_files: Optional[dict] = None,
) -> dict:
    """Sample, cluster and write the candidates of ``pair`` (a ``ModelPair``) into
    ``out``; with ``compare`` (a folder of images) put each candidate beside its nearest
    image there. ``cfg.prompt`` ``None``: the instance prompt the fine-tune records, as
    ``authenticate`` resolves it (``pipeline.resolve_prompt``; a ``ValueError`` without
    one); ``prompt_from`` says where a given prompt came from. The scale a LoRA
    was loaded with (``pair.info["lora_scale"]``) is recorded when a LoRA is involved
    (``None``: a pair built without it). The whole
    run holds ``out``'s lock (``resume.OutputLock``): a folder another cgidm run holds is
    refused (``ValueError``) before anything in it is cleared or written. Returns what
    ``extract.json`` holds. ``hash_models``: the model files read, by SHA-256, in it too
    (``provenance``), hashed when the run starts; ``model_files``: such a record made before
    the pair was loaded (as ``authenticate`` takes it)."""
    if not isinstance(cfg, ExtractConfig):
        raise TypeError(f"cfg must be an ExtractConfig, got {type(cfg).__name__}")
    if cfg.prompt is None:
        from cgidm.pipeline import resolve_prompt

        cfg, prompt_from = resolve_prompt(cfg, pair)
    kind = feature_kind(cfg, embedder)
    out = Path(out).expanduser()
    # what can be known before sampling is checked before it, so that a bad setting costs no
    # sampling; whatever stops the run later leaves an earlier run's outputs as they were
    if scheduler is None:
        scheduler = load_scheduler(pair.info["base"])
    trained = int(scheduler.config.num_train_timesteps)
    if cfg.steps > trained:
        raise ValueError(f"--steps {cfg.steps}: the base's scheduler has {trained} timesteps; give at most {trained}")
    check_clustering_memory(cfg.samples)
    compare_items = None
    if compare is not None:
        compare_items = list_compare_images(compare, exclude=[out])
        check_readable(compare_items, pair.resolution)
    with OutputLock(out):
        check_run_kind(out, "extract")
        files = model_files if model_files is not None else (
            model_digests(pair_models(pair.info), out, progress) if hash_models else None)
        stage = out / STAGE
        shutil.rmtree(stage, ignore_errors=True)  # a killed run's (this run holds the lock)
        stage.mkdir(parents=True)
        try:
            summary = _extract_staged(pair, stage, cfg, kind, compare_items, embedder, progress, prompt_from,
                                      scheduler, out / PARTIAL, files)
            _publish(stage, out)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        if not summary.get("samples_kept_beyond"):
            (out / PARTIAL).unlink(missing_ok=True)  # published: nothing to resume
        summary["report"] = str(out / "report.html")
        return summary


def check_clustering_memory(samples: int) -> None:
    """``ValueError`` for more samples than the clustering's pairwise similarities (about
    ``CLUSTER_BYTES`` bytes per pair of samples) fit in this machine's memory."""
    need = CLUSTER_BYTES * samples * samples
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if need > have:
        most = int(math.isqrt(have // CLUSTER_BYTES))
        raise ValueError(f"--samples {samples}: clustering them compares every pair of samples, about "
                         f"{need / 2**30:,.0f} GiB, more than this machine's {have / 2**30:,.0f} GiB of memory; "
                         f"give at most about {most:,}")


def _publish(stage: Path, out: Path) -> None:
    """The staged outputs into ``out``: the images first, the report and ``extract.json``
    last, then an earlier run's outputs this run did not write again (cgidm's own names
    only) go. Whatever stops it midway, nothing is lost that no other file replaced."""
    written = set()

    def move(src: Path, dst: Path) -> None:
        try:
            os.replace(src, dst)
        except OSError as e:
            if e.errno != errno.EXDEV:  # a linked subfolder on another filesystem: copied over
                raise
            shutil.move(src, dst)
        written.add(dst)

    for sub in (CANDIDATES, COMPARE, SAMPLES):
        if (stage / sub).is_dir():
            (out / sub).mkdir(exist_ok=True)
            for p in sorted((stage / sub).iterdir()):
                move(p, out / sub / p.name)
    for name in ("grid.png", "samples.png", "report.html", "extract.json"):
        if (stage / name).is_file():
            move(stage / name, out / name)
    for sub, pattern in ((CANDIDATES, "candidate_*.png"), (COMPARE, "candidate_*.png"), (SAMPLES, "sample_*.png")):
        if (out / sub).is_dir():
            for p in (out / sub).glob(pattern):
                if p not in written:
                    p.unlink()
    remove_stale_temporaries(out, [out / CANDIDATES, out / COMPARE, out / SAMPLES])
    for sub in (COMPARE, SAMPLES):  # emptied: this run wrote none (no --compare, no --save-samples)
        try:
            (out / sub).rmdir()
        except OSError:  # not there, not empty (a user's file in it), or a link
            pass


def _extract_staged(pair, out: Path, cfg: ExtractConfig, kind: str, compare_items, embedder, progress: bool,
                    prompt_from: str, scheduler, partial: Path, files: Optional[dict] = None) -> dict:
    """``extract`` into the staging folder ``out`` (paths in the summary are relative);
    ``partial``: the samples a stopped run drew (``cgidm.extract_resume``); ``files``: the
    model files' digests (``provenance``)."""
    t_start = time.perf_counter()
    device = pair.device
    c_ft, c_pre = conditioning(pair, cfg)
    pair_fn, pass_info = pair_pass(pair)
    latent_shape = pair.latent_shape
    # the samples a stopped run drew with these settings are kept; only the others are drawn
    settings = sampling_settings(pair, cfg, scheduler, latent_shape)
    digest = sampling_digest(settings, pair, c_ft, c_pre)
    drawn = load_partial(partial, digest, latent_shape, settings)
    todo = [i for i in range(cfg.samples) if i not in drawn]
    warnings = [SAME_AS_BASE] if pair.info.get("same_as_base") else []

    def warn(text: str) -> None:  # said now, and kept for extract.json and the report
        warnings.append(text)
        log.warning("%s", text)
    if len(todo) < cfg.samples:
        log.warning("%d of %d samples were drawn by a run that stopped (%s); %s", cfg.samples - len(todo), cfg.samples,
                    partial, f"drawing the other {len(todo)}" if todo else "none left to draw")
    beyond = sum(i >= cfg.samples for i in drawn)
    if beyond:  # kept for a run with more --samples: never dropped without a word
        warn(f"{counted(beyond, 'sample')} a stopped run drew past --samples {cfg.samples} not used; kept in "
             f"{partial.name} for a run with more --samples")
    saver = PartialSaver(partial, digest, drawn, settings)
    use_graph = graph_wanted(None, device)
    t0 = time.perf_counter()
    if todo:
        try:
            sample(pair_fn, c_ft, c_pre, scheduler, sample_keys(cfg.seed, todo), latent_shape, cfg.guidance,
                   cfg.correction, cfg.steps, cfg.batch_size, device, progress, use_graph,
                   on_batch=lambda lo, x: saver.add(todo[lo:lo + x.shape[0]], x))
        except BaseException:
            saver.flush()
            raise
        # every sample kept before decoding: a stop (Ctrl-C, an error, a kill) while the
        # samples are decoded, clustered or compared loses none of them
        saver.flush()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    sampling_s = time.perf_counter() - t0
    latents = torch.stack([drawn[i] for i in range(cfg.samples)])  # fp32 on the CPU (``PartialSaver``)
    if hasattr(pair_fn, "remove"):
        pair_fn.remove()
    finite = torch.isfinite(latents.flatten(1)).all(dim=1)
    if not finite.all():
        warn(f"{int((~finite).sum())} of {cfg.samples} samples are not finite and are left out")
    kept = torch.nonzero(finite).flatten().tolist()
    if not kept:
        if all(not torch.isfinite(x).all() for x in drawn.values()):  # nothing there worth resuming
            partial.unlink(missing_ok=True)
        raise ValueError("every sample is non-finite (NaN or inf): lower --guidance"
                         + (" or --correction" if cfg.correction else ""))
    feats, tiles, fits = describe_samples(pair, latents, kept, kind, embedder, cfg, out, progress)
    clustering = cluster(feats, cfg.clusters, cfg.threshold_quantile, cfg.threshold_step, cfg.clique_budget,
                         progress=progress)
    warnings += said_of(clustering, cfg, len(kept))
    order = [j for c in clustering.clusters for j in c.members]
    atomic_save_image(thumbnails([tiles[j] for j in order], groups=[c.size for c in clustering.clusters]),
                      out / "samples.png")
    del tiles

    # the candidates decoded again (a few images), not every sample's kept: ``extract_samples``
    cand_rows = [c.representative for c in clustering.clusters[:cfg.n_candidates]]
    cand_images, _ = decode(pair, latents[[kept[j] for j in cand_rows]], fits)
    (out / CANDIDATES).mkdir(exist_ok=True)
    candidates, cand_pils = [], [to_pil(im) for im in cand_images]
    for rank, (c, pil) in enumerate(zip(clustering.clusters, cand_pils)):
        name = f"{CANDIDATES}/candidate_{rank:02d}.png"
        atomic_save_image(pil, out / name)
        candidates.append({
            "rank": rank, "image": name, "sample": kept[c.representative], "cluster_size": c.size,
            "mean_similarity": c.mean_similarity, "cluster": [kept[j] for j in c.members],
        })
    words = [(f"rank {c['rank']}: {c['cluster_size']} sample{'s' if c['cluster_size'] != 1 else ''}",
              f"rank {c['rank']}: {c['cluster_size']}", f"{c['rank']}: {c['cluster_size']}") for c in candidates]
    atomic_save_image(grid(cand_pils, columns=min(8, len(cand_pils)), labels=words), out / "grid.png")

    models = {k: v for k, v in pair.info.items() if k in ("base", "finetuned", "lora", "finetuned_format", "family")}
    if _uses_lora(pair):
        models["lora_scale"] = pair.info.get("lora_scale")
    weights = next(pair.unet_ft.parameters()).dtype
    summary = {
        "method": "FineXtract-style extraction (extrapolated guidance, clique clustering)",
        "models": models,
        "prompt": cfg.prompt,
        "prompt_from": prompt_from,
        # candidates: the number written (at most --candidates, fewer when there are fewer clusters)
        "config": {**cfg.to_json(), "candidates": len(candidates)},
        "guidance_formula": "eps = eps_pre + w (eps_ft - eps_pre) + k eps_pre",
        "scheduler": {"class": type(scheduler).__name__, **{k: v for k, v in dict(scheduler.config).items()
                                                               if not k.startswith("_")}},
        "pair_pass": pass_info,
        "cuda_graph": use_graph,
        "device": str(device),
        "dtype": str(weights).removeprefix("torch."),
        "runtime": runtime(device, weights),
        "features": kind,
        "samples": cfg.samples,
        "finite_samples": len(kept),
        "clustering": {
            "threshold": on_step(clustering.threshold, cfg.threshold_step),
            "clusters": len(clustering.clusters),
            "sizes": [c.size for c in clustering.clusters],
            # every cluster's samples, densest first: the order of the tiles in samples.png
            "members": [[kept[j] for j in c.members] for c in clustering.clusters],
            "scanned": [{**r, "threshold": on_step(r["threshold"], cfg.threshold_step)} for r in clustering.scanned],
        },
        "candidates": candidates,
        "resumed_samples": cfg.samples - len(todo),
        "samples_kept_beyond": beyond,  # in the partial file, for a later run with more --samples
        "warnings": warnings,
        "timing": {"sampling_s": sampling_s,
                   "samples_per_hour": 3600 * len(todo) / sampling_s if todo and sampling_s else None},
    }
    if compare_items is not None:
        summary["compare"] = compare_images(pair, compare_items, kind, [latents[kept[j]] for j in cand_rows],
                                            list(cand_images), candidates, out, cfg, embedder,
                                            progress=progress)
        if summary["compare"].get("unlabelled_why"):
            warn(f"--compare {summary['compare']['unlabelled_why']}")
    summary["timing"]["wall_s"] = time.perf_counter() - t_start
    if files is not None:
        summary["model_files"] = files
        check_unchanged(summary)
    atomic_write_json(out / "extract.json", summary)
    write_report(out, summary)
    return summary


# --------------------------------------------------------------------------- report

REPORT = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>cgidm extraction</title>
<style>
code,td,li{unicode-bidi:isolate}
body{font-family:system-ui,sans-serif;margin:24px;color:#222} .error{color:#b00;font-weight:bold}
.sub{color:#666} .cards{display:flex;gap:12px;flex-wrap:wrap;margin:12px 0}
.card{border:1px solid #ddd;border-radius:8px;padding:10px 14px;min-width:120px;max-width:22em}.card b{display:block;font-size:22px}
.note{display:block;color:#666;font-size:smaller} code,td{unicode-bidi:isolate}
img{image-rendering:pixelated} table{border-collapse:collapse;margin-top:16px}
th,td{border-bottom:1px solid #eee;padding:6px 8px;text-align:left;vertical-align:middle}
.settings th{font-weight:normal;color:#666}
td img{height:128px} .member{color:#b00}.holdout{color:#06a}
</style></head><body>
<h1>cgidm extraction</h1>
{% if s.warnings %}<ul class="error">{% for w in s.warnings %}<li>warning: {{ w|shown }}</li>{% endfor %}</ul>{% endif %}
<p class="sub">Samples drawn with the guidance extrapolated from the pretrained model toward the fine-tune
(<code>{{ s.guidance_formula }}</code>, w = {{ s.config.guidance }}, k = {{ s.config.correction }},
pretrained prompt: {{ s.config.pretrained_prompt|shown }}), then clustered; each candidate is the
representative of a cluster of similar samples, densest first. Prompt: <code>{{ s.prompt|shown }}</code> ({{ s.prompt_from|shown }}).</p>
<p class="sub">models: {% for k, v in s.models.items() %}{{ k }} = <code>{{ v|shown }}</code>{% if not loop.last %}; {% endif %}{% endfor %}</p>
<h2>Settings</h2>
<table class="settings"><tbody>
{% for name, value in settings %}<tr><th>{{ name }}</th><td>{{ value|shown }}</td></tr>
{% endfor %}</tbody></table>
<div class="cards">
<div class="card">samples<b>{{ s.finite_samples }}</b></div>
<div class="card">clusters<b>{{ s.clustering.clusters }}</b></div>
<div class="card">threshold ({{ s.features }} cosine)<b>{{ fmt(s.clustering.threshold) }}</b></div>
{% if s.compare and s.compare.labelled %}{% set lab = s.compare.labelled %}<div class="card">members extracted<b>{{ lab.extracted }} / {{ lab.members }}</b>
<span class="note">a member counts when its best similarity to a candidate is above every hold-out's
(threshold {{ fmt(lab.threshold) }}, the best of {{ lab.holdouts }} hold-out{{ 's' if lab.holdouts != 1 else '' }}): no hold-out counts{% if lab.controls %};
{{ lab.controls_above }} of {{ lab.controls }} control images (also never trained on) are above it too{% endif %}</span></div>
<div class="card">AUC members vs hold-outs<b>{{ fraction(lab.auc) }}</b><span class="note">each image ranked by its best similarity to a candidate</span></div>{% endif %}
</div>
<h2>Candidates</h2><img alt="candidates" src="grid.png" style="max-width:100%">
{% if s.compare %}<h2>Nearest images in the compared folder</h2>
<table><thead><tr><th>rank</th><th>cluster size</th><th>candidate | nearest</th><th>nearest</th><th>label</th>
<th>similarity</th><th>SSIM</th><th>PSNR (dB)</th></tr></thead><tbody>
{% for p in s.compare.pairs %}<tr><td>{{ p.rank }}</td><td>{{ s.candidates[loop.index0].cluster_size }}</td>
<td><img alt="candidate {{ p.rank }}" src="{{ p.pair_image }}"></td><td><code>{{ p.nearest|shown }}</code></td>
<td class="{{ p.label or '' }}">{{ p.label or '' }}</td><td>{{ fmt(p.similarity) }}</td><td>{{ fmt(p.ssim) }}</td>
<td>{{ fmt(p.psnr) }}</td></tr>{% endfor %}</tbody></table>
{% if s.compare.failed %}<p class="sub">{{ s.compare.failed | length }} image(s) of the folder could not be read and
were not compared:</p><ul>{% for f in s.compare.failed %}<li><code>{{ f.error|shown }}</code></li>{% endfor %}</ul>{% endif %}
{% else %}
<table><thead><tr><th>rank</th><th>cluster size</th><th>mean similarity</th><th>candidate</th></tr></thead><tbody>
{% for c in s.candidates %}<tr><td>{{ c.rank }}</td><td>{{ c.cluster_size }}</td><td>{{ fmt(c.mean_similarity) }}</td>
<td><img alt="candidate {{ c.rank }}" src="{{ c.image }}"></td></tr>{% endfor %}</tbody></table>{% endif %}
<h2>All samples, by cluster</h2><p class="sub">Densest cluster first. The strip under each sample is its
cluster's colour (two colours, in turn, so that neighbouring clusters differ); the number on a cluster's
first sample is its rank: the rank of its candidate above, where the cluster is among the candidates written.</p><img alt="samples" src="samples.png" style="max-width:100%">
{{ files_table }}
</body></html>
"""


def _setting(v) -> str:
    if isinstance(v, bool) or v is None:
        return {True: "yes", False: "no", None: "not recorded"}[v]
    return str(v)


def settings_rows(summary: dict) -> list[tuple[str, str]]:
    """``(name, value)`` of every setting that changes the result, as ``extract.json``
    records it: the report's "Settings" table."""
    c, sch = summary["config"], summary["scheduler"]
    samples = str(summary["samples"])
    if summary["finite_samples"] != summary["samples"]:
        samples += f" ({summary['finite_samples']} finite)"
    rows = [
        ("prompt", summary["prompt"]),
        ("prompt from", summary["prompt_from"]),
        ("pretrained prompt", c["pretrained_prompt"]),
        ("guidance w", c["guidance"]),
        ("correction k", c["correction"]),
        ("steps", c["steps"]),
        ("samples", samples),
        ("seed", c["seed"]),
        ("batch size", c["batch_size"]),
        ("scheduler", f"{sch['class']} ({sch.get('prediction_type', 'epsilon')})"),
        ("features", summary["features"]),
        ("clusters N", c["clusters"]),
        ("threshold scan", f"from the {_setting(c['threshold_quantile'])} quantile of the pairwise similarities, "
                           f"step {_setting(c['threshold_step'])}, {c['clique_budget']} search steps per threshold"),
        ("candidates written", c["candidates"]),
    ]
    if "lora_scale" in summary["models"]:
        rows.append(("LoRA scale", summary["models"]["lora_scale"]))
    rows += [("device", summary["device"]), ("dtype", summary["dtype"]),
             ("pair pass", f"{summary['pair_pass']['name']} ({summary['pair_pass']['kind']})"),
             ("CUDA graph", summary["cuda_graph"])]
    if "runtime" in summary:
        rows.append(("versions", f"cgidm {summary['runtime']['cgidm']}, torch {summary['runtime']['torch']}"))
    return [(name, _setting(v)) for name, v in rows]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(out: Path, summary: dict) -> Path:
    """``report.html`` beside the images it shows (relative links only)."""
    from jinja2 import Environment, select_autoescape

    from cgidm import provenance
    from cgidm.report import fraction

    env = Environment(autoescape=select_autoescape(default=True))
    env.filters["shown"] = shown  # names and prompts are untrusted: bidi overrides and controls as escapes
    html = env.from_string(REPORT).render(s=summary, fmt=_fmt, fraction=fraction, settings=settings_rows(summary),
                                          files_table=provenance.table(summary))
    path = Path(out) / "report.html"
    atomic_write_text(path, html)
    return path
