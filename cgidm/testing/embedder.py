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

    folder = Path(root) / NAME
    if (folder / "config.json").exists():
        return folder
    tmp = Path(root) / f".{NAME}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    cfg = ViTConfig(hidden_size=48, num_hidden_layers=4, num_attention_heads=3, intermediate_size=96,
                    image_size=224, patch_size=16, layer_norm_eps=1e-6)
    ViTModel(cfg, add_pooling_layer=False).eval().save_pretrained(tmp)
    try:
        tmp.rename(folder)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
