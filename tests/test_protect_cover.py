"""What of an image ``cgidm protect`` covers (``--cover``, docs/protect.md, "Back to the
original size"): the view's geometry by hand, the perturbation mapped back onto the whole
image or the centre square, the engine at a non-square size against the plain loop, the
runner batching by size, and a resume of a run made before ``--cover``."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cgidm.config import ProtectConfig
from cgidm.images import load_image_with_notes, view_of
from cgidm.protect import _target, collect_protect_items, protect
from cgidm.protect_output import perturbation_levels
from cgidm.protect_pgd import ProtectEngine, builtin_target, load_base, protect_loop, target_latent
from cgidm.testing.world import copy_members

FAST = dict(steps=2, eval_draws=2)


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_base(tiny_world / "base")


def test_view_geometry_by_hand():
    # a square image: the same view either way
    assert view_of(32, 32, 16, "full", 4) == view_of(32, 32, 16, "centre") == ((0, 0, 32, 32), (16, 16))
    # 3:2 landscape at R 16: short side 16, long side 24 (a multiple of 4 and of 8)
    assert view_of(30, 20, 16, "full", 4) == ((0, 0, 30, 20), (24, 16))
    assert view_of(30, 20, 16, "full", 8) == ((0, 0, 30, 20), (24, 16))
    # the long side rounds to the nearest multiple: 16 * 23/17 = 21.6 -> 20 (of 4), 22 (of 2)
    assert view_of(17, 23, 16, "full", 4) == ((0, 0, 17, 23), (16, 20))
    assert view_of(17, 23, 16, "full", 2) == ((0, 0, 17, 23), (16, 22))
    # beyond 2:1 the centre 2:1 is kept: 100x20 -> x 30..70, at 32x16
    assert view_of(100, 20, 16, "full", 2) == ((30, 0, 70, 20), (32, 16))
    # the centre view: the centre square of the resized image, in the original's pixels
    assert view_of(40, 20, 16, "centre") == ((10, 0, 30, 20), (16, 16))
    with pytest.raises(ValueError, match="cover"):
        view_of(40, 20, 16, "middle")


def test_the_perturbation_covers_the_view():
    d = torch.full((3, 16, 24), 2 / 255)
    full = perturbation_levels(d, (30, 20), 16, "full", 4)
    assert full.shape == (20, 30, 3) and np.allclose(full, 1.0)
    centre = perturbation_levels(torch.full((3, 16, 16), 2 / 255), (40, 20), 16, "centre")
    assert np.allclose(centre[:, 10:30], 1.0) and (centre[:, :10] == 0).all() and (centre[:, 30:] == 0).all()
    cut = perturbation_levels(torch.full((3, 16, 32), 2 / 255), (100, 20), 16, "full", 2)
    assert np.allclose(cut[:, 30:70], 1.0) and (cut[:, :30] == 0).all() and (cut[:, 70:] == 0).all()


def test_loading_a_wide_image_keeps_its_aspect(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "w.png")
    full, _ = load_image_with_notes(tmp_path / "w.png", 16, cover="full", multiple=4)
    centre, _ = load_image_with_notes(tmp_path / "w.png", 16)
    assert full.shape == (3, 16, 24) and centre.shape == (3, 16, 16)
    want = np.asarray(Image.fromarray(arr).resize((24, 16), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    torch.testing.assert_close(full, torch.from_numpy(want).permute(2, 0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("loss", ["advdm", "fused"])
def test_engine_at_a_non_square_size_takes_the_loops_steps(base, loss):
    cfg = ProtectConfig(steps=3, loss=loss, random_start=True)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 16, 24, generator=g) * 2 - 1
    ids = ["a.png", "b.png"]
    z_target = target_latent(base, builtin_target(16, 24)) if cfg.needs_target else None
    want = protect_loop(base, x, ids, cfg, z_target=z_target)
    engine = ProtectEngine(base, cfg, 3, z_target=z_target, size=(16, 24))  # a padded bucket of 3
    got = engine.run(x, ids)
    assert got.delta.shape == (2, 3, 16, 24)
    assert (got.delta != want.delta).float().mean() < 0.01
    torch.testing.assert_close(got.objective, want.objective, rtol=1e-3, atol=1e-5)
    assert got.delta.abs().max() <= 2 * 8 / 255 + 1e-6 and got.delta.abs().amax((0, 1)).gt(0).all()
    with pytest.raises(ValueError, match="multiples"):
        ProtectEngine(base, cfg, 1, size=(16, 23))


def test_engine_at_a_non_square_size_through_a_vae(tiny_world):
    """The random SD-shaped base with a VAE (factor 2, 2-level UNet: sides in multiples of
    4 px): the keyed posterior sample and the encoder's backward at 8 x 12."""
    from test_protect_graph import vae_base

    model = vae_base()
    assert model.pixel_multiple == 4 and model.latent_shape_for(8, 12) == (4, 4, 6)
    cfg = ProtectConfig(steps=3, k=2)
    x = torch.rand(2, 3, 8, 12, generator=torch.Generator().manual_seed(4)) * 2 - 1
    cond = torch.randn(1, 3, 8)
    want = protect_loop(model, x, ["a", "b"], cfg, cond=cond)
    got = ProtectEngine(model, cfg, 2, cond=cond, size=(8, 12)).run(x, ["a", "b"])
    assert (got.delta != want.delta).float().mean() < 0.01 and got.delta.abs().gt(0).float().mean() > 0.5
    torch.testing.assert_close(got.objective, want.objective, rtol=1e-3, atol=1e-5)


def test_target_is_drawn_or_resized_at_the_images_size(base, tiny_world):
    assert builtin_target(16, 24).shape == (3, 16, 24)
    assert torch.equal(builtin_target(16, 16), builtin_target(16))
    cfg = ProtectConfig(loss="textural")
    assert _target(base, cfg, (16, 24)).shape == (1, base.latent_channels, 16, 24)
    # a wide --target: at R x R its centre square, as before --cover (and as --cover centre)
    rng = np.random.default_rng(5)
    arr = rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = f"{d}/t.png"
        Image.fromarray(arr).save(path)
        t = cfg.replace(target=path)
        from cgidm.images import load_image

        torch.testing.assert_close(_target(base, t, (16, 16)), target_latent(base, load_image(path, 16)),
                                   rtol=0, atol=0)
        # 16 x 24 (3:2): the target's full view (16 x 32) cut to its centre 24 columns
        want = load_image_with_notes(path, 16, cover="full", multiple=base.pixel_multiple)[0][..., 4:28]
        torch.testing.assert_close(_target(base, t, (16, 24)), target_latent(base, want), rtol=0, atol=0)
        assert _target(base, t, (24, 16)).shape == (1, base.latent_channels, 24, 16)


def _folder(tiny_world, tmp_path):
    d = copy_members(tiny_world, tmp_path / "art", 3)
    rng = np.random.default_rng(1)
    for name, shape in (("wide_a.png", (16, 24, 3)), ("wide_b.png", (20, 30, 3)), ("tall.png", (24, 16, 3))):
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(d / name)
    return d


def test_the_runner_batches_by_size_and_covers_every_image(base, tiny_world, tmp_path, monkeypatch):
    folder = _folder(tiny_world, tmp_path)
    sizes = []
    real = ProtectEngine.run

    def run(self, images, ids, callback=None):
        sizes.append((self.size, sorted(ids)))
        return real(self, images, ids, callback)

    monkeypatch.setattr(ProtectEngine, "run", run)
    out = tmp_path / "out"
    s = protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST, batch_size=2), progress=False)
    assert s["protected"] == 6 and s["failed"] == 0
    # square members in batches of 2 then 1, both wide ones (16x24 at the model's scale) together, the tall one alone
    assert sorted(sizes) == sorted([((16, 16), ["member_00.png", "member_01.png"]), ((16, 16), ["member_02.png"]),
                                    ((16, 24), ["wide_a.png", "wide_b.png"]), ((24, 16), ["tall.png"])])
    for name in ("wide_a.png", "wide_b.png", "tall.png"):
        a = np.asarray(Image.open(folder / name), dtype=np.int64)
        b = np.asarray(Image.open(out / "protected" / name), dtype=np.int64)
        assert a.shape == b.shape and np.abs(a - b).max() <= 8
        assert (np.abs(a - b).max(axis=(0, 2)) > 0).all() and (np.abs(a - b).max(axis=(1, 2)) > 0).all(), name
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert rows["wide_b.png"]["loss_protected"] > 0 and json.loads((out / "summary.json").read_text())[
        "config"]["cover"] == "full"
    text = Image.open(out / "protected" / "wide_a.png").text["cgidm-protect"]
    assert json.loads(text)["cover"] == "full"


def test_each_row_records_the_fused_weight_its_size_was_protected_with(base, tiny_world, tmp_path):
    """``--loss fused`` without ``--textural-weight``: Mist's C*h*w/1e4 of each size's latent,
    in each row and (as a range) in the report's settings; a set weight is every row's."""
    import math

    folder = _folder(tiny_world, tmp_path)
    out = tmp_path / "out"
    s = protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST, loss="fused"), progress=False)
    assert s["protected"] == 6
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    square, wide = (math.prod(base.latent_shape_for(*hw)) / 1e4 for hw in ((16, 16), (16, 24)))
    assert square != wide
    assert rows["member_00.png"]["textural_weight"] == square and rows["wide_b.png"]["textural_weight"] == wide
    html = (out / "report.html").read_text()
    assert f"C*h*w/1e4 = {square:.4g} to {wide:.4g} by size" in html
    s = protect(base, collect_protect_items(folder), tmp_path / "set", ProtectConfig(**FAST, loss="fused",
                textural_weight=0.5), progress=False)
    rows = list(map(json.loads, (tmp_path / "set" / "results.jsonl").read_text().splitlines()))
    assert {r["textural_weight"] for r in rows} == {0.5}
    s = protect(base, collect_protect_items(folder), tmp_path / "adv", ProtectConfig(**FAST), progress=False)
    assert not any("textural_weight" in json.loads(r) for r in (tmp_path / "adv" / "results.jsonl").read_text().splitlines())


def test_centre_cover_leaves_the_margins_and_a_run_from_before_cover_resumes_as_centre(base, tiny_world, tmp_path):
    folder = _folder(tiny_world, tmp_path)
    out = tmp_path / "out"
    cfg = ProtectConfig(**FAST, cover="centre")
    items = collect_protect_items(folder)
    protect(base, items[:2], out, cfg, progress=False)
    a = np.asarray(Image.open(folder / "wide_b.png"), dtype=np.int64)
    # a run written before --cover existed: its settings have no "cover"
    state = out / "protect.json"
    old = json.loads(state.read_text())
    del old["settings"]["cover"]
    state.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="cover 'centre' there, 'full' now"):
        protect(base, items, out, ProtectConfig(**FAST), progress=False)
    s = protect(base, items, out, cfg, progress=False)
    assert s["protected"] == 6
    b = np.asarray(Image.open(out / "protected" / "wide_b.png"), dtype=np.int64)
    # 30x20: the centre square is x 5..25; the margins are untouched
    assert (a[:, :5] == b[:, :5]).all() and (a[:, 25:] == b[:, 25:]).all() and (a[:, 5:25] != b[:, 5:25]).any()
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert "--cover centre: only the centre 20x20 protected; the margins are unchanged" in rows["wide_b.png"]["notes"]
    assert not any(n.startswith("--cover") for n in rows["member_00.png"]["notes"])  # a square one: all of it


def test_an_engine_is_kept_only_while_it_fits_the_batch(base, tiny_world, tmp_path):
    """Eager (CPU): a new engine for every other batch count or size, so no padded row is
    computed; with a graph, a batch of its size is padded into it while that at most
    doubles the rows, and a smaller one gets an engine (and a capture) of its own."""
    from cgidm.protect import _Run

    run = _Run(base, ProtectConfig(**FAST, batch_size=8), tmp_path, lambda row: None, False)
    first = run._engine((16, 16), 8)
    assert run._engine((16, 16), 8) is first and first.b == 8
    assert run._engine((16, 16), 5) is not first and run.engine.b == 5  # eager: rebuilt, no padding
    run.engine.graph = object()  # as if captured
    graphed = run.engine
    assert run._engine((16, 16), 3) is graphed  # 5 rows for 3: padded
    assert run._engine((16, 16), 2) is not graphed and run.engine.b == 2  # 5 > 2 x 2: rebuilt
    assert run._engine((16, 24), 2).size == (16, 24)  # another size: rebuilt


@pytest.mark.parametrize("first", ["wide", "square"])
def test_out_of_memory_lowers_each_size_batch_by_its_pixels(base, tmp_path, monkeypatch, first):
    """An out-of-memory fault lowers a budget of pixels per batch, not one batch count for
    every size: after 4 wide images (16x24) did not fit, 3 square ones (16x16) still go
    together; after 4 square ones did not fit, wide ones go alone without a fault of their
    own. The files are those of a run without faults (every draw is keyed by the image)."""
    rng = np.random.default_rng(3)
    folder = tmp_path / "art"
    folder.mkdir()
    order = {"wide": "a", "square": "b"} if first == "wide" else {"square": "a", "wide": "b"}
    for i in range(4):
        for kind, shape in (("wide", (20, 30, 3)), ("square", (16, 16, 3))):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(folder / f"{order[kind]}_{kind}_{i}.png")
    items = collect_protect_items(folder)
    cfg = ProtectConfig(**FAST, batch_size=4)
    protect(base, items, tmp_path / "plain", cfg, progress=False)
    limit = 1100 if first == "wide" else 700  # pixels x rows that "fit"
    real, tried = ProtectEngine.run, []

    def run(self, images, ids, callback=None):
        kind = "W" if self.size == (16, 24) else "S"
        fits = self.b * self.size[0] * self.size[1] <= limit
        tried.append((kind, self.b, fits))
        if not fits:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(self, images, ids, callback)

    monkeypatch.setattr(ProtectEngine, "run", run)
    s = protect(base, items, tmp_path / "low", cfg, progress=False)
    assert s["protected"] == 8 and s["failed"] == 0
    if first == "wide":  # budget 2 x 384 px: wide in twos, square in threes (768 px)
        assert tried == [("W", 4, False), ("W", 2, True), ("W", 2, True), ("S", 3, True), ("S", 1, True)]
    else:  # budget 2 x 256 px: square in twos, wide alone (512 // 384)
        assert tried == [("S", 4, False), ("S", 2, True), ("S", 2, True)] + [("W", 1, True)] * 4
    for it in items:
        a = np.asarray(Image.open(tmp_path / "plain" / "protected" / it.id))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "low" / "protected" / it.id))), it.id


@pytest.mark.parametrize("shape,top", [((37, 53, 3), 255), ((40, 29), 255), ((23, 31), 65535), ((8, 9, 3), 255),
                                       ((5, 64, 3), 255)])
def test_scores_in_strips_equal_scikit_image_on_the_whole_image(monkeypatch, shape, top):
    """PSNR, SSIM and the largest change, strip by strip (a few rows per strip here, so every
    border case is hit), against scikit-image on the whole image."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from cgidm import protect_output as O

    monkeypatch.setattr(O, "STRIP_ROWS", 4)
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, top + 1, shape).astype(np.uint16 if top > 255 else np.uint8)
    b = np.clip(a.astype(np.int64) + rng.integers(-9, 10, shape), 0, top).astype(a.dtype)
    got = O._scores(a, b, top)
    fa, fb = a / top, b / top
    side = min(shape[:2])
    win = max(3, min(7, side if side % 2 else side - 1))
    want = structural_similarity(fa, fb, channel_axis=2 if a.ndim == 3 else None, data_range=1.0, win_size=win)
    assert got["ssim"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got["psnr"] == pytest.approx(peak_signal_noise_ratio(fa, fb, data_range=1.0), rel=1e-9)
    assert got["change"] == np.abs(a.astype(np.int64) - b).max()
    same = O._scores(a, a.copy(), top)
    assert same["psnr"] == 100.0 and same["ssim"] == pytest.approx(1.0) and same["change"] == 0


def test_the_panel_in_strips_equals_the_whole_image_computation(monkeypatch):
    from cgidm import protect_output as O

    rng = np.random.default_rng(2)
    before = rng.integers(0, 256, (21, 30, 3)).astype(np.uint8)
    after = np.clip(before.astype(np.int64) + rng.integers(-8, 9, before.shape), 0, 255).astype(np.uint8)
    whole = np.asarray(O.panel(before, after, 255, 8))
    monkeypatch.setattr(O, "STRIP_ROWS", 4)
    assert np.array_equal(np.asarray(O.panel(before, after, 255, 8)), whole)
    # the amplified third: grey where unchanged, the full range at the budget
    amp = np.asarray(O._amplified(before, after, 255, 8)).astype(np.float64)
    want = np.clip(np.rint(127.5 + (after.astype(np.float64) - before) * 127.5 / 8), 0, 255)
    assert np.abs(amp - want).max() <= 1
    grey = np.asarray(O._display(before[..., 0], 255))
    assert grey.shape == (21, 30, 3) and np.array_equal(grey[..., 0], before[..., 0])


@pytest.mark.parametrize("mode", ["I;16", "L", "LA", "RGB"])
def test_written_levels_follow_the_float64_rounding(tmp_path, mode):
    """The step written into each pixel: rint(levels x scale) of the perturbation (for a
    greyscale image the mean of its three channels) in float64, clipped to the budget, as
    cgidm always wrote it. 600 x 600 px of 16-bit levels puts a few values within float32's
    rounding of x.5, where 32-bit arithmetic wrote the other level."""
    from cgidm.protect_output import perturbation_levels, protect_file

    rng = np.random.default_rng(7)
    side = 600
    sixteen = mode == "I;16"
    if sixteen:
        src = Image.fromarray(rng.integers(0, 65536, (side, side)).astype(np.uint16))
    else:
        chans = {"L": 1, "LA": 2, "RGB": 3}[mode]
        src = Image.fromarray(rng.integers(0, 256, (side, side, chans)).astype(np.uint8).squeeze(), mode)
    src.save(tmp_path / "in.png")
    delta = (torch.rand(3, side, side, generator=torch.Generator().manual_seed(1)) * 2 - 1) * (10 / 127.5)
    protect_file(tmp_path / "in.png", tmp_path / "out.png", delta, side, 8 / 255, {})
    got = np.asarray(Image.open(tmp_path / "out.png")).astype(np.int64)
    arr = np.asarray(Image.open(tmp_path / "in.png")).astype(np.int64)
    d = perturbation_levels(delta, (side, side), side).astype(np.float64)
    scale, top = (257, 65535) if sixteen else (1, 255)
    step = d if mode == "RGB" else d.mean(-1)
    step = np.clip(np.rint(step * scale), -8 * scale, 8 * scale).astype(np.int64)
    colour = arr[..., 0] if mode == "LA" else arr
    want = np.clip(colour + step, 0, top)
    assert np.array_equal(got[..., 0] if mode == "LA" else got, want)
    if mode == "LA":
        assert np.array_equal(got[..., 1], arr[..., 1])  # alpha unchanged


def test_scores_refuse_an_image_no_window_fits():
    from cgidm.protect_output import _scores

    a = np.zeros((2, 10), dtype=np.uint8)
    with pytest.raises(ValueError, match="win_size"):
        _scores(a, a + 50, 255)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def test_written_modes_say_what_the_imaging_library_cannot_keep(tmp_path):
    """A 48-bit RGB PNG (Pillow holds RGB in 8 bits) is written 8-bit with a note; a CMYK
    JPEG's CMYK ICC profile is not put on its RGB PNG (note), an RGB profile on RGB is."""
    import struct
    import zlib

    from PIL import ImageCms

    from cgidm.protect_output import protect_file

    rng = np.random.default_rng(3)
    deep = rng.integers(0, 65536, (12, 10, 3)).astype(">u2")
    raw = b"".join(b"\0" + deep[i].tobytes() for i in range(12))
    header = struct.pack(">IIBBBBB", 10, 12, 16, 2, 0, 0, 0)  # 10 x 12, 16 bits, RGB
    (tmp_path / "rgb48.png").write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                                         + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    cmyk_icc = bytearray(srgb)
    cmyk_icc[16:20] = b"CMYK"
    pixels = Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8), "RGB")
    pixels.convert("CMYK").save(tmp_path / "c.jpg", icc_profile=bytes(cmyk_icc))
    pixels.save(tmp_path / "rgb.png", icc_profile=srgb)
    delta = torch.full((3, 12, 10), 4 / 127.5)
    rows = {n: protect_file(tmp_path / n, tmp_path / f"out-{n}.png", delta, 12, 8 / 255, {}) for n in
            ("rgb48.png", "c.jpg", "rgb.png")}
    assert any("16 bits per channel read and written as 8" in n for n in rows["rgb48.png"]["notes"])
    assert Image.open(tmp_path / "out-rgb48.png.png").mode == "RGB"
    assert not any("16 bits" in n for r in ("c.jpg", "rgb.png") for n in rows[r]["notes"])
    assert "icc_profile" not in Image.open(tmp_path / "out-c.jpg.png").info
    assert any("ICC profile (CMYK colour space) not copied" in n for n in rows["c.jpg"]["notes"])
    assert Image.open(tmp_path / "out-rgb.png.png").info["icc_profile"] == srgb
    assert not any("ICC" in n for n in rows["rgb.png"]["notes"])
    # a BMP of 16 bits per pixel (RGB565: 5 or 6 bits a channel) loses nothing in 8 bits
    from cgidm.protect_output import _fewer_bits

    pix = b"".join(struct.pack("<H", 0xF800) * 4 for _ in range(2))
    dib = struct.pack("<IiiHHIIiiII", 40, 4, 2, 1, 16, 3, len(pix), 2835, 2835, 0, 0)
    masks = struct.pack("<III", 0xF800, 0x07E0, 0x001F)
    (tmp_path / "565.bmp").write_bytes(b"BM" + struct.pack("<IHHI", 66 + len(pix), 0, 0, 66) + dib + masks + pix)
    with Image.open(tmp_path / "565.bmp") as bmp, Image.open(tmp_path / "rgb48.png") as deep_png:
        assert bmp.mode == "RGB" and not _fewer_bits(bmp) and _fewer_bits(deep_png)


def test_a_16_bit_image_takes_the_budget_in_16_bit_levels(tmp_path):
    """The cap is floor(budget * 65535) 16-bit levels, so a budget under one 8-bit level
    still changes a 16-bit file (as the CLI's warning says), and 0.03 reaches 1966 levels
    (not 7 x 257 = 1799)."""
    from cgidm.protect_output import protect_file

    Image.fromarray(np.full((10, 10), 30000, dtype=np.uint16)).save(tmp_path / "g.png")
    delta = torch.full((3, 10, 10), 20 / 127.5)  # 20 levels up, past either budget
    for budget, cap in ((0.5 / 255, 128), (0.03, 1966)):
        row = protect_file(tmp_path / "g.png", tmp_path / "o.png", delta, 10, budget, {})
        got = np.asarray(Image.open(tmp_path / "o.png")).astype(np.int64)
        assert row["mode"] == "I;16" and (got - 30000 == cap).all(), (budget, np.unique(got))
