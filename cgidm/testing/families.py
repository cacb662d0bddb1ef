"""Tiny pipelines of other model families, for tests (untrained, seeded, from
``cgidm.testing.tiny.build_tiny_pipeline``): only what tells the families apart differs.

- ``build_tiny_v_pair``: an SD 2.x-v-shaped base and fine-tune (the schedulers'
  ``prediction_type`` is ``v_prediction``; the text encoder stays the tiny 32-wide one).
"""
from __future__ import annotations

import json
from pathlib import Path

from cgidm.testing.tiny import build_tiny_pipeline


def set_prediction_type(pipeline: Path, prediction_type: str) -> None:
    """Rewrite ``pipeline/scheduler/scheduler_config.json`` with ``prediction_type``."""
    path = Path(pipeline) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    cfg["prediction_type"] = prediction_type
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_tiny_v_pair(root: str | Path, size: int = 16) -> tuple[Path, Path]:
    """``(base, finetuned)`` pipeline folders under ``root``: two untrained tiny pipelines
    (different seeds) whose schedulers predict v. No AUC is to be expected from them."""
    root = Path(root)
    base, finetuned = root / "base", root / "finetuned"
    for folder, seed in ((base, 0), (finetuned, 10)):
        build_tiny_pipeline(folder, size=size, seed=seed)
        set_prediction_type(folder, "v_prediction")
    return base, finetuned
