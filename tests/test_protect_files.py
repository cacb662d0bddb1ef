"""``cgidm protect``'s written files on inputs found in real archives (docs/protect.md,
"Modes and metadata"): a transparent colour (PNG tRNS) becomes an alpha channel instead
of being lost, 16-bit grey with alpha stays grey, an XMP orientation follows the rotated
pixels, the PNG colour chunks and a TIFF's picture tags (not its layout tags) carry over;
a file name that is not UTF-8 is protected and reported; a ``--target`` too small for the
model is refused before ``--out`` records it."""
from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin, TiffImagePlugin

from cgidm import cli
from cgidm.config import ProtectConfig
from cgidm.protect import collect_protect_items, protect
from cgidm.protect_pgd import load_base
from cgidm.rng import image_key

FAST = dict(steps=2, eval_draws=2)
RIGHTS = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
          '<rdf:Description xmlns:dc="http://purl.org/dc/elements/1.1/"><dc:rights>(c) an artist</dc:rights>'
          '</rdf:Description></rdf:RDF></x:xmpmeta>')
XMP6 = ('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
        '<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF></x:xmpmeta>')


@pytest.fixture(scope="module")
def base(tiny_world):
    return load_base(tiny_world / "base")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _grey_alpha16(path, rng) -> None:
    """A 16-bit grey + alpha PNG (colour type 4), which Pillow opens as RGBA."""
    la = rng.integers(0, 65536, (24, 24, 2))
    raw = b"".join(b"\0" + la[y].astype(">u2").tobytes() for y in range(24))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 24, 24, 16, 4, 0, 0, 0))
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))


def _make(folder) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    rgb[:6, :6] = (10, 20, 30)
    Image.fromarray(rgb).save(folder / "rgb_key.png", transparency=(10, 20, 30))
    grey = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    grey[:5, :7] = 7
    Image.fromarray(grey, "L").save(folder / "grey_key.png", transparency=7)
    deep = (rng.integers(0, 256, (24, 24)) * 257).astype(np.uint16)
    deep[:4, :4] = 3000
    Image.fromarray(deep).save(folder / "deep_key.png", transparency=3000)
    _grey_alpha16(folder / "grey_alpha16.png", rng)
    info = PngImagePlugin.PngInfo()
    info.add_itxt("XML:com.adobe.xmp", XMP6)
    Image.fromarray(rng.integers(0, 256, (24, 36, 3), dtype=np.uint8)).save(folder / "xmp6.png", pnginfo=info)
    colour = PngImagePlugin.PngInfo()
    colour.add(b"gAMA", struct.pack(">I", 55556))
    colour.add(b"sRGB", b"\x01")
    colour.add(b"cHRM", struct.pack(">8I", 31270, 32900, 64000, 33000, 30000, 60000, 15000, 6000))
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(folder / "colour.png", pnginfo=colour)
    tif = Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8))
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[315] = "an artist"  # Artist
    ifd[700] = RIGHTS.encode()  # XMP, with the copyright line
    tif.save(folder / "scan.tif", tiffinfo=ifd)
    deep6 = (rng.integers(0, 256, (24, 36)) * 257).astype(np.uint16)
    deep6[:3, :3] = 500
    info6 = PngImagePlugin.PngInfo()
    info6.add_itxt("XML:com.adobe.xmp", XMP6)
    Image.fromarray(deep6).save(folder / "deep_key_xmp6.png", transparency=500, pnginfo=info6)


def _transparent(path) -> np.ndarray:
    """Which pixels are transparent: by the alpha channel, or where a colour key matches."""
    img = Image.open(path)
    key = img.info.get("transparency")
    if key is None:
        return np.asarray(img.convert("RGBA"))[..., 3] == 0
    a = np.asarray(img)
    return (a == np.asarray(key)).all(-1) if a.ndim == 3 else a == key


def test_written_files_keep_transparency_grey_orientation_and_colour_metadata(base, tmp_path):
    folder = tmp_path / "art"
    _make(folder)
    out = tmp_path / "out"
    summary = protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST), progress=False)
    assert summary["failed"] == 0, summary["errors"]
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}

    def written(image_id):
        return Image.open(out / rows[image_id]["protected"])

    for image_id, mode in (("rgb_key.png", "RGBA"), ("grey_key.png", "LA"), ("deep_key.png", "LA")):
        src = folder / image_id
        assert written(image_id).mode == mode, image_id
        assert (_transparent(out / rows[image_id]["protected"]) == _transparent(src)).all(), image_id
        assert _transparent(src).sum() >= 16
        assert any("transparent colour written as" in n for n in rows[image_id]["notes"]), rows[image_id]["notes"]
    # the model's square cut is not the file's (xmp6.png is 36 x 24); the flattening is of what the model saw
    assert not any(n.startswith("only its centre") or "upright" in n for r in rows.values() for n in r.get("notes", []))
    assert "transparency flattened on white in what the model saw" in rows["rgb_key.png"]["notes"]
    assert written("grey_alpha16.png").mode == "LA"  # grey stays grey: one change for all three channels
    rotated = written("xmp6.png")
    assert rotated.size == (24, 36) and 'Orientation="6"' not in rotated.info.get("XML:com.adobe.xmp", "")
    colour = written("colour.png").info
    assert colour["gamma"] == pytest.approx(0.55556) and colour["srgb"] == 1
    assert colour["chromaticity"] == pytest.approx((0.3127, 0.329, 0.64, 0.33, 0.3, 0.6, 0.15, 0.06))
    scan = written("scan.tif")
    assert scan.getexif().get(315) == "an artist"
    assert not {256, 257, 259, 273, 279} & set(scan.getexif()), dict(scan.getexif())  # the TIFF's layout
    assert "compression" not in scan.info
    assert "<dc:rights>(c) an artist</dc:rights>" in scan.info["XML:com.adobe.xmp"]  # the TIFF's XMP, as PNG XMP
    both = written("deep_key_xmp6.png")  # 16-bit grey, a colour key and an XMP rotation at once
    assert both.mode == "LA" and both.size == (24, 36)
    assert 'Orientation="6"' not in both.info.get("XML:com.adobe.xmp", "")
    assert any("written in 8 bits" in n for n in rows["deep_key_xmp6.png"]["notes"])


def test_a_file_name_that_is_not_utf8_is_protected_and_reported(tiny_world, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    latin1 = b"caf\xe9.png".decode("utf-8", "surrogateescape")  # a Latin-1 name from an old archive
    rng = np.random.default_rng(1)
    for name in (latin1, "ok.png", "back\\slash.png"):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / name)
    out = tmp_path / "out"
    code = cli.main(["protect", "--base", str(tiny_world / "base"), "--images", str(folder), "--out", str(out),
                     "--steps", "1", "--eval-draws", "1", "-q"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protected"] == 3 and (out / "report.html").is_file()
    assert (out / "protected" / "back_slash.png").is_file()  # a backslash is a separator on other systems
    assert "caf\\udce9.png" in (out / "report.html").read_text()
    assert image_key(0, "ok.png") == image_key(0, "ok.png".encode().decode("utf-8", "surrogateescape"))


def test_a_target_too_small_for_the_model_is_refused_before_out_records_it(base, tiny_world, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / "a.png")
    small, good = tmp_path / "small.png", tmp_path / "good.png"
    Image.new("RGB", (3, 3)).save(small)  # readable (the check before loading passes), under 16 px / 4
    Image.new("RGB", (16, 16), (200, 30, 30)).save(good)
    items = collect_protect_items(folder)
    out = tmp_path / "out"
    cfg = ProtectConfig(**FAST, loss="textural")
    with pytest.raises(ValueError, match="too small"):
        protect(base, items, out, cfg.replace(target=str(small)), progress=False)
    assert not out.exists()  # nothing made, nothing recorded
    out.mkdir()
    # a run that wrote no row (interrupted before its first image) does not hold its settings
    (out / "protect.json").write_text(json.dumps({"settings": {"steps": 99}}))
    summary = protect(base, items, out, cfg.replace(target=str(good)), progress=False)
    assert summary["protected"] == 1
    with pytest.raises(ValueError, match="other settings"):  # once it has rows, it does
        protect(base, items, out, cfg.replace(target=str(good), steps=3), progress=False)


def test_file_names_reach_the_terminal_without_their_escapes(tiny_world, tmp_path, capsys):
    """A name with an escape sequence (clear the screen, set the window title) or a bidi
    override is printed as its escapes, in the failure list and in the log alike; the
    report isolates such text (``unicode-bidi: isolate``) and escapes it as HTML."""
    folder = tmp_path / "art"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / "ok.png")
    (folder / "x\x1b[2J\x1b]0;owned\x07\u202e.png").write_text("not an image")
    out = tmp_path / "out"
    code = cli.main(["protect", "--base", str(tiny_world / "base"), "--images", str(folder), "--out", str(out),
                     "--steps", "1", "--eval-draws", "1", "-q"])
    said = capsys.readouterr()
    assert code == 1
    assert "\x1b" not in said.out + said.err and "\u202e" not in said.out + said.err
    assert "x\\x1b[2J\\x1b]0;owned\\x07\\u202e.png" in said.out
    assert "unicode-bidi:isolate" in (out / "report.html").read_text()


def test_an_out_inside_the_images_that_holds_the_users_images_is_refused(tiny_world, tmp_path, capsys):
    """``--out`` inside ``--images`` is left out of the listing as the run's outputs: one
    that already holds images no cgidm run made (the user's) is refused before anything is
    written, rather than those images never being protected."""
    folder = tmp_path / "art"
    (folder / "sub").mkdir(parents=True)
    for name in ("a.png", "sub/b.png"):
        Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(folder / name)
    code = cli.main(["protect", "--base", str(tiny_world / "base"), "--images", str(folder),
                     "--out", str(folder / "sub"), "--steps", "1", "--eval-draws", "1", "-q"])
    assert code == 2 and "holds 1 image of" in capsys.readouterr().err
    assert sorted(p.name for p in (folder / "sub").iterdir()) == ["b.png"]
    out = folder / "out"  # a fresh one inside: the run's own, skipped on the next run
    assert cli.main(["protect", "--base", str(tiny_world / "base"), "--images", str(folder), "--out", str(out),
                     "--steps", "1", "--eval-draws", "1", "-q"]) == 0
    assert cli.main(["protect", "--base", str(tiny_world / "base"), "--images", str(folder), "--out", str(out),
                     "--steps", "1", "--eval-draws", "1", "-q"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == ["a.png", "sub/b.png"]


def test_comments_odd_orientations_and_damaged_exif_are_said(base, tmp_path):
    """A JPEG's comment (often its copyright line) is kept as the PNG's ``Comment``; an
    EXIF orientation outside 1-8 is said to be ignored (it was said to be applied); a
    damaged EXIF block is said in the row's notes, not in Pillow's raw warning lines."""
    folder = tmp_path / "art"
    folder.mkdir()
    rng = np.random.default_rng(3)
    pixels = lambda: Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))  # noqa: E731
    pixels().save(folder / "comment.jpg", comment=b"(c) an artist 2026", quality=95)
    for value in (0, 9):
        ex = Image.Exif()
        ex[0x0112] = value
        pixels().save(folder / f"orient{value}.jpg", exif=ex, quality=95)
    ex = Image.Exif()
    ex[315] = "an artist"
    ex[0x010E] = "a description long enough to be cut off"
    pixels().save(folder / "damaged.jpg", exif=ex.tobytes()[:30], quality=95)
    pixels().save(folder / "latin1.jpg", comment=b"\xa9 2024 Jane Doe\x00", quality=95)  # no set encoding
    pixels().save(folder / "empty_exif.jpg", exif=Image.Exif().tobytes(), quality=95)  # well-formed, no tag
    out = tmp_path / "out"
    summary = protect(base, collect_protect_items(folder), out, ProtectConfig(**FAST), progress=False)
    assert summary["failed"] == 0, summary["errors"]
    rows = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert Image.open(out / rows["comment.jpg"]["protected"]).info["Comment"] == "(c) an artist 2026"
    for value in (0, 9):
        notes = rows[f"orient{value}.jpg"]["notes"]
        assert f"EXIF orientation {value} is not one of 1-8, ignored" in notes and not any(
            "applied" in n for n in notes), notes
        assert Image.open(out / rows[f"orient{value}.jpg"]["protected"]).size == (16, 16)
    assert "EXIF unreadable, not copied" in rows["damaged.jpg"]["notes"]
    assert Image.open(out / rows["latin1.jpg"]["protected"]).info["Comment"] == "\u00a9 2024 Jane Doe"
    assert not rows["empty_exif.jpg"].get("notes"), rows["empty_exif.jpg"]
    # pytest sets the warning filters of its own around a test: the process cgidm runs in is checked
    import subprocess
    import sys

    read = "from PIL import Image; im = Image.open({!r}); im.getexif(); im.load()"
    for prelude, said in (("", True), ("import cgidm.images; ", False)):
        err = subprocess.run([sys.executable, "-c", prelude + read.format(str(folder / "damaged.jpg"))],
                             capture_output=True, text=True, check=True).stderr
        assert ("TiffImagePlugin" in err) is said, err
