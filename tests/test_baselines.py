"""Baselines beside CGI-DM (cgidm/baselines.py): the option, each score against a hand
computation on closed-form denoisers, batch invariance, fault isolation, and one run on the
tiny world through the batch loop."""
import json
import math

import pytest
import torch

from cgidm import baselines as bl
from cgidm import cli, rng
from cgidm.config import BASELINE_FIELDS, BASELINES, AuthConfig, parse_baselines, preset_config
from cgidm.reference import contrast_gradient

SHAPE = (3, 4, 4)
# SD's schedule: scaled-linear betas 0.00085 -> 0.012 over 1000 steps
ABAR = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
COND = torch.zeros(1, 2, 5)


# --------------------------------------------------------------------------- the option


@pytest.mark.parametrize("value, names", [
    (None, ()), ("", ()), ("none", ()), ("all", BASELINES), ("ALL", BASELINES),
    ("secmi, pia", ("pia", "secmi")), (["masked", "loss_diff"], ("loss_diff", "masked")),
    ("all,pia", BASELINES),
])
def test_parse_baselines(value, names):
    assert parse_baselines(value) == names
    cfg = AuthConfig(baselines=value)
    assert cfg.baseline_names == names
    assert cfg.baselines == (",".join(names) or None)


def test_unknown_baseline_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="unknown lira.*loss_diff"):
        AuthConfig(baselines="pia,lira")


def test_the_cli_offers_baselines_from_the_config():
    base = ["authenticate", "--base", "b", "--finetuned", "f", "--images", "i", "--out", "o"]
    args = cli.build_parser().parse_args(base + ["--baselines", "secmi,pia"])
    assert cli.config_from_args(args).baseline_names == ("pia", "secmi")
    assert cli.config_from_args(cli.build_parser().parse_args(base)).baselines is None
    screen = cli.build_parser().parse_args(["screen", "--manifest", "m", "--out", "o", "--baselines", "all"])
    assert cli.config_from_args(screen).baseline_names == BASELINES


# --------------------------------------------------------------------------- closed forms


def _identity_eps(x_t, t, cond):
    return x_t


def test_pia_by_hand():
    # eps(x, t) = x: eps0 = x0, x_t = (a + s) x0, eps_t = (a + s) x0, so R = |1 - a - s| ||x0||_4
    x0 = torch.randn(2, *SHAPE)
    got = bl.pia(_identity_eps, x0, COND, ABAR, t=200, p=4)
    a, s = math.sqrt(ABAR[200]), math.sqrt(1 - ABAR[200])
    want = [abs(1 - a - s) * float(x0[b].double().pow(4).sum() ** 0.25) for b in range(2)]
    assert got.tolist() == pytest.approx(want, rel=1e-5)


def test_secmi_by_hand():
    # eps(x, t) = x makes every DDIM step a scalar multiple m(s, s') of x:
    # f = x (1 - sqrt(1 - a_s)) / sqrt(a_s), x' = sqrt(a_s') f + sqrt(1 - a_s') x
    def m(s, s_to):
        a, a_to = float(ABAR[s]), float(ABAR[s_to])
        return math.sqrt(a_to) * (1 - math.sqrt(1 - a)) / math.sqrt(a) + math.sqrt(1 - a_to)

    x0 = torch.randn(2, *SHAPE)
    scale = 1.0
    for s in range(0, 90, 10):  # x~_90 from x0 by steps 0 -> 10 -> ... -> 90
        scale *= m(s, s + 10)
    round_trip = m(90, 100) * m(100, 90)
    want = [(scale * (1 - round_trip)) ** 2 * float(x0[b].double().pow(2).sum()) for b in range(2)]
    got = bl.secmi(_identity_eps, x0, COND, ABAR, t_sec=100, interval=10)
    # the t-error is a difference of near-equal fp32 latents (here 1 - round_trip ~ 1e-3)
    assert got.tolist() == pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError):
        bl.secmi(_identity_eps, x0, COND, ABAR, t_sec=10, interval=10)


def test_secmi_is_zero_for_a_denoiser_that_knows_its_one_image():
    # the exact noise predictor of a point mass at x*: every DDIM step is exact, the round trip too
    x_star = torch.randn(1, *SHAPE)

    def eps(x_t, t, cond):
        a = ABAR[t].float().view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * x_star) / (1 - a).sqrt()

    assert bl.secmi(eps, x_star, COND, ABAR).item() == pytest.approx(0.0, abs=1e-6)
    assert bl.pia(eps, x_star, COND, ABAR).item() > 0  # PIA's eps(x0, 0) is not this noise


def test_loss_diff_by_hand_and_per_image():
    # x0 = 0: x_t = sqrt(1 - abar_t) n, so eps_ft = x_t / sqrt(1 - abar_t) is the noise itself
    # (L_ft = 0) and eps_pre = 0 has L_pre = mean(n^2): the score is mean_k mean(n_k^2) of the
    # image's own draws, keyed by its key on the reserved counter
    def eps_ft(x_t, t, cond):
        return x_t / (1 - ABAR[t]).sqrt().float().view(-1, 1, 1, 1)

    keys = rng.image_keys(0, ["a", "b", "c"])
    x0 = torch.zeros(3, *SHAPE)
    got = bl.loss_diff(eps_ft, bl._zero_eps, x0, keys, COND, COND, ABAR, 1, 999, draws=5)
    for b in range(3):
        _, n, _ = rng.counter_draws(keys[b:b + 1], bl.LOSS_DIFF_STEP, 5, SHAPE, 1, 999, False, "cpu")
        assert got[b].item() == pytest.approx(n.pow(2).flatten(1).mean(1).mean().item(), rel=1e-5)
    # batch-invariant: one image alone gives what it gives in the batch
    alone = bl.loss_diff(eps_ft, bl._zero_eps, x0[1:2], keys[1:2], COND, COND, ABAR, 1, 999, draws=5)
    assert alone.item() == got[1].item()
    assert len(set(got.tolist())) == 3
    same = bl.loss_diff(eps_ft, eps_ft, torch.randn(3, *SHAPE), keys, COND, COND, ABAR, 1, 999, draws=5)
    assert same.abs().max().item() == 0.0


def test_one_model_recovery_follows_that_models_loss_alone():
    # the inversion's contrast with a constant second model has exactly the gradient of L_ft
    w = torch.randn(3, 3, 1, 1)

    def eps(x_t, t, cond):
        return torch.tanh(torch.nn.functional.conv2d(x_t, w.to(x_t.dtype)))

    x0, x = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    mask = (torch.rand(SHAPE) > 0.5).float()
    t, noise, _ = rng.counter_draws(rng.image_keys(0, ["a", "b"]), 0, 1, SHAPE, 1, 999, False, "cpu")
    cond = COND.expand(2, -1, -1)
    _, grad = contrast_gradient(eps, bl._zero_eps, x0, x, mask, t, noise, None, ABAR, cond, cond, scale=1.0)
    xr = x.clone().requires_grad_(True)
    z = x0 * mask + xr * (1 - mask)
    a = ABAR[t].sqrt().float().view(-1, 1, 1, 1)
    s = (1 - ABAR[t]).sqrt().float().view(-1, 1, 1, 1)
    l_ft = (eps(a * z + s * noise, t, cond) - noise).pow(2).flatten(1).mean(1).sum()
    (want,) = torch.autograd.grad(l_ft, xr)
    torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


def test_masked_by_hand():
    class Prep:
        x0 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
        x_init = torch.tensor([[[[9.0, 0.0], [-3.0, 9.0]]]])
        mask = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])

    # removed entries (mask 0): x0 -> (2, 3), x_init -> (0, -3): cosine -9 / (sqrt(13) * 3)
    assert bl.masked(Prep).item() == pytest.approx(-9 / (math.sqrt(13) * 3), rel=1e-6)


# --------------------------------------------------------------------------- on the tiny world


@pytest.fixture(scope="module")
def pair_and_items(tiny_world):
    from cgidm.manifest import collect_items
    from cgidm.models import load_pair

    imgs = tiny_world / "images"
    items = collect_items(None, imgs / "members", imgs / "holdouts", imgs / "controls")
    pick = [it for it in items if it.label == "member"][:3] + [it for it in items if it.label == "holdout"][:3]
    pick += [it for it in items if it.label == "control"][:3]
    return load_pair(tiny_world / "base", tiny_world / "finetuned"), pick


def _cfg(**kw):
    from cgidm.testing.tiny import INSTANCE_PROMPT

    return preset_config("demo", prompt=INSTANCE_PROMPT, steps=2, **kw)


def _prep(pair, items, cfg):
    from cgidm.images import load_image_with_notes
    from cgidm.pipeline import prepare

    x = torch.stack([load_image_with_notes(it.path, pair.resolution)[0] for it in items])
    return prepare(pair, x, [it.id for it in items], cfg)


def test_scores_do_not_depend_on_the_batch(pair_and_items):
    pair, items = pair_and_items
    cfg = _cfg(baselines="all")
    batch = bl.score_batch(pair, _prep(pair, items[:3], cfg), cfg)
    alone = bl.score_batch(pair, _prep(pair, items[1:2], cfg), cfg)[items[1].id]
    assert set(alone) == set(BASELINE_FIELDS)
    for f, v in alone.items():
        assert isinstance(v, float) and math.isfinite(v), f
        if f in ("baseline_ft_only", "baseline_pre_only"):  # the UNet runs on the batch there
            assert batch[items[1].id][f] == pytest.approx(v, abs=1e-5)
        else:
            assert batch[items[1].id][f] == v, f


def test_a_failing_baseline_costs_only_its_column(pair_and_items, monkeypatch):
    pair, items = pair_and_items
    cfg = _cfg(baselines="pia,masked")
    prep = _prep(pair, items[:2], cfg)

    def broken(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(bl, "pia", broken)
    timings = {}
    rows = bl.score_batch(pair, prep, cfg, timings=timings)
    for r in rows.values():
        assert r["baseline_pia"] is None and r["baseline_errors"] == {"pia": "RuntimeError: boom"}
        assert isinstance(r["baseline_masked"], float)
    assert set(timings) == {"pia", "masked"}

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(bl, "pia", oom)
    with pytest.raises(RuntimeError, match="out of memory"):  # the batch loop halves the batch
        bl.score_batch(pair, prep, cfg)


def test_authenticate_writes_baselines_beside_cgidm(pair_and_items, tmp_path):
    from cgidm.api import authenticate

    pair, items = pair_and_items
    summary = authenticate(pair, items, tmp_path, _cfg(baselines="all", batch_size=4), progress=False,
                           prefetch_depth=0)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(isinstance(r[f], float) for r in rows for f in BASELINE_FIELDS)
    bm = summary["by_metric"]
    assert set(BASELINE_FIELDS) <= set(bm)
    # members come back for the fine-tune and not for the base: the loss difference and PIA
    # separate the tiny world's 3 members from its 3 hold-outs
    assert bm["baseline_loss_diff"]["auc"] == 1.0 and bm["baseline_pia"]["auc"] == 1.0
    # the set verdict tests the 3 members (the 3 hold-outs are known clean) against the controls
    sv = summary["set_verdict"]
    assert (sv["n_suspect"], sv["n_controls"], sv["holdouts_left_out"]) == (3, 3, 3)
    assert summary["config"]["baselines"] == ",".join(BASELINES)
    html = (tmp_path / "report.html").read_text()
    assert "CGI-DM (latent_cos)" in html and "<td>secmi</td>" in html
    # default: no baseline, no column
    plain = authenticate(pair, items[:2], tmp_path / "plain", _cfg(), progress=False, prefetch_depth=0)
    assert not any(k.startswith("baseline_") for k in plain["by_metric"])
