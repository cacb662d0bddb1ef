"""Hand-checked cases of the paper's algorithm against cgidm.reference (the spec)."""
import math

import pytest
import torch

from cgidm.masks import block_mask
from cgidm.reference import (
    PGDConfig, draw_step, invert, pair_contrast_loss_ref, pair_noise_ref, pgd_update_ref,
    sample_timesteps,
)


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
    g = torch.Generator().manual_seed(0)
    t = sample_timesteps(50, 4, cfg, g).view(50, 4)
    assert t.min() >= 1 and t.max() <= 999
    for k in range(4):  # stratum k of [1, 999]
        lo, hi = 1 + math.floor(k * 999 / 4), 1 + math.floor((k + 1) * 999 / 4)
        assert ((t[:, k] >= lo) & (t[:, k] < hi)).all()
    t = sample_timesteps(3, 1, PGDConfig(noise="paper"), g)
    assert (t == t[0]).all()  # paper: one t for the step


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
    res = invert(eps_ft, eps_pre, x0, x_init, mask, cond, cond, abar, cfg, torch.Generator().manual_seed(7))

    t, n_ft, n_pre = draw_step(cfg, 1, x0.shape[1:], torch.Generator().manual_seed(7))
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
                 torch.linspace(0.99, 0.01, 1000, dtype=torch.float64), PGDConfig(steps=3),
                 torch.Generator().manual_seed(0))
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
        gens = [torch.Generator().manual_seed(100 + i) for i in idx]
        return invert(eps_ft, eps_pre, x0[idx], x_init[idx], mask, cond, cond, abar, cfg, gens).x_rec

    full = run([0, 1, 2])
    assert torch.equal(full, run([0, 1, 2]))
    assert torch.allclose(full[1:2], run([1]), atol=1e-6)
    assert not torch.allclose(full, x0 * mask + x_init * (1 - mask))  # it moved


def test_non_finite_loss_with_a_finite_gradient_is_skipped():
    mask = block_mask(8, 8, 2, 2, 2)
    x0 = torch.randn(2, 2, 8, 8)
    x_init = x0 * mask

    def ft(x, t, c):  # image 0's output is NaN but detached: its gradient stays finite
        out = 0.5 * x
        return torch.cat([out[:1] + (x[:1] * float("nan")).detach(), out[1:]])

    res = invert(ft, lambda x, t, c: 0.2 * x, x0, x_init, mask, torch.zeros(1, 3, 4), torch.zeros(1, 3, 4),
                 torch.linspace(0.99, 0.01, 1000, dtype=torch.float64), PGDConfig(steps=2),
                 torch.Generator().manual_seed(0))
    assert res.skipped_steps.tolist() == [2, 0]
    assert torch.equal(res.x_rec[0], (x0 * mask + x_init * (1 - mask))[0])
