"""v-prediction pairs beyond the inversion (docs/families.md, "Other features"): the
baselines (each model's loss against its own target, the noise a v output stands for, the
one-model recoveries), protection (the AdvDM loss against v, ``cgidm protect`` end to end)
and extraction (the guided v, the sampler against the plain loop, ``cgidm extract`` end to
end), all on closed-form denoisers or the tiny SD 2.x-v pair; the epsilon paths unchanged."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from cgidm import baselines as bl
from cgidm import cli, rng
from cgidm import guidance as G
from cgidm.reference import contrast_gradient, eps_from_v_ref, v_target_ref

SHAPE = (3, 4, 4)
COND = torch.zeros(1, 2, 5)
PROMPT = "a figure"


def _sched(**kw):
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                         prediction_type="v_prediction", **kw)


ABAR = _sched().alphas_cumprod.double()


def _coef(t):
    return ABAR[t].sqrt().float().view(-1, 1, 1, 1), (1 - ABAR[t]).sqrt().float().view(-1, 1, 1, 1)


def _net(seed=0):
    w = torch.randn(3, 3, 1, 1, generator=torch.Generator().manual_seed(seed))

    def fn(x_t, t, cond):
        return torch.tanh(torch.nn.functional.conv2d(x_t, w.to(x_t.dtype)))

    return fn


@pytest.fixture(scope="module")
def v_root(tmp_path_factory):
    from cgidm.testing.families import build_tiny_v_pair

    return build_tiny_v_pair(tmp_path_factory.mktemp("v"))


@pytest.fixture(scope="module")
def v_pair(v_root):
    from cgidm.models import load_pair

    return load_pair(*v_root)


# --------------------------------------------------------------------------- baselines


def test_loss_diff_compares_each_models_loss_against_v():
    f_ft, f_pre = _net(0), _net(1)
    keys = rng.image_keys(0, ["a", "b"])
    x0 = torch.randn(2, *SHAPE)
    got = bl.loss_diff(f_ft, f_pre, x0, keys, COND, COND, ABAR, 1, 999, draws=4, target=v_target_ref)
    sched = _sched()
    for b in range(2):
        t, n, _ = rng.counter_draws(keys[b:b + 1], bl.LOSS_DIFF_STEP, 4, SHAPE, 1, 999, False, "cpu")
        a, s = _coef(t)
        x_t = a * x0[b:b + 1] + s * n
        v = sched.get_velocity(x0[b:b + 1].expand_as(n), n, t)
        want = ((f_pre(x_t, t, COND) - v) ** 2).flatten(1).mean(1) - ((f_ft(x_t, t, COND) - v) ** 2).flatten(1).mean(1)
        assert got[b].item() == pytest.approx(want.mean().item(), rel=1e-5, abs=1e-7)
    # epsilon (target None) is the noise-target loss, as before
    eps = bl.loss_diff(f_ft, f_pre, x0, keys, COND, COND, ABAR, 1, 999, draws=4)
    assert not torch.allclose(eps, got)


def _point_mass(x_star):
    """The exact noise and v predictors of a point mass at ``x_star``."""
    def eps(x_t, t, cond):
        a, s = _coef(t)
        return (x_t - a * x_star) / s

    def v(x_t, t, cond):
        a, s = _coef(t)
        return a * eps(x_t, t, cond) - s * x_star

    return eps, v


def test_the_noise_a_v_output_stands_for():
    x_star = torch.randn(1, *SHAPE)
    eps, v = _point_mass(x_star)
    as_eps = bl.noise_prediction(v, ABAR, v_target_ref)
    t = torch.tensor([0, 200, 999])
    n = torch.randn(3, *SHAPE)
    a, s = _coef(t)
    x_t = a * x_star + s * n
    torch.testing.assert_close(as_eps(x_t, t, COND), n, rtol=1e-4, atol=1e-4)
    # the attacks on the v model give what they give on the noise model
    assert bl.secmi(as_eps, x_star, COND, ABAR).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(bl.pia(as_eps, x_star, COND, ABAR), bl.pia(eps, x_star, COND, ABAR), rtol=1e-3,
                               atol=1e-4)
    assert bl.noise_prediction(eps, ABAR, None) is eps  # epsilon: the model itself
    assert bl._null_fn(None, ABAR) is bl._zero_eps
    with pytest.raises(ValueError, match="no noise prediction"):
        bl.noise_prediction(v, ABAR, lambda z, n, a, s: n)


@pytest.mark.parametrize("paper", [False, True])
def test_one_model_recovery_follows_that_models_v_loss_alone(paper):
    f = _net(0)
    x0, x = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE)
    mask = (torch.rand(SHAPE) > 0.5).float()
    keys = rng.image_keys(0, ["a", "b"])
    t, noise, _ = rng.counter_draws(keys, 0, 1, SHAPE, 1, 999, False, "cpu")
    noise_pre = torch.randn_like(noise) if paper else None
    cond = COND.expand(2, -1, -1)
    _, grad = contrast_gradient(f, bl._null_fn(v_target_ref, ABAR), x0, x, mask, t, noise, noise_pre, ABAR, cond,
                                cond, scale=1.0, target=v_target_ref)
    xr = x.clone().requires_grad_(True)
    z = x0 * mask + xr * (1 - mask)
    a, s = _coef(t)
    l_ft = (f(a * z + s * noise, t, cond) - (a * noise - s * z)).pow(2).flatten(1).mean(1).sum()
    (want,) = torch.autograd.grad(l_ft, xr)
    torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_authenticate_with_every_baseline_on_a_v_pair(v_pair, tiny_world, tmp_path):
    from cgidm.api import authenticate
    from cgidm.config import BASELINE_FIELDS, preset_config
    from cgidm.manifest import collect_items

    imgs = tiny_world / "images"
    items = collect_items(None, imgs / "members", imgs / "holdouts")[::4]
    cfg = preset_config("demo", prompt=PROMPT, steps=2, batch_size=2, baselines="all")
    summary = authenticate(v_pair, items, tmp_path, cfg, progress=False, prefetch_depth=0)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == len(items)
    for r in rows:
        assert "baseline_errors" not in r, r["baseline_errors"]
        assert all(isinstance(r[f], float) and math.isfinite(r[f]) for f in BASELINE_FIELDS), r
    assert summary["models"]["family"].startswith("sd2 v_prediction")
    # the scores are the v-parametrised ones
    from cgidm.images import load_image_with_notes
    from cgidm.pipeline import prepare
    from cgidm.reference import unet_eps_fn

    x = torch.stack([load_image_with_notes(it.path, v_pair.resolution)[0] for it in items[:1]])
    prep = prepare(v_pair, x, [items[0].id], cfg)
    c_ft, c_pre = v_pair.encode_prompt(PROMPT)
    want = bl.loss_diff(unet_eps_fn(v_pair.unet_ft), unet_eps_fn(v_pair.unet_pre), prep.x0, prep.keys, c_ft, c_pre,
                        v_pair.abar, cfg.pgd.t_min, cfg.pgd.t_max, target=v_target_ref)
    row = next(r for r in rows if r["id"] == items[0].id)
    assert row["baseline_loss_diff"] == pytest.approx(want.item(), rel=1e-5, abs=1e-8)


# --------------------------------------------------------------------------- protection


def test_protect_loss_of_a_v_base_is_the_mse_against_v(v_root):
    from cgidm.protect_pgd import denoising_loss, load_base

    base = load_base(v_root[0])
    assert base.target is v_target_ref and base.info["family"].startswith("sd2 v_prediction")
    cond = base.encode_prompt(PROMPT)
    z = torch.randn(2, *base.latent_shape)
    t = torch.tensor([10, 500, 700, 990])
    n = torch.randn(4, *base.latent_shape)
    got = denoising_loss(base.unet, z, t, n, base.abar, cond, base.target)
    zk = z.repeat_interleave(2, dim=0)
    a, s = _coef(t)
    with torch.no_grad():
        out = base.unet(a * zk + s * n, t, encoder_hidden_states=cond.expand(4, -1, -1)).sample
    want = (out - _sched().get_velocity(zk, n, t)).pow(2).flatten(1).mean(1).view(2, 2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    eps = denoising_loss(base.unet, z, t, n, base.abar, cond)  # epsilon: against the noise, as before
    torch.testing.assert_close(eps, (out - n).pow(2).flatten(1).mean(1).view(2, 2), rtol=1e-5, atol=1e-7)


def test_cgidm_protect_runs_on_a_v_base(v_root, tiny_world, tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    for name in ("member_00.png", "member_01.png"):
        shutil.copy(tiny_world / "images" / "members" / name, folder)
    out = tmp_path / "out"
    rc = cli.main(["protect", "--base", str(v_root[0]), "--images", str(folder), "--out", str(out), "--steps", "8",
                   "--step-size", "2/255", "--eval-draws", "16", "--prompt", PROMPT, "--device", "cpu", "-q"])
    assert rc == cli.EXIT_OK
    summary = json.loads((out / "summary.json").read_text())
    assert summary["protected"] == 2 and summary["family"].startswith("sd2 v_prediction")
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    for r in rows:
        assert (out / r["protected"]).is_file() and r["skipped_steps"] == 0
        assert r["loss_protected"] > r["loss_clean"], r  # the v loss, over fixed draws, went up


# --------------------------------------------------------------------------- extraction


def test_guided_v_stands_for_the_guided_noise():
    t = torch.tensor([1, 300, 981])
    a, s = _coef(t)
    x_t, e_ft, e_pre = torch.randn(3, *SHAPE), torch.randn(3, *SHAPE), torch.randn(3, *SHAPE)
    v_ft, v_pre = (e_ft - s * x_t) / a, (e_pre - s * x_t) / a
    for w, k in ((3.0, -0.02), (5.0, 0.0), (0.0, 0.3), (1.0, -0.5)):
        got = G.guided_output(v_ft, v_pre, w, k, "v_prediction", x_t, ABAR[t])
        want = G.guided_eps(e_ft, e_pre, w, k)
        torch.testing.assert_close(eps_from_v_ref(got, x_t, a.view(-1), s.view(-1)), want, rtol=1e-4, atol=1e-4)
    # epsilon, and any k = 0: the plain combination, bit for bit
    assert torch.equal(G.guided_output(e_ft, e_pre, 3.0, -0.02), G.guided_eps(e_ft, e_pre, 3.0, -0.02))
    assert torch.equal(G.guided_output(v_ft, v_pre, 3.0, 0.0, "v_prediction"), G.guided_eps(v_ft, v_pre, 3.0, 0.0))
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        G.guided_output(v_ft, v_pre, 3.0, -0.02, "sample", x_t, ABAR[t])


def test_v_sampling_with_a_correction_equals_the_plain_loop(v_root, v_pair, monkeypatch):
    from cgidm import extract as X

    sched = G.load_scheduler(v_root[0])
    assert sched.config.prediction_type == "v_prediction"
    fn, _ = X.pair_pass(v_pair)
    c_ft, c_pre = v_pair.encode_prompt(PROMPT)
    keys, shape = G.sample_keys(0, range(3)), v_pair.latent_shape
    w, k, steps = 3.0, -0.3, 4
    got = G.sample(fn, c_ft, c_pre, sched, keys, shape, w, k, steps, batch_size=3)
    plain = G.sample_plain(v_pair.unet_ft, v_pair.unet_pre, c_ft, c_pre, G.load_scheduler(v_root[0]), keys, shape,
                           w, k, steps)
    tol = 2e-4 * float(plain.abs().max())
    torch.testing.assert_close(got, plain, rtol=0, atol=tol)
    # the correction taken on the v outputs as if they were noise would be another sampler
    monkeypatch.setattr(G, "guided_output", lambda o_ft, o_pre, w, k, *a: G.guided_eps(o_ft, o_pre, w, k))
    naive = G.sample(fn, c_ft, c_pre, sched, keys, shape, w, k, steps, batch_size=3)
    assert (naive - plain).abs().max() > 20 * tol


def test_cgidm_extract_runs_on_a_v_pair(v_root, tmp_path, capsys):
    out = tmp_path / "out"
    rc = cli.main(["extract", "--base", str(v_root[0]), "--finetuned", str(v_root[1]), "--out", str(out),
                   "--prompt", PROMPT, "--samples", "4", "--steps", "3", "--clusters", "2", "--batch-size", "2",
                   "--correction", "-0.02", "--device", "cpu", "-q"])
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "extract.json").read_text())
    assert s["scheduler"]["prediction_type"] == "v_prediction" and "v_prediction" in s["models"]["family"]
    assert s["finite_samples"] == 4 and (out / "candidates" / "candidate_00.png").is_file()
