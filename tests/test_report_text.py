"""What the report and the printed summary say: figures that do not round to what they
are not, a set verdict that says which images it tested, untrusted names shown as
escapes, a histogram that survives a score that is not a number, a stand-in
embedder that is not called DINO, and plain words for readers who are not researchers."""
from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import pytest

from cgidm.config import AuthConfig
from cgidm.report import _fmt, fraction, write_report
from cgidm.summary import print_summary, summarize


def _row(i, label, score, **extra):
    return {"id": f"img{i:02d}", "image": f"img{i:02d}.png", "label": label, "score": score, "latent_cos": score,
            **extra}


@pytest.mark.parametrize("value, text", [(0.9996, "0.9996"), (0.99996, "0.99996"), (1.0, "1.000"), (1, "1.000"),
                                         (0.0004, "0.0004"), (0.0, "0.000"), (0.8125, "0.812"), (0.5, "0.500"),
                                         (None, ""), (float("nan"), "nan")])
def test_a_fraction_is_not_rounded_to_one_or_zero(value, text):
    assert fraction(value) == text


@pytest.mark.parametrize("value, text", [(0.000549, "0.000549"), (0.00549, "0.00549"), (0.0166, "0.0166"),
                                         (0.25, "0.2500"), (0.0, "0.0000"), (-0.003, "-0.003")])
def test_small_values_keep_three_digits(value, text):
    assert _fmt(value) == text


def _html(tmp_path, rows, summary):
    return write_report(tmp_path, rows, summary).read_text()


def test_the_report_says_which_images_the_set_verdict_tested(tmp_path, capsys):
    rows = [_row(i, "member", 0.9 + i / 1000) for i in range(4)]
    rows += [_row(10 + i, "holdout", 0.05 + i / 1000) for i in range(3)]
    rows += [_row(20 + i, "control", 0.1 + i / 1000) for i in range(12)]
    s = summarize(rows, AuthConfig(prompt="p"))
    s["report"] = "r"
    html = _html(tmp_path, rows, s)
    # the statistic as the integer it is, the hold-outs named as left out
    assert "U = 48;" in html and "4 suspect vs 12 control images;\n3 hold-outs, known not trained on, left out" in html
    print_summary(s)
    out = capsys.readouterr().out
    assert "4 suspect vs 12 control images, one-sided Mann-Whitney U; 3 hold-outs, known not trained on, left out" in out


def test_the_flagged_card_and_the_verdict_column_give_the_level(tmp_path):
    rows = [_row(i, None, 0.9 - i / 100) for i in range(20)]
    rows += [_row(30 + i, "control", 0.1 + i / 1000) for i in range(19)]
    s = summarize(rows, AuthConfig(prompt="p", level=0.05))
    html = _html(tmp_path, rows, s)
    assert s["flagged"] == 20 and s["flagged_by_chance"] == 1.0
    assert "flagged as fine-tuned on (p &le; 0.05)<b>20 of 20</b>" in html
    assert "about 1.0 would be flagged by chance if none had been trained on" in html
    assert "verdict (p &le; 0.05)</th>" in html
    # the z-score of each image is a column; the top image is far above the controls
    assert ">z</th>" in html
    z = max(r["z"] for r in rows if "z" in r)
    assert f"<td>{z:+.2f}</td>" in html


def test_psnr_has_its_unit(tmp_path):
    rows = [_row(i, None, 0.5, psnr=14.25) for i in range(2)]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert "psnr (dB)</th>" in _html(tmp_path, rows, s)


def test_bidi_and_control_characters_in_names_are_escapes(tmp_path):
    evil = "gpj.\u202eevil\x1b[2J.png"
    rows = [{**_row(0, None, 0.5), "id": evil, "triptych": "t/x.png", "notes": ["n\u202e"]}]
    rows.append({"id": "b\u2066ad", "label": None, "error": "broken \u202e name"})
    s = summarize(rows, AuthConfig(prompt="p\u202eq"))
    s["prompt_from"] = "instance_prompt in /m\u202e/args.json"
    html = _html(tmp_path, rows, s)
    for ch in ("\u202e", "\u2066", "\x1b"):
        assert ch not in html
    assert "gpj.\\u202eevil\\x1b[2J.png" in html and "failed: broken \\u202e name" in html
    assert 'alt="triptych of gpj.\\u202eevil' in html and "p\\u202eq" in html and "n\\u202e" in html
    assert "/m\\u202e/args.json" in html


def test_a_score_that_is_not_a_number_leaves_the_histogram_drawn(tmp_path):
    rows = [_row(0, "member", float("nan")), _row(1, "member", 0.8), _row(2, "holdout", float("inf")),
            _row(3, "holdout", 0.2)]
    s = summarize(rows, AuthConfig(prompt="p"))
    # ranked as the calibration ranks them: NaN the worst recovery, +inf the best; of the
    # four member-hold-out pairs only 0.8 > 0.2 goes the members' way
    assert s["auc"] == 0.25
    html = _html(tmp_path, rows, s)
    assert 'alt="score histogram (1 holdout, 1 member not a number, not drawn)"' in html
    # an infinite latent_mse is the worst recovery; the threshold is never a stand-in value
    from cgidm.score import set_metrics

    m = set_metrics([math.inf, 0.2, 0.3, 0.5], [True, False, False, False], "latent_mse")
    assert m["auc"] == 0.0
    m = set_metrics([math.inf, 0.2, 0.3, 0.5], [True, False, False, False], "latent_cos")
    assert m["auc"] == 1.0 and m["threshold"] == math.inf
    # every score not a number: the axes are drawn, empty, and say why
    rows = [_row(0, None, float("nan"))]
    html = _html(tmp_path, rows, summarize(rows, AuthConfig(prompt="p")))
    assert 'alt="score histogram (1 unlabelled not a number, not drawn)"' in html


def test_the_histogram_counts_images_in_whole_numbers():
    from cgidm import report

    captured = {}
    real = report._png

    def keep(fig):
        captured.setdefault("ticks", fig.axes[0].get_yticks())
        return real(fig)

    rows = [_row(0, "member", 0.8), _row(1, "holdout", 0.2)]
    report._png = keep
    try:
        report._plots(rows, {"metric": "latent_cos"})
    finally:
        report._png = real
    assert len(captured["ticks"]) and all(float(t).is_integer() for t in captured["ticks"])


def test_the_stand_in_embedder_is_not_called_dino(tmp_path):
    from cgidm.testing.embedder import ensure_tiny_embedder
    from cgidm.validator import STAND_IN_FILE, load_official_embedder

    folder = ensure_tiny_embedder(tmp_path)
    emb = load_official_embedder(folder)
    assert emb.kind == "dino" and emb.stand_in and "stand-in" in emb.label and "not DINO" in emb.label
    # a world cached before the marker existed gets it on its next use
    (folder / STAND_IN_FILE).unlink()
    assert not load_official_embedder(folder).stand_in
    ensure_tiny_embedder(tmp_path)
    assert load_official_embedder(folder).stand_in
    # the report's card and the printed line name it so
    rows = [_row(i, ("member", "holdout")[i % 2], 0.5, official_cos=0.3 + i / 10) for i in range(4)]
    s = summarize(rows, AuthConfig(prompt="p"),
                  embedder_info={"kind": "dino", "folder": str(folder), "dim": 192, "stand_in": True,
                                 "label": emb.label})
    html = _html(tmp_path, rows, s)
    assert re.search(r"official validator AUC \(random stand-in in DINO.{1,6}s layout, not DINO, max", html)


def test_a_real_folder_is_named_by_its_kind(tmp_path):
    from cgidm.testing.embedder import ensure_tiny_embedder
    from cgidm.validator import STAND_IN_FILE, load_official_embedder

    folder = ensure_tiny_embedder(tmp_path)
    (folder / STAND_IN_FILE).unlink()
    emb = load_official_embedder(folder)
    assert emb.label == "dino" and not math.isnan(emb.dim)


def test_protect_report_says_what_its_ratio_is_and_escapes_names(tmp_path):
    from cgidm.protect_output import write_report as protect_report

    rows = [{"id": "a\u202egnp.png", "size": [8, 8], "mode": "RGB", "psnr": 40.0, "ssim": 0.99, "linf_levels": 8.0,
             "loss_clean": 0.1, "loss_protected": 0.2, "notes": ["kept \u2067x"], "panel": "panels/a.png"},
            {"id": "b.png", "error": "not an image \u202e"}]
    summary = {"images": 2, "protected": 1, "failed": 1, "base": "m\u202e", "device": "cpu", "dtype": "fp32",
               "medians": {"PSNR dB": 40.0, "loss protected / clean": 2.0}, "config": {}}
    html = protect_report(tmp_path, rows, summary).read_text()
    assert "each image's own ratio, then their median" in html
    for ch in ("\u202e", "\u2067"):
        assert ch not in html
    assert "a\\u202egnp.png" in html and "kept \\u2067x" in html and "not an image \\u202e" in html


def test_the_report_says_what_it_cannot_judge(tmp_path):
    from cgidm.summary import summarize_pairs

    # one pair, no controls, no labels: the report says there is no verdict, and why
    rows = [_row(i, None, 0.5 + i / 10) for i in range(3)]
    s = summarize(rows, AuthConfig(prompt="p"))
    html = _html(tmp_path, rows, s)
    assert "no verdict: scores alone say little; give control images" in html
    assert "known not to be in the fine-tune: --controls DIR)" in html and "manifest" not in html
    # a screen's (its summary has timing) names its manifest's way; the demo its own option
    assert "the label control, or a controls/ subfolder" in _html(tmp_path, rows, {**s, "timing": {"images": 3}})
    demo = {**s, "preset": {"name": "demo", "departures": {}}}
    assert "cgidm demo --with-controls; cgidm authenticate --controls DIR" in _html(tmp_path, rows, demo)
    # members and hold-outs without controls: an AUC, and no verdict, which is said (an artist
    # reading the demo's report would look for one)
    rows = [_row(i, ("member", "holdout")[i % 2], 0.5 + i / 10) for i in range(4)]
    html = _html(tmp_path, rows, summarize(rows, AuthConfig(prompt="p")))
    assert "no verdict on whether the model was fine-tuned on these images: the AUC says how well" in html
    rows += [_row(10 + i, "control", 0.1 + i / 100) for i in range(4)]
    assert "no verdict on whether" not in _html(tmp_path, rows, summarize(rows, AuthConfig(prompt="p")))
    # two pairs, one without controls: its images are named as unjudged beside the other's cards
    rows = [{**_row(i, "member" if i < 3 else None, 0.9), "id": f"a/{i}", "pair": "a"} for i in range(5)]
    rows += [{**_row(10 + i, "control", 0.1 + i / 100), "id": f"a/c{i}", "pair": "a"} for i in range(4)]
    rows += [{**_row(20 + i, ("member", "holdout")[i % 2], 0.5 + i / 10), "id": f"b/{i}", "pair": "b"}
             for i in range(4)]
    s = summarize_pairs(rows, {"a": {"base": "x"}, "b": {"base": "y"}}, AuthConfig(prompt="p"))
    html = _html(tmp_path, rows, s)
    assert "warning: pair b has no control images: its 4 images get no p-value or verdict" in html
    assert "no controls: no verdicts" in html and "(few labelled images)" in html


def test_a_decomposed_name_is_not_shown_as_the_composed_one(tmp_path):
    import unicodedata

    from cgidm.files import shown

    nfc = "café ñ.png"
    nfd = unicodedata.normalize("NFD", nfc)
    assert shown(nfc) == nfc and shown(nfd) == "cafe\\u0301 n\\u0303.png"
    assert shown("日本語 한국어.png") == "日本語 한국어.png"  # composed text is left as it is
    # conjoining jamo and the Angstrom sign are not combining marks, and not NFC either
    assert shown("\u1100\u1161.png") == "\\u1100\\u1161.png" and shown("\u212b.png") == "\\u212b.png"
    rows = [{**_row(0, None, 0.5), "id": f"image/{nfc}"}, {**_row(1, None, 0.6), "id": f"image/{nfd}"}]
    html = _html(tmp_path, rows, summarize(rows, AuthConfig(prompt="p")))
    assert f"<td>image/{nfc}" in html and "<td>image/cafe\\u0301 n\\u0303.png" in html


def test_a_name_spelling_an_escape_is_not_shown_as_the_character():
    from cgidm.files import shown

    assert shown("evil\u202egnp.png") == "evil\\u202egnp.png"  # the override itself
    assert shown("evil\\u202egnp.png") == "evil\\\\u202egnp.png"  # six characters a user typed
    assert shown("C:\\art\\x.png") == "C:\\\\art\\\\x.png"
    assert shown("plain/path.png") == "plain/path.png"


def test_a_run_off_the_defaults_and_a_stand_in_are_said_plainly(tmp_path, capsys):
    from cgidm.config import PGDConfig

    rows = [_row(i, ("member", "holdout")[i % 2], 0.5 + i / 10, official_cos=0.3 + i / 10) for i in range(4)]
    rows += [_row(10 + i, "control", 0.1 + i / 100) for i in range(3)]
    cfg = AuthConfig(prompt="p", pgd=PGDConfig(steps=30))
    s = summarize(rows, cfg, embedder_info={"kind": "dino", "folder": "f", "dim": 8, "stand_in": True,
                                            "label": "random stand-in in DINO's layout, not DINO"})
    assert s["departures_from_defaults"] == {"steps": {"preset": 1000, "given": 30}}
    html = _html(tmp_path, rows, s)
    assert "settings that differ from the defaults (the paper's): steps 30 (default 1000)" in html
    assert "a random network: this checks the code path and says nothing about the images" in html
    assert "official accuracy (random stand-in)" in html
    # too few controls for any image: said with the smallest p-value one image can get
    assert "the smallest p-value one image can get is 1/4 = 0.25" in s["calibration_warning"]
    # the set verdict comes first, before the cards, with what it means
    assert html.index("Was the model fine-tuned on some of these images?") < html.index('<div class="cards">')
    s["report"] = "r"
    print_summary(s)
    assert "settings that differ from the defaults (the paper's): steps 30 (default 1000)" in capsys.readouterr().out
    # a preset run without departures and a run on the defaults say nothing of the kind
    assert "departures_from_defaults" not in summarize(rows, AuthConfig(prompt="p"))


def test_no_evidence_is_not_proof(tmp_path):
    rows = [_row(i, None, 0.1 + i / 1000) for i in range(6)] + [_row(10 + i, "control", 0.1 + i / 1000 + 0.0005)
                                                                for i in range(20)]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["set_verdict"]["verdict"] == "no evidence"
    assert "\"No evidence\" is not proof that the images were not used." in _html(tmp_path, rows, s)


def test_a_word_mixing_look_alike_scripts_has_its_foreign_letters_escaped():
    from cgidm.files import shown

    assert shown("p\u0430ypal.png") == "p\\u0430ypal.png"  # a Cyrillic a among Latin letters
    assert shown("\u03b1lpha.png") == "\\u03b1lpha.png"  # a Greek alpha
    assert shown("\u0441\u043e\u0441\u0435") == "\u0441\u043e\u0441\u0435"  # one script in the word: as it is
    # words of one script each, and scripts that do not pass for each other, are left alone
    for name in ("\u0395\u03bb\u03bb\u03b7\u03bd\u03b9\u03ba\u03ac_photo.png", "Moskva_\u041c\u043e\u0441\u043a\u0432\u0430.png",
                 "\u732b\u306e\u7d75.png", "caf\u00e9.png", "na\u00efve r\u00e9sum\u00e9.png"):
        assert shown(name) == name


def test_an_invisible_mark_does_not_split_a_mixed_word():
    from cgidm.files import shown

    # a combining grapheme joiner or a variation selector between the letters: still one word
    assert shown("p\u034f\u0430\u034fypal.png") == "p\\u034f\\u0430\\u034fypal.png"
    assert shown("p\ufe00\u0430ypal") == "p\\ufe00\\u0430ypal"
    assert shown("p\u0430\u0301ypal") == "p\\u0430\\u0301ypal"  # the accent escaped with its letter
    assert shown("\u041c\u043e\u0441\u043a\u0432\u0430\u0301") == "\u041c\u043e\u0441\u043a\u0432\u0430\u0301"


def test_the_histogram_draws_where_the_verdict_starts(tmp_path):
    """With enough controls a dashed line marks the score beyond which an image is
    flagged, said in the picture's legend and alt text; not with too few."""
    rows = [_row(i, "control", i / 100) for i in range(24)] + [_row(30, "member", 0.9), _row(31, "member", 0.2)]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["flag_line"] == 0.23 and s["verdicts"]["img30"]["verdict"] == "fine-tuned on"
    assert s["verdicts"]["img31"]["verdict"] == "no evidence"
    assert 'alt="score histogram; dashed line: flagged above 0.23 (p &lt;= 0.05)"' in _html(tmp_path, rows, s)
    # lower is better: flagged below the lowest control
    mse = [{**r, "latent_mse": r["score"]} for r in rows]
    s = summarize(mse, AuthConfig(prompt="p", metric="latent_mse"))
    assert s["flag_line"] == 0.0 and s["verdicts"]["img31"]["verdict"] == "no evidence"
    assert 'alt="score histogram; dashed line: flagged below 0 (p &lt;= 0.05)"' in _html(tmp_path, mse, s)
    rows = rows[12:]  # 12 controls: no p-value reaches 0.05
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["flag_line"] is None and 'alt="score histogram"' in _html(tmp_path, rows, s)


class _Titles(HTMLParser):
    """Each element's text and ``title`` in a report: ``(tag, title, text)``, with the text of
    the elements inside it; and the text of the guide (``<details class="guide">``)."""

    def __init__(self):
        super().__init__()
        self.found, self._open, self.guide, self._in_guide = [], [], "", 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "details" and attrs.get("class") == "guide":
            self._in_guide = 1
        elif tag == "details" and self._in_guide:
            self._in_guide += 1
        if tag not in ("br", "img", "meta", "input"):
            self._open.append([tag, attrs.get("title"), ""])

    def handle_endtag(self, tag):
        if tag == "details" and self._in_guide:
            self._in_guide -= 1
        while self._open:
            el = self._open.pop()
            self.found.append(tuple(el))
            if self._open:
                self._open[-1][2] += el[2]
            if el[0] == tag:
                break

    def handle_data(self, data):
        if self._open:
            self._open[-1][2] += data
        if self._in_guide:
            self.guide += data

    def titles(self, tag, text):
        """The titles of the ``tag`` elements whose text, spaces folded, is ``text``, in order."""
        return [t for g, t, x in self.found if g == tag and " ".join(x.split()) == text]

    def title(self, tag, text):
        """The title of the first such element, or None."""
        return next(iter(self.titles(tag, text)), None)


def _labelled_run(n_controls=24, **cfg):
    rows = [_row(i, "member", 0.9 + i / 1000, baseline_pia=float(i)) for i in range(4)]
    rows += [_row(10 + i, "holdout", 0.3 + i / 1000, baseline_pia=10.0 + i) for i in range(4)]
    rows += [_row(20 + i, "control", 0.1 + i / 1000, baseline_pia=20.0 + i) for i in range(n_controls)]
    return rows, summarize(rows, AuthConfig(prompt="p", **cfg))


def test_the_report_says_how_to_read_it_in_plain_words(tmp_path):
    """A section for an artist or a rights holder: what was done to each image, what the
    scores, the p-values, z, the verdicts, the AUC and "failed"/stalled mean; near the
    top, before the set verdict and the cards, and tied to this run's level and score."""
    rows, s = _labelled_run()
    html = _html(tmp_path, rows, s)
    page = _Titles()
    page.feed(html)
    guide = " ".join(page.guide.split())
    assert guide.startswith("How to read this report")
    start = html.index('<details class="guide">')
    assert start < html.index("Was the model fine-tuned on some of these images?") < html.index('<div class="cards">')
    for said in ("Each image was turned into the model's compressed form (its latent) and half of it was hidden",
                 "steered by the contrast between the suspect fine-tuned model and the original model it was made from",
                 "the score column is latent_cos", "Higher is closer (for latent_mse, lower is)",
                 "known not to be in the fine-tune",
                 "p-value of an image: the share of controls that came back at least as well, counting the image "
                 "itself",
                 "z: how many standard deviations of the control scores it lies from their average, positive when "
                 "it came back better",
                 "fine-tuned on when its p-value is at most 0.05", "which is not proof it was not used",
                 "Set verdict (the box at the top): one test of all the suspect images together",
                 "AUC, when images labelled member (known to be in the fine-tune) and hold-out (known not to be)",
                 "the chance that a member scores better than a hold-out", "it is not a verdict",
                 "failed: an image that could not be scored", "Stalled: every search step was skipped",
                 "left out of the AUC and the set verdict"):
        assert said in guide, said
    assert page.title("abbr", "PGD") == "projected gradient descent"
    # the level is the run's, and a mask other than the default hides part, not half, of the latent
    rows, s = _labelled_run(level=0.01, blocks_per_side=2)
    guide = " ".join(_html(tmp_path, rows, s).split())
    assert "at most 0.01;" in guide and "and part of it was hidden" in guide and "half of it" not in guide
    # several pairs: each judged against its own controls, its set verdict in the table of pairs
    from cgidm.summary import summarize_pairs

    rows, _ = _labelled_run()
    rows = [{**r, "pair": p} for p in ("p1", "p2") for r in rows]
    rows = [{**r, "id": f"{r['pair']}/{r['id']}"} for r in rows]
    html = _html(tmp_path, rows, summarize_pairs(rows, {"p1": {}, "p2": {}}, AuthConfig(prompt="p")))
    guide = " ".join(re.sub("<[^>]+>", "", html).split())
    assert "the share of the controls of its pair that came back" in guide and "box at the top" not in guide
    assert "Set verdict (per pair, in the table of pairs): one test of all the suspect images together (members and " \
           "unlabelled images, not hold-outs) against the controls of its pair" in guide
    # no controls: no p-value, no verdict, no set verdict: said, and no box pointed at
    rows = [r for r in _labelled_run()[0] if r["label"] != "control"]
    guide = " ".join(re.sub("<[^>]+>", "", _html(tmp_path, rows, summarize(rows, AuthConfig(prompt="p")))).split())
    assert "(none here: no controls were given, so no p-value or verdict)" in guide and "Set verdict" not in guide


def test_technical_names_have_plain_tooltips(tmp_path):
    """Every score column, z, the p-value, the verdict, the label and the cards carry a
    plain title; the names stay the technical ones (results.jsonl and summary.json use
    them); the settings line explains PGD, step, radius and noise."""
    from cgidm.config import BASELINES, METRICS
    from cgidm.report import BASELINE_TITLES, METRIC_TITLES

    assert set(METRIC_TITLES) == set(METRICS) and set(BASELINE_TITLES) == set(BASELINES)
    rows, s = _labelled_run()
    rows = [{**r, "latent_mse": 1 - r["score"], "ssim": r["score"], "psnr": 20.0} for r in rows]
    s = summarize(rows, AuthConfig(prompt="p"))
    page = _Titles()
    page.feed(_html(tmp_path, rows, s))
    for name in ("latent_cos", "latent_mse", "ssim"):
        assert page.title("th", name) == METRIC_TITLES[name], name
    assert page.title("th", "psnr (dB)") == METRIC_TITLES["psnr"]
    assert "on the hidden part only" in METRIC_TITLES["latent_cos"]
    assert "lower is a closer recovery" in METRIC_TITLES["latent_mse"]
    assert page.title("th", "score") == ("the score the AUC and the verdicts use: latent_cos, repeated "
                                         "(higher is closer)")
    assert "standard deviations" in page.title("th", "z")
    assert page.title("th", "p-value").startswith("the share of controls that came back at least as well")
    assert "no evidence: above it (not proof" in page.title("th", "verdict (p ≤ 0.05)")
    assert "member: known to be in the fine-tune" in page.title("th", "label")
    assert page.title("th", "original | partial | recovered")
    for card in (f"images{len(rows)}", f"scored{len(rows)}", "failed0"):
        assert page.title("div", card), card
    auc = next(t for g, t, x in page.found if g == "div" and x.startswith("AUC (latent_cos)"))
    assert auc.startswith("area under the ROC curve: the chance that a member")
    assert next(t for g, t, x in page.found if g == "div" and x.startswith("TPR @ 1% FPR")).startswith(
        "true positive rate at 1 % false positive rate")
    assert next(t for g, t, x in page.found if g == "div" and x.startswith("flagged as fine-tuned on"))
    # the settings line and the set verdict's test
    assert page.titles("abbr", "PGD")[-1].startswith("projected gradient descent: the step-by-step search")
    for word in ("step", "radius", "noise", "level"):
        assert page.title("abbr", word), word
    test = s["set_verdict"]["test"] + ", " + s["set_verdict"]["method"]
    assert page.title("span", test).startswith("a rank test of whether the suspect images' scores tend to be better")
    # the baselines: their columns keep their names, their rows in the comparison say what they are
    pia_row = next(t for g, t, x in page.found if g == "tr" and x.startswith("pia"))
    assert pia_row == BASELINE_TITLES["pia"] and "lower = member" in pia_row
    # a lower-is-better score says so
    s = summarize(rows, AuthConfig(prompt="p", metric="latent_mse"))
    page = _Titles()
    page.feed(_html(tmp_path, rows, s))
    assert page.title("th", "score").endswith("latent_mse, repeated (lower is closer)")
