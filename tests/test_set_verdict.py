"""The set-level verdict (one rank-test p-value for the whole suspect set against the
controls) and the baselines' place in the summary and the report: hand-checked cases,
no models."""
import math

import pytest

from cgidm.config import AuthConfig
from cgidm.report import write_report
from cgidm.score import SET_VERDICTS, set_verdict
from cgidm.summary import print_summary, summarize, summarize_pairs


@pytest.mark.parametrize("suspects, controls, u, p", [
    # every suspect above every control: U = 2*2, exact p = 1 / C(4, 2)
    ([3.0, 4.0], [1.0, 2.0], 4.0, 1 / 6),
    # interleaved: pairs 2>1, 4>1, 4>3 -> U = 3; the null counts of U = 0..4 are 1,1,2,1,1
    ([2.0, 4.0], [1.0, 3.0], 3.0, 2 / 6),
    ([1.0, 2.0], [3.0, 4.0], 0.0, 1.0),
    ([5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0], 12.0, 1 / 35),
])
def test_exact_mann_whitney_by_hand(suspects, controls, u, p):
    sv = set_verdict(suspects, controls, "latent_cos", 0.05)
    assert sv["method"] == "exact"
    assert sv["statistic"] == u
    assert sv["p_value"] == pytest.approx(p, rel=1e-12)
    assert (sv["n_suspect"], sv["n_controls"]) == (len(suspects), len(controls))
    assert sv["min_p"] == pytest.approx(1 / math.comb(len(suspects) + len(controls), len(controls)))
    # two against two cannot reach 0.05 (min_p 1/6): inconclusive, whatever the scores
    assert sv["verdict"] == (SET_VERDICTS[0] if p <= 0.05 else SET_VERDICTS[2] if sv["min_p"] > 0.05
                             else SET_VERDICTS[1])


def test_lower_is_better_metric_is_turned_around():
    # latent_mse: a small error is a good recovery, so suspects below controls are evidence
    sv = set_verdict([1.0, 2.0], [3.0, 4.0], "latent_mse", 0.2)
    assert sv["statistic"] == 4.0 and sv["p_value"] == pytest.approx(1 / 6)
    assert sv["verdict"] == SET_VERDICTS[0]


def test_ties_use_the_permutation_distribution_with_the_ties():
    # values 0,0,1,1,1,2: midranks 1.5,1.5,4,4,4,6; suspects [1,1,2] -> R = 14, U = 14 - 6 = 8.
    # Of the C(6, 3) = 20 splits, the rank sums >= 14 are {4,4,6} three ways: p = 3/20 (the
    # normal approximation said 1 - Phi(sqrt 2) = 0.079)
    sv = set_verdict([1.0, 1.0, 2.0], [1.0, 0.0, 0.0], "latent_cos", 0.05)
    assert sv["method"] == "exact (permutation, ties)"
    assert sv["statistic"] == 8.0
    assert sv["p_value"] == pytest.approx(3 / 20, rel=1e-12)
    assert sv["verdict"] == SET_VERDICTS[1]
    # two suspects at PSNR's 100 dB cap against three equal controls: the best split of 10,
    # p = 1/10 = min_p, never below it (the approximation gave 0.048, a verdict its own
    # warning contradicted)
    sv = set_verdict([100.0, 100.0], [12.0, 12.0, 12.0], "psnr", 0.05)
    assert sv["p_value"] == pytest.approx(0.1) and sv["p_value"] >= sv["min_p"] - 1e-12
    assert sv["verdict"] == SET_VERDICTS[2]  # 2 against 3 cannot reach 0.05
    # one suspect (a single image against the controls): the share of pooled scores at
    # least its own, ties included: {1.0, 1.0} of 4 -> 1/2
    sv = set_verdict([1.0], [1.0, 0.0, 0.5], "latent_cos", 0.05)
    assert sv["method"] == "exact (permutation, ties)" and sv["p_value"] == pytest.approx(0.5)
    # more splits than PERMUTATIONS (float32 scores tie by chance in a large screen): the
    # approximation with the tie correction
    a = [round(0.01 * (i % 37), 2) for i in range(60)]
    b = [round(0.01 * (i % 31), 2) for i in range(50)]
    sv = set_verdict(a, b, "latent_cos", 0.05)
    from scipy.stats import mannwhitneyu
    assert sv["method"] == "asymptotic"
    assert sv["p_value"] == pytest.approx(float(mannwhitneyu(a, b, alternative="greater").pvalue), rel=1e-12)


def test_a_tied_set_verdict_equals_every_split_counted():
    """Small tied cases against a brute-force count of every split of the pooled mid-ranks."""
    import itertools
    import random

    from scipy.stats import rankdata

    rng = random.Random(0)
    for _ in range(60):
        ns, nc = rng.randint(1, 4), rng.randint(2, 5)
        a, b = [rng.randint(0, 3) / 4 for _ in range(ns)], [rng.randint(0, 3) / 4 for _ in range(nc)]
        ranks = rankdata(a + b)
        at_least = sum(ranks[list(split)].sum() >= ranks[:ns].sum() - 1e-9
                       for split in itertools.combinations(range(ns + nc), ns))
        sv = set_verdict(a, b, "latent_cos", 0.05)
        assert sv["p_value"] == pytest.approx(at_least / math.comb(ns + nc, ns), rel=1e-12), (a, b)
        assert sv["p_value"] >= sv["min_p"] - 1e-12


def test_non_finite_scores_are_dropped_and_too_few_refused():
    sv = set_verdict([3.0, float("nan"), None, 4.0], [1.0, 2.0, float("inf")], "latent_cos", 0.05)
    assert (sv["n_suspect"], sv["n_controls"]) == (2, 2) and sv["p_value"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="2 control"):
        set_verdict([1.0], [2.0], "latent_cos", 0.05)
    with pytest.raises(ValueError, match="1 suspect"):
        set_verdict([float("nan")], [2.0, 3.0], "latent_cos", 0.05)


def _row(i, label, score, **extra):
    return {"id": f"img{i:02d}", "image": f"img{i:02d}.png", "label": label, "score": score, "latent_cos": score,
            **extra}


def test_summary_gives_one_verdict_for_the_suspect_set():
    # 4 members, 4 hold-outs, 4 unlabelled suspects against 12 controls, every suspect above
    rows = [_row(i, ("member", "holdout", None)[i % 3], 0.9 + i / 1000) for i in range(12)]
    rows += [_row(20 + i, "control", 0.1 + i / 1000) for i in range(12)]
    cfg = AuthConfig(prompt="p")
    s = summarize(rows, cfg)
    sv = s["set_verdict"]
    # the suspect set is the members and the unlabelled images: hold-outs are known clean
    assert (sv["n_suspect"], sv["n_controls"], sv["holdouts_left_out"]) == (8, 12, 4)
    assert sv["statistic"] == 96.0
    assert sv["p_value"] == pytest.approx(1 / math.comb(20, 8))
    assert sv["verdict"] == SET_VERDICTS[0] and "warning" not in sv
    # the same scores, suspects now mixed in with the controls: no evidence
    mixed = [r if r["label"] == "control" else _row(int(r["id"][3:]), r["label"], 0.1 + int(r["id"][3:]) / 1000 + 0.0005)
             for r in rows]
    assert summarize(mixed, cfg)["set_verdict"]["verdict"] == SET_VERDICTS[1]


def test_hold_outs_do_not_dilute_the_set_verdict():
    # 4 members far above 12 controls; 8 hold-outs (never trained on) among the lowest.
    # Counted as suspects they would give U = 48 + 0 of 144 and "no evidence".
    rows = [_row(i, "member", 0.9 + i / 1000) for i in range(4)]
    rows += [_row(10 + i, "holdout", 0.05 + i / 1000) for i in range(8)]
    rows += [_row(20 + i, "control", 0.1 + i / 1000) for i in range(12)]
    sv = summarize(rows, AuthConfig(prompt="p"))["set_verdict"]
    assert (sv["n_suspect"], sv["holdouts_left_out"]) == (4, 8)
    assert sv["p_value"] == pytest.approx(1 / math.comb(16, 4)) and sv["verdict"] == SET_VERDICTS[0]
    # with no hold-outs the field is absent
    assert "holdouts_left_out" not in summarize([r for r in rows if r["label"] != "holdout"],
                                                AuthConfig(prompt="p"))["set_verdict"]


def test_hold_outs_alone_get_no_set_verdict_and_are_told_why(capsys):
    rows = [_row(i, "holdout", 0.5 + i / 100) for i in range(4)] + [_row(10 + i, "control", 0.1 + i / 100)
                                                                    for i in range(4)]
    s = summarize(rows, AuthConfig(prompt="p"))
    sv = s["set_verdict"]
    assert "p_value" not in sv and sv["holdouts_left_out"] == 4 and "every image besides the controls" in sv["error"]
    s["report"] = "r"
    print_summary(s)
    assert "no set verdict: every image besides the controls is a hold-out (4)" in capsys.readouterr().out


def test_summary_warns_when_the_counts_cannot_reach_the_level():
    rows = [_row(0, None, 0.9), _row(1, None, 0.8), _row(2, "control", 0.1), _row(3, "control", 0.2)]
    sv = summarize(rows, AuthConfig(prompt="p"))["set_verdict"]
    # the lowest p two against two allow is 1/6: "inconclusive", not "no evidence"
    assert sv["p_value"] == pytest.approx(1 / 6) and sv["verdict"] == SET_VERDICTS[2] == "inconclusive"
    assert "cannot give p <= 0.05" in sv["warning"]


def test_no_controls_no_set_verdict():
    rows = [_row(0, "member", 0.9), _row(1, "holdout", 0.1)]
    assert "set_verdict" not in summarize(rows, AuthConfig(prompt="p"))


def test_too_few_scored_controls_are_said_not_dropped(tmp_path, capsys):
    """Controls given but fewer than 2 scored (one control, or unreadable files): the
    summary, the CLI's lines and the report say no verdict can be given, and why."""
    one = [_row(0, None, 0.9), _row(1, None, 0.8), _row(2, "control", 0.1)]
    broken = one + [{"id": "c/bad.png", "label": "control", "error": "not an image"}]
    for rows, said in ((one, "1 control image given, 1 scored"), (broken, "2 control images given, 1 scored")):
        s = summarize(rows, AuthConfig(prompt="p"))
        assert said in s["calibration_error"] and "need at least 2" in s["calibration_error"]
        assert "set_verdict" not in s and "flagged" not in s
    s["report"] = str(write_report(tmp_path, broken, s))
    assert "2 control images given, 1 scored" in (tmp_path / "report.html").read_text()
    print_summary(s)
    assert "warning: 2 control images given, 1 scored" in capsys.readouterr().out
    assert "calibration_error" not in summarize(one[:2], AuthConfig(prompt="p"))
    # several pairs: a pair with one control is said as such, not as "no control images"
    rows = [{**r, "id": f"a/{r['id']}", "pair": "a"} for r in one]
    rows += [{**_row(10 + i, None if i < 2 else "control", 0.9 - i / 10), "pair": "b"} for i in range(4)]
    s = summarize_pairs(rows, {"a": {"base": "x"}, "b": {"base": "y"}}, AuthConfig(prompt="p"))
    assert s["calibration_error"].startswith("a: 1 control image given, 1 scored")
    assert "a" not in (s.get("pairs_without_controls") or {})
    assert s["pairs"]["a"]["calibration_error"] and s["pairs"]["b"]["controls"] == 2
    # many pairs with one message: one sentence naming a few, not the sentence once per pair
    many = [{**r, "id": f"p{k}/{r['id']}", "pair": f"p{k}"} for k in range(6) for r in one]
    s = summarize_pairs(many, {f"p{k}": {"base": "x"} for k in range(6)}, AuthConfig(prompt="p"))
    assert s["calibration_error"].startswith("p0, p1, p2 and 3 more: 1 control image given, 1 scored")
    assert s["calibration_error"].count("control image given") == 1
    # what loading found, in each pair's models line: a LoRA's counts as matched/total
    s = summarize_pairs(rows, {"a": {"base": "x", "lora_match": {"matched": 3, "total": 4}},
                               "b": {"base": "y", "finetuned_uses_base": ["text_encoder", "tokenizer"]}},
                        AuthConfig(prompt="p"))
    assert s["models"] == {"a": "base=x lora_match=3/4", "b": "base=y finetuned_uses_base=text_encoder,tokenizer"}


def test_each_pair_gets_its_own_set_verdict():
    rows = []
    for pair, hi in (("a", 0.9), ("b", 0.1)):
        rows += [{**_row(i, None, hi + i / 100), "id": f"{pair}/{i}", "pair": pair} for i in range(4)]
        rows += [{**_row(10 + i, "control", 0.5 + i / 100), "id": f"{pair}/c{i}", "pair": pair} for i in range(4)]
    s = summarize_pairs(rows, {"a": {"base": "x"}, "b": {"base": "y"}}, AuthConfig(prompt="p"))
    assert s["pairs"]["a"]["set_verdict"]["p_value"] == pytest.approx(1 / math.comb(8, 4))
    assert s["pairs"]["b"]["set_verdict"]["statistic"] == 0.0


def test_baselines_sit_beside_cgidm_in_by_metric_with_their_orientation():
    members = [_row(i, "member", 0.9, baseline_pia=1.0 + i, baseline_loss_diff=0.5, baseline_secmi=3.0)
               for i in range(3)]
    holdouts = [_row(10 + i, "holdout", 0.1, baseline_pia=10.0 + i, baseline_loss_diff=-0.5, baseline_secmi=None)
                for i in range(3)]
    s = summarize(members + holdouts, AuthConfig(prompt="p"))
    bm = s["by_metric"]
    assert bm["latent_cos"]["auc"] == 1.0
    # PIA: a smaller error is a member (config.HIGHER_IS_BETTER), so lower members give AUC 1
    assert bm["baseline_pia"]["auc"] == 1.0 and bm["baseline_pia"]["threshold"] < 10.0
    assert bm["baseline_loss_diff"]["auc"] == 1.0
    assert "baseline_secmi" not in bm  # failed (null) on some image: not scored on a subset
    assert all("roc" not in v for v in bm.values())


def test_report_shows_the_set_verdict_and_the_comparison(tmp_path):
    rows = [_row(i, "member" if i < 3 else "holdout", 0.9 if i < 3 else 0.1, baseline_pia=float(i))
            for i in range(6)]
    rows += [_row(10 + i, "control", 0.05 * i) for i in range(4)]
    s = summarize(rows, AuthConfig(prompt="p"))
    html = write_report(tmp_path, rows, s).read_text()
    assert "Was the model fine-tuned on some of these images?" in html
    assert s["set_verdict"]["verdict"] in html and "Mann-Whitney" in html
    assert "CGI-DM (latent_cos)" in html and "<td>pia</td>" in html
    assert "<th data-k=\"n\">baseline_pia</th>" in html


def test_the_folder_maximum_gets_no_p_values():
    """official_cos is a maximum over each folder's recoveries: suspects' and controls'
    folders differ in size, so under the null the larger folder scores higher (19 of 20
    null trials gave p <= 0.05 with it)."""
    rows = [_row(i, ("member", "holdout")[i % 2], 0.5, official_cos=0.9) for i in range(4)]
    rows += [_row(10 + i, "control", 0.4, official_cos=0.1 * i) for i in range(5)]
    s = summarize(rows, AuthConfig(prompt="p", metric="official_cos"))
    assert "official_cos is a maximum over each folder's recoveries" in s["calibration_error"]
    assert "verdicts" not in s and "set_verdict" not in s
    assert "set_verdict" in summarize(rows, AuthConfig(prompt="p"))  # a per-image metric is calibrated


def test_a_validator_score_whose_folder_changed_is_dropped():
    """A resume after the image list changed kept every other image's folder maximum: the
    official AUC was computed over images no longer listed."""
    from cgidm.embed_scores import drop_stale_official, validator_folders

    rows = [{"id": f"{label}{i}", "label": label, "pair": "p", "recovered": f"r/{label}{i}.png"}
            for label in ("member", "holdout") for i in range(3)]
    folders = validator_folders(rows)
    for r in rows:
        r.update(official_cos=0.5, official_folder=folders[(r["pair"], r["label"])])
    assert drop_stale_official(rows) == 0
    kept = [r for r in rows if r["id"] != "member0"]  # an image removed from the list
    assert drop_stale_official(kept) == 2
    assert [r["id"] for r in kept if "official_cos" in r] == ["holdout0", "holdout1", "holdout2"]
    # an image added to a folder (its row has no score yet), or one relabelled, likewise
    added = [*kept, {"id": "holdout9", "label": "holdout", "pair": "p", "recovered": "r/h9.png"}]
    assert drop_stale_official(added) == 3 and not any("official_cos" in r for r in added)
    # an error row is in no folder
    rows2 = [dict(r) for r in rows] + [{"id": "member7", "label": "member", "pair": "p", "error": "x"}]
    assert drop_stale_official(rows2) == 0


def test_a_pair_that_looks_swapped_is_said_so():
    """Suspects clearly below the controls, or members clearly below the hold-outs, is what
    a run with --base and --finetuned swapped gives: a warning asks, beside the verdict;
    too few images, or scores in the usual order, give none."""
    rows = [_row(i, None, 0.1 + i / 1000) for i in range(8)] + [_row(20 + i, "control", 0.9 + i / 1000)
                                                                for i in range(8)]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["set_verdict"]["verdict"] == SET_VERDICTS[1] and "swapped" in s["set_verdict"]["warning"]
    labelled = [_row(i, "member", 0.1 + i / 1000) for i in range(6)] + [_row(10 + i, "holdout", 0.9 + i / 1000)
                                                                        for i in range(6)]
    s = summarize(labelled, AuthConfig(prompt="p"))
    assert s["auc"] == 0.0 and "swapped" in s["auc_warning"]  # one ordering in 924 by chance
    usual = [_row(i, "member", 0.9 + i / 1000) for i in range(6)] + [_row(10 + i, "holdout", 0.1 + i / 1000)
                                                                     for i in range(6)]
    assert "auc_warning" not in summarize(usual, AuthConfig(prompt="p"))
    # all four members below all four hold-outs happens once in 70 by chance: not clear enough
    four = [_row(i, "member", 0.1 + i / 1000) for i in range(4)] + [_row(10 + i, "holdout", 0.9) for i in range(4)]
    assert "auc_warning" not in summarize(four, AuthConfig(prompt="p"))
    # one suspect below 20 controls: once in 21 by chance
    one = [_row(0, None, 0.0)] + [_row(20 + i, "control", 0.5 + i / 100) for i in range(20)]
    assert "warning" not in summarize(one, AuthConfig(prompt="p"))["set_verdict"]


def test_the_summary_says_how_many_flags_chance_would_give():
    """Per-image p-values are not corrected for many images: the summary gives the flags
    expected by chance (the largest p-value the controls allow at the level, times the images
    judged: 1/21 with 20 controls), and none where no image could be flagged."""
    rows = [_row(i, None, 0.5 + i / 1000) for i in range(40)] + [_row(100 + i, "control", i / 20) for i in range(20)]
    s = summarize(rows, AuthConfig(prompt="p"))
    assert s["flagged_by_chance"] == pytest.approx(40 / 21, abs=0.005)
    # 38 controls: p <= 0.05 only as p = 1/39 (2/39 > 0.05), so about n/39, not 0.05 n
    from cgidm.summary import chance_rate

    assert chance_rate(38, 0.05) == 1 / 39 and chance_rate(19, 0.05) == 1 / 20 and chance_rate(12, 0.05) == 0
    assert chance_rate(40, 0.05) == 2 / 41 and chance_rate(999, 0.05) == 0.05
    # the rate is what the p-values give: over every rank an image can take among n controls
    from cgidm.score import Calibration

    for n in (12, 19, 38, 40):
        cal = Calibration(tuple(float(i) for i in range(n)), "latent_cos", 0.05)
        ranks = [i - 0.5 for i in range(n + 1)]  # each gap between controls, and above all
        flagged = sum(cal.judge(x)["verdict"] == "fine-tuned on" for x in ranks)
        assert flagged / (n + 1) == pytest.approx(chance_rate(n, 0.05))
    few = [_row(i, None, 0.5) for i in range(4)] + [_row(100 + i, "control", i / 10) for i in range(5)]
    assert summarize(few, AuthConfig(prompt="p"))["flagged_by_chance"] == 0


def test_scores_without_controls_or_labels_say_how_to_get_a_verdict(capsys, tmp_path):
    rows = [_row(i, None, 0.5) for i in range(3)]
    s = summarize(rows, AuthConfig(prompt="p"))
    print_summary({**s, "report": str(tmp_path / "report.html")})
    assert "no verdict: scores alone say little; give control images" in capsys.readouterr().out
    rows += [_row(100 + i, "control", i / 20) for i in range(20)]
    s = summarize(rows, AuthConfig(prompt="p"))
    print_summary({**s, "report": str(tmp_path / "report.html")})
    assert "no verdict" not in capsys.readouterr().out


def test_a_large_report_shows_the_failed_the_flagged_and_the_best_recovered(tmp_path, monkeypatch):
    """Past REPORT_ROWS the table keeps the failed rows, then the flagged, then the best
    recovered (oriented by the metric), says how many it shows, and still sorts by label
    and id; the results file keeps every row."""
    from cgidm import report

    monkeypatch.setattr(report, "REPORT_ROWS", 4)
    rows = [_row(i, None, 0.1 * i) for i in range(8)]
    rows[0] = {"id": "img00", "image": "img00.png", "label": None, "error": "unreadable"}
    rows[2]["verdict"], rows[2]["p_value"] = "fine-tuned on", 0.01
    shown = report.shown_rows(rows, "latent_cos", limit=4)
    assert [r["id"] for r in shown] == ["img00", "img02", "img06", "img07"]
    assert [r["id"] for r in report.shown_rows(rows, "latent_mse", limit=4)] == ["img00", "img01", "img02", "img03"]
    # rows without a p-value (controls) or not flagged rank by their score alone
    mixed = [_row(i, None, i / 100, p_value=0.5, verdict="no evidence") for i in range(5)]
    mixed += [_row(10 + i, "control", 0.9 + i / 100) for i in range(3)]
    assert [r["id"] for r in report.shown_rows(mixed, "latent_cos", limit=4)] == ["img04", "img10", "img11", "img12"]
    # the images tested before the controls: a demo's 24 controls do not push its members down
    labelled = [_row(0, "control", 0.5), _row(1, "member", 0.5), _row(2, "holdout", 0.5), _row(3, None, 0.5)]
    assert [r["label"] for r in report.shown_rows(labelled, "latent_cos")] == [None, "member", "holdout", "control"]
    path = write_report(tmp_path, rows, summarize(rows, AuthConfig(prompt="p")))
    html = path.read_text()
    assert "The table shows 4 of 8 images" in html and "img07" in html and "img05.png" not in html
    assert "The table shows" not in write_report(tmp_path, rows[:4], summarize(rows[:4], AuthConfig(prompt="p"))).read_text()


def test_an_auc_from_few_labelled_images_comes_with_a_warning():
    few = [_row(i, "member", 0.9 + i / 100) for i in range(3)] + [_row(10 + i, "holdout", 0.1) for i in range(4)]
    s = summarize(few, AuthConfig(prompt="p"))
    assert s["auc"] == 1.0 and "AUC from 3 members and 4 hold-outs: one image moves it by up to 0.33" in s["sample_warning"]
    many = [_row(i, "member", 0.9 + i / 100) for i in range(10)] + [_row(20 + i, "holdout", 0.1) for i in range(10)]
    assert "sample_warning" not in summarize(many, AuthConfig(prompt="p"))


def test_a_swapped_pair_among_good_ones_is_named_in_a_screens_summary():
    good = [{**_row(i, "member", 0.9 + i / 100), "pair": "good"} for i in range(6)]
    good += [{**_row(10 + i, "holdout", 0.1 + i / 100), "pair": "good"} for i in range(6)]
    swapped = [{**_row(20 + i, "member", 0.1 + i / 100), "pair": "swapped"} for i in range(6)]
    swapped += [{**_row(30 + i, "holdout", 0.9 + i / 100), "pair": "swapped"} for i in range(6)]
    s = summarize_pairs(good + swapped, {"good": {}, "swapped": {}}, AuthConfig(prompt="p"))
    assert s["auc_warning"].startswith("swapped: members recover worse") and "good" not in s["auc_warning"]
    assert "swapped" in s["pairs"]["swapped"]["auc_warning"] and "auc_warning" not in s["pairs"]["good"]


class _CountingEmbedder:
    """A fake embedder: features from the mean colour and a fixed projection; counts images."""

    kind, dim = "dino", 4

    def __init__(self, folder):
        self.folder, self.seen = folder, 0

    def __call__(self, images):
        import numpy as np
        import torch

        self.seen += len(images)
        means = torch.tensor(np.array([np.asarray(im, dtype=np.float32).mean(axis=(0, 1)) for im in images]))
        return torch.cat([means, means.sum(1, keepdim=True) ** 0.5], dim=1)


def test_a_rerun_embeds_only_the_images_it_has_not_embedded(tmp_path, monkeypatch):
    """With --embedder, features are kept in the output folder: a second run over the same
    rows embeds nothing and gives the same scores; a recovery written anew is embedded
    anew; another embedder does not read them; a damaged file is embedded again; past
    MAX_CHUNKS runs the files merge into one of the rows asked for."""
    from PIL import Image

    from cgidm import feature_cache
    from cgidm.embed_scores import add_embedding_scores

    out = tmp_path / "out"
    (out / "recovered").mkdir(parents=True)
    (tmp_path / "emb").mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (8, 8), (40 * i, 10, 200 - 30 * i)).save(tmp_path / f"img{i}.png")
        Image.new("RGB", (8, 8), (40 * i + 5, 20, 190 - 30 * i)).save(out / "recovered" / f"img{i}.png")
        rows.append({**_row(i, ("member", "holdout")[i % 2], 0.5), "image": str(tmp_path / f"img{i}.png"),
                     "recovered": f"recovered/img{i}.png", "pair": "p"})
    emb = _CountingEmbedder(tmp_path / "emb")
    add_embedding_scores(rows, emb, out)
    first = [(r["official_cos"], r["embed_cos"]) for r in rows]
    assert emb.seen == 10
    add_embedding_scores(rows, emb, out)
    assert emb.seen == 10 and [(r["official_cos"], r["embed_cos"]) for r in rows] == first
    Image.new("RGB", (8, 8), (0, 0, 0)).save(out / "recovered" / "img3.png")
    add_embedding_scores(rows, emb, out)
    assert emb.seen == 12 and rows[3]["embed_cos"] != first[3][1]
    other = _CountingEmbedder(tmp_path)  # another folder: another embedder
    add_embedding_scores(rows, other, out)
    assert other.seen == 10
    mine = out / feature_cache.FEATURES / feature_cache.embedder_key(emb)
    chunks = sorted(mine.glob("*.safetensors"))
    assert len(chunks) == 2  # the first run's, and the one recovery embedded anew
    chunks[0].write_bytes(b"damaged")
    add_embedding_scores(rows, emb, out)
    assert emb.seen > 12
    monkeypatch.setattr(feature_cache, "MAX_CHUNKS", 2)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(out / "recovered" / "img0.png")
    add_embedding_scores(rows, emb, out)
    assert len(list(mine.glob("*.safetensors"))) == 1
    seen = emb.seen
    add_embedding_scores(rows, emb, out)
    assert emb.seen == seen


def test_the_feature_cache_follows_the_run_not_the_spelling(tmp_path, monkeypatch):
    """The same --out spelled otherwise finds its features; another dtype of the embedder
    does not; an embedder without a folder is not cached; a failed write (a full disk,
    safetensors' own error) costs only time and leaves no temporary."""
    from PIL import Image

    from cgidm import feature_cache
    from cgidm.embed_scores import add_embedding_scores

    out = tmp_path / "out"
    (out / "recovered").mkdir(parents=True)
    (tmp_path / "emb").mkdir()
    rows = []
    for i in range(3):
        Image.new("RGB", (8, 8), (60 * i, 10, 30)).save(tmp_path / f"img{i}.png")
        Image.new("RGB", (8, 8), (60 * i, 20, 30)).save(out / "recovered" / f"img{i}.png")
        rows.append({**_row(i, None, 0.5), "image": str(tmp_path / f"img{i}.png"),
                     "recovered": f"recovered/img{i}.png", "pair": "p"})
    emb = _CountingEmbedder(tmp_path / "emb")
    add_embedding_scores(rows, emb, out)
    monkeypatch.chdir(tmp_path)
    add_embedding_scores(rows, emb, "out")
    assert emb.seen == 6
    emb.dtype = "torch.bfloat16"
    add_embedding_scores(rows, emb, out)
    assert emb.seen == 12
    bare = _CountingEmbedder(None)
    add_embedding_scores(rows, bare, out)
    add_embedding_scores(rows, bare, out)
    assert bare.seen == 12 and "official_cos" in rows[0]

    def full(*a, **kw):
        raise RuntimeError("Error while serializing: I/O error: No space left on device")

    monkeypatch.setattr("safetensors.torch.save_file", full)
    emb.dtype = "torch.float16"
    add_embedding_scores(rows, emb, out)
    assert emb.seen == 18 and "official_cos" in rows[0]
    assert not list((out / feature_cache.FEATURES).rglob(".*.tmp"))


def test_the_swap_test_counts_ties_exactly():
    """Members tied among themselves below tied hold-outs: the exact p-value with the ties
    (1/56 for 3 against 5), not the normal approximation's 0.0068: no swap warning."""
    from cgidm.score import worse_p

    assert worse_p([20.0] * 3, [30.0] * 5, "latent_cos") == pytest.approx(1 / 56)
    rows = [_row(i, "member", 20.0) for i in range(3)] + [_row(10 + i, "holdout", 30.0) for i in range(5)]
    assert "auc_warning" not in summarize(rows, AuthConfig(prompt="p"))


def test_one_file_under_two_names_is_scored_once(tmp_path, caplog):
    """A link beside its file, under the same label, was scored and counted twice: it
    weighed twice in the AUC and the set verdict. A folder lists it once (warned), a
    manifest screens it once (warned); items given to the API are warned of."""
    import logging
    import os

    from PIL import Image

    from cgidm.manifest import ImageItem, check_items, collect_items, read_manifest

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (8, 8), (i * 90, 0, 0)).save(folder / f"m{i}.png")
    os.symlink(folder / "m0.png", folder / "again.png")
    os.link(folder / "m1.png", folder / "hard.png")  # a hard link is one file too
    with caplog.at_level(logging.WARNING, logger="cgidm.manifest"):
        items = collect_items(images=folder)
    # the first name listed (sorted) is kept
    assert sorted(it.path.name for it in items) == ["again.png", "hard.png"]
    assert caplog.text.count("listed already: scored once") == 2
    # items given to the API under their own ids are scored as given (another id, another
    # draw), with a warning that the verdicts count them once (copies.py)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cgidm.manifest"):
        check_items([ImageItem(folder / "m0.png"), ImageItem(folder / "again.png")])
    assert "is the file" in caplog.text and "scored once per id, and counted once in the calibration" in caplog.text
    # a manifest: the second name of the file is screened once, with a warning
    (tmp_path / "base").mkdir()
    (tmp_path / "ft").mkdir()
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,label,base,finetuned\n" + "".join(
        f"imgs/{n},member,base,ft\n" for n in ("m0.png", "m1.png", "again.png", "hard.png")))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cgidm.manifest"):
        entries = read_manifest(manifest)
    assert sorted(e.path.name for e in entries) == ["m0.png", "m1.png"]
    assert "again.png is the file imgs/m0.png, listed already for the same models; screened once" in caplog.text
    assert "hard.png is the file imgs/m1.png" in caplog.text


def test_controls_under_another_pair_are_said_not_called_missing():
    """A screen whose controls sit under a pair with nothing else to test: the pairs with
    images are named as without controls, the controls' pair as calibrating nothing,
    rather than "give control images"."""
    from cgidm.summary import summarize_pairs, unjudged

    rows = [{**_row(i, None, 0.5 + i / 100), "pair": k, "id": f"{k}/{i}"} for k in ("a", "b") for i in range(3)]
    rows += [{**_row(i, "control", i / 100), "pair": "c", "id": f"c/{i}"} for i in range(20)]
    s = summarize_pairs(rows, {k: {"base": k} for k in "abc"}, AuthConfig(prompt="p"))
    assert s["pairs_without_controls"] == {"a": 3, "b": 3} and s["pairs_with_only_controls"] == {"c": 20}
    said = "\n".join(unjudged(s))
    assert "give control images" not in said and "pair a has no control images" in said
    assert "1 pair (c) has control images and no scored image to test" in said


def test_no_verdict_when_every_image_stalled():
    """The fine-tune given as its own base (or no gradient anywhere): every PGD step of every
    image skipped, so the scores are the starting point's; no p-value or verdict is given."""
    from cgidm.config import AuthConfig, PGDConfig
    from cgidm.summary import summarize

    cfg = AuthConfig(prompt="p", pgd=PGDConfig(steps=4))
    rows = [{"id": f"c{i}", "label": "control", "score": i / 30, "latent_cos": i / 30, "skipped_steps": 4}
            for i in range(20)] + [{"id": "mine", "label": None, "score": 0.9, "latent_cos": 0.9, "skipped_steps": 4}]
    s = summarize(rows, cfg)
    assert "verdicts" not in s and "nothing was recovered to judge; no p-values or verdicts" in s["calibration_error"]
    rows[-1]["skipped_steps"] = 0  # one image recovered, but its controls calibrate nothing
    assert "0 scored and used" in summarize(rows, cfg)["calibration_error"]
    for r in rows:  # every image recovered: judged as usual
        r["skipped_steps"] = 0
    assert summarize(rows, cfg)["verdicts"]["mine"]["verdict"] == "fine-tuned on"


def test_a_stalled_image_among_recovered_ones_gets_no_verdict():
    """Some images stalled, the others recovered: a stalled suspect is 'failed' with no
    p-value and out of the set verdict; a stalled control is out of the null."""
    from cgidm.config import AuthConfig, PGDConfig
    from cgidm.summary import summarize

    cfg = AuthConfig(prompt="p", pgd=PGDConfig(steps=4))
    rows = [{"id": f"c{i}", "label": "control", "score": i / 30, "latent_cos": i / 30, "skipped_steps": 0}
            for i in range(20)]
    rows += [{"id": f"s{i}", "label": None, "score": 0.9, "latent_cos": 0.9, "skipped_steps": 4 * (i == 0)}
             for i in range(3)]
    s = summarize(rows, cfg)
    assert s["verdicts"]["s0"] == {"p_value": None, "z": None, "verdict": "failed"}
    assert s["verdicts"]["s1"]["verdict"] == "fine-tuned on" and s["flagged"] == 2
    assert s["set_verdict"]["n_suspect"] == 2 and s["stalled"]["ids"] == ["s0"]
    assert s["controls"] == 20
    rows[0]["skipped_steps"] = rows[1]["skipped_steps"] = 4  # two stalled controls calibrate nothing
    s = summarize(rows, cfg)
    assert s["controls"] == 18 and "s0" not in [r["id"] for r in rows if r.get("verdict") == "fine-tuned on"]
    # every suspect stalled, hold-outs beside: said as stalled, not as "every image is a hold-out"
    for r in rows[20:]:
        r["skipped_steps"] = 4
    held = [{"id": f"h{i}", "label": "holdout", "score": 0.2, "latent_cos": 0.2, "skipped_steps": 0} for i in range(3)]
    s = summarize(rows + held, cfg)
    assert s["set_verdict"]["error"].startswith("every suspect image stalled (3: every PGD step skipped)")
    for r in rows[:20]:  # every control stalled: said in the calibration error
        r["skipped_steps"] = 4
    assert "20 control images given, 0 scored and used (20 stalled" in summarize(rows + held, cfg)["calibration_error"]


def test_stalled_images_are_no_point_of_the_auc_and_the_cause_is_said():
    """A stalled member or hold-out is out of the AUC (its score is the starting point's);
    every image stalled: no AUC, and the line printed says why, naming the base copy when
    loading found one."""
    from cgidm.config import AuthConfig, PGDConfig
    from cgidm.summary import summarize, unjudged

    cfg = AuthConfig(prompt="p", pgd=PGDConfig(steps=4))
    rows = [{"id": f"m{i}", "label": "member", "score": 0.9, "latent_cos": 0.9, "skipped_steps": 0} for i in range(3)]
    rows += [{"id": f"h{i}", "label": "holdout", "score": 0.1, "latent_cos": 0.1, "skipped_steps": 0} for i in range(3)]
    rows.append({"id": "h-stalled", "label": "holdout", "score": 0.95, "latent_cos": 0.95, "skipped_steps": 4})
    s = summarize(rows, cfg)
    assert s["auc"] == 1.0 and s["by_metric"]["latent_cos"]["n_holdouts"] == 3
    for r in rows:
        r["skipped_steps"] = 4
    s = summarize(rows, cfg, {"base": "b", "same_as_base": True})
    assert s["auc"] is None and s["stalled"]["note"].startswith("the fine-tune has the base model's weights exactly")
    assert unjudged(s) == ["no AUC and no verdict: every image stalled (every PGD step skipped), so nothing was "
                           "recovered; is --finetuned the base itself, or a copy of it?"]
