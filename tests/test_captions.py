"""Words in the pictures (cgidm/captions.py): each part of a triptych, protect panel,
candidate grid and compare pair is named under it, the picture itself is pasted unchanged
above, and the contact sheet shows where each cluster begins."""
import numpy as np
import pytest
import torch
from PIL import Image

from cgidm.captions import PAPER, ascii_text, caption_size, caption_under, fitted, font, strip_height


def _noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8))


def _inked(a: np.ndarray) -> bool:
    return bool((a != np.array(PAPER, dtype=a.dtype)).any())


def test_each_label_is_drawn_under_its_own_image_and_the_images_are_unchanged():
    ims = [_noise(70, 50, 0), _noise(90, 50, 1), _noise(60, 50, 2)]
    out = np.asarray(caption_under(ims, ["left", None, "right"], pad=5))
    assert out.shape == (50 + strip_height(), 70 + 90 + 60 + 2 * 5, 3)
    x = 0
    for im, label in zip(ims, ["left", None, "right"]):
        w = im.size[0]
        assert np.array_equal(out[:50, x:x + w], np.asarray(im))
        assert _inked(out[50:, x:x + w]) == (label is not None)
        if x:
            assert not _inked(out[:, x - 5:x]), "the gap between images stays blank"
        x += w + 5


def test_a_long_label_is_cut_to_its_image_and_never_spills_into_the_next():
    ims = [_noise(40, 30, 0), _noise(40, 30, 1)]
    out = np.asarray(caption_under(ims, ["a label far too long for forty pixels", None], pad=4))
    assert _inked(out[30:, :40])
    assert not _inked(out[30:, 40:])
    cut = fitted("a label far too long for forty pixels", 36)
    assert cut.endswith("...") and font().getlength(cut) <= 36
    assert fitted("short", 200) == "short"
    assert fitted("anything", 1) == ""
    with pytest.raises(ValueError, match="2 images and 1 labels"):  # never an image dropped silently
        caption_under(ims, ["one"], pad=4)


def test_each_thread_draws_with_its_own_font():
    import threading

    from cgidm.captions import CAPTION_SIZE

    here = font(CAPTION_SIZE)
    assert font(CAPTION_SIZE) is here
    seen = []
    t = threading.Thread(target=lambda: seen.append(font(CAPTION_SIZE)))
    t.start()
    t.join()
    assert seen[0] is not here and seen[0].getlength("x15.9") == here.getlength("x15.9")


def test_a_file_name_is_cut_in_its_middle_so_siblings_stay_apart():
    from cgidm.captions import Name, fitted_name

    a, b = "dataset_export_2024_01_01_image_00017.png", "dataset_export_2024_01_01_image_00018.png"
    cut_a, cut_b = fitted_name("nearest 0.787: ", a, 200), fitted_name("nearest 0.787: ", b, 200)
    assert cut_a.startswith("nearest 0.787: ") and "..." in cut_a and font().getlength(cut_a) <= 200
    assert cut_a.endswith("00017.png") and cut_b.endswith("00018.png")
    assert fitted_name("p: ", "short.png", 200) == "p: short.png"
    assert fitted_name("a prefix far too long: ", a, 30).endswith("...")  # not even the prefix: cut at the end
    # a path: its folders are cut before its file name, which stays whole where it fits
    path = "/tmp/some/long/folder/of/models/JaneDoeStyle_v2_epoch10_final.safetensors"
    cut = fitted_name("fine-tune: ", path, 420)
    assert cut.startswith("fine-tune: /tmp/") and cut.endswith(".../JaneDoeStyle_v2_epoch10_final.safetensors")
    assert font().getlength(cut) <= 420 and font().getlength(cut.replace(".../", "o.../")) > 420  # as much as fits
    narrow = fitted_name("fine-tune: ", path, 200)  # the file name alone too long: cut in its middle
    assert "..." in narrow and narrow.endswith(".safetensors") and font().getlength(narrow) <= 200
    # a Name in a strip: escaped first (a backslash doubled, a character past ASCII as its
    # escape), then cut in its middle
    from cgidm.captions import _text

    escaped = ascii_text("caf\u00e9_" + a)
    assert escaped.startswith("caf\\xe9_")
    got = _text(Name("nearest: ", "caf\u00e9_" + a), 196, caption_size(40))
    assert got == fitted_name("nearest: ", escaped, 196, caption_size(40)) and got.endswith("00017.png")
    assert ascii_text("a\\u202e.png") == "a\\\\u202e.png", "six characters are not shown as the override"


def test_alternatives_take_the_first_that_fits_and_the_size_follows_the_picture():
    ims = [_noise(60, 40, 0)]
    short = np.asarray(caption_under(ims, [("a label far too long for sixty pixels", "fits")], pad=0))
    assert np.array_equal(short, np.asarray(caption_under(ims, ["fits"], pad=0)))
    assert caption_size(192) == 13 and caption_size(512) == 32 and caption_size(2048) == 40
    big = caption_under([_noise(600, 512, 1)], ["x"], pad=0)
    assert big.size == (600, 512 + strip_height(32))


def test_names_from_files_are_drawn_in_ascii_with_their_escapes():
    assert ascii_text("plain.png") == "plain.png"
    assert ascii_text("caf\u00e9.png") == "caf\\xe9.png"
    assert ascii_text("a\u202egnp.exe") == "a\\u202egnp.exe"  # a bidi override is not obeyed
    assert ascii_text("x\ny") == "x\\ny"
    assert ascii_text(3) == "3"


def test_the_triptych_names_its_three_panels_and_how_much_was_removed():
    from cgidm.rows import triptych

    g = torch.Generator().manual_seed(0)
    x = [torch.rand(3, 16, 16, generator=g) * 2 - 1 for _ in range(3)]
    out = np.asarray(triptych(*x, removed=0.5))
    side = 16 * 12  # enlarged to min_side 192
    pad = side // 32
    assert out.shape == (side + strip_height(), 3 * side + 2 * pad, 3)
    from cgidm.images import to_pil

    for i, t in enumerate(x):
        x0 = i * (side + pad)
        assert np.array_equal(out[:side, x0:x0 + side], np.asarray(to_pil(t).resize((side, side), Image.NEAREST)))
        assert _inked(out[side:, x0:x0 + side])
    # the middle label is the share removed, which the mask sets (not always a half)
    other = np.asarray(triptych(*x, removed=0.875))
    assert np.array_equal(other[:, :side], out[:, :side]) and np.array_equal(other[:, -side:], out[:, -side:])
    assert not np.array_equal(other[side:], out[side:])
    blank = [Image.new("RGB", (side, side), PAPER)] * 3
    want = np.asarray(caption_under(blank, ("original", ("50% of the latent removed", "50% removed"), "recovered"),
                                    pad=pad))
    assert np.array_equal(out[side:], want[side:])


def test_the_protect_panel_names_its_parts_and_the_amplification():
    from cgidm import protect_output as O

    rng = np.random.default_rng(3)
    before = rng.integers(0, 256, (24, 36, 3)).astype(np.uint8)
    after = np.clip(before.astype(np.int64) + rng.integers(-8, 9, before.shape), 0, 255).astype(np.uint8)
    out = np.asarray(O.panel(before, after, 255, 8))
    h, w = O.PANEL_HEIGHT, round(36 * O.PANEL_HEIGHT / 24)
    assert out.shape == (h + strip_height(), 3 * w + 2 * 6, 3)
    third = np.asarray(O._amplified(before, after, 255, 8).resize((w, h), Image.NEAREST))
    assert np.array_equal(out[:h, 2 * (w + 6):], third)
    for i in range(3):
        assert _inked(out[h:, i * (w + 6):i * (w + 6) + w])
    # the amplification in the label: drawn exactly as caption_under draws it
    want = np.asarray(caption_under([Image.new("RGB", (w, h), PAPER)] * 3,
                                    ("original", "protected", "change x15.9"), pad=6))
    assert np.array_equal(out[h:], want[h:])
    # a narrow (portrait) image keeps its labels and the amplification: its cells are widened
    tall = rng.integers(0, 256, (400, 30, 3)).astype(np.uint8)
    narrow = np.asarray(O.panel(tall, tall, 255, 8))
    cell = round(30 * O.PANEL_HEIGHT / 400)
    assert narrow.shape == (h + strip_height(), 3 * 96 + 2 * 6, 3)
    assert np.array_equal(narrow[:h, :cell], np.asarray(O._display(tall, 255).resize((cell, h), Image.LANCZOS)))
    assert not _inked(narrow[:h, cell:96]), "the widening is blank"
    want = np.asarray(caption_under([Image.new("RGB", (96, h), PAPER)] * 3,
                                    ("original", "protected", "change x15.9"), pad=6))
    assert np.array_equal(narrow[h:], want[h:])


def test_a_labelled_grid_keeps_every_tile_in_its_place():
    from cgidm.extract_compare import grid

    ims = [_noise(32, 32, i) for i in range(5)]
    out = np.asarray(grid(ims, columns=2, min_side=64, pad=4, labels=[f"rank {i}" for i in range(5)]))
    cell_h = 64 + strip_height()
    assert out.shape == (3 * cell_h + 2 * 4, 2 * 64 + 4, 3)
    for i, im in enumerate(ims):
        y, x = (i // 2) * (cell_h + 4), (i % 2) * (64 + 4)
        assert np.array_equal(out[y:y + 64, x:x + 64], np.asarray(im.resize((64, 64), Image.NEAREST)))
        assert _inked(out[y + 64:y + cell_h, x:x + 64])
    assert not _inked(out[2 * (cell_h + 4):, 64 + 4:]), "nothing where the sixth tile would be"
    unlabelled = np.asarray(grid(ims, columns=2, min_side=64, pad=4))
    assert unlabelled.shape == (3 * 64 + 2 * 4, 2 * 64 + 4, 3)


def test_the_contact_sheet_marks_where_each_cluster_begins():
    from cgidm.extract_samples import BANDS, thumbnails

    side, pad = 20, 2
    ims = [_noise(20, 20, i) for i in range(7)]
    groups = [3, 1, 2, 1]
    out = np.asarray(thumbnails(ims, side=side, columns=4, pad=pad, groups=groups))
    line = strip_height(10)
    assert out.shape == (2 * (side + line) + pad, 4 * side + 3 * pad, 3)
    owner = [r for r, n in enumerate(groups) for _ in range(n)]
    for i, im in enumerate(ims):
        y, x = (i // 4) * (side + line + pad), (i % 4) * (side + pad)
        assert np.array_equal(out[y:y + side, x:x + side], np.asarray(im))
        strip = out[y + side:y + side + line, x:x + side].reshape(-1, 3)
        band = np.array(BANDS[owner[i] % len(BANDS)], dtype=np.uint8)
        first = i == 0 or owner[i] != owner[i - 1]
        # a cluster's colour everywhere in its strip, with its rank written on its first tile only
        assert (strip == band).all(axis=1).mean() > (0.5 if first else 0.999)
        assert (strip != band).any() == first
    with pytest.raises(ValueError, match="groups count 6 images, not 7"):
        thumbnails(ims, side=side, groups=[3, 3])
    with pytest.raises(ValueError, match="groups count 8 images, not 7"):
        thumbnails(ims, side=side, groups=[4, 4])


def test_a_card_wraps_a_long_line_rather_than_cut_it():
    """What a card says is evidence: a path or a prompt too long for the card's width goes
    on over the next lines, none of it cut where four lines hold it; longer, the last line
    is cut (a name keeps its end)."""
    from cgidm.captions import INDENT, Name, lines_under, wrapped

    path = "/home/someone/models/checkpoints/JaneDoeStyle_v2_epoch10_final.safetensors"
    got = wrapped(Name("fine-tune (sha256 0123456789abcdef...): ", path), 300)
    assert 1 < len(got) <= 4 and all(font().getlength(t) <= 300 for t in got)
    assert got[0].startswith("fine-tune (sha256") and all(t.startswith(INDENT) for t in got[1:])
    joined = got[0] + "".join(t[len(INDENT):] for t in got[1:])
    assert joined.replace(" ", "") == ("fine-tune (sha256 0123456789abcdef...): " + path).replace(" ", "")
    assert any(t.endswith("/") for t in got[:-1]), "broken after a folder where one is near the end of a line"
    assert wrapped(Name("p: ", "short.png"), 300) == ["p: short.png"]
    # a tuple's fullest alternative is wrapped, not swapped for the short one
    assert wrapped(("verdict: fine-tuned on (p = 0.04 <= 0.05, against 24 control images)", "short"), 200)[0] \
        .startswith("verdict: fine-tuned on")
    many = wrapped("x" * 500, 100)
    assert len(many) == 4 and many[-1].endswith("...") and all(font().getlength(t) <= 100 for t in many)
    tail = wrapped(Name("image: ", "a" * 300 + "_00017.png"), 160)
    assert len(tail) == 4 and tail[-1].endswith("00017.png") and "..." in tail[-1]
    # the card grows by the lines the wrapping takes
    im = _noise(300, 40, 0)
    one, two = lines_under(im, ["short"]), lines_under(im, [Name("fine-tune: ", path)])
    assert two.size[1] - one.size[1] == (len(wrapped(Name("fine-tune: ", path), 292)) - 1) * strip_height()


def test_a_date_is_not_broken_at_its_dashes():
    from cgidm.captions import wrapped

    text = "cgidm 0.1.1, preset demo, 100 PGD steps of 0.25 within 10, noise shared, seed 0, judged 2026-12-01"
    for width in range(380, 700, 7):
        lines = wrapped(text, width)
        assert any("2026-12-01" in t for t in lines), (width, lines)
