"""One row per image: the builder both runners use for scored, failed and non-finite
images, and the triptych written beside a scored row (docs/architecture.md, "Stages").

A row is a dict written as one JSON line: ``image``, ``id``, ``label`` (and ``pair`` in a
many-pair run), then either the scores and ``triptych`` or an ``error``; ``notes`` says
what loading changed. Values are strict JSON: a non-finite score is written as null.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch

from cgidm.files import atomic_save_image, output_path
from cgidm.images import to_pil
from cgidm.score import latent_scores, pixel_scores

TRIPTYCHS = "triptychs"
RECOVERED = "recovered"


def own_files(out: Path, row: dict) -> list[Path]:
    """The triptych and recovered image a row names, where each is a file of this run's
    own folders (``triptychs/NAME``, ``recovered/NAME``): a name edited to point elsewhere
    is neither read nor removed."""
    found = []
    for folder, key in ((TRIPTYCHS, "triptych"), (RECOVERED, "recovered")):
        name = row.get(key)
        if isinstance(name, str) and name.startswith(folder + "/") and "/" not in name[len(folder) + 1:] \
                and name[len(folder) + 1:] not in ("", ".", ".."):
            found.append(Path(out) / name)
    return found


def triptych(original: torch.Tensor, partial: torch.Tensor, recovered: torch.Tensor, removed: float,
             min_side: int = 192):
    """original | partial | recovered, side by side, each named in a strip under it
    (``captions``; the partial image with ``removed``, the share of the latent removed);
    tiny images are enlarged (nearest) so that their cells stay visible."""
    from PIL import Image

    from cgidm.captions import caption_under

    ims = [to_pil(x) for x in (original, partial, recovered)]
    w, h = ims[0].size
    s = max(1, math.ceil(min_side / max(h, 1)))
    if s > 1:
        ims = [im.resize((w * s, h * s), Image.NEAREST) for im in ims]
        w, h = w * s, h * s
    return caption_under(ims, ("original", (f"{100 * removed:.0f}% of the latent removed", f"{100 * removed:.0f}% removed"),
                               "recovered"), pad=max(2, w // 32))


def score_batch(prep, result, recovered: torch.Tensor) -> list[dict]:
    """Scores of every image of an inverted batch: latent cosine/MSE on the removed half,
    SSIM/PSNR, and the skipped steps. Embedding scores come later, from the saved
    recovered images (``embed_scores.add_embedding_scores``)."""
    lat = latent_scores(prep.x0, result.x_rec, prep.mask)
    rows = []
    for i in range(prep.x0.shape[0]):
        row = {k: float(v[i]) for k, v in lat.items()}
        row.update(pixel_scores(prep.images[i], recovered[i]))
        row["skipped_steps"] = int(result.skipped_steps[i])
        rows.append(row)
    return rows


def _head(item) -> dict:
    row = {"image": str(item.path), "id": item.id, "label": item.label}
    if getattr(item, "pair", None) is not None:
        row["pair"] = item.pair.key
    if getattr(item, "source", None) is not None:  # the file as it was read (batches.load_batch)
        row["source"] = item.source
    if getattr(item, "fingerprint", None) is not None:  # its pixels' digest and perceptual hash (copies.py)
        row.update(item.fingerprint)
    return row


def error_row(item, reason: str, notes: Optional[list] = None) -> dict:
    row = {**_head(item), "error": reason}
    if notes:
        row["notes"] = notes
    return row


def _finite(sc: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in sc.items()}


def batch_rows(items: Sequence, notes: Sequence, prep, result, recovered: torch.Tensor, metric: str,
               out: Path) -> Iterator[dict]:
    """Rows of an inverted batch, one at a time, each after its image's recovered image
    (8-bit PNG, what the paper's validator reads) and triptych are written: a row on disk
    means its image is complete, and a write that fails stops after the rows before it.
    A non-finite result gets no score and no files."""
    scores = score_batch(prep, result, recovered)
    images, partials = prep.images.detach().float().cpu(), prep.partial_images.detach().float().cpu()
    recs = recovered.detach().float().cpu()
    removed = 1.0 - float(prep.mask.float().mean())  # 1 = kept (``masks.block_mask``)
    finite = torch.isfinite(result.x_rec.detach().flatten(1)).all(1).tolist()
    for i, (item, sc) in enumerate(zip(items, scores)):
        if finite[i] and all(math.isfinite(v) for v in sc.values() if isinstance(v, float)):
            rec_path = output_path(Path(out) / RECOVERED, item.id)
            atomic_save_image(to_pil(recs[i]), rec_path)
            path = output_path(Path(out) / TRIPTYCHS, item.id)
            atomic_save_image(triptych(images[i], partials[i], recs[i], removed), path)
            row = {**_head(item), "triptych": f"{TRIPTYCHS}/{path.name}", "recovered": f"{RECOVERED}/{rec_path.name}",
                   "score": sc.get(metric), **sc}
        else:
            row = {**_head(item), "error": "result is not finite", **_finite(sc)}
        if notes[i]:
            row["notes"] = notes[i]
        yield row
