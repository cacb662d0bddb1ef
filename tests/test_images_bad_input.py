"""Every image file is untrusted input: odd modes are handled, bad files become an
``ImageError`` with the reason, and fuzzed bytes never produce anything else."""
import io
import struct
import tempfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cgidm.images import ImageError, _load, list_images, load_image, load_image_with_notes, min_side


def _grey(value: float) -> float:
    """An 8-bit value as the loader's [-1, 1] float, rounded the way it rounds (fp32)."""
    return float(np.float32(value) / np.float32(127.5) - np.float32(1.0))


def _save(tmp_path, im, name, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(w: int, h: int, bit_depth: int, colour_type: int, raw: bytes, interlace: int = 0, parts: int = 1,
         plte: bytes = b"") -> bytes:
    """A PNG written by hand: PIL cannot write 16-bit RGB or interlaced PNGs, and a bomb or a
    file whose data ends early needs a header that lies about its size. ``raw``: the filtered
    scanlines, compressed into one zlib stream cut into ``parts`` IDAT chunks (and an empty one
    after the first when there are three or more); ``plte``: a palette."""
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, colour_type, 0, 0, interlace)
    data = zlib.compress(raw)
    pieces = [data[len(data) * i // parts:len(data) * (i + 1) // parts] for i in range(parts)]
    if parts >= 3:
        pieces.insert(1, b"")  # empty IDAT chunks are allowed
    idats = b"".join(_chunk(b"IDAT", piece) for piece in pieces)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + (_chunk(b"PLTE", plte) if plte else b"") + idats
            + _chunk(b"IEND", b""))


# --------------------------------------------------------------------------- modes


def test_greyscale_and_bilevel_become_equal_channels(tmp_path):
    x = load_image(_save(tmp_path, Image.new("L", (20, 20), 64), "g.png"), 16)
    assert x.shape == (3, 16, 16)
    assert torch.allclose(x, torch.full_like(x, _grey(64)))
    x = load_image(_save(tmp_path, Image.new("1", (20, 20), 1), "b.png"), 16)
    assert torch.allclose(x, torch.ones_like(x))


def test_palette_image_keeps_its_colours(tmp_path):
    im = Image.new("RGB", (16, 16), (200, 30, 90)).quantize(4)
    x = load_image(_save(tmp_path, im, "p.png"), 16)
    assert torch.allclose(x[:, 0, 0], torch.tensor([_grey(200), _grey(30), _grey(90)]), atol=2 / 127.5)


@pytest.mark.parametrize("mode,colour", [("RGBA", (255, 0, 0, 128)), ("LA", (0, 128))])
def test_alpha_is_composited_on_white(tmp_path, mode, colour):
    x, notes = load_image_with_notes(_save(tmp_path, Image.new(mode, (16, 16), colour), "a.png"), 16)
    a = 128 / 255
    if mode == "RGBA":
        want = [255, 255 * (1 - a), 255 * (1 - a)]
    else:
        want = [255 * (1 - a)] * 3
    assert torch.allclose(x[:, 3, 3], torch.tensor([_grey(v) for v in want]), atol=1.5 / 127.5)
    assert any("white" in n for n in notes)


def test_opaque_alpha_changes_nothing_and_says_nothing(tmp_path):
    x, notes = load_image_with_notes(_save(tmp_path, Image.new("RGBA", (16, 16), (10, 20, 30, 255)), "o.png"), 16)
    assert torch.allclose(x[:, 0, 0], torch.tensor([_grey(10), _grey(20), _grey(30)]))
    assert notes == []


def test_palette_transparency_is_white(tmp_path):
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 8, 16))
    path = _save(tmp_path, im, "t.gif", transparency=0)
    x = load_image(path, 16)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red, opaque
    assert torch.allclose(x[:, 0, 15], torch.ones(3))  # transparent -> white


def test_cmyk_is_converted(tmp_path):
    x, notes = load_image_with_notes(_save(tmp_path, Image.new("CMYK", (16, 16), (0, 255, 0, 0)), "c.tif"), 16)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))  # magenta
    assert any("CMYK" in n for n in notes)


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    levels = np.array([0, 1000, 32896, 65535], dtype=np.uint16)  # 32896 = 128 * 257
    arr = np.repeat(np.repeat(levels[None, :], 16, 0), 4, 1)  # 16 x 16, four bands
    path = _save(tmp_path, Image.fromarray(arr), "g16.png")
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")
    x = load_image(path, 16)
    got = x[0, 8, [1, 5, 9, 13]]
    want = torch.tensor([_grey(round(v / 257)) for v in levels.tolist()])
    assert torch.allclose(got, want, atol=1e-6), (got, want)  # PIL's convert gives 255 for all but 0


def test_16_bit_rgb_png(tmp_path):
    px = np.zeros((16, 16, 3), dtype=">u2")
    px[..., 0] = 65535
    px[..., 2] = 32896
    raw = b"".join(b"\0" + px[y].tobytes() for y in range(16))
    path = tmp_path / "rgb48.png"
    path.write_bytes(_png(16, 16, 16, 2, raw))
    x = load_image(path, 16)
    assert torch.allclose(x[:, 4, 4], torch.tensor([1.0, -1.0, _grey(128)]))


def test_32_bit_integer_and_float_images_are_scaled(tmp_path):
    i16 = np.full((16, 16), 32896, dtype=np.int32)
    assert torch.allclose(load_image(_save(tmp_path, Image.fromarray(i16), "i.tif"), 16), torch.full((3, 16, 16), _grey(128)))
    f = np.full((16, 16), 0.5, dtype=np.float32)
    assert torch.allclose(load_image(_save(tmp_path, Image.fromarray(f), "f.tif"), 16), torch.full((3, 16, 16), _grey(128)))
    wide = np.linspace(-1e6, 1e6, 256, dtype=np.float32).reshape(16, 16)
    x, notes = load_image_with_notes(_save(tmp_path, Image.fromarray(wide), "w.tif"), 16)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert any("stretched" in n for n in notes)


def test_float_image_with_nan_is_an_error(tmp_path):
    f = np.zeros((16, 16), dtype=np.float32)
    f[3, 3] = np.nan
    with pytest.raises(ImageError, match="non-finite"):
        load_image(_save(tmp_path, Image.fromarray(f), "nan.tif"), 16)


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (32, 16), (255, 0, 0))
    im.paste((0, 0, 255), (16, 0, 32, 16))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated 90 degrees clockwise
    tagged = load_image(_save(tmp_path, im, "exif.png", exif=exif), 16)
    upright = load_image(_save(tmp_path, im.transpose(Image.Transpose.ROTATE_270), "upright.png"), 16)
    plain = load_image(_save(tmp_path, im, "plain.png"), 16)
    assert torch.equal(tagged, upright)
    assert not torch.equal(tagged, plain)
    assert tagged[0, 0, 8] == 1.0 and tagged[2, 15, 8] == 1.0  # red on top, blue below


def test_animated_gif_uses_the_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 255, 255), (0, 0, 0))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    x, notes = load_image_with_notes(path, 16)
    assert torch.allclose(x, torch.ones_like(x))
    assert any("first frame" in n for n in notes)


# --------------------------------------------------------------------------- sizes


def test_min_side_rule():
    assert min_side(16) == 8 and min_side(512) == 128 and min_side(4) == 4


@pytest.mark.parametrize("size,resolution,outcome", [
    ((16, 16), 16, "ok"),
    ((12, 30), 16, "upscaled"),
    ((7, 40), 16, "too small"),
    ((100, 100), 512, "too small"),
    ((200, 300), 512, "upscaled"),
])
def test_small_images_are_upscaled_or_refused(tmp_path, size, resolution, outcome):
    path = _save(tmp_path, Image.new("RGB", size, (9, 9, 9)), "s.png")
    if outcome == "too small":
        with pytest.raises(ImageError, match=rf"too small \({size[0]}x{size[1]}\) for {resolution}x{resolution}"):
            load_image(path, resolution)
        return
    x, notes = load_image_with_notes(path, resolution)
    assert x.shape == (3, resolution, resolution)
    assert any("upscaled" in n for n in notes) == (outcome == "upscaled")


def test_extreme_aspect_ratio_is_centre_cropped(tmp_path):
    # resized whole, this strip would be 16 x 12000 px; only its centre can be kept
    im = Image.new("RGB", (8, 6000), (0, 0, 0))
    im.paste((255, 255, 255), (0, 2998, 8, 3002))
    x = load_image(_save(tmp_path, im, "tall.png"), 16)
    centre = load_image(_save(tmp_path, im.crop((0, 2992, 8, 3008)), "centre.png"), 16)
    assert torch.equal(x, centre)
    assert float(x.max()) > 0.9 and float(x.min()) == -1.0


@pytest.mark.parametrize("side", [10_000, 20_000])  # above our limit; above PIL's own hard limit
def test_decompression_bomb_is_refused_before_decoding(tmp_path, side):
    # a few bytes of file that declare a gigapixel image; the data would never fit
    path = tmp_path / "bomb.png"
    path.write_bytes(_png(side, side, 8, 0, b"\0" * 64))
    # one message whichever refuses it, ours or PIL's: the size and cgidm's own limit
    with pytest.raises(ImageError, match=rf"too large \(({side}x{side} = )?{side * side} pixels, limit 89478485; "
                                         "decompression-bomb guard\)"):
        load_image(path, 16)
    if side * side > 2 * Image.MAX_IMAGE_PIXELS:  # PIL refuses first, whatever limit was asked: its limit said
        with pytest.raises(ImageError, match=rf"limit {2 * Image.MAX_IMAGE_PIXELS};"):
            load_image(path, 16, max_pixels=10**9)


def test_pixel_limit_is_configurable(tmp_path):
    path = _save(tmp_path, Image.new("RGB", (40, 40)), "m.png")
    with pytest.raises(ImageError, match="limit 1000"):
        load_image(path, 16, max_pixels=1000)
    assert load_image(path, 16, max_pixels=1600).shape == (3, 16, 16)


# --------------------------------------------------------------------------- bad files


def _valid_bytes(fmt: str, size: int = 16) -> bytes:
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("name,data,reason", [
    ("text.png", b"this is not an image", "not an image"),
    ("empty.jpg", b"", "not an image"),
    ("half.png", _valid_bytes("PNG", 64)[:300], "truncated"),
    ("half.jpg", _valid_bytes("JPEG", 64)[:400], None),
    ("head.gif", _valid_bytes("GIF")[:20], None),
])
def test_bad_files_are_image_errors_with_the_path(tmp_path, name, data, reason):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ImageError, match=reason) as e:
        load_image(path, 16)
    assert e.value.path == str(path) and str(path) in str(e.value)


def test_missing_file_is_an_image_error(tmp_path):
    with pytest.raises(ImageError, match="cannot open"):
        load_image(tmp_path / "gone.png", 16)


def test_hidden_files_are_not_listed(tmp_path):
    for name in ("a.png", "._a.png", ".a.png.tmp123", "b.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "dir.png").mkdir()
    assert [p.name for p in list_images(tmp_path)] == ["a.png"]


def test_an_output_folder_that_is_or_holds_the_image_folder_is_refused(tmp_path):
    """Every image would be left out as the run's own output: said as such, not as an
    empty folder; an output folder inside the image folder is skipped when a cgidm run made
    it, and refused while it holds images no run made (they would be left out unsaid)."""
    images = tmp_path / "art"
    (images / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        (images / name).write_bytes(b"x")
    for out, verb in ((images, "is"), (tmp_path, "holds")):
        with pytest.raises(ValueError, match=f"the output folder .* {verb} the image folder .*: choose an output"):
            list_images(images, recursive=True, exclude=[out])
    # an earlier run's outputs in a folder of its own inside it are not the user's
    (images / "sub" / "run1" / "panels").mkdir(parents=True)
    (images / "sub" / "run1" / ".cgidm.lock").write_bytes(b"")
    (images / "sub" / "run1" / "panels" / "a.png").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"the output folder .*sub holds 1 image of .* \(sub/b.png\) that no "
                                         r"cgidm run made: .* choose an output folder without images"):
        list_images(images, recursive=True, exclude=[images / "sub"])
    (images / "sub" / "b.png").unlink()
    assert [p.name for p in list_images(images, recursive=True, exclude=[images / "sub"])] == ["a.png"]
    (images / "sub" / "b.png").write_bytes(b"x")
    (images / "sub" / ".cgidm.lock").write_bytes(b"")  # what every run leaves in its --out
    assert [p.name for p in list_images(images, recursive=True, exclude=[images / "sub"])] == ["a.png"]
    # an output folder given through a link to the image folder (or to its subfolder) is that folder
    (tmp_path / "link").symlink_to(images, target_is_directory=True)
    with pytest.raises(ValueError, match="is the image folder"):
        list_images(images, recursive=True, exclude=[tmp_path / "link"])
    (tmp_path / "sublink").symlink_to(images / "sub", target_is_directory=True)
    assert [p.name for p in list_images(images, recursive=True, exclude=[tmp_path / "sublink"])] == ["a.png"]


def test_what_a_listing_leaves_out_is_said_and_linked_folders_are_followed(tmp_path, caplog):
    """Entries named like images that are not image files (a broken link, a folder) are
    counted in a warning, not dropped silently, once however often the folder is listed; a
    linked subfolder leading out of the tree is listed, one inside it only under its own
    name, one to a folder above not at all (a link loop ends); an image folder that cannot
    be listed says so."""
    import os

    images = tmp_path / "art"
    (images / "members").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    for name in ("a.png", "members/b.png"):
        (images / name).write_bytes(b"x")
    (tmp_path / "elsewhere" / "c.png").write_bytes(b"x")
    (images / "holdouts").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (images / "members" / "again").symlink_to(images / "members", target_is_directory=True)  # a loop
    (images / "a").mkdir()
    (images / "a" / "featured").symlink_to(images / "members", target_is_directory=True)  # inside, met first
    (images / "up").symlink_to(tmp_path, target_is_directory=True)  # a folder above the tree
    (tmp_path / "elsewhere" / "v2").mkdir()  # a versioned dataset: latest -> v2, inside the followed folder
    (tmp_path / "elsewhere" / "v2" / "d.png").write_bytes(b"x")
    (tmp_path / "elsewhere" / "latest").symlink_to(tmp_path / "elsewhere" / "v2", target_is_directory=True)
    (images / "broken.png").symlink_to(tmp_path / "gone.png")
    (images / "folder.png").mkdir()
    with caplog.at_level("WARNING", logger="cgidm"):
        flat = list_images(images)
    assert [p.name for p in flat] == ["a.png"]
    assert "2 entries under" in caplog.text and "broken.png, folder.png" in caplog.text
    caplog.clear()
    list_images(images)
    assert caplog.text == ""  # said once
    deep = list_images(images, recursive=True, quiet=True)
    # each image once, under its own folder's name (its label); nothing from above the tree
    assert [p.relative_to(images).as_posix() for p in deep] == ["a.png", "holdouts/c.png", "holdouts/v2/d.png",
                                                                "members/b.png"]
    assert list_images(images, recursive=True, quiet=True, follow_links=False) == [images / "a.png",
                                                                                  images / "members" / "b.png"]
    assert caplog.text == ""
    if os.geteuid() != 0:  # root reads any folder
        locked = tmp_path / "locked"
        locked.mkdir(mode=0)
        with pytest.raises(ValueError, match="cannot list the image folder .*locked"):
            list_images(locked)


# --------------------------------------------------------------------------- fuzzing

FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP")
SEEDS = {fmt: _valid_bytes(fmt) for fmt in FORMATS}
FUZZ_DIR = Path(tempfile.mkdtemp(prefix="cgidm-fuzz-"))
# the bomb guard has its own tests; here it keeps a mutated header from costing seconds
FUZZ_PIXELS = 1 << 20


def _check(data: bytes, suffix: str) -> None:
    path = FUZZ_DIR / f"fuzz{suffix}"
    path.write_bytes(data)
    try:
        x = load_image(path, 16, max_pixels=FUZZ_PIXELS)
    except ImageError as e:
        assert e.path == str(path) and e.reason
        return
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.isfinite(x).all() and float(x.min()) >= -1.0 and float(x.max()) <= 1.0


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the metadata it skips
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".png", ".jpg", ".gif", ".tif"]))
def test_fuzz_random_bytes(data, suffix):
    _check(data, suffix)


@pytest.mark.filterwarnings("ignore::UserWarning")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    fmt=st.sampled_from(FORMATS),
    cut=st.one_of(st.none(), st.floats(0, 1)),
    flips=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=8),
)
def test_fuzz_mutated_valid_images(fmt, cut, flips):
    data = bytearray(SEEDS[fmt])
    for where, value in flips:
        data[int(where * len(data))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    _check(bytes(data), "." + fmt.lower())


def _returns_in_time(fn, seconds: float = 30.0):
    """``fn()``'s result, or a failure if it has not returned in ``seconds`` (run on a
    daemon thread: a hang fails the test instead of the whole run)."""
    import threading

    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn} did not return in {seconds} s (blocked on a pipe or a device?)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@pytest.mark.skipif(not hasattr(__import__("os"), "mkfifo"), reason="named pipes are POSIX")
def test_pipes_devices_and_folders_named_like_files_are_refused_without_blocking(tmp_path):
    """A named pipe would block the open forever and /dev/zero never end (a manifest row, a
    --target, --finetuned <(...)): each is refused before it is opened, as an image, as a
    file screen's resume hashes, and as a weights file."""
    import os

    from cgidm.checkpoints import ModelLoadError, load_state_dict
    from cgidm.resume import DigestCache, source

    os.mkfifo(tmp_path / "pipe.png")
    os.mkfifo(tmp_path / "pipe.safetensors")
    (tmp_path / "zero.png").symlink_to("/dev/zero")
    (tmp_path / "dir.png").mkdir()
    for name, kind in (("pipe.png", "a named pipe"), ("zero.png", "a device"), ("dir.png", "a folder")):
        with pytest.raises(ImageError, match=f"cannot open \\(not a regular file \\({kind}\\)\\)"):
            _returns_in_time(lambda: load_image_with_notes(tmp_path / name, 16))
        assert _returns_in_time(lambda: source(tmp_path / name)) == {"missing": True}
        with pytest.raises(OSError, match="not a regular file"):
            _returns_in_time(lambda: DigestCache(tmp_path).sha256(tmp_path / name))
    with pytest.raises(ModelLoadError, match="cannot read \\(not a regular file \\(a named pipe\\)\\)"):
        _returns_in_time(lambda: load_state_dict(tmp_path / "pipe.safetensors"))


def test_too_small_is_refused_from_the_header_before_decoding(tmp_path, monkeypatch):
    """A 1 x N image is refused by its header's size; its pixels are never decoded."""
    from PIL import ImageFile

    path = _save(tmp_path, Image.new("L", (1, 4000)), "strip.png")

    def no_decoding(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match="too small \\(1x4000\\)"):
        load_image_with_notes(path, 16)


def test_pictures_in_formats_not_read_are_said_and_a_folder_without_images_names_what_it_holds(tmp_path, caplog):
    from cgidm.manifest import collect_items
    from cgidm.protect import collect_protect_items

    phone = tmp_path / "phone"
    phone.mkdir()
    (phone / "IMG_1.HEIC").write_bytes(b"heic")
    (phone / "notes.pdf").write_bytes(b"%PDF")
    for collect in (lambda d: collect_items(images=d), collect_protect_items):
        with pytest.raises(FileNotFoundError, match=r"no images in .*phone: 2 files of other types \(IMG_1.HEIC, "
                                                    r"notes.pdf; the formats read are .png .jpg"):
            collect(phone)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.new("RGB", (8, 8), "red").save(mixed / "a.png")
    Image.new("RGB", (8, 8), "blue").save(mixed / "b.jfif", format="JPEG")  # a JPEG under Windows' name
    (mixed / "c.heic").write_bytes(b"heic")
    (mixed / "d.txt").write_text("notes")
    assert [p.name for p in list_images(mixed)] == ["a.png", "b.jfif"]
    assert "1 pictures under" in caplog.text
    assert "cgidm does not read and are left out (save them as PNG or JPEG to use them): c.heic" in caplog.text
    assert "d.txt" not in caplog.text


def test_the_centre_the_model_reads_and_an_exif_turn_are_noted(tmp_path):
    wide = Image.new("RGB", (48, 32), "red")
    wide.save(tmp_path / "wide.png")
    _, notes = load_image_with_notes(tmp_path / "wide.png", 16)
    assert notes == ["only its centre 32x32 of 48x32 used (the model reads a square)"]
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees
    Image.new("RGB", (32, 48), "blue").save(tmp_path / "phone.jpg", exif=exif.tobytes())
    x, notes = load_image_with_notes(tmp_path / "phone.jpg", 16)
    assert notes[0] == "turned upright by its EXIF orientation" and notes[1].startswith("only its centre 32x32 of 48x32")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "square.png")
    assert load_image_with_notes(tmp_path / "square.png", 16)[1] == []


def test_a_folder_named_like_a_picture_is_not_said_unread_and_names_are_escaped(tmp_path, caplog):
    from cgidm.images import no_images

    (tmp_path / "a").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "a" / "x.png")
    (tmp_path / "a" / "shoot.raw").mkdir()
    list_images(tmp_path / "a")
    assert "shoot.raw" not in caplog.text
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "\x1b]0;owned\x07.txt").write_text("")
    said = no_images(tmp_path / "b")
    assert "\x1b" not in said and "\\x1b]0;owned\\x07.txt" in said


# --------------------------------------------------------------------------- PNG data that ends early

_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
# (bit depth, colour type, samples per pixel): every kind of PNG there is
_KINDS = [(1, 0, 1), (2, 0, 1), (4, 0, 1), (8, 0, 1), (16, 0, 1), (8, 2, 3), (16, 2, 3), (1, 3, 1), (2, 3, 1),
          (4, 3, 1), (8, 3, 1), (8, 4, 2), (16, 4, 2), (8, 6, 4), (16, 6, 4)]
_ENDS_EARLY = r"truncated image \(image file is truncated \(its image data ends after \d+ of \d+ bytes\)\)"


def _scanlines(px: np.ndarray, bits: int) -> list[bytes]:
    """The rows of ``px`` (h x w x samples) at ``bits`` per sample, each with filter byte 0."""
    flat = px.reshape(px.shape[0], -1)
    if bits == 16:
        body = flat.astype(">u2").view(np.uint8)
    else:  # each sample's low ``bits`` bits, packed from the top of each byte
        bits_of = np.unpackbits(flat.astype(np.uint8)[..., None], axis=-1)[..., 8 - bits:]
        body = np.packbits(bits_of.reshape(px.shape[0], -1), axis=1)
    return [b"\0" + row.tobytes() for row in body]


def _kind_png(w: int, h: int, kind, interlace: int = 0, parts: int = 1, drop: int = 0) -> tuple[bytes, np.ndarray]:
    """A ``w x h`` PNG of ``kind`` with random pixels (and the pixels), its last ``drop``
    scanlines left out of a zlib stream that still ends cleanly."""
    bits, colour_type, samples = kind
    rng = np.random.default_rng(w * h + bits)
    px = rng.integers(0, 1 << bits, (h, w, samples))
    passes = _ADAM7 if interlace else ((0, 0, 1, 1),)
    rows = [row for r, c, dr, dc in passes if h > r and w > c for row in _scanlines(px[r::dr, c::dc], bits)]
    plte = rng.integers(0, 256, 3 << min(bits, 8), dtype=np.uint8).tobytes() if colour_type == 3 else b""
    return _png(w, h, bits, colour_type, b"".join(rows[:len(rows) - drop]), interlace, parts, plte), px


def test_png_whose_data_ends_cleanly_before_its_last_row_is_a_truncated_image(tmp_path):
    """A complete zlib stream of fewer rows than the header declares: this Pillow reads it
    without an error, the missing rows black; cgidm refuses it as a truncated image."""
    rng = np.random.default_rng(0)
    px = rng.integers(1, 256, (48, 64, 3), dtype=np.uint8)
    small = tmp_path / "small.png"
    small.write_bytes(_png(64, 48, 8, 2, b"".join(b"\0" + px[y].tobytes() for y in range(20))))  # 20 of 48 rows
    big = tmp_path / "big.png"  # 9000 x 9000 declared, 2000 rows there
    big.write_bytes(_png(9000, 9000, 8, 0, (b"\0" + b"\x80" * 9000) * 2000))
    for path, got, need in ((small, 20 * 193, 48 * 193), (big, 2000 * 9001, 9000 * 9001)):
        with pytest.raises(ImageError, match=rf"truncated image \(image file is truncated \(its image data ends "
                                             rf"after {got} of {need} bytes\)\)") as e:
            load_image(path, 16)
        assert e.value.path == str(path) and e.value.reason.startswith("truncated image (")


@pytest.mark.parametrize("interlace,parts,drop", [(0, 1, 1), (0, 3, 30), (1, 1, 1), (1, 2, 40)])
@pytest.mark.parametrize("kind", [(8, 2, 3), (1, 0, 1), (4, 3, 1), (16, 0, 1), (16, 4, 2), (16, 6, 4)], ids=str)
def test_png_of_any_kind_ending_early_is_a_truncated_image(tmp_path, kind, interlace, parts, drop):
    path = tmp_path / "short.png"
    path.write_bytes(_kind_png(64, 48, kind, interlace, parts, drop)[0])
    with pytest.raises(ImageError, match=_ENDS_EARLY):
        load_image(path, 16)


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("kind", _KINDS, ids=str)
def test_valid_png_of_every_kind_loads_as_before(tmp_path, kind, interlace):
    """Each bit depth and colour type, interlaced (Adam7, with passes left empty by a small
    size) or not, in one IDAT chunk or several: the same pixels as Pillow's own load."""
    for (w, h), parts in (((13, 9), 1), ((1, 1), 1), ((3, 6), 2), ((9, 17), 4), ((64, 48), 3)):
        path = tmp_path / f"{w}x{h}.png"
        data, px = _kind_png(w, h, kind, interlace, parts)
        path.write_bytes(data)
        with Image.open(path) as im:
            im.load()
            plain = np.asarray(im)
        with Image.open(path) as im:
            _load(im)
            assert np.array_equal(np.asarray(im), plain), (w, h)
        if kind[0] == 8 and kind[1] != 3:
            assert np.array_equal(plain.reshape(px.shape), px)
        if min(w, h) >= 8:
            assert load_image(path, 16).shape == (3, 16, 16)


@pytest.mark.parametrize("default_image", [False, True])
def test_apng_and_pillow_written_pngs_load_as_before(tmp_path, default_image):
    rng = np.random.default_rng(1)
    frames = [Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)) for _ in range(3)]
    path = tmp_path / "anim.png"
    frames[0].save(path, save_all=True, append_images=frames[1:], default_image=default_image)
    assert "animated: first frame used" in load_image_with_notes(path, 16)[1]
    with Image.open(path) as im:
        _load(im)
        assert np.array_equal(np.asarray(im), np.asarray(frames[0]))
    big = Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8))  # Pillow writes many IDAT chunks
    for mode in ("RGB", "RGBA", "LA", "P", "I;16", "1"):
        im = big.convert(mode) if mode != "I;16" else Image.fromarray(
            np.asarray(big.convert("L")).astype(np.uint16) * 257)
        im.save(tmp_path / "big.png")
        with Image.open(tmp_path / "big.png") as got:
            _load(got)
            assert np.array_equal(np.asarray(got), np.asarray(im)), mode
