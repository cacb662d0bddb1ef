"""The samples' images in ``cgidm extract`` (docs/extract.md, "Outputs"): decoded a batch
at a time (halved on out of memory), each batch's features for the clustering, a small tile
of each sample for ``samples.png`` and, with ``--save-samples``, its PNG; the full-size
images go with their batch, so however many samples there are, a batch of them is held.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from cgidm.config import ExtractConfig
from cgidm.extract_compare import features_of, grid
from cgidm.files import atomic_save_image
from cgidm.images import to_pil

log = logging.getLogger(__name__)

SAMPLES = "samples"
THUMB_SIDE = 64  # a sample's tile in samples.png


def tile(im, side: int):
    """``im`` scaled to ``side`` (enlarged with nearest, shrunk with area filtering)."""
    from PIL import Image

    return im if im.size == (side, side) else im.resize((side, side), Image.NEAREST if im.size[0] < side else Image.BOX)


BANDS = ((214, 228, 245), (250, 222, 200))  # the strips of neighbouring clusters, in turn


def thumbnails(images: Sequence, side: int = THUMB_SIDE, columns: int = 16, pad: int = 2,
               groups: Optional[Sequence[int]] = None):
    """A contact sheet of many images, each scaled to ``side``. With ``groups`` (the sizes
    of consecutive runs of ``images``: the clusters, densest first) each tile has a strip
    under it in its group's colour, the colours taking turns, and each group's first tile
    has the group's rank in it, so that where one cluster ends and the next begins is seen."""
    if groups is None:
        return grid([tile(im, side) for im in images], columns, min_side=side, pad=pad)
    from PIL import Image, ImageDraw

    from cgidm.captions import INK, ascii_text, font, strip_height

    if sum(groups) != len(images):
        raise ValueError(f"groups count {sum(groups)} images, not {len(images)}")
    size = 10
    line = strip_height(size)
    cells = []
    for rank, n in enumerate(groups):
        for k in range(n):
            cell = Image.new("RGB", (side, side + line), BANDS[rank % len(BANDS)])
            cell.paste(tile(images[len(cells)], side), (0, 0))
            if k == 0:
                ImageDraw.Draw(cell).text((2, side + (line - size) // 2), ascii_text(rank), fill=INK, font=font(size))
            cells.append(cell)
    return grid(cells, columns, min_side=side, pad=pad)


def describe_samples(pair, latents: torch.Tensor, kept: list, kind: str, embedder, cfg: ExtractConfig, out: Path,
                     progress: bool) -> tuple[np.ndarray, list, int]:
    """The clustering's unit features of the samples ``kept`` (rows of ``latents``) and a
    ``THUMB_SIDE`` tile of each for ``samples.png``; with ``--save-samples`` each sample's
    PNG too, and the decoding's batch size (``decode``). Decoded a batch at a time, so no more
    than a batch of full-size images is held however many samples there are (500 SDXL images
    in fp32 would be 6 GB)."""
    from tqdm.auto import tqdm

    from cgidm.progress import bar_options

    if cfg.save_samples:
        (out / SAMPLES).mkdir(exist_ok=True)
    feats, tiles, b, lo = [], [], cfg.batch_size, 0
    with tqdm(total=len(kept), unit="sample", desc="decoding", disable=not progress, **bar_options()) as bar:
        while lo < len(kept):
            rows = kept[lo:lo + b]
            lo += len(rows)
            images, b = decode(pair, latents[rows], b)
            feats.append(features_of(kind, latents[rows], images, embedder))
            for i, im in zip(rows, images):
                pil = to_pil(im)
                if cfg.save_samples:
                    atomic_save_image(pil, out / SAMPLES / f"sample_{i:05d}.png")
                tiles.append(tile(pil, THUMB_SIDE))
            bar.update(len(rows))
    return np.concatenate(feats), tiles, b


@torch.no_grad()
def decode(pair, latents: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """``[M, 3, H, W]`` fp32 images in [-1, 1] on the CPU, decoded ``batch_size`` at a time,
    and the batch size that fit: halved when a batch runs out of memory (the VAE at full
    resolution may not take the batch the UNets did), as the sampler does."""
    from cgidm.batches import halving_batches

    fits = [batch_size]

    def run(lo: int, size: int) -> torch.Tensor:
        return pair.codec.decode(latents[lo:lo + size].to(pair.device)).float().clamp(-1, 1).cpu()

    out = [x for _, x in halving_batches(latents.shape[0], batch_size, run, what="decoding", device=pair.device,
                                         on_halve=lambda size: fits.__setitem__(0, size))]
    return torch.cat(out), fits[0]
