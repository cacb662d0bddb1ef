"""The tiny world's shipped weights: a world assembled from them is the world that was
trained: the same weights, tensor for tensor, and images, byte for byte; the round trip train -> export -> assemble is exact."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cgidm.testing import fixture
from cgidm.testing.tiny import WORLD_VERSION, WorldConfig, build_tiny_world

WEIGHT_FILES = [
    "base/unet/diffusion_pytorch_model.safetensors", "base/text_encoder/model.safetensors",
    "finetuned/unet/diffusion_pytorch_model.safetensors", "finetuned/text_encoder/model.safetensors",
    "lora.safetensors", "lora_kohya.safetensors", "finetuned.safetensors",
]


def _same_world(a: Path, b: Path) -> None:
    for rel in WEIGHT_FILES:
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        assert ta.keys() == tb.keys(), rel
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (rel, k)
    images = sorted(p.relative_to(a) for p in (a / "images").rglob("*.png"))
    assert images == sorted(p.relative_to(b) for p in (b / "images").rglob("*.png"))
    for rel in images:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    assert json.loads((a / "world.json").read_text()) == json.loads((b / "world.json").read_text())
    assert (a / "finetuned" / "args.json").read_text() == (b / "finetuned" / "args.json").read_text()


SMALL = WorldConfig(pretrain_per_style=2, pretrain_steps=2, members=2, holdouts=2, controls=2,
                    finetune_steps=2, lora_steps=2, lora_rank=2, batch=2)


def test_train_export_assemble_round_trip(tmp_path, monkeypatch):
    cfg = SMALL
    stamp = {"version": WORLD_VERSION, **asdict(cfg)}
    trained = build_tiny_world(tmp_path / "trained", cfg, train=True)
    monkeypatch.setattr(fixture, "WEIGHTS", tmp_path / "weights")
    assert fixture.find_fixture(stamp) is None
    path = fixture.export_fixture(trained, stamp, tmp_path / "weights" / fixture.fixture_path(WORLD_VERSION).name)
    assert fixture.find_fixture(stamp) == path
    assert fixture.find_fixture({**stamp, "seed": 1}) is None, "another configuration is trained, not assembled"
    assert fixture.find_fixture({**stamp, "members": 3}) is None
    # training never reads the hold-outs or controls: more of them, the same weights
    assert fixture.find_fixture({**stamp, "holdouts": 3, "controls": 5}) == path
    assembled = build_tiny_world(tmp_path / "assembled", cfg)
    _same_world(trained, assembled)


def test_the_weights_do_not_depend_on_the_holdout_and_control_counts(tmp_path):
    """What lets find_fixture leave ``UNTRAINED`` out: two trainings, other counts."""
    from dataclasses import replace

    a = build_tiny_world(tmp_path / "a", SMALL, train=True)
    b = build_tiny_world(tmp_path / "b", replace(SMALL, holdouts=1, controls=4), train=True)
    for rel in WEIGHT_FILES:
        ta, tb = load_file(str(a / rel)), load_file(str(b / rel))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
    assert len(list((b / "images" / "controls").glob("*.png"))) == 4


def test_the_shipped_weights_are_the_default_worlds(tiny_world):
    stamp = {"version": WORLD_VERSION, **asdict(WorldConfig())}
    assert fixture.find_fixture(stamp) is not None, "the default world's weights ship with cgidm"
    weights = load_file(str(fixture.fixture_path(WORLD_VERSION)))
    base = load_file(str(tiny_world / "base/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(base[k], weights[f"base_unet/{k}"]) for k in base)


def test_a_fixture_that_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import save_file

    from cgidm.testing.tiny import build_tiny_pipeline

    build_tiny_pipeline(tmp_path / "w" / "base", 16, 0)
    bad = tmp_path / "bad.safetensors"
    save_file({"base_unet/x": torch.zeros(2), "text_encoder/y": torch.zeros(2), "finetuned_unet/x": torch.zeros(2),
               "lora/z": torch.zeros(1)}, str(bad))
    with pytest.raises(ValueError, match="does not fit the configuration"):
        fixture.apply_fixture(tmp_path / "w", bad)
