"""The authentication pipeline: load -> encode -> mask -> invert -> decode -> score ->
write. ``authenticate`` is what ``cgidm authenticate`` runs; researchers can call the
pieces (``prepare``, ``recover``) on their own tensors."""
from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from cgidm.files import OutputError, append_jsonl, atomic_save_image, atomic_write_text, output_path
from cgidm.images import ImageError, list_images, load_image_with_notes, to_pil
from cgidm.masks import block_mask
from cgidm.models import ModelPair
from cgidm.reference import PGDConfig, invert, partial_representation, unet_eps_fn
from cgidm.score import DEFAULT_SCORE, SCORE_FIELDS, calibrate, latent_scores, pixel_scores, set_metrics

log = logging.getLogger(__name__)

LABELS = ("member", "holdout", "control")


@dataclass(frozen=True)
class AuthConfig:
    """Everything that decides a result besides the models and the images."""

    prompt: str = "a figure"
    pgd: PGDConfig = PGDConfig()
    blocks_per_side: Optional[int] = None  # None: a block of 4×4 latent cells (16 at 64×64)
    pass_rate: int = 2
    batch_size: int = 8
    seed: int = 0
    metric: str = DEFAULT_SCORE
    alpha: float = 0.05
    impl: str = "ref"
    engine: str = "reference"  # "engine": cgidm.engine (same results on CPU; CUDA graphs on GPU)

    def to_json(self) -> dict:
        d = asdict(self)
        d["pgd"] = asdict(self.pgd)
        return d


@dataclass
class ImageItem:
    path: Path
    label: Optional[str] = None
    id: str = ""

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if self.label is not None and self.label not in LABELS:
            raise ValueError(f"label must be one of {LABELS} or empty, got {self.label!r}")
        if not self.id:
            self.id = f"{self.label or 'image'}/{self.path.name}"


@dataclass
class Prepared:
    """Encoded inputs of a batch: ``x0``, ``x_init`` ``[B, C, h, w]``; ``mask [C, h, w]``;
    images ``[B, 3, H, W]`` in [-1, 1]."""

    x0: torch.Tensor
    x_init: torch.Tensor
    mask: torch.Tensor
    images: torch.Tensor
    partial_images: torch.Tensor
    generators: list[torch.Generator] = field(default_factory=list)


def image_seed(seed: int, image_id: str) -> int:
    """A per-image seed: results do not depend on batching or on the order of a run."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{image_id}".encode()).digest()[:8], "little") >> 1


def make_mask(pair: ModelPair, cfg: AuthConfig) -> torch.Tensor:
    h = pair.latent_size
    blocks = cfg.blocks_per_side or max(1, h // 4)
    return block_mask(h, h, pair.latent_channels, blocks, cfg.pass_rate, device=pair.device)


@torch.no_grad()
def prepare(pair: ModelPair, images: torch.Tensor, ids: Sequence[str], cfg: AuthConfig) -> Prepared:
    """Encode (sampled, one generator per image), mask, and build the partial
    representation (decode the masked latent, encode again)."""
    device = pair.device
    gens = [torch.Generator(device=device).manual_seed(image_seed(cfg.seed, i)) for i in ids]
    mask = make_mask(pair, cfg)
    x0s, inits, partials = [], [], []
    for img, g in zip(images, gens):
        x0 = pair.codec.encode(img[None].to(device), generator=g)
        x_init, partial = partial_representation(pair.codec, x0, mask, generator=g)
        x0s.append(x0)
        inits.append(x_init)
        partials.append(partial)
    return Prepared(torch.cat(x0s), torch.cat(inits), mask, images, torch.cat(partials), gens)


def recover(pair: ModelPair, prep: Prepared, cfg: AuthConfig, callback=None):
    """PGD on the contrast loss; returns the reference's ``InversionResult``."""
    from cgidm.ops import get_ops

    c_ft, c_pre = pair.encode_prompt(cfg.prompt)
    if cfg.engine == "engine":
        from cgidm.engine import Engine

        # One bucket per call: a graph captured here serves this batch only.
        engine = Engine(
            pair.unet_ft, pair.unet_pre, c_ft, c_pre, pair.abar, prep.x0.shape[1:], cfg.pgd,
            batch=prep.x0.shape[0], device=pair.device, impl=cfg.impl,
        )
        return engine.invert(prep.x0, prep.x_init, prep.mask, prep.generators, callback=callback)
    if cfg.engine != "reference":
        raise ValueError(f"engine must be 'reference' or 'engine', got {cfg.engine!r}")
    return invert(
        unet_eps_fn(pair.unet_ft), unet_eps_fn(pair.unet_pre), prep.x0, prep.x_init, prep.mask,
        c_ft, c_pre, pair.abar, cfg.pgd, generator=prep.generators, ops=get_ops(cfg.impl),
        callback=callback,
    )


def collect_items(
    images: Optional[str | Path] = None,
    members: Optional[str | Path] = None,
    holdouts: Optional[str | Path] = None,
    controls: Optional[str | Path] = None,
) -> list[ImageItem]:
    items: list[ImageItem] = []
    for folder, label in ((images, None), (members, "member"), (holdouts, "holdout"), (controls, "control")):
        if folder is not None:
            found = list_images(folder)
            if not found:
                raise FileNotFoundError(f"no images in {folder}")
            items += [ImageItem(p, label) for p in found]
    if not items:
        raise ValueError("no images given (use --images, or --members and --holdouts)")
    return items


def triptych(original: torch.Tensor, partial: torch.Tensor, recovered: torch.Tensor, min_side: int = 192):
    """original | partial | recovered, side by side; tiny images are enlarged (nearest)
    so that their cells stay visible."""
    from PIL import Image

    ims = [to_pil(x) for x in (original, partial, recovered)]
    w, h = ims[0].size
    s = max(1, math.ceil(min_side / max(h, 1)))
    if s > 1:
        ims = [im.resize((w * s, h * s), Image.NEAREST) for im in ims]
        w, h = w * s, h * s
    pad = max(2, w // 32)
    canvas = Image.new("RGB", (3 * w + 2 * pad, h), (255, 255, 255))
    for i, im in enumerate(ims):
        canvas.paste(im, (i * (w + pad), 0))
    return canvas


def score_batch(pair: ModelPair, prep: Prepared, result, recovered: torch.Tensor, embedder=None) -> list[dict]:
    lat = latent_scores(prep.x0, result.x_rec, prep.mask)
    rows = []
    emb = embedder.cosine(prep.images, recovered) if embedder is not None else None
    for i in range(prep.x0.shape[0]):
        row = {k: float(v[i]) for k, v in lat.items()}
        row.update(pixel_scores(prep.images[i], recovered[i]))
        if emb is not None:
            row["embed_cos"] = float(emb[i])
        row["skipped_steps"] = int(result.skipped_steps[i])
        rows.append(row)
    return rows


def run_items(
    pair: ModelPair,
    items: Sequence[ImageItem],
    out: Path,
    cfg: AuthConfig,
    embedder=None,
    progress: bool = True,
    on_row=None,
) -> list[dict]:
    """Authenticate ``items`` in batches; write triptychs and one JSONL row per image
    (through ``on_row``, default: append to ``out/results.jsonl``).

    An unreadable image becomes an ``error`` row and the run goes on; a write that fails
    (full disk, permission) raises ``OutputError`` and stops the run, the rows written
    before it complete."""
    from tqdm.auto import tqdm

    out = Path(out)
    results = out / "results.jsonl"
    try:
        (out / "triptychs").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(out / "triptychs", e) from e
    on_row = on_row or (lambda row: append_jsonl(results, row))
    rows: list[dict] = []
    bar = tqdm(total=len(items), desc="images", unit="img", disable=not progress)

    def emit(row: dict) -> None:
        try:
            on_row(row)
        except OutputError:
            raise
        except OSError as e:
            raise OutputError(e.filename or results, e) from e
        rows.append(row)
        bar.update(1)

    for start in range(0, len(items), cfg.batch_size):
        batch = items[start:start + cfg.batch_size]
        ok, tensors, notes = [], [], []
        for it in batch:
            try:
                x, note = load_image_with_notes(it.path, pair.resolution)
            except ImageError as e:
                emit({"image": str(it.path), "id": it.id, "label": it.label, "error": e.reason})
                continue
            tensors.append(x)
            notes.append(note)
            ok.append(it)
        if not ok:
            continue
        prep = prepare(pair, torch.stack(tensors), [it.id for it in ok], cfg)
        step_bar = tqdm(total=cfg.pgd.steps, desc="  PGD", unit="step", leave=False, disable=not progress)

        def cb(step, loss):
            step_bar.update(1)
            if step % 10 == 0:
                step_bar.set_postfix(contrast=f"{loss:+.4f}")

        result = recover(pair, prep, cfg, callback=cb)
        step_bar.close()
        recovered = pair.codec.decode(result.x_rec)
        for it, sc, i in zip(ok, score_batch(pair, prep, result, recovered, embedder), range(len(ok))):
            finite = all(math.isfinite(v) for v in sc.values() if isinstance(v, float))
            if not finite or not torch.isfinite(result.x_rec[i]).all():
                # no triptych and no score; NaN is not JSON that other tools read
                sc = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in sc.items()}
                row = {"image": str(it.path), "id": it.id, "label": it.label,
                       "error": "result is not finite", **sc}
            else:
                path = output_path(out / "triptychs", it.id)
                atomic_save_image(triptych(prep.images[i], prep.partial_images[i], recovered[i]), path)
                row = {"image": str(it.path), "id": it.id, "label": it.label,
                       "triptych": f"triptychs/{path.name}", "score": sc[cfg.metric], **sc}
            if notes[i]:
                row["notes"] = notes[i]
            emit(row)
    bar.close()
    return rows


def summarize(rows: Sequence[dict], cfg: AuthConfig, info: Optional[dict] = None) -> dict:
    """Counts, member-vs-holdout metrics for every score field, verdicts against controls."""
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
    if info:
        summary["models"] = info
    labelled = [r for r in good if r.get("label") in ("member", "holdout")]
    if labelled:
        y = [r["label"] == "member" for r in labelled]
        per = {m: set_metrics([r[m] for r in labelled], y, m) for m in SCORE_FIELDS + ("embed_cos",)
               if all(m in r for r in labelled)}
        main = per[cfg.metric]
        summary.update({k: main.get(k) for k in ("auc", "accuracy", "tpr_at_1fpr", "threshold")})
        summary["roc"] = main.get("roc")
        summary["by_metric"] = {m: {k: v for k, v in d.items() if k != "roc"} for m, d in per.items()}
    controls = [r["score"] for r in good if r.get("label") == "control"]
    if controls:
        try:
            cal = calibrate(controls, cfg.metric, cfg.alpha)
        except ValueError as e:
            summary["calibration_error"] = str(e)
        else:
            summary["controls"] = len(cal.scores)
            if cal.min_p() > cfg.alpha:
                summary["calibration_warning"] = (
                    f"{len(cal.scores)} controls cannot give p <= {cfg.alpha}: "
                    f"use at least {math.ceil(1 / cfg.alpha) - 1}"
                )
            verdicts = {}
            for r in good:
                if r.get("label") != "control":
                    r.update(cal.judge(r["score"]))
                    verdicts[r["id"]] = {k: r[k] for k in ("p_value", "z", "verdict")}
            summary["verdicts"] = verdicts
            summary["flagged"] = sum(v["verdict"] == "fine-tuned on" for v in verdicts.values())
    return summary


def authenticate(
    pair: ModelPair,
    items: Sequence[ImageItem],
    out: str | Path,
    cfg: AuthConfig = AuthConfig(),
    embedder=None,
    progress: bool = True,
) -> dict:
    """Authenticate images against a model pair; writes ``out/results.jsonl``,
    ``out/triptychs/*.png``, ``out/summary.json`` and ``out/report.html``.
    Returns the summary. Raises ``OutputError`` when an output cannot be written; the
    rows finished before it stay complete in ``results.jsonl``."""
    from cgidm.report import write_report

    out = Path(out)
    results = out / "results.jsonl"
    try:
        out.mkdir(parents=True, exist_ok=True)
        results.unlink(missing_ok=True)
    except OSError as e:
        raise OutputError(out, e) from e
    rows = run_items(pair, list(items), out, cfg, embedder, progress)
    summary = summarize(rows, cfg, pair.info)
    if "verdicts" in summary:  # rewrite rows with their verdicts
        atomic_write_text(results, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    summary["report"] = str(write_report(out, rows, summary))
    return summary
