"""``cgidm extract --compare`` reads its folder in chunks (cgidm/extract_compare.py): the
result does not depend on the chunk size (latent and pixel features; a broken file in
any chunk), and no more than a chunk of images is held at once."""
from __future__ import annotations

import json
import shutil

import pytest

import cgidm.extract_compare as XC
from cgidm.cli import main


def _run(tiny_world, out, folder, features):
    rc = main(["extract", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
               "--out", str(out), "--samples", "6", "--steps", "2", "--clusters", "3", "--batch-size", "6",
               "--features", features, "--compare", str(folder), "-q"])
    assert rc == 0
    s = json.loads((out / "extract.json").read_text())
    return s["compare"], {p["pair_image"]: (out / p["pair_image"]).read_bytes() for p in s["compare"]["pairs"]}


@pytest.mark.parametrize("features", ["latent", "pixel"])
def test_compare_does_not_depend_on_its_chunk_and_holds_one_chunk(tiny_world, tmp_path, monkeypatch, features):
    folder = tmp_path / "images"
    shutil.copytree(tiny_world / "images", folder)
    (folder / "members" / "member_03b.png").write_text("not an image")  # in the middle of a chunk
    held = []
    real = XC._features

    def counting(pair, kind, chunk, cfg, embedder):
        held.append(len(chunk))
        return real(pair, kind, chunk, cfg, embedder)

    monkeypatch.setattr(XC, "_features", counting)
    results = {}
    for chunk in (1000, 5, 1):
        monkeypatch.setattr(XC, "CHUNK", chunk)
        held.clear()
        results[chunk] = _run(tiny_world, tmp_path / f"out-{chunk}", folder, features)
        assert max(held) == min(chunk, 36) and sum(held) == 36
    (whole, files), *others = results.values()
    assert whole["images"] == 36 and len(whole["failed"]) == 1 and "member_03b.png" in whole["failed"][0]["image"]
    for cmp, pictures in others:
        assert cmp["per_image"] == whole["per_image"] and cmp["pairs"] == whole["pairs"]
        assert pictures == files
