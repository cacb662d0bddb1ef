"""The paper's validator on a run's rows: embedding scores of each original against the
recoveries of its folder (``official_cos``) and its own (``embed_cos``), and which folders
such a maximum was computed over (docs/faithfulness.md, "Scoring")."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from cgidm.config import EMBED_FIELDS


def check_embedder(cfg, embedder) -> None:
    """An embedding metric needs an embedder, and an embedder is a loaded one (not its
    folder): say so before any compute."""
    if embedder is not None and not callable(embedder):
        raise TypeError(f"embedder must be a loaded embedder (cgidm.validator.load_official_embedder(folder)), "
                        f"got {type(embedder).__name__}")
    if cfg.metric in EMBED_FIELDS and embedder is None:
        raise ValueError(f"--metric {cfg.metric} needs --embedder DIR (a local CLIP or DINO model folder)")


def _original_image(path: str):
    """The original as the validator reads it: the file itself, upright 8-bit RGB."""
    from PIL import Image

    from cgidm.images import to_rgb

    with Image.open(path) as im:
        im.load()
        return to_rgb(im)


def validator_folders(rows: Sequence[dict]) -> dict:
    """``{(pair, label): fingerprint}`` of the scored rows' validator folders: what an
    ``official_cos`` (a maximum over its folder's recoveries) was computed over."""
    ids: dict = {}
    for r in rows:
        if "error" not in r and r.get("recovered"):
            ids.setdefault((r.get("pair"), r.get("label")), []).append(r["id"])
    return {k: hashlib.sha256("\n".join(sorted(v)).encode("utf-8", "surrogateescape")).hexdigest()[:16]
            for k, v in ids.items()}


def drop_stale_official(rows: Sequence[dict]) -> int:
    """Remove ``official_cos`` from the rows whose folder has gained, lost or changed an
    image since it was computed (a resume after the image list or labels changed, a
    failed image retried); returns how many. Such a maximum is over other recoveries."""
    now, n = validator_folders(rows), 0
    for r in rows:
        if "official_cos" in r and r.get("official_folder") != now.get((r.get("pair"), r.get("label"))):
            r.pop("official_cos")
            r.pop("official_folder", None)
            n += 1
    return n


def add_embedding_scores(rows: Sequence[dict], embedder, out: Path, batch: int = 32) -> dict:
    """The paper's validator on the scored rows, in place: ``official_cos`` (each original
    against every recovered image of its folder: same pair and label, the maximum cosine)
    and ``embed_cos`` (against its own recovery); ``summarize`` then sets the rows' ``score``
    by the metric.
    Originals are read from their files and recovered images from the saved 8-bit PNGs,
    as the official validator reads them (docs/faithfulness.md, "Scoring"). Returns what
    the summary records about the embedder."""
    import torch
    from PIL import Image

    from cgidm.feature_cache import FeatureCache, row_key
    from cgidm.validator import official_scores, paired_scores

    good = [r for r in rows if "error" not in r and r.get("recovered")]
    if good:
        cache = FeatureCache(out, embedder)  # rows embedded by an earlier run are not embedded again
        keys = [row_key(r, r["image"], Path(out)) for r in good]
        feats = {i: hit for i, k in enumerate(keys) if (hit := cache.get(k)) is not None}
        todo = [i for i in range(len(good)) if i not in feats]
        for start in range(0, len(todo), batch):
            chunk = todo[start:start + batch]
            orig = embedder([_original_image(good[i]["image"]) for i in chunk])
            recs = []
            for i in chunk:
                with Image.open(Path(out) / good[i]["recovered"]) as im:
                    recs.append(im.convert("RGB"))
            for i, a, b in zip(chunk, orig, embedder(recs)):
                feats[i] = (a.detach().float().cpu(), b.detach().float().cpu())
                cache.put(keys[i], *feats[i])
        cache.save([k for k in keys if k is not None])
        o = torch.stack([feats[i][0] for i in range(len(good))])
        c = torch.stack([feats[i][1] for i in range(len(good))])
        groups = [(r.get("pair"), r.get("label")) for r in good]
        official = official_scores(o, c, groups)
        paired = paired_scores(o, c)
        folders = validator_folders(rows)
        for r, g, a, b in zip(good, groups, official.tolist(), paired.tolist()):
            r["official_cos"], r["embed_cos"], r["official_folder"] = float(a), float(b), folders[g]
    info = {"kind": embedder.kind, "folder": str(embedder.folder), "dim": int(embedder.dim)}
    if getattr(embedder, "stand_in", False):
        info["stand_in"] = True
        info["label"] = embedder.label
    return info
