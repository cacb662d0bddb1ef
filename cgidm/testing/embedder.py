"""A stand-in for the paper's DINO validator in the tiny world: a small ``ViTModel`` with
random weights, saved in the DINO layout the validator loads (``cgidm.validator``).

Its features are those of an untrained network, not DINO's: the scores it gives say how
alike two images are to a random convolution-and-attention stack, which is enough to run
the official validator's path end to end (max over the folder, the threshold grid) on the
demo and in the tests, and nothing more. Real runs pass ``--embedder`` a local DINO
ViT-S/16 or CLIP ViT-B/32 folder.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

NAME = "embedder-vit-random"


def ensure_tiny_embedder(root: str | Path, seed: int = 0) -> Path:
    """``root/embedder-vit-random``, written once (atomically) and reused."""
    import torch
    from transformers import ViTConfig, ViTModel

    from cgidm.validator import STAND_IN_FILE

    folder = Path(root) / NAME
    if (folder / "config.json").exists():
        if not (folder / STAND_IN_FILE).is_file():  # a world cached before the marker was written
            _mark(folder / STAND_IN_FILE)
        return folder
    tmp = Path(root) / f".{NAME}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96,
                    image_size=224, patch_size=16, layer_norm_eps=1e-6)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(tmp)
    _mark(tmp / STAND_IN_FILE)
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _mark(path: Path) -> None:
    """The file that makes reports call this embedder a random stand-in, not DINO."""
    try:
        path.write_text("random weights, untrained: a stand-in for DINO that runs the validator's code path; "
                        "its scores are not DINO's\n")
    except OSError:  # a read-only cache: the report then says dino, as the folder's config does
        pass
