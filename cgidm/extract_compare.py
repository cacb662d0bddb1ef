"""``cgidm extract --compare DIR`` (docs/extract.md): each candidate beside its nearest
image in a folder, and each image's best similarity to the candidates; and what the
runner (``cgidm.extract``) shares with it: pixel features, the nearest candidates, the
extraction metrics, image grids.

The folder is read in chunks of ``CHUNK`` images: only their features stay (a latent, a
64-px pixel feature or an embedding an image), so a folder of tens of thousands of images
needs no more memory than a chunk of them; the nearest images are read again for their
pictures and pixel scores.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from cgidm.captions import Name
from cgidm.cliques import unit_features
from cgidm.config import ExtractConfig
from cgidm.files import atomic_save_image
from cgidm.images import load_image, to_pil
from cgidm.rng import image_key
from cgidm.score import pixel_scores

CHUNK = 64  # images read and featurised together (3 MB each at 512 px)
COMPARE = "compare"
# pixel features of decoded images are pooled to at most this side (a 512 px image would
# make each feature 786k numbers; the clustering needs the layout, not every pixel)
PIXEL_FEATURE_SIDE = 64


def pixel_features(images: torch.Tensor) -> torch.Tensor:
    """``[M, 3, H, W]`` in [-1, 1] -> ``[M, 3 * h * w]``, area-pooled to a side of at
    most ``PIXEL_FEATURE_SIDE``."""
    x = images.float().clamp(-1, 1)
    side = max(x.shape[-2:])
    if side > PIXEL_FEATURE_SIDE:
        f = math.ceil(side / PIXEL_FEATURE_SIDE)
        x = torch.nn.functional.avg_pool2d(x, f, ceil_mode=True)
    return x.flatten(1)


def nearest(candidate_features: np.ndarray, image_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosine similarities ``[J, K]`` of ``J`` images against ``K`` candidates, and each
    image's best similarity over the candidates ``[J]`` (its extraction score)."""
    sims = unit_features(image_features) @ unit_features(candidate_features).T
    return sims, sims.max(axis=1)


def extraction_metrics(member_scores: Sequence[float], holdout_scores: Sequence[float]) -> dict:
    """Each image scored by its best similarity to the extracted set: the fraction of
    members above the highest hold-out (a threshold fixed on the hold-outs: none of them
    counts as extracted), and members-vs-hold-outs AUC."""
    from sklearn.metrics import roc_auc_score

    m = np.asarray(member_scores, dtype=np.float64)
    h = np.asarray(holdout_scores, dtype=np.float64)
    if m.size == 0 or h.size == 0:
        return {"members": int(m.size), "holdouts": int(h.size), "threshold": None, "extracted_fraction": None,
                "auc": None}
    thr = float(h.max())
    y = np.r_[np.ones(m.size), np.zeros(h.size)]
    return {
        "members": int(m.size),
        "holdouts": int(h.size),
        "threshold": thr,
        "extracted": int((m > thr).sum()),
        "extracted_fraction": float((m > thr).mean()),
        "auc": float(roc_auc_score(y, np.r_[m, h])),
    }


def _enlarged(im, min_side: int):
    from PIL import Image

    w, h = im.size
    s = max(1, math.ceil(min_side / max(h, 1)))
    return im.resize((w * s, h * s), Image.NEAREST) if s > 1 else im


def grid(images: Sequence, columns: int, min_side: int = 128, pad: int = 4, labels: Optional[Sequence] = None):
    """PIL images (one size) tiled ``columns`` wide; small ones enlarged (nearest); with
    ``labels``, each named in a strip under it (``captions``)."""
    from PIL import Image

    from cgidm.captions import caption_under

    tiles = [_enlarged(im, min_side) for im in images]
    w, h = tiles[0].size
    cols = max(1, min(columns, len(tiles)))
    if labels is not None:
        tiles = [caption_under(tiles[i:i + cols], labels[i:i + cols], pad) for i in range(0, len(tiles), cols)]
        w, h, cols = max(t.size[0] for t in tiles), tiles[0].size[1], 1
    rows = math.ceil(len(tiles) / cols)
    canvas = Image.new("RGB", (cols * w + (cols - 1) * pad, rows * h + (rows - 1) * pad), (255, 255, 255))
    for i, im in enumerate(tiles):
        canvas.paste(im, ((i % cols) * (w + pad), (i // cols) * (h + pad)))
    return canvas


def features_of(kind: str, latents: torch.Tensor, images: torch.Tensor, embedder) -> np.ndarray:
    """``[M, D]`` unit features of ``kind`` for latents ``[M, C, h, w]`` and their images
    ``[M, 3, H, W]`` in [-1, 1]."""
    if kind == "latent":
        return unit_features(latents.float())
    if kind == "pixel":
        return unit_features(pixel_features(images))
    return unit_features(embedder([to_pil(im) for im in images]))


def _features(pair, kind: str, chunk: list, cfg: ExtractConfig, embedder) -> np.ndarray:
    """Unit feature rows of ``chunk`` (``(path, image)``); a latent is drawn with a key of the
    image's file name, so it does not depend on the chunk."""
    imgs = torch.stack([im for _, im in chunk])
    if kind != "latent":
        return features_of(kind, None, imgs, embedder)
    lats = []
    for path, im in chunk:
        g = torch.Generator(device=pair.device).manual_seed(image_key(cfg.seed, f"compare/{path.name}"))
        lats.append(pair.codec.encode(im[None].to(pair.device), generator=g).float().cpu())
    return features_of(kind, torch.cat(lats), imgs, embedder)


def check_readable(items, resolution: int) -> None:
    """``ValueError`` when none of ``items`` (``(path, label)``) can be read for a model of
    ``resolution`` (said before sampling; reading stops at the first image that can be)."""
    failed = []
    for path, _ in items:
        try:
            load_image(path, resolution)
            return
        except ValueError as e:
            failed.append(str(e))
    raise ValueError(_NONE_READ + "; ".join(failed[:5]) + (" ..." if len(failed) > 5 else "") + ")")


_NONE_READ = "--compare: none of its images could be read ("


@torch.no_grad()
def compare_images(pair, items, kind: str, cand_latents: list, cand_images: list, candidates: list[dict], out: Path,
                   cfg: ExtractConfig, embedder, progress: bool = False) -> dict:
    """Each candidate beside its nearest image of ``items`` (``(path, label)``), the
    similarity in the clustering's feature space, SSIM and PSNR; each image's best
    similarity to the candidates; with members and hold-outs among the labels, the
    extracted fraction and AUC (``extraction_metrics``)."""
    from tqdm.auto import tqdm

    from cgidm.progress import bar_options

    res = pair.resolution
    loaded, failed, feats, chunk = [], [], [], []
    for k, (path, label) in enumerate(tqdm(items, unit="image", desc="comparing", disable=not progress,
                                           **bar_options())):
        try:
            chunk.append((path, load_image(path, res)))
            loaded.append((path, label))
        except ValueError as e:
            failed.append({"image": str(path), "error": str(e)})
        if chunk and (len(chunk) == CHUNK or k == len(items) - 1):
            feats.append(_features(pair, kind, chunk, cfg, embedder))
            chunk = []
    if not loaded:
        raise ValueError(_NONE_READ + "; ".join(f["error"] for f in failed) + ")")
    img_feats = np.concatenate(feats)
    cand_feats = features_of(kind, torch.stack(cand_latents), torch.stack(cand_images), embedder)
    sims, best = nearest(cand_feats, img_feats)
    (out / COMPARE).mkdir(exist_ok=True)
    pairs = []
    for k, cand in enumerate(candidates):
        j = int(np.argmax(sims[:, k]))
        path, label = loaded[j]
        im = load_image(path, res)  # read again: the same pixels (it was read above)
        px = pixel_scores(im, cand_images[k])
        name = f"{COMPARE}/candidate_{cand['rank']:02d}.png"
        # the nearest image's label (its subfolder) or "nearest", the similarity, its name
        words = (f"candidate, rank {cand['rank']}", Name(f"{label or 'nearest'} {float(sims[j, k]):.3f}: ", path.name))
        atomic_save_image(grid([to_pil(cand_images[k]), to_pil(im)], columns=2, min_side=256, labels=words),
                          out / name)
        pairs.append({"rank": cand["rank"], "candidate": cand["image"], "nearest": str(path), "label": label,
                      "similarity": float(sims[j, k]), **px, "pair_image": name})
    per_image = [{"image": str(path), "label": label, "best_similarity": float(best[j]),
                  "best_candidate": int(np.argmax(sims[j]))} for j, (path, label) in enumerate(loaded)]
    result = {"features": kind, "images": len(loaded), "failed": failed, "pairs": pairs, "per_image": per_image}
    members = [r["best_similarity"] for r in per_image if r["label"] == "member"]
    holdouts = [r["best_similarity"] for r in per_image if r["label"] == "holdout"]
    if members and holdouts:
        result["labelled"] = extraction_metrics(members, holdouts)
        controls = [r["best_similarity"] for r in per_image if r["label"] == "control"]
        if controls:  # known clean too, but not in the threshold: how many of them pass it is said
            result["labelled"]["controls"] = len(controls)
            result["labelled"]["controls_above"] = int(sum(c > result["labelled"]["threshold"] for c in controls))
    elif members or holdouts:  # one labelled side alone sets no threshold: said, not left out silently
        result["unlabelled_why"] = (f"{'members' if members else 'hold-outs'} only ({len(members or holdouts)}; no "
                                    f"{'holdouts' if members else 'members'}/ images read): no fraction of members "
                                    "extracted and no AUC, which need both")
    return result
