"""``cgidm protect`` (docs/protect.md): the L-inf PGD and its constraints, the loss it
raises, batch invariance, the written files (size, mode, budget, metadata), resume, bad
images and the command line's exit codes. All on the tiny world's base, a few steps each."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from cgidm import cli
from cgidm.config import ProtectConfig
from cgidm.images import load_image
from cgidm.protect import collect_protect_items, protect
from cgidm.protect_output import crop_box, perturbation_levels
from cgidm.protect_pgd import (builtin_target, encode, eval_denoising_loss, linf_pgd_update_ref, load_base,
                               protect_batch, target_latent)
from cgidm.testing.world import copy_members

FAST = dict(steps=2, eval_draws=2)


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_base(tiny_world / "base")


@pytest.fixture(scope="module")
def members(tiny_world):
    paths = sorted((tiny_world / "images" / "members").glob("*.png"))[:3]
    return torch.stack([load_image(p, 16) for p in paths]), [p.name for p in paths]


def _folder(tiny_world, tmp_path, n=2):
    return copy_members(tiny_world, tmp_path / "art", n)


def test_linf_budget_and_pixel_range_hold_at_every_step(base, members):
    x, ids = members
    x = torch.cat([x, torch.ones_like(x[:1]), -torch.ones_like(x[:1])])  # saturated images push on the range
    ids = ids + ["white", "black"]
    cfg = ProtectConfig(steps=6, budget="8/255", step_size="3/255", random_start=True)
    eps = 2 * 8 / 255
    seen = []

    def check(step, delta, obj):
        assert delta.abs().max() <= eps + 1e-7
        assert (x + delta).min() >= -1 and (x + delta).max() <= 1
        seen.append(step)

    res = protect_batch(base, x, ids, cfg, callback=check)
    assert seen == list(range(6)) and res.delta.abs().max() > 0.9 * eps
    assert (res.skipped_steps == 0).all()


def test_update_skips_an_image_with_a_non_finite_gradient():
    delta, x = torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    grad = torch.randn(2, 3, 4, 4)
    grad[1, 0, 0, 0] = float("nan")
    new, skipped = linf_pgd_update_ref(delta, grad, x, alpha=0.1, eps=0.05)
    assert skipped.tolist() == [False, True]
    assert torch.equal(new[1], delta[1]) and torch.allclose(new[0].abs(), torch.full_like(new[0], 0.05))


def test_advdm_raises_the_denoising_loss_of_the_tiny_base(base, members):
    x, ids = members
    res = protect_batch(base, x, ids, ProtectConfig(steps=15, step_size="2/255"))
    clean = eval_denoising_loss(base, x, ids, 0, "a painting", 32)
    protected = eval_denoising_loss(base, x + res.delta, ids, 0, "a painting", 32)
    assert (protected > 1.1 * clean).all(), (clean, protected)


def test_textural_loss_pulls_the_encoding_toward_the_target(base, members):
    x, ids = members
    z_t = target_latent(base, builtin_target(base.resolution))
    res = protect_batch(base, x, ids, ProtectConfig(steps=4, loss="textural"), z_target=z_t)
    before = (encode(base.codec, x) - z_t).pow(2).flatten(1).mean(1)
    after = (encode(base.codec, x + res.delta) - z_t).pow(2).flatten(1).mean(1)
    assert (after < before).all()
    fused = protect_batch(base, x, ids, ProtectConfig(steps=2, loss="fused"), z_target=z_t)
    assert torch.isfinite(fused.objective).all()


def test_results_do_not_depend_on_the_batch(base, members):
    x, ids = members
    cfg = ProtectConfig(steps=4, k=2, random_start=True)
    together = protect_batch(base, x, ids, cfg)
    for i in (0, 2):
        alone = protect_batch(base, x[i:i + 1], ids[i:i + 1], cfg)
        # sign steps: a last-bit difference of a batched convolution could flip an entry
        # whose gradient is ~0; on CPU the batched and single runs agree exactly
        assert (alone.delta[0] != together.delta[i]).float().mean() < 0.01
    other = protect_batch(base, x, ids, cfg.replace(seed=1))
    assert not torch.equal(other.delta, together.delta)


def test_perturbation_maps_onto_the_centre_square():
    assert crop_box(16, 16, 16) == (0, 0, 16, 16)
    assert crop_box(32, 32, 16) == (0, 0, 32, 32)
    assert crop_box(40, 20, 16) == (10, 0, 30, 20)
    d = perturbation_levels(torch.full((3, 16, 16), 2 / 255), (40, 20), 16)
    assert d.shape == (20, 40, 3)
    assert np.allclose(d[:, 10:30], 1.0) and (d[:, :10] == 0).all() and (d[:, 30:] == 0).all()


def _make_inputs(folder):
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (20, 36, 3), dtype=np.uint8), "RGB")
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "an artist")
    rgb.save(folder / "wide.png", pnginfo=info)
    Image.fromarray(rng.integers(0, 256, (18, 18), dtype=np.uint8), "L").save(folder / "grey.png")
    rgba = rng.integers(0, 256, (24, 24, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8), "RGB").save(folder / "photo.jpg", quality=90)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), "RGB").convert("P").save(folder / "pal.png")
    sub = folder / "sub"
    sub.mkdir()
    Image.fromarray(rng.integers(0, 65536, (16, 16), dtype=np.uint16)).save(sub / "deep.png")
    Image.fromarray(rng.integers(0, 100_000, (16, 20)).astype(np.int32)).save(sub / "wide32.tif")


def test_protected_files_keep_size_mode_metadata_and_the_budget(base, tiny_world, tmp_path):
    folder = _folder(tiny_world, tmp_path, n=1)
    _make_inputs(folder)
    out = tmp_path / "out"
    summary = protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST, batch_size=3), progress=False)
    assert summary["failed"] == 0 and summary["protected"] == 8
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    expect = {"wide.png": "RGB", "grey.png": "L", "alpha.png": "RGBA", "photo.jpg": "RGB", "pal.png": "RGB",
              "sub/deep.png": "I;16", "member_00.png": "RGB", "sub/wide32.tif": "L"}
    for image_id, mode in expect.items():
        row = rows[image_id]
        src = Image.open(folder / image_id)
        dst = Image.open(out / row["protected"])
        assert dst.format == "PNG" and dst.size == src.size and dst.mode == mode, image_id
        assert row["linf_levels"] <= 8 and 0 < row["ssim"] <= 1 and (out / row["panel"]).is_file()
        if mode in ("RGB", "RGBA", "L") and src.mode == mode:
            a, b = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
            assert np.abs(a - b).max() <= 8 and np.abs(a - b).max() > 0, image_id
    assert rows["photo.jpg"]["protected"] == "protected/photo.jpg.png"
    assert any("P written as RGB" in n for n in rows["pal.png"]["notes"])
    assert Image.open(out / rows["wide.png"]["protected"]).text["Author"] == "an artist"
    # the published file names the base model's folder, not its path on this machine
    assert json.loads(Image.open(out / rows["wide.png"]["protected"]).text["cgidm-protect"])["base"] == "base"
    notes = rows["sub/wide32.tif"]["notes"]  # the loading and the writing both stretch it: said once
    assert len(notes) == len(set(notes)) and any("stretched" in n for n in notes), notes
    wide = np.asarray(Image.open(out / rows["wide.png"]["protected"]), dtype=np.int64)
    orig = np.asarray(Image.open(folder / "wide.png"), dtype=np.int64)
    # --cover full (the default): the whole wide image is perturbed, margins too
    assert (np.abs(wide - orig).max(axis=(0, 2)) > 0).all()
    alpha = np.asarray(Image.open(out / rows["alpha.png"]["protected"]))[..., 3]
    assert (alpha == np.asarray(Image.open(folder / "alpha.png"))[..., 3]).all()
    assert (out / "report.html").is_file() and json.loads((out / "summary.json").read_text())["protected"] == 8


def test_a_second_run_does_nothing_and_other_settings_are_refused(base, tiny_world, tmp_path):
    folder = _folder(tiny_world, tmp_path, n=3)
    out = tmp_path / "out"
    items = collect_protect_items(folder)
    cfg = ProtectConfig(**FAST, batch_size=2)
    first = protect(base, items[:2], out, cfg, progress=False)
    assert first["timing"]["images"] == 2
    stamp = {p: p.stat().st_mtime_ns for p in (out / "protected").iterdir()}
    lines = (out / "results.jsonl").read_text()
    again = protect(base, items[:2], out, cfg.replace(batch_size=1), progress=False)
    assert again["timing"]["images"] == 0 and (out / "results.jsonl").read_text() == lines
    assert {p: p.stat().st_mtime_ns for p in (out / "protected").iterdir()} == stamp
    more = protect(base, items, out, cfg, progress=False)
    assert more["timing"]["images"] == 1 and more["protected"] == 3
    with pytest.raises(ValueError, match="other settings"):
        protect(base, items, out, cfg.replace(budget="4/255"), progress=False)


def test_bad_images_become_error_rows(base, tiny_world, tmp_path):
    folder = _folder(tiny_world, tmp_path, n=1)
    (folder / "notes.png").write_text("not an image")
    good = (folder / "member_00.png").read_bytes()
    (folder / "cut.png").write_bytes(good[: len(good) // 2])
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    out = tmp_path / "out"
    summary = protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST), progress=False)
    assert summary["protected"] == 1 and summary["failed"] == 3
    assert "not an image" in summary["errors"]["notes.png"] and "too small" in summary["errors"]["tiny.png"]
    assert not (out / "protected" / "notes.png").exists()


def test_cli_exit_codes(tiny_world, tmp_path, capsys, caplog):
    folder = _folder(tiny_world, tmp_path, n=1)
    common = ["--base", str(tiny_world / "base"), "--images", str(folder), "--steps", "1", "--eval-draws", "1",
              "--device", "cpu", "-q"]
    assert cli.main(["protect", *common, "--out", str(tmp_path / "a")]) == cli.EXIT_OK
    assert (tmp_path / "a" / "protected" / "member_00.png").is_file()
    # what protection does, measured, is said beside the loss it raised: on the console and in the report
    assert "note: what protection does is limited" in capsys.readouterr().out
    html = (tmp_path / "a" / "report.html").read_text()
    assert "nothing of it was left after JPEG q75" in html and "authentication still flagged the members" in html
    # the panel's amplification is said: 8/255 is +-8 levels, shown 15.9 times larger
    assert "&plusmn;8 levels\nof 255, so the change is shown 15.9 times larger" in html
    (folder / "bad.png").write_text("nope")
    assert cli.main(["protect", *common, "--out", str(tmp_path / "b")]) == cli.EXIT_SOME_FAILED
    assert cli.main(["protect", *common, "--out", str(tmp_path / "c"), "--budget", "16"]) == cli.EXIT_USAGE
    assert cli.main(["protect", *common, "--out", str(tmp_path / "d"), "--base", str(tmp_path)]) == cli.EXIT_USAGE
    assert cli.main(["protect", "--base", str(tiny_world / "base"), "--images", str(tmp_path / "none"),
                     "--out", str(tmp_path / "e")]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert "budget must be in (0, 1]" in err and "image folder not found" in err
    (tmp_path / "f").write_text("a file")  # refused before any model loads
    assert cli.main(["protect", *common, "--out", str(tmp_path / "f")]) == cli.EXIT_USAGE
    said = capsys.readouterr()
    assert "exists and is not a folder" in said.err and "device:" not in said.out
    (folder / "bad.png").unlink()
    assert cli.main(["protect", *common, "--out", str(tmp_path / "g"), "--steps", "0"]) == cli.EXIT_OK
    said = capsys.readouterr()
    assert "the images are written unchanged" in caplog.text and "each whole up to 2:1 (a longer one: its centre 2:1), at its aspect ratio" in said.out


def test_cli_defaults_come_from_the_configuration():
    args = cli.build_parser().parse_args(["protect", "--base", "b", "--images", "i", "--out", "o"])
    assert ProtectConfig(**cli._given(args, ProtectConfig)) == ProtectConfig()
    args = cli.build_parser().parse_args(["protect", "--base", "b", "--images", "i", "--out", "o",
                                          "--budget", "4/255", "--timesteps-per-image", "3", "--loss", "fused"])
    cfg = ProtectConfig(**cli._given(args, ProtectConfig))
    assert cfg.budget_value == 4 / 255 and cfg.k == 3 and cfg.loss == "fused"


def test_fused_weight_follows_the_latent_size_as_mist_weighs_it(monkeypatch):
    # Mist: summed textural loss against 1e4 x the mean denoising loss; on the mean, C*H*W / 1e4
    from types import SimpleNamespace

    from cgidm import protect_pgd
    from cgidm.codec import IdentityCodec

    monkeypatch.setattr(protect_pgd, "denoising_loss", lambda *a, **k: torch.zeros(2, 1))
    monkeypatch.setattr(protect_pgd, "encode", lambda codec, x, noise: x)
    model = SimpleNamespace(codec=IdentityCodec(), unet=None, abar=None, target=None)
    z_target = torch.zeros(2, 3, 16, 16)
    x = torch.rand(2, 3, 16, 16)
    textural = protect_pgd.objective(model, ProtectConfig(loss="textural"), x, None, None, None, None, z_target)
    assert torch.all(textural < 0)
    for weight, expect in ((None, 3 * 16 * 16 / 1e4), (2.0, 2.0)):
        fused = protect_pgd.objective(model, ProtectConfig(loss="fused", textural_weight=weight), x, None, None,
                                      None, None, z_target)
        torch.testing.assert_close(fused, expect * textural)


def test_the_vae_runs_in_the_runs_dtype(tiny_world, tmp_path):
    """The VAE encoder runs forward and backward every step: ``load_base`` casts it with
    the UNet (it stayed fp32 while the UNet ran in bf16); the text encoder, used once, stays."""
    import shutil

    from diffusers import AutoencoderKL

    root = tmp_path / "base"
    shutil.copytree(tiny_world / "base", root)
    shutil.rmtree(root / "codec")
    # a one-level VAE (factor 1) with the tiny UNet's 3 latent channels
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                  up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=3,
                  norm_num_groups=8, sample_size=16).save_pretrained(root / "vae")
    model = load_base(root, dtype=torch.bfloat16)
    assert model.codec.dtype == torch.bfloat16 and next(model.unet.parameters()).dtype == torch.bfloat16
    assert next(model.text_encoder.parameters()).dtype == torch.float32
    assert load_base(root).codec.dtype == torch.float32
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    res = protect_batch(model, x, ["a.png"], ProtectConfig(steps=2))
    assert torch.isfinite(res.objective).all() and res.delta.abs().max() > 0


def test_the_api_refuses_another_commands_folder(base, tiny_world, tmp_path):
    """``protect`` (the API, not only the CLI) leaves a folder holding an extract run alone."""
    folder = _folder(tiny_world, tmp_path, n=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "extract.json").write_text("{}")
    (out / "report.html").write_text("extract's report")
    with pytest.raises(ValueError, match="holds extract.json, of a cgidm extract run; protect would overwrite"):
        protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST), progress=False)
    assert sorted(p.name for p in out.iterdir() if p.name != ".cgidm.lock") == ["extract.json", "report.html"]
    assert (out / "report.html").read_text() == "extract's report"


def test_a_fresh_run_refuses_an_out_holding_someone_elses_outputs(base, tiny_world, tmp_path):
    """An --out with no protect run of cgidm's (no protect.json) that already holds a
    protected/ file or a report.html is refused before anything is written over them; the
    same command resumes its own run, which has the state file."""
    folder = _folder(tiny_world, tmp_path, n=1)
    for name in ("protected/x.png", "report.html"):
        out = tmp_path / name.replace("/", "_")
        (out / name).parent.mkdir(parents=True)
        (out / name).write_text("mine")
        with pytest.raises(ValueError, match=f"already holds {name.split('/')[0]} and no protect.json"):
            protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST), progress=False)
        assert (out / name).read_text() == "mine"
    out = tmp_path / "ours"
    protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST), progress=False)
    (out / "panels").mkdir(exist_ok=True)
    protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST), progress=False)  # its own: resumed
