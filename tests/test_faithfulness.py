"""Points of docs/faithfulness.md that no other test pins: resize and crop by torchvision's
rules, the [-1, 1] scaling, the sampled VAE encode keyed per image, the prompt."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cgidm.images import centre_crop, preprocess, resize_short_side


def _columns(w: int, h: int) -> Image.Image:
    """Each column's red value is its x (mod 256): a crop shows where it started."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, :, 0] = (np.arange(w) % 256)[None, :]
    return Image.fromarray(arr)


@pytest.mark.parametrize("size, short, expect", [((1000, 600), 512, (853, 512)), ((600, 1000), 512, (512, 853)),
                                                  ((513, 512), 512, (513, 512)), ((700, 300), 64, (149, 64))])
def test_resize_truncates_the_long_side_like_torchvision(size, short, expect):
    # torchvision Resize(int): long = int(short * long / short_side)
    assert resize_short_side(Image.new("RGB", size), short, Image.BILINEAR).size == expect


def test_centre_crop_rounds_the_offset_half_to_even():
    # (853 - 512) / 2 = 170.5 -> 170 (Python's round); (855 - 512) / 2 = 171.5 -> 172
    assert np.asarray(centre_crop(_columns(853, 512), 512))[0, 0, 0] == 170
    assert np.asarray(centre_crop(_columns(855, 512), 512))[0, 0, 0] == 172
    assert np.asarray(centre_crop(_columns(513, 512), 512))[0, 0, 0] == 0  # 0.5 -> 0


def test_preprocess_is_resize_then_crop_with_those_rules():
    img = _columns(1000, 600)
    want = centre_crop(img.resize((853, 512), Image.BILINEAR), 512)
    got = preprocess(img, 512)
    ref = torch.from_numpy(np.asarray(want, dtype=np.float32) / 255.0 * 2 - 1).permute(2, 0, 1)
    assert torch.equal(got, ref)


def test_scaling_to_unit_range_equals_the_official_formula_bit_for_bit():
    x = np.arange(256, dtype=np.float32)
    ours = x / 127.5 - 1.0
    official = np.float32(2.0) * (x / np.float32(255.0)) - np.float32(1.0)  # sdm_utils.py:234-236
    assert np.array_equal(ours.astype(np.float32), official)


def test_vae_encode_is_a_posterior_sample_keyed_by_the_image():
    """x0 = vae.encode(img).latent_dist.sample(generator) * scaling_factor, the generator
    seeded by the image's key: the same image id gives the same x0 in any batch."""
    from diffusers import AutoencoderKL

    from cgidm.codec import VaeCodec
    from cgidm.config import AuthConfig
    from cgidm.pipeline import prepare
    from cgidm.rng import image_key

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                        sample_size=16, scaling_factor=0.18215).eval()
    codec = VaeCodec(vae)

    class Pair:  # what prepare reads of a model pair
        latent_size, latent_channels, resolution, device = 16, 4, 16, torch.device("cpu")

    Pair.codec = codec
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    cfg = AuthConfig(prompt="x", seed=7)
    ids = ["a", "b", "c"]
    prep = prepare(Pair(), images, ids, cfg)
    with torch.no_grad():
        for i, image_id in enumerate(ids):
            g = torch.Generator().manual_seed(image_key(7, image_id))
            want = vae.encode(images[i:i + 1]).latent_dist.sample(generator=g) * 0.18215
            assert torch.allclose(prep.x0[i:i + 1], want, atol=1e-6)
    alone = prepare(Pair(), images[1:2], ["b"], cfg)
    assert torch.allclose(alone.x0, prep.x0[1:2], atol=1e-6)
    other_seed = prepare(Pair(), images[1:2], ["b"], AuthConfig(prompt="x", seed=8))
    assert not torch.allclose(other_seed.x0, prep.x0[1:2])


def test_preset_paper_end_to_end_with_the_official_validator(tiny_world, tmp_path, capsys):
    """--preset paper on the tiny world, with the official validator on a random ViT in
    DINO's layout; the shortened run is recorded as a departure."""
    import json

    from cgidm import cli
    from cgidm.testing.embedder import ensure_tiny_embedder

    imgs = tiny_world / "images"
    out = tmp_path / "out"
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--members", str(imgs / "members"), "--holdouts", str(imgs / "holdouts"), "--out", str(out),
                     "--preset", "paper", "--steps", "3", "--batch-size", "12",
                     "--embedder", str(ensure_tiny_embedder(tmp_path)), "-q"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["preset"] == {"name": "paper", "departures": {"steps": {"preset": 1000, "given": 3}}}
    assert summary["config"]["pgd"]["noise"] == "paper" and summary["config"]["pgd"]["eps"] == 70.0
    assert summary["prompt_from"].startswith("instance_prompt in ")
    assert set(summary["official"]) >= {"auc", "accuracy", "exact_auc"}
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert all(0 <= r["official_cos"] <= 1 and "embed_cos" in r for r in rows)
    # each original's official score is the max over the recoveries of its folder: at least its own
    assert all(r["official_cos"] >= r["embed_cos"] - 1e-6 for r in rows)
    text = capsys.readouterr().out
    assert "official validator (random stand-in in DINO's layout, not DINO, max over the folder): AUC" in text
    assert "departures: steps 3" in text
