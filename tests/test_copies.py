"""Copies: the same picture under two names (its rows' SHA-256 alike) is one picture."""
from __future__ import annotations

import random
import shutil

from cgidm import cli
from cgidm.config import AuthConfig
from cgidm.copies import find_copies
from cgidm.summary import SUSPECT_LABELS, summarize, summarize_pairs


def _row(name, label, score, content=None, **extra):
    return {"id": name, "image": f"{name}.png", "label": label, "score": score, "latent_cos": score,
            "source": {"sha256": (content or name) * 4}, **extra}


def _controls(n=20):
    return [_row(f"c{i:02d}", "control", i / 100) for i in range(n)]


def test_find_copies_names_each_copy_and_its_first():
    rows = [_row("a", None, 0.9), _row("b", None, 0.8, "a"), _row("m", "member", 0.7), _row("h", "holdout", 0.1, "m"),
            _row("c0", "control", 0.5, "a"), _row("c1", "control", 0.4), _row("c2", "control", 0.3, "c1"),
            {"id": "x", "label": "control", "score": 0.2}]  # no source: not compared
    found = find_copies(rows, SUSPECT_LABELS)
    assert found.controls == [("c0", "a"), ("c2", "c1")] and found.left_out == {"c0", "c2"}
    assert found.tested == [("b", "a")] and found.conflicts == [("m", "h")]
    said = found.warning()
    assert "2 control images left out" in said and "(first: c0 = a)" in said and "1 images tested counted once" in said
    assert find_copies(_controls(), SUSPECT_LABELS).warning() is None


def test_a_suspects_copy_among_the_controls_does_not_take_its_verdict():
    rows = [_row("mine", None, 0.9)] + _controls()
    clean = summarize(rows, AuthConfig(prompt="p"))
    assert clean["verdicts"]["mine"]["verdict"] == "fine-tuned on" and "copies_warning" not in clean
    rows = [_row("mine", None, 0.9)] + _controls() + [_row("copy", "control", 0.9, "mine")]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["controls"] == 20 and s["verdicts"]["mine"] == clean["verdicts"]["mine"]
    assert "(first: copy = mine)" in s["copies_warning"]


def test_copies_of_a_suspect_count_once_in_the_set_verdict():
    one = summarize([_row("a", None, 0.9)] + _controls(), AuthConfig(prompt="p"))
    three = summarize([_row("a", None, 0.9), _row("b", None, 0.91, "a"), _row("c", None, 0.92, "a")] + _controls(),
                      AuthConfig(prompt="p"))
    assert three["set_verdict"]["n_suspect"] == 1 and three["set_verdict"]["p_value"] == one["set_verdict"]["p_value"]
    assert len(three["verdicts"]) == 3  # each row keeps its own p-value
    # fewer controls than given (copies left out) is said in the too-few warning
    few = summarize([_row("a", None, 0.9)] + _controls(12) + [_row("d", "control", 0.5, "c00")],
                    AuthConfig(prompt="p"))
    assert few["calibration_warning"].startswith("13 control images given, 12 used: 12 controls cannot")


def test_one_image_under_two_pairs_is_not_a_copy():
    rows = [{**r, "pair": k} for k in ("p1", "p2") for r in [_row("img", None, 0.9)] + _controls()]
    for r in rows:
        r["id"] = f"{r['pair']}/{r['id']}"
    s = summarize_pairs(rows, {"p1": {}, "p2": {}}, AuthConfig(prompt="p"))
    assert "copies_warning" not in s and all("copies_warning" not in p for p in s["pairs"].values())
    assert s["flagged"] == 2


def _authenticate_with_a_copy_among_the_controls(tiny_world, tmp_path, capsys, copy) -> str:
    """``authenticate`` of member_00 as a.png against the world's controls and ``copy(member_00,
    controls folder)``; its terminal output."""
    imgs = tiny_world / "images"
    suspects, controls = tmp_path / "mine", tmp_path / "controls"
    suspects.mkdir()
    shutil.copy(imgs / "members" / "member_00.png", suspects / "a.png")
    shutil.copytree(imgs / "controls", controls)
    copy(imgs / "members" / "member_00.png", controls)
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--images", str(suspects), "--controls", str(controls), "--out", str(tmp_path / "out"),
                     "--preset", "demo", "--steps", "2", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
    return out


def test_the_cli_says_a_copy_was_left_out(tiny_world, tmp_path, capsys):
    out = _authenticate_with_a_copy_among_the_controls(tiny_world, tmp_path, capsys,
                                                       lambda f, d: shutil.copy(f, d / "copy_of_a.png"))
    assert "warning: 1 control images left out of the calibration" in out and "copy_of_a.png = " in out
    assert "copy_of_a.png" in (tmp_path / "out" / "report.html").read_text().split("left out of the calibration")[1]


def test_too_few_controls_points_to_the_set_verdict_only_where_it_can_reach_the_level():
    def cal(suspects, controls):
        rows = [_row(f"s{i}", None, 0.9 + i / 100) for i in range(suspects)] + _controls(controls)
        return summarize(rows, AuthConfig(prompt="p"))["calibration_warning"]

    assert cal(6, 12).endswith("or read the set verdict")  # 1/C(18, 6): the set can say it
    assert not cal(1, 2).endswith("or read the set verdict")  # 1/3: neither can


def test_copies_are_marked_on_their_rows_and_in_the_report(tmp_path):
    from cgidm.report import _bins, write_report

    rows = [_row("mine", None, 0.9), _row("again", None, 0.8, "mine")] + _controls() + [
        _row("copy", "control", 0.95, "mine"), _row("m", "member", 0.7), _row("h", "holdout", 0.2, "m")]
    s = summarize(rows, AuthConfig(prompt="p"))
    marks = {r["id"]: (r.get("copy_of"), r.get("copy_kind")) for r in rows if r.get("copy_of")}
    assert marks == {"again": ("mine", "counted_once"), "copy": ("mine", "left_out"), "m": ("h", "conflicts"),
                     "h": ("m", "conflicts")}
    html = write_report(tmp_path, rows, s).read_text()
    assert "the same file or pixels (SHA-256) as mine: left out of the calibration" in html
    assert "the same file or pixels (SHA-256) as mine: counted once" in html
    assert "the same file or pixels (SHA-256) as h: the labels contradict each other" in html
    # summarized again (a resume) with the copy gone: its mark goes too
    rows = [r for r in rows if r["id"] != "copy"]
    summarize(rows, AuthConfig(prompt="p"))
    assert {r["id"] for r in rows if r.get("copy_of")} == {"again", "m", "h"}
    # the histogram's bins put an edge at the line, the line's own control on its side
    edges = _bins(0.0, 1.0, {"flag_line": 0.19, "metric": "latent_cos"})
    assert any(0.19 < e <= 0.19 + 1e-9 for e in edges) and edges[0] <= 0.0 and edges[-1] > 1.0
    edges = _bins(0.0, 1.0, {"flag_line": 0.19, "metric": "latent_mse"})
    assert any(abs(e - 0.19) < 1e-12 for e in edges)


def _dct_hash_by_hand(grey: "np.ndarray") -> str:
    """pHash from the DCT-II's definition, sum over x, y of g cos(pi u (2x+1)/64) cos(pi v (2y+1)/64)."""
    import numpy as np

    k = np.arange(32)
    basis = np.cos(np.pi * np.outer(np.arange(8), 2 * k + 1) / 64)  # [u, x]
    low = basis @ grey @ basis.T
    bits = (low > np.median(low)).ravel()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def _phash(x):
    from cgidm.copies import fingerprint

    return fingerprint(x)["phash"]


def test_the_perceptual_hash_is_the_dct_hash():
    import numpy as np
    import torch
    from PIL import Image

    # a flat picture: every coefficient but the mean is 0, so only the first bit is set
    assert _phash(torch.full((3, 40, 40), 0.3)) == "8000000000000000"
    rng = np.random.default_rng(3)
    for h, w in ((32, 32), (17, 45), (64, 48)):
        x = torch.from_numpy(rng.uniform(-1, 1, (3, h, w)).astype(np.float32))
        rgb = ((x + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        grey = np.asarray(Image.fromarray(rgb).convert("L").resize((32, 32), Image.LANCZOS), np.float64)
        assert _phash(x) == _dct_hash_by_hand(grey)


def test_the_pixels_digest_is_of_the_8_bit_pixels_and_their_size():
    import hashlib

    import torch

    from cgidm.copies import fingerprint

    x = torch.zeros(3, 2, 3)
    x[0, 1, 2] = 1.0  # red 255 at row 1, column 2; the rest 127.5 -> 128
    rgb = bytes([128] * 3 * 5 + [255, 128, 128])
    assert fingerprint(x)["pixels"] == hashlib.sha256(b"3x2:" + rgb).hexdigest()
    assert fingerprint(x.reshape(3, 3, 2))["pixels"] != fingerprint(x)["pixels"]


def test_the_same_picture_saved_again_looks_alike_and_other_pictures_do_not(tiny_world, tmp_path):
    import itertools

    from PIL import Image

    from cgidm.copies import NEAR
    from cgidm.images import load_image_with_notes

    def bits(a, b):
        return bin(int(a, 16) ^ int(b, 16)).count("1")

    files = sorted((tiny_world / "images").rglob("*.png"))
    hashes = [_phash(load_image_with_notes(f, 16)[0]) for f in files]
    assert min(bits(a, b) for a, b in itertools.combinations(hashes, 2)) > NEAR
    for f, h in zip(files[::5], hashes[::5]):
        im = Image.open(f).convert("RGB")
        im.save(tmp_path / "q75.jpg", quality=75)
        im.resize((im.width * 3, im.height * 3), Image.BICUBIC).save(tmp_path / "big.png")
        for again in (tmp_path / "q75.jpg", tmp_path / "big.png"):
            assert bits(h, _phash(load_image_with_notes(again, 16)[0])) <= NEAR


def _looks(name, label, score, hash_, **extra):
    return _row(name, label, score, **extra) | {"phash": hash_}


def test_look_alikes_are_said_and_counted_as_given_and_the_same_pixels_are_a_copy():
    base = 0x0123456789ABCDEF
    near, far = f"{base ^ 0b111:016x}", f"{base ^ 0x1FF:016x}"  # 3 and 9 bits apart
    rows = ([_looks("mine", None, 0.9, f"{base:016x}", pixels="p-mine")] + _controls()
            + [_looks("jpeg", "control", 0.9, near), _looks("other", "control", 0.85, far)])
    rng = random.Random(0)  # pictures of their own: about 32 bits from each other
    for r in rows[1:21]:
        r["phash"] = f"{rng.getrandbits(64):016x}"
    found = find_copies(rows, SUSPECT_LABELS)
    assert found.controls == [] and found.alike == [("jpeg", "mine", 3)]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["controls"] == 22 and s["copies"] == {"alike": 1}
    assert s["copies_warning"].startswith("1 images that look like another image here (first: jpeg = mine, 3 bits apart;")
    assert "A copy:" not in s["copies_warning"]
    jpeg = next(r for r in rows if r["id"] == "jpeg")
    assert jpeg["looks_like"] == "mine" and jpeg["looks_bits"] == 3 and "copy_of" not in jpeg
    # the same pixels from another file (a PNG saved again without its metadata): a copy, left out
    rows.append(_looks("png", "control", 0.9, near, pixels="p-mine"))
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["controls"] == 22 and rows[-1]["copy_of"] == "mine" and "looks_like" not in rows[-1]
    assert s["copies"] == {"left_out": 1, "alike": 1} and s["copies_warning"].endswith(
        "A copy: the same file or the same pixels (SHA-256)")


def test_a_resaved_jpeg_among_the_controls_is_said_and_a_lossless_one_left_out_end_to_end(tiny_world, tmp_path,
                                                                                            capsys):
    from PIL import Image

    def resave(f, d):
        Image.open(f).convert("RGB").save(d / "a_again.jpg", quality=75)
        Image.open(f).convert("RGB").save(d / "a_again.png", optimize=True, compress_level=1)  # other bytes

    out = _authenticate_with_a_copy_among_the_controls(tiny_world, tmp_path, capsys, resave)
    assert "warning: 1 control images left out of the calibration" in out and "a_again.png = image/a.png" in out
    assert "1 images that look like another image here (first: control/a_again.jpg = image/a.png, " in out
    html = (tmp_path / "out" / "report.html").read_text()
    assert "the same file or pixels (SHA-256) as image/a.png: left out of the calibration" in html
    assert "looks like image/a.png (perceptual hashes" in html


def test_a_screens_copies_in_many_pairs_are_added_up_in_one_sentence():
    def pair(k, copies):
        rows = [_row("mine", None, 0.9)] + _controls() + [_row(f"copy{i}", "control", 0.9, "mine") for i in range(copies)]
        return [{**r, "pair": k, "id": f"{k}/{r['id']}"} for r in rows]

    rows = pair("p1", 2) + pair("p2", 1) + pair("p3", 0)
    s = summarize_pairs(rows, {"p1": {}, "p2": {}, "p3": {}}, AuthConfig(prompt="p"))
    assert s["pairs"]["p1"]["copies"] == {"left_out": 2} and "copies" not in s["pairs"]["p3"]
    said = s["copies_warning"]
    assert said.startswith("copies or look-alikes within 2 pairs: 3 control images left out of the calibration (")
    assert "the first, p1: 2 control images left out" in said and "(first: p1/copy0 = p1/mine)" in said
    assert said.count("A copy: the same file") == 1
    # one pair with copies: its own sentence, named
    s = summarize_pairs(pair("p1", 1) + pair("p3", 0), {"p1": {}, "p3": {}}, AuthConfig(prompt="p"))
    assert s["copies_warning"].startswith("p1: 1 control images left out of the calibration")


def test_a_look_alike_of_a_copy_is_still_said_and_a_malformed_hash_is_not_compared():
    h = "0123456789abcdef"
    rows = ([_looks("m", "member", 0.9, h, pixels="p-m"), _looks("h", "holdout", 0.2, h, pixels="p-m"),
             _looks("c", "control", 0.9, f"{int(h, 16) ^ 1:016x}")] + _controls()
            + [_looks("odd", "control", 0.4, "0011223344556  7"), _looks("short", "control", 0.4, "00 11 22 33 4455")])
    found = find_copies(rows, SUSPECT_LABELS)
    assert found.conflicts == [("m", "h")] and found.alike == [("c", "m", 1)]
    assert not {"odd", "short"} & {a for a, *_ in found.alike + found.controls}


def test_many_rows_are_compared_by_hash_in_numpy():
    """A screen's pair of thousands of images: every look-alike found, none invented."""
    rng = random.Random(1)
    rows = [_looks(f"s{i}", None, 0.5, f"{rng.getrandbits(64):016x}") for i in range(3000)]
    rows += [_looks(f"c{i}", "control", 0.5, f"{rng.getrandbits(64):016x}") for i in range(3000)]
    for i in range(0, 3000, 500):  # a control that is suspect i with 2 bits changed
        rows.append(_looks(f"again{i}", "control", 0.5, f"{int(rows[i]['phash'], 16) ^ 0b101:016x}"))
    found = find_copies(rows, SUSPECT_LABELS)
    assert sorted(found.alike) == sorted((f"again{i}", f"s{i}", 2) for i in range(0, 3000, 500))


def test_one_shape_in_two_colours_does_not_look_alike_and_a_jpeg_of_it_does(tmp_path):
    """The hash is luminance alone: the mean colour tells a logo's colourways apart."""
    import torch
    from PIL import Image, ImageDraw

    from cgidm.copies import fingerprint
    from cgidm.images import load_image_with_notes

    rows = []
    for name, fill in (("red", "red"), ("black", "black")):
        im = Image.new("RGB", (64, 64), "white")
        ImageDraw.Draw(im).ellipse((16, 16, 48, 48), fill=fill)
        im.save(tmp_path / f"{name}.png")
        rows.append({"id": name, "label": None if name == "red" else "control", "score": 0.5,
                     **fingerprint(load_image_with_notes(tmp_path / f"{name}.png", 64)[0])})
    assert rows[0]["phash"] == rows[1]["phash"]  # the same shape: the same luminance hash
    assert find_copies(rows, SUSPECT_LABELS).alike == []
    Image.open(tmp_path / "red.png").save(tmp_path / "red.jpg", quality=75)
    again = {"id": "again", "label": "control", "score": 0.5,
             **fingerprint(load_image_with_notes(tmp_path / "red.jpg", 64)[0])}
    assert [a[:2] for a in find_copies(rows + [again], SUSPECT_LABELS).alike] == [("again", "red")]
    # a row without a colour (an earlier version's) is compared by its hash alone
    old = {k: v for k, v in rows[1].items() if k != "colour"}
    assert [a[:2] for a in find_copies([rows[0], old], SUSPECT_LABELS).alike] == [("black", "red")]
    assert fingerprint(torch.zeros(3, 4, 4))["colour"] == "808080"  # 127.5 rounds to 128


def test_copies_without_controls_are_said_and_count_once_in_the_auc():
    members = [_row(f"m{i}", "member", 0.8 + i / 100) for i in range(3)]
    holdouts = [_row(f"h{i}", "holdout", 0.2 + i / 100) for i in range(3)]
    rows = members + holdouts + [_row("m0again", "member", 0.81, "m0"), _row("h0again", "holdout", 0.21, "h0")]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["copies"] == {"counted_once": 2} and "2 images tested counted once" in s["copies_warning"]
    assert (s["by_metric"]["latent_cos"]["n_members"], s["by_metric"]["latent_cos"]["n_holdouts"]) == (3, 3)
    # an unlabelled copy of a member stays in the AUC beside it (only the set verdict counts it once)
    rows = [_row("u", None, 0.81, "m0")] + members + holdouts
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["by_metric"]["latent_cos"]["n_members"] == 3 and rows[1]["copy_kind"] == "counted_once"


def test_an_unlabelled_copy_or_look_alike_of_a_hold_out_is_said_and_both_look_alikes_name_each_other():
    h = "0123456789abcdef"
    rows = ([_looks("h0", "holdout", 0.2, h, pixels="p-h0"), _looks("up0", None, 0.3, "f" * 16, pixels="p-h0"),
             _looks("h1", "holdout", 0.2, "00ff00ff00ff00ff"), _looks("up1", None, 0.3, "00ff00ff00ff00fe")]
            + _controls())
    rng = random.Random(0)
    for r in rows[4:]:
        r["phash"] = f"{rng.getrandbits(64):016x}"
    s = summarize(rows, AuthConfig(prompt="p"))
    by_id = {r["id"]: r for r in rows}
    assert by_id["up0"]["copy_of"] == "h0" and by_id["h0"]["copy_of"] == "up0"
    assert by_id["up0"]["copy_kind"] == by_id["h0"]["copy_kind"] == "of_holdouts"
    assert "1 unlabelled images that are copies of hold-outs, known not trained on (first: up0 = h0)" in s["copies_warning"]
    assert (by_id["up1"]["looks_like"], by_id["h1"]["looks_like"]) == ("h1", "up1") and by_id["h1"]["looks_bits"] == 1


def test_controls_of_another_kind_are_said():
    """Noise or blurred photographs as controls for paintings: their fine detail differs
    clearly from the images tested, said (a warning in the summary, the report and on each
    card); controls of the same kind, or too few to tell, are not."""
    import numpy as np
    import torch

    from cgidm.copies import fingerprint, unlike_controls

    rng = np.random.default_rng(0)

    def rows(make, n):
        return [fingerprint(torch.from_numpy(make()).permute(2, 0, 1)) for _ in range(n)]

    painting = lambda: np.kron(rng.uniform(-1, 1, (4, 4, 3)), np.ones((8, 8, 1))).astype(np.float32)  # noqa: E731
    noise = lambda: rng.uniform(-1, 1, (32, 32, 3)).astype(np.float32)  # noqa: E731
    tested, alike, unlike = rows(painting, 8), rows(painting, 12), rows(noise, 12)
    said = unlike_controls(tested, unlike)
    assert said and said.startswith("the control images differ clearly from the images tested in fine detail")
    assert unlike_controls(tested, alike) is None
    assert unlike_controls(tested[:4], unlike) is None  # too few to tell
