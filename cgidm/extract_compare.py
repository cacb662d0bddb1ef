"""``cgidm extract --compare DIR`` (docs/extract.md): each candidate beside its nearest
image in a folder, and each image's best similarity to the candidates.

The folder is read in chunks of ``CHUNK`` images: only their features stay (a latent, a
64-px pixel feature or an embedding an image), so a folder of tens of thousands of images
needs no more memory than a chunk of them; the nearest images are read again for their
pictures and pixel scores.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cgidm.cliques import unit_features
from cgidm.config import ExtractConfig
from cgidm.extract import COMPARE, extraction_metrics, grid, nearest, pixel_features
from cgidm.files import atomic_save_image
from cgidm.images import load_image, to_pil
from cgidm.rng import image_key
from cgidm.score import pixel_scores

CHUNK = 64  # images read and featurised together (3 MB each at 512 px)


def _features(pair, kind: str, chunk: list, cfg: ExtractConfig, embedder) -> np.ndarray:
    """Unit feature rows of ``chunk`` (``(path, image)``); a latent is drawn with a key of the
    image's file name, so it does not depend on the chunk."""
    if kind == "latent":
        lats = []
        for path, im in chunk:
            g = torch.Generator(device=pair.device).manual_seed(image_key(cfg.seed, f"compare/{path.name}"))
            lats.append(pair.codec.encode(im[None].to(pair.device), generator=g).float().cpu())
        return unit_features(torch.cat(lats))
    imgs = torch.stack([im for _, im in chunk])
    if kind == "pixel":
        return unit_features(pixel_features(imgs))
    return unit_features(embedder([to_pil(im) for im in imgs]))


@torch.no_grad()
def compare_images(pair, items, kind: str, cand_latents: list, cand_images: list, candidates: list[dict], out: Path,
                   cfg: ExtractConfig, embedder) -> dict:
    """Each candidate beside its nearest image of ``items`` (``(path, label)``), the
    similarity in the clustering's feature space, SSIM and PSNR; each image's best
    similarity to the candidates; with members and hold-outs among the labels, the
    extracted fraction and AUC (``extraction_metrics``)."""
    res = pair.resolution
    loaded, failed, feats, chunk = [], [], [], []
    for k, (path, label) in enumerate(items):
        try:
            chunk.append((path, load_image(path, res)))
            loaded.append((path, label))
        except ValueError as e:
            failed.append({"image": str(path), "error": str(e)})
        if chunk and (len(chunk) == CHUNK or k == len(items) - 1):
            feats.append(_features(pair, kind, chunk, cfg, embedder))
            chunk = []
    if not loaded:
        raise ValueError("--compare: none of its images could be read (" + "; ".join(f["error"] for f in failed) + ")")
    img_feats = np.concatenate(feats)
    if kind == "latent":
        cand_feats = unit_features(torch.stack(cand_latents))
    elif kind == "pixel":
        cand_feats = unit_features(pixel_features(torch.stack(cand_images)))
    else:
        cand_feats = unit_features(embedder([to_pil(im) for im in cand_images]))
    sims, best = nearest(cand_feats, img_feats)
    (out / COMPARE).mkdir(exist_ok=True)
    pairs = []
    for k, cand in enumerate(candidates):
        j = int(np.argmax(sims[:, k]))
        path, label = loaded[j]
        im = load_image(path, res)  # read again: the same pixels (it was read above)
        px = pixel_scores(im, cand_images[k])
        name = f"{COMPARE}/candidate_{cand['rank']:02d}.png"
        atomic_save_image(grid([to_pil(cand_images[k]), to_pil(im)], columns=2, min_side=192), out / name)
        pairs.append({"rank": cand["rank"], "candidate": cand["image"], "nearest": str(path), "label": label,
                      "similarity": float(sims[j, k]), **px, "pair_image": name})
    per_image = [{"image": str(path), "label": label, "best_similarity": float(best[j]),
                  "best_candidate": int(np.argmax(sims[j]))} for j, (path, label) in enumerate(loaded)]
    result = {"features": kind, "images": len(loaded), "failed": failed, "pairs": pairs, "per_image": per_image}
    members = [r["best_similarity"] for r in per_image if r["label"] == "member"]
    holdouts = [r["best_similarity"] for r in per_image if r["label"] == "holdout"]
    if members and holdouts:
        result["labelled"] = extraction_metrics(members, holdouts)
    return result
