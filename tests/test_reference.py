"""Hand-checked cases of the paper's algorithm against cgidm.reference (the spec)."""
import math

import pytest
import torch

from cgidm.masks import block_mask
from cgidm.reference import (
    PGDConfig, contrast_gradient, draw_step, invert, pair_contrast_loss_ref, pair_noise_ref, partial_representation,
    pgd_update_ref, quantize_8bit,
)
from cgidm.rng import image_key, image_keys


def paper_mask_64() -> torch.Tensor:
    """The official pattern written out cell by cell: 16×16 blocks of 4×4, top-left 2×2
    and bottom-right 2×2 of every block kept, on all 4 channels."""
    m = torch.zeros(4, 64, 64)
    for bi in range(16):
        for bj in range(16):
            for di in range(2):
                for dj in range(2):
                    m[:, 4 * bi + di, 4 * bj + dj] = 1
                    m[:, 4 * bi + 2 + di, 4 * bj + 2 + dj] = 1
    return m


def test_mask_is_the_papers_at_64():
    assert torch.equal(block_mask(64, 64, 4, 16, 2), paper_mask_64())


def test_mask_keeps_half_on_every_channel_and_odd_shapes_work():
    for c, h, w in ((4, 64, 64), (4, 40, 56), (3, 17, 23), (3, 16, 16)):
        m = block_mask(h, w, c, max(1, h // 4), 2) if h % 4 == 0 else block_mask(h, w, c, 4, 2)
        assert m.shape == (c, h, w)
        assert all(torch.equal(m[0], m[i]) for i in range(c))
        if h % 4 == 0 and w % 4 == 0:
            assert m.mean().item() == pytest.approx(0.5)
        assert 0.2 < m.mean().item() < 0.8


def test_mask_rejects_impossible_geometry():
    with pytest.raises(ValueError):
        block_mask(8, 8, 4, 8, 2)  # blocks of 1 cell cannot hold 2×2 kept cells


def _one_free(shape=(1, 1, 1, 2)):
    """A 1×2 latent whose both cells are free (mask 0)."""
    return torch.zeros(shape[1:])


def test_pgd_update_closed_form_step_and_projection():
    mask = _one_free()
    x0 = torch.zeros(1, 1, 1, 2)
    x_init = torch.zeros(1, 1, 1, 2)
    grad = torch.tensor([[[[3.0, 4.0]]]])
    delta, z = pgd_update_ref(torch.zeros(1, 1, 1, 2), grad, x0, x_init, mask, alpha=2.0, eps=70.0)
    # g/|g| = (0.6, 0.8); delta = -2 * (0.6, 0.8)
    assert torch.allclose(delta, torch.tensor([[[[-1.2, -1.6]]]]))
    assert torch.allclose(z, delta)
    delta, _ = pgd_update_ref(torch.zeros(1, 1, 1, 2), grad, x0, x_init, mask, alpha=2.0, eps=1.0)
    assert torch.allclose(delta, torch.tensor([[[[-0.6, -0.8]]]]))  # projected onto |delta| = 1


def test_pgd_update_clamps_x_init_plus_delta():
    mask = _one_free()
    x_init = torch.tensor([[[[99.5, -99.9]]]])
    grad = torch.tensor([[[[-1.0, 1.0]]]])  # steps +, - : push past the clamp
    delta, z = pgd_update_ref(torch.zeros(1, 1, 1, 2), grad, torch.zeros_like(x_init), x_init, mask,
                              alpha=2.0, eps=70.0)
    assert torch.allclose(x_init + delta, torch.tensor([[[[100.0, -100.0]]]]))
    assert torch.allclose(z, torch.tensor([[[[100.0, -100.0]]]]))


def test_pgd_update_ignores_kept_entries_and_keeps_x0_there():
    mask = torch.tensor([[[1.0, 0.0]]])
    x0 = torch.tensor([[[[5.0, 7.0]]]])
    grad = torch.tensor([[[[100.0, 1.0]]]])  # the kept entry's gradient must not count
    delta, z = pgd_update_ref(torch.zeros(1, 1, 1, 2), grad, x0, torch.zeros_like(x0), mask, alpha=1.0, eps=70.0)
    assert torch.allclose(delta, torch.tensor([[[[0.0, -1.0]]]]))
    assert torch.allclose(z, torch.tensor([[[[5.0, -1.0]]]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 0.0])
def test_pgd_update_bad_gradient_means_no_step(bad):
    mask = _one_free((2, 1, 1, 2))
    grad = torch.tensor([[[[bad, bad]]], [[[3.0, 4.0]]]])
    delta0 = torch.tensor([[[[0.5, 0.5]]], [[[0.0, 0.0]]]])
    delta, _ = pgd_update_ref(delta0, grad, torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), mask, 2.0, 70.0)
    assert torch.equal(delta[0], delta0[0])  # that image does not move
    assert torch.allclose(delta[1], torch.tensor([[[-1.2, -1.6]]]))  # the other one does
    # paper mode: one whole-tensor norm, so a non-finite entry stops the whole step
    delta, _ = pgd_update_ref(delta0, grad, torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2), mask, 2.0, 70.0,
                              per_sample=False)
    if math.isfinite(bad):
        assert torch.equal(delta[0], delta0[0]) and not torch.equal(delta[1], delta0[1])
    else:
        assert torch.equal(delta, delta0)


def test_pgd_update_paper_mode_normalises_over_the_whole_tensor():
    mask = _one_free((2, 1, 1, 2))
    grad = torch.tensor([[[[3.0, 0.0]]], [[[0.0, 4.0]]]])
    delta, _ = pgd_update_ref(torch.zeros(2, 1, 1, 2), grad, torch.zeros(2, 1, 1, 2), torch.zeros(2, 1, 1, 2),
                              mask, 1.0, 70.0, per_sample=False)
    assert torch.allclose(delta.flatten(), torch.tensor([-0.6, 0.0, 0.0, -0.8]))


def test_pair_noise_composes_and_noises_both_models():
    x0 = torch.full((1, 1, 1, 2), 2.0)
    x = torch.full((1, 1, 1, 2), -1.0)
    mask = torch.tensor([[[1.0, 0.0]]])
    n1, n2 = torch.ones(2, 1, 1, 2), torch.full((2, 1, 1, 2), 3.0)
    a, s = torch.tensor([0.5, 0.8]), torch.tensor([0.1, 0.2])
    z, x_t = pair_noise_ref(x0, x, mask, n1, n2, a, s)  # K = 2 timesteps for one image
    assert torch.equal(z, torch.tensor([[[[2.0, -1.0]]]]))
    assert torch.allclose(x_t[0, 0], torch.tensor([[[0.5 * 2 + 0.1, -0.5 + 0.1]]]))
    assert torch.allclose(x_t[1, 1], torch.tensor([[[0.8 * 2 + 0.6, -0.8 + 0.6]]]))
    _, x_t = pair_noise_ref(x0, x, mask, n1, None, a, s)
    assert torch.equal(x_t[0], x_t[1])


def test_pair_contrast_loss_value_and_gradient_seeds():
    eps_ft = torch.tensor([[[[1.0, 2.0]]]], requires_grad=True)
    eps_pre = torch.tensor([[[[0.0, 4.0]]]], requires_grad=True)
    n = torch.tensor([[[[1.0, 1.0]]]])
    loss = pair_contrast_loss_ref(eps_ft, eps_pre, n, None)
    assert loss.item() == pytest.approx((0 + 1) / 2 - (1 + 9) / 2)
    loss.sum().backward()
    assert torch.allclose(eps_ft.grad, 2 * (eps_ft - n).detach() / 2)
    assert torch.allclose(eps_pre.grad, -2 * (eps_pre - n).detach() / 2)


def test_timesteps_in_range_and_stratified():
    cfg = PGDConfig(k=4)
    keys = image_keys(0, [f"img{i}" for i in range(50)])
    t = draw_step(cfg, keys, 0, (1, 2, 2))[0].view(50, 4)
    assert t.min() >= 1 and t.max() <= 999
    for k in range(4):  # stratum k of [1, 999]
        lo, hi = 1 + math.floor(k * 999 / 4), 1 + math.floor((k + 1) * 999 / 4)
        assert ((t[:, k] >= lo) & (t[:, k] < hi)).all()
    t, n_ft, n_pre = draw_step(PGDConfig(noise="paper"), image_keys(0, [f"img{i}" for i in range(200)]), 3, (1, 2, 2))
    assert t.shape == (200,) and t.min() >= 1 and t.max() <= 999
    assert n_pre is not None and not torch.equal(n_ft, n_pre)  # paper: independent noise
    assert len(set(t.tolist())) > 1  # paper: one t per image, as a batch of one draws it


def _linear_models(a: float, b: float):
    return (lambda x, t, c: a * x), (lambda x, t, c: b * x)


@pytest.mark.parametrize("noise", ["shared", "paper"])
def test_one_pgd_step_on_a_toy_model_equals_the_closed_form(noise):
    """eps_ft(x) = a x, eps_pre(x) = b x: the contrast gradient is known in closed form."""
    a, b = 0.7, -0.3
    cfg = PGDConfig(steps=1, alpha=0.5, eps=70.0, noise=noise)
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(1, 2, 8, 8)
    x_init = x0 * mask + 0.3 * torch.randn(1, 2, 8, 8)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    eps_ft, eps_pre = _linear_models(a, b)
    cond = torch.zeros(1, 3, 4)
    res = invert(eps_ft, eps_pre, x0, x_init, mask, cond, cond, abar, cfg, keys=[7])

    t, n_ft, n_pre = draw_step(cfg, [7], 0, x0.shape[1:])
    n_pre = n_ft if n_pre is None else n_pre
    sa, sb = abar[t].sqrt().float(), (1 - abar[t]).sqrt().float()
    z = x0 * mask + x_init * (1 - mask)
    M = z.numel()
    xt_ft, xt_pre = sa * z + sb * n_ft, sa * z + sb * n_pre
    d_xt_ft = 2 * a * (a * xt_ft - n_ft) / M
    d_xt_pre = -2 * b * (b * xt_pre - n_pre) / M
    grad = (d_xt_ft + d_xt_pre) * sa * (1 - mask)
    step = -cfg.alpha * grad / grad.norm()
    expected = x0 * mask + (x_init + step) * (1 - mask)
    assert torch.allclose(res.x_rec, expected, atol=1e-6)
    assert res.skipped_steps.tolist() == [0]


def test_nan_model_output_skips_every_step_and_is_counted():
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(2, 2, 8, 8)
    x_init = x0 * mask
    nan_model = lambda x, t, c: x * float("nan")  # noqa: E731
    ok_model = lambda x, t, c: 0.5 * x  # noqa: E731
    res = invert(nan_model, ok_model, x0, x_init, mask, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4),
                 torch.linspace(0.99, 0.01, 1000, dtype=torch.float64), PGDConfig(steps=3), keys=[0, 1])
    assert torch.equal(res.x_rec, x0 * mask + x_init * (1 - mask))
    assert res.skipped_steps.tolist() == [3, 3]


def test_same_seed_same_result_and_batching_does_not_change_an_image():
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(3, 2, 8, 8)
    x_init = x0 * mask
    eps_ft, eps_pre = (lambda x, t, c: torch.tanh(x) * 0.9), (lambda x, t, c: torch.sin(x))
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    cond = torch.zeros(1, 3, 4)
    cfg = PGDConfig(steps=5, alpha=0.3, eps=2.0, k=2)

    def run(idx):
        return invert(eps_ft, eps_pre, x0[idx], x_init[idx], mask, cond, cond, abar, cfg, [100 + i for i in idx]).x_rec

    full = run([0, 1, 2])
    assert torch.equal(full, run([0, 1, 2]))
    assert torch.equal(full[1:2], run([1]))
    assert not torch.allclose(full, x0 * mask + x_init * (1 - mask))  # it moved


def test_non_finite_loss_with_a_finite_gradient_is_skipped():
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(2, 2, 8, 8)
    x_init = x0 * mask

    def ft(x, t, c):  # image 0's output is NaN but detached: its gradient stays finite
        out = 0.5 * x
        return torch.cat([out[:1] + (x[:1] * float("nan")).detach(), out[1:]])

    res = invert(ft, lambda x, t, c: 0.2 * x, x0, x_init, mask, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4),
                 torch.linspace(0.99, 0.01, 1000, dtype=torch.float64), PGDConfig(steps=2), keys=[0, 1])
    assert res.skipped_steps.tolist() == [2, 0]
    assert torch.equal(res.x_rec[0], (x0 * mask + x_init * (1 - mask))[0])


# --------------------------------------------------------------------------- paper mode, one image at a time

ABAR = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)


def _nonlinear_models():
    """Elementwise models: a batch changes no arithmetic of a row, so results are exact.
    The fine-tuned one returns NaN where its input exceeds 50 (a poisoned image)."""

    def ft(x, t, c):
        out = torch.tanh(x) * 0.9 + 1e-3 * t.view(-1, 1, 1, 1)
        return torch.where(x.abs() > 50, torch.full_like(out, float("nan")), out)

    return ft, (lambda x, t, c: torch.sin(x))


def _official_loop(eps_ft, eps_pre, x0, x_init, mask, cond, cfg, key):
    """The PGD step (docs/faithfulness.md) written as the official code runs it, batch 1:
    ``delta`` is the leaf, the loss is one scalar ``MSE(eps_ft, n) - MSE(eps_pre, n')``, the
    gradient of ``delta`` is normalised over the whole tensor (NaN -> 0), then clamp and
    whole-tensor projection.
    Returns the recovered latent and the first step's gradient of ``delta``."""
    delta = torch.zeros_like(x0)
    first = None
    for step in range(cfg.steps):
        t, n, n_pre = draw_step(cfg, [key], step, x0.shape[1:])
        delta.requires_grad_(True)
        z = x0 * mask + (x_init + delta) * (1 - mask)
        a, s = ABAR[t].sqrt().float().view(-1, 1, 1, 1), (1 - ABAR[t]).sqrt().float().view(-1, 1, 1, 1)
        loss = torch.nn.functional.mse_loss(eps_ft(a * z + s * n, t, cond), n) - torch.nn.functional.mse_loss(
            eps_pre(a * z + s * n_pre, t, cond), n_pre)
        (g,) = torch.autograd.grad(loss, delta)
        first = g if first is None else first
        with torch.no_grad():
            g = torch.nan_to_num(g / g.norm(), nan=0.0)
            delta = delta - cfg.alpha * g
            delta = (x_init + delta).clamp(cfg.clamp_min, cfg.clamp_max) - x_init
            if delta.norm() > cfg.eps:
                delta = delta * cfg.eps / delta.norm()
    x_rec = x0 * mask + (x_init + delta).clamp(cfg.clamp_min, cfg.clamp_max) * (1 - mask)
    return x_rec, first


def test_free_entry_norm_equals_the_official_whole_tensor_norm_of_the_delta_gradient():
    """The official code normalises d loss / d delta over the whole tensor; the compose
    gives the kept entries exactly 0 there, so its norm is our norm over the free entries."""
    cfg = PGDConfig(steps=1, noise="paper")
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(1, 2, 8, 8)
    x_init = x0 * mask + 0.3 * torch.randn(1, 2, 8, 8)
    eps_ft, eps_pre = _nonlinear_models()
    cond = torch.zeros(1, 3, 4)
    _, g_official = _official_loop(eps_ft, eps_pre, x0, x_init, mask, cond, cfg, 5)
    assert torch.equal(g_official * mask, torch.zeros_like(g_official))  # kept entries: exactly 0
    t, n, n_pre = draw_step(cfg, [5], 0, x0.shape[1:])
    _, grad = contrast_gradient(eps_ft, eps_pre, x0, x_init, mask, t, n, n_pre, ABAR, cond, cond, scale=1.0)
    torch.testing.assert_close(grad, g_official, rtol=1e-6, atol=0)
    free_norm = (grad * (1 - mask)).norm()
    assert free_norm.item() == pytest.approx(g_official.norm().item(), rel=1e-6)
    # hand-checked: the step pgd_update takes is -alpha * g / |g| on the free entries
    delta, _ = pgd_update_ref(torch.zeros_like(x0), grad, x0, x_init, mask, 2.0, 70.0)
    torch.testing.assert_close(delta, -2.0 * g_official / g_official.norm(), rtol=1e-5, atol=1e-7)


def test_paper_mode_at_batch_1_is_the_official_loop():
    cfg = PGDConfig(steps=4, alpha=1.0, eps=1.2, noise="paper")  # eps small: the projection acts
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(1, 2, 8, 8)
    x_init = x0 * mask + 0.3 * torch.randn(1, 2, 8, 8)
    eps_ft, eps_pre = _nonlinear_models()
    cond = torch.zeros(1, 3, 4)
    want, _ = _official_loop(eps_ft, eps_pre, x0, x_init, mask, cond, cfg, 9)
    got = invert(eps_ft, eps_pre, x0, x_init, mask, cond, cond, ABAR, cfg, keys=[9])
    torch.testing.assert_close(got.x_rec, want, rtol=1e-5, atol=1e-6)
    assert got.delta.norm().item() == pytest.approx(1.2, rel=1e-5)


@pytest.mark.parametrize("noise,k", [("paper", 1), ("shared", 1), ("shared", 3)])
def test_a_batch_of_3_equals_3_runs_of_1_exactly(noise, k):
    """Every image its own t, noise, norm, projection and skip: with elementwise models
    (no batched arithmetic) the results are bit-for-bit those of batch-1 runs. One image
    whose model output is NaN skips its own steps only."""
    cfg = PGDConfig(steps=4, alpha=0.3, eps=1.0, noise=noise, k=k)
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(3, 2, 8, 8)
    x_init = x0 * mask + 0.3 * torch.randn(3, 2, 8, 8)
    x0[1, 0, 0, 0] = 1000.0  # a kept entry of image 1: its model output is NaN every step
    eps_ft, eps_pre = _nonlinear_models()
    cond = torch.zeros(1, 3, 4)

    def run(idx):
        keys = [image_key(11, f"img{i}") for i in idx]
        return invert(eps_ft, eps_pre, x0[idx], x_init[idx], mask, cond, cond, ABAR, cfg, keys)

    full = run([0, 1, 2])
    assert full.skipped_steps.tolist() == [0, 4, 0]
    for i in range(3):
        one = run([i])
        assert torch.equal(full.delta[i], one.delta[0]), i
        assert torch.equal(full.skipped_steps[i], one.skipped_steps[0])
    assert not torch.equal(full.delta[0], torch.zeros_like(full.delta[0]))  # it moved
    assert torch.equal(full.delta[1], torch.zeros_like(full.delta[1]))  # the bad one did not


@pytest.mark.parametrize("noise", ["paper", "shared"])
def test_history_is_the_mean_over_images_of_each_images_loss(noise):
    cfg = PGDConfig(steps=2, alpha=0.3, eps=1.0, noise=noise)
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(2, 2, 8, 8)
    eps_ft, eps_pre = _nonlinear_models()
    cond = torch.zeros(1, 3, 4)
    seen = []

    def run(idx, cb=None):
        return invert(eps_ft, eps_pre, x0[idx], x0[idx] * mask, mask, cond, cond, ABAR, cfg, [100 + i for i in idx],
                      callback=cb)

    both = run([0, 1], cb=lambda step, v: seen.append((step, v)))
    ones = [run([i], cb=lambda step, v: None).loss_history for i in range(2)]
    assert [s for s, _ in seen] == [0, 1]
    assert both.loss_history == pytest.approx([(a + b) / 2 for a, b in zip(*ones)], rel=1e-6)


# --------------------------------------------------------------------------- partial representation


class _WideCodec:
    """A codec whose decode leaves [-1, 1] and lands between 8-bit levels; encode records
    what it was given (the official code encodes the saved 8-bit image)."""

    def __init__(self):
        self.encoded = None

    def decode(self, latents):
        return 1.7 * latents.repeat(1, 3, 1, 1)[:, :3] + 0.0013

    def encode(self, images, generator=None):
        self.encoded = images.clone()
        return images[:, :1] * 0.5


def test_partial_representation_encodes_the_8_bit_image():
    codec = _WideCodec()
    x0 = torch.linspace(-1.5, 1.5, 2 * 1 * 6 * 6).view(2, 1, 6, 6)
    mask = (torch.arange(36).view(1, 6, 6) % 3 == 0).float()
    x_init, partial = partial_representation(codec, x0, mask)
    raw = codec.decode(x0 * mask)
    assert raw.max() > 1 and raw.min() < -1  # the decode leaves [-1, 1] ...
    levels = (raw / 2 + 0.5) * 255
    assert (levels - levels.round()).abs().max() > 0.1  # ... and falls between 8-bit levels
    assert torch.equal(codec.encoded, partial)  # what was encoded is the evidence returned
    assert partial.min() == -1 and partial.max() == 1  # clamped
    u8 = (partial + 1) / 2 * 255
    torch.testing.assert_close(u8, u8.round(), rtol=0, atol=1e-4)  # 256 levels
    # hand-checked pixels: 0.0013 -> 127.67 -> 128; 1.7*0.5+0.0013 -> 236.04 -> 236
    assert u8[0, 0, 0, 1].round().item() == 128  # a masked-out cell: decode(0) = 0.0013
    px = torch.tensor([[[[0.0013, 1.7 * 0.5 + 0.0013, 5.0, -5.0]]]])
    assert ((quantize_8bit(px) + 1) / 2 * 255).round().flatten().tolist() == [128, 236, 255, 0]
    torch.testing.assert_close(x_init, partial[:, :1] * 0.5)


def test_quantize_8bit_is_idempotent_and_within_half_a_level():
    x = torch.rand(1, 3, 5, 7) * 2 - 1
    q = quantize_8bit(x.half())
    assert q.dtype == torch.float32
    assert torch.equal(quantize_8bit(q), q)
    assert (q - x).abs().max() <= 1 / 255 + 1e-3  # half a level is 1/255 in [-1, 1]


# --------------------------------------------------------------------------- counter-based draws


@pytest.mark.parametrize("noise,k", [("paper", 1), ("shared", 1), ("shared", 3)])
def test_same_key_and_step_same_draws_at_any_batch_position(noise, k):
    cfg = PGDConfig(noise=noise, k=k)
    a, b, c = image_keys(4, ["a", "b", "c"]).tolist()
    shape = (3, 5, 7)
    t3, n3, p3 = draw_step(cfg, [a, b, c], 17, shape)
    t2, n2, p2 = draw_step(cfg, torch.tensor([c, a]), torch.tensor(17), shape)
    for got, want in ((t2, t3), (n2, n3)) + (((p2, p3),) if noise == "paper" else ()):
        assert torch.equal(got[:k], want[2 * k:]) and torch.equal(got[k:], want[:k])
    assert (p3 is None) == (noise == "shared")
    t_next, n_next, _ = draw_step(cfg, [a, b, c], 18, shape)
    assert not torch.equal(n_next, n3)  # the step is part of the counter
    _, n_seed, _ = draw_step(cfg, [image_key(5, "a")], 17, shape)
    assert not torch.equal(n_seed, n3[:k])  # and the run seed is part of the key


def test_invert_refuses_generators_and_missing_keys():
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(2, 2, 8, 8)
    args = (lambda x, t, c: x, lambda x, t, c: 0.5 * x, x0, x0, mask, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4),
            ABAR, PGDConfig(steps=1))
    with pytest.raises(TypeError, match="image_keys"):
        invert(*args, [torch.Generator(), torch.Generator()])
    with pytest.raises(TypeError, match="image_keys"):
        invert(*args, generator=torch.Generator())
    with pytest.raises(ValueError, match="one key per image"):
        invert(*args)
    with pytest.raises(ValueError, match="one per image"):
        invert(*args, [1, 2, 3])
    from cgidm.config import AuthConfig

    with pytest.raises(TypeError, match=r"cfg must be a PGDConfig, got AuthConfig \(pass its .pgd\)"):
        invert(*args[:-1], AuthConfig(prompt="p"), keys=[1, 2])


def test_radius_and_clamp_hold_over_a_whole_inversion():
    """Every step projects: after any number of steps each image's delta is inside its
    ball and x_init + delta inside the clamp, for steps far larger than the radius."""
    torch.manual_seed(3)
    b, shape = 3, (3, 8, 8)
    x0 = torch.randn(b, *shape) * 3
    x_init = (torch.randn(b, *shape) * 3).clamp(-4, 4)
    mask = torch.zeros(shape)
    mask[:, ::2] = 1
    cond = torch.zeros(1, 2, 4)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    w = torch.randn(*shape)

    def eps_ft(x_t, t, c):
        return torch.tanh(x_t * w) + 0.1 * x_t

    def eps_pre(x_t, t, c):
        return 0.5 * x_t

    seen = []
    for eps, alpha in ((3.0, 2.0), (0.5, 5.0)):
        cfg = PGDConfig(steps=25, alpha=alpha, eps=eps, clamp_min=-4.0, clamp_max=4.0)
        res = invert(eps_ft, eps_pre, x0, x_init, mask, cond, cond, abar, cfg, keys=[1, 2, 3])
        norms = res.delta.flatten(1).norm(dim=1)
        assert (norms <= eps * (1 + 1e-5)).all(), norms
        z = x_init + res.delta
        assert z.min() >= -4.0 - 1e-5 and z.max() <= 4.0 + 1e-5
        assert torch.equal(res.delta * mask, torch.zeros_like(res.delta)), "kept entries never move"
        seen.append(norms)
    assert (seen[1] > 0.49).all(), "a large step saturates the small ball"
