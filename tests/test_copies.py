"""Copies: the same picture under two names (its rows' SHA-256 alike) is one picture."""
from __future__ import annotations

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
    assert found.suspects == [("b", "a")] and found.conflicts == [("m", "h")]
    said = found.warning()
    assert "2 control images left out" in said and "(first: c0 = a)" in said and "1 suspect images counted once" in said
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


def test_the_cli_says_a_copy_was_left_out(tiny_world, tmp_path, capsys):
    imgs = tiny_world / "images"
    suspects, controls = tmp_path / "mine", tmp_path / "controls"
    suspects.mkdir()
    shutil.copy(imgs / "members" / "member_00.png", suspects / "a.png")
    shutil.copytree(imgs / "controls", controls)
    shutil.copy(imgs / "members" / "member_00.png", controls / "copy_of_a.png")
    code = cli.main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                     "--images", str(suspects), "--controls", str(controls), "--out", str(tmp_path / "out"),
                     "--preset", "demo", "--steps", "2", "-q"])
    out = capsys.readouterr().out
    assert code == 0, out
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
    marks = {r["id"]: r.get("copy_of") for r in rows if r.get("copy_of")}
    assert marks == {"again": "mine", "copy": "mine", "m": "h", "h": "m"}
    html = write_report(tmp_path, rows, s).read_text()
    assert "the same file (SHA-256) as mine: left out of the calibration" in html
    assert "the same file (SHA-256) as mine: counted once in the set verdict" in html
    assert "the same file (SHA-256) as h: the labels contradict each other" in html
    # summarized again (a resume) with the copy gone: its mark goes too
    rows = [r for r in rows if r["id"] != "copy"]
    summarize(rows, AuthConfig(prompt="p"))
    assert {r["id"] for r in rows if r.get("copy_of")} == {"again", "m", "h"}
    # the histogram's bins put an edge at the line, the line's own control on its side
    edges = _bins(0.0, 1.0, {"flag_line": 0.19, "metric": "latent_cos"})
    assert any(0.19 < e <= 0.19 + 1e-9 for e in edges) and edges[0] <= 0.0 and edges[-1] > 1.0
    edges = _bins(0.0, 1.0, {"flag_line": 0.19, "metric": "latent_mse"})
    assert any(abs(e - 0.19) < 1e-12 for e in edges)
