import math

import pytest
import torch

from cgidm.score import calibrate, latent_scores, pixel_scores, set_metrics


def test_latent_scores_use_only_the_removed_half():
    mask = torch.tensor([[[1.0, 0.0, 1.0, 0.0]]])
    x0 = torch.tensor([[[[9.0, 1.0, -9.0, 2.0]]]])
    rec = torch.tensor([[[[0.0, 2.0, 0.0, 4.0]]]])  # kept entries differ: must not count
    s = latent_scores(x0, rec, mask)
    assert s["latent_cos"].item() == pytest.approx(1.0)
    assert s["latent_mse"].item() == pytest.approx((1 + 4) / 2)


def test_pixel_scores_identity_and_difference():
    img = torch.rand(3, 32, 32) * 2 - 1
    same = pixel_scores(img, img)
    assert same["ssim"] == pytest.approx(1.0) and same["psnr"] == 100.0
    other = pixel_scores(img, -img)
    assert other["ssim"] < 0.5 and other["psnr"] < 20


def test_set_metrics_on_known_scores():
    m = set_metrics([0.9, 0.8, 0.7, 0.1, 0.2, 0.75], [True, True, True, False, False, False])
    # members 0.9 0.8 0.7 vs holdouts 0.1 0.2 0.75: 8 of 9 pairs ordered
    assert m["auc"] == pytest.approx(8 / 9)
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["tpr_at_1fpr"] == pytest.approx(2 / 3)
    inv = set_metrics([0.1, 0.2, 5.0, 6.0], [True, True, False, False], metric="latent_mse")
    assert inv["auc"] == 1.0  # lower MSE is better


def test_set_metrics_without_both_labels_has_no_auc():
    assert set_metrics([0.1, 0.2], [True, True])["auc"] is None


def test_calibration_p_value_z_and_verdict():
    cal = calibrate([0.1 * i for i in range(19)], "latent_cos", level=0.05)  # 0.0 .. 1.8
    top = cal.judge(5.0)
    assert top["p_value"] == pytest.approx(1 / 20) and top["verdict"] == "fine-tuned on"
    mid = cal.judge(0.95)
    assert mid["p_value"] == pytest.approx((1 + 9) / 20) and mid["verdict"] == "no evidence"
    assert mid["z"] == pytest.approx((0.95 - 0.9) / torch.tensor([0.1 * i for i in range(19)]).std().item())
    assert cal.judge(float("nan"))["verdict"] == "failed"
    assert calibrate([1.0, 2.0, 3.0], "latent_cos", 0.05).min_p() == pytest.approx(0.25)
    with pytest.raises(ValueError):
        calibrate([1.0, math.nan], "latent_cos", 0.05)


@pytest.mark.parametrize("metric", ["latent_cos", "latent_mse"])
def test_calibration_judges_as_the_definition_with_ties_and_either_orientation(metric):
    """The p-value from the sorted controls equals the count of controls at least as
    extreme (oriented by the metric), ties included, for scores below, among and above
    the controls; z from the controls' mean and sample standard deviation."""
    import numpy as np

    rng = np.random.default_rng(0)
    controls = np.round(rng.normal(size=41), 1)  # rounded: many ties
    cal = calibrate(controls.tolist(), metric, level=0.05)
    sign = 1.0 if metric == "latent_cos" else -1.0
    for score in [*controls[:10].tolist(), -9.0, 9.0, 0.05, float(controls.max()), float(controls.min())]:
        got = cal.judge(score)
        want_p = (1 + int((sign * controls >= sign * score).sum())) / (len(controls) + 1)
        want_z = (sign * score - (sign * controls).mean()) / controls.std(ddof=1)
        assert got["p_value"] == pytest.approx(want_p) and got["z"] == pytest.approx(want_z)
        assert got["verdict"] == ("fine-tuned on" if want_p <= 0.05 else "no evidence")
    # too few controls for the level: not "no evidence" but "inconclusive", at any score
    few = calibrate(controls[:12].tolist(), metric, level=0.05)
    assert {few.judge(x)["verdict"] for x in (-9.0, 0.0, 9.0)} == {"inconclusive"}
    assert few.judge(9.0 * sign)["p_value"] == pytest.approx(1 / 13)


@pytest.mark.parametrize("metric", ["latent_cos", "latent_mse"])
@pytest.mark.parametrize("n, level", [(12, 0.05), (19, 0.05), (24, 0.05), (38, 0.05), (39, 0.05), (41, 0.05),
                                      (99, 0.01), (100, 0.05), (9, 0.1), (30, 0.1)])
def test_the_flag_line_splits_what_judge_flags(metric, n, level):
    """Every score beyond the flag line (above, or below for latent_mse) is flagged and
    none at or short of it, ties among the controls included; None where the count of
    controls cannot reach the level."""
    import numpy as np

    controls = np.round(np.random.default_rng(n).normal(size=n), 1).tolist()
    cal = calibrate(controls, metric, level)
    line = cal.flag_line()
    if cal.min_p() > level:
        assert line is None
        return
    assert line in controls
    sign = 1.0 if metric == "latent_cos" else -1.0
    for s in sorted(set(controls)) + [line + 1e-9, line - 1e-9, -9.0, 9.0]:
        assert (cal.judge(s)["verdict"] == "fine-tuned on") == (sign * s > sign * line), s


def test_the_flag_line_by_hand():
    # 24 controls 0..23 at 0.05: only a score above all of them (p = 1/25) is flagged
    assert calibrate(list(range(24)), "latent_cos", 0.05).flag_line() == 23
    # 39 at 0.05: p = 2/40 = 0.05 with one control at least as extreme, the second highest
    assert calibrate(list(range(39)), "latent_cos", 0.05).flag_line() == 37
    # 41 at 0.05: p = 2/42 <= 0.05 with one control at least as extreme, so the second highest
    assert calibrate(list(range(41)), "latent_cos", 0.05).flag_line() == 39
    # lower is better: the line is the lowest control
    assert calibrate(list(range(24)), "latent_mse", 0.05).flag_line() == 0
    assert calibrate(list(range(12)), "latent_cos", 0.05).flag_line() is None
