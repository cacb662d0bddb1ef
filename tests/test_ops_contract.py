"""The ops' contract at its edges, as a researcher calling them directly meets it: one
input on ``meta`` among real ones is refused (not answered with uninitialised memory);
every implementation hands back contiguous outputs, as the fake kernels say (else
``torch.compile`` and ``opcheck`` break); the PGD steps refuse a backward instead of giving
no gradient with one kernel and a gradient with another; the reference L2 step takes
``[B, ...]`` of any rank, as the compiled kernels do; the reference ``pair_noise`` does its
math in fp32; an empty batch gives empty outputs. And the runners above them: ``invert``,
``Engine`` and ``prepare`` name a mistake (an empty batch, a mask in another layout, a
``t_max`` past the schedule, images not in [-1, 1] at the pair's size) where they used to
fail deep inside or answer wrong, and ``Engine`` runs any module ``invert`` runs."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_ops import abar_schedule, maybe_strided, pair_noise_inputs, pgd_inputs  # noqa: E402

from cgidm import ops as cgidm_ops  # noqa: E402
from cgidm import reference, rng  # noqa: E402
from cgidm.config import PGDConfig  # noqa: E402
from cgidm.engine import Engine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 5, 7)


def op_calls():
    """``(name, op, args)``: one call of each op on small contiguous CPU inputs."""
    x0, x, mask, nft, npre, sa, sb = pair_noise_inputs(SHAPE, 2, 2, torch.float32, False)
    delta, grad, px0, xi, pmask = pgd_inputs(SHAPE, 2, torch.float32)
    ops = torch.ops.cgidm
    return [
        ("pair_noise", ops.pair_noise.default, [x0, x, mask, nft, npre, sa, sb]),
        ("pair_contrast_loss", ops.pair_contrast_loss.default, [nft, nft * 0.5, nft.flip(0), npre]),
        ("pgd_update", ops.pgd_update.default, [delta, grad, px0, xi, pmask, 2.0, 70.0, -100.0, 100.0, True]),
        ("linf_update", ops.linf_update.default, [delta, grad, px0, 0.01, 0.03, -1.0, 1.0]),
    ]


@pytest.mark.parametrize("which", range(4))
def test_one_input_on_meta_among_real_ones_is_refused(which):
    name, op, args = op_calls()[which]
    tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
    for i in tensors[1:]:  # the first decides where the outputs go: any other one on meta
        bad = list(args)
        bad[i] = bad[i].to("meta")
        with pytest.raises(RuntimeError, match="one device"):
            op(*bad)
    all_meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    assert all(o.device.type == "meta" for o in op(*all_meta)), name  # all on meta: shapes only, as before
    keys = torch.arange(3)
    t, noise = torch.ops.cgidm.draw_noise(keys.to("meta"), torch.tensor(4), 2, list(SHAPE), 1, 999, False)
    assert noise.shape == (1, 6, *SHAPE) and noise.device.type == "meta"  # a 0-d CPU step may come along


def strided_cases():
    """Each op on channels-last and transposed inputs, and draw_noise where C*H*W is odd."""
    cases = []
    for layout in ("channels_last", "transposed"):
        def lay(t):
            if t is None or t.dim() != 4:
                return t
            return maybe_strided(t, False) if layout == "channels_last" else t.transpose(2, 3).contiguous().transpose(2, 3)

        x0, x, mask, nft, npre, sa, sb = pair_noise_inputs(SHAPE, 2, 2, torch.float32, False)
        delta, grad, px0, xi, pmask = pgd_inputs(SHAPE, 2, torch.float32)
        ops = torch.ops.cgidm
        cases += [
            (ops.pair_noise.default, (lay(x0), lay(x.requires_grad_(True)), mask, lay(nft), lay(npre), sa, sb)),
            (ops.pair_noise.default, (lay(x0), lay(x), mask, lay(nft), None, sa, sb)),
            (ops.pair_contrast_loss.default, (lay(nft).requires_grad_(True), lay(npre), lay(nft * 2), None)),
            (ops.pgd_update.default, (lay(delta), lay(grad), lay(px0), lay(xi), pmask, 2.0, 70.0, -100.0, 100.0, True)),
            (ops.linf_update.default, (lay(delta), lay(grad), lay(px0), 0.01, 0.03, -1.0, 1.0)),
        ]
    cases.append((torch.ops.cgidm.draw_noise.default, (torch.arange(3), torch.tensor(5), 2, list(SHAPE), 1, 999, False)))
    return cases


def test_opcheck_on_strided_inputs_with_the_extension():
    if not cgidm_ops.has_cpp():
        pytest.skip("extension not built")
    for op, args in strided_cases():
        torch.library.opcheck(op, args)


def test_the_default_kernels_give_the_fakes_strides():
    """Without the extension (an install with CGIDM_BUILD_EXT=0) the plain-torch kernels
    serve every call: their outputs must be laid out as the fake kernels promise."""
    script = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["cgidm._C"] = None
        warnings.simplefilter("ignore")
        sys.path.insert(0, "tests")
        import torch
        from cgidm import ops
        assert not ops.has_cpp()
        from test_ops_contract import strided_cases
        for op, args in strided_cases():
            torch.library.opcheck(op, args)
            for out in op(*args):
                assert out.is_contiguous(), (op, out.stride())
        print("OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout + proc.stderr


@pytest.mark.parametrize("shape", [(2, 3, 4, 4, 5), (2, 6), (1, 7)])
@pytest.mark.parametrize("per_sample", [True, False])
def test_the_reference_l2_step_takes_any_rank(shape, per_sample):
    torch.manual_seed(0)
    delta = torch.zeros(shape)
    grad = torch.randn(shape)
    x0 = torch.randn(shape)
    mask = torch.zeros(shape[1:])
    alpha, eps = 2.0, 70.0
    new, z = reference.pgd_update_ref(delta, grad, x0, x0, mask, alpha, eps, -100.0, 100.0, per_sample)
    assert new.shape == z.shape == shape
    # by hand: one step from zero moves by alpha along the normalised gradient
    norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (len(shape) - 1)) if per_sample else grad.norm()
    torch.testing.assert_close(new, -alpha * grad / norm)
    if cgidm_ops.has_cpp():
        got = torch.ops.cgidm.pgd_update(delta, grad, x0, x0, mask, alpha, eps, -100.0, 100.0, per_sample)
        torch.testing.assert_close(got[0], new)


@pytest.mark.parametrize("impl", ["ref", "cpp"])
def test_the_pgd_steps_refuse_a_backward(impl):
    if impl == "cpp" and not cgidm_ops.has_cpp():
        pytest.skip("extension not built")
    ops = cgidm_ops.get_ops(impl)
    delta, grad, x0, xi, mask = pgd_inputs(SHAPE, 2, torch.float32)
    grad.requires_grad_(True)
    for name, out in (("pgd_update", torch.ops.cgidm.pgd_update(delta, grad, x0, xi, mask, 2.0, 70.0)[0]),
                      ("linf_update", torch.ops.cgidm.linf_update(delta, grad, x0, 0.01, 0.03)[0])):
        with pytest.raises(RuntimeError, match=f"cgidm::{name} is a PGD step, not differentiable"):
            out.sum().backward()
    with torch.no_grad():  # the engine's way: no graph, no error
        assert not ops.pgd_update(delta, grad, x0, xi, mask, 2.0, 70.0)[0].requires_grad


def test_the_reference_pair_noise_computes_in_fp32():
    """bf16 latents with fp32 noise: x_t is fp32, and so is every intermediate (the
    schedule's square roots were rounded to bf16 before)."""
    x0, x, mask, nft, _, sa, sb = pair_noise_inputs(SHAPE, 2, 1, torch.float32, True)
    x0, x, mask = (t.to(torch.bfloat16) for t in (x0, x, mask))
    z, x_t = reference.pair_noise_ref(x0, x, mask, nft, None, sa, sb)
    assert z.dtype == torch.bfloat16 and x_t.dtype == torch.float32
    z64 = x0.double() * mask.double() + x.double() * (1 - mask.double())
    want = sa.double().view(-1, 1, 1, 1) * z64 + sb.double().view(-1, 1, 1, 1) * nft.double()
    assert (x_t[0].double() - want).abs().max() < 1e-5
    got = cgidm_ops.get_ops("auto").pair_noise(x0, x, mask, nft, None, sa, sb)
    torch.testing.assert_close(got[1], x_t)


def test_an_empty_batch():
    x = torch.zeros(0, *SHAPE)
    m = torch.zeros(SHAPE)
    e = torch.zeros(0)
    for ops in (cgidm_ops.get_ops("auto"), reference.REFERENCE_OPS):
        z, x_t = ops.pair_noise(x, x, m, x, None, e, e)
        assert z.shape == x.shape and x_t.shape == (2, 0, *SHAPE)
    with pytest.raises(RuntimeError, match="not a multiple of the image batch 0"):
        torch.ops.cgidm.pair_noise(x, x, m, torch.zeros(2, *SHAPE), None, torch.zeros(2), torch.zeros(2))
    abar = abar_schedule()
    cond = torch.zeros(1, 2, 4)

    def eps(x_t, t, c):
        return x_t * 0.5

    with pytest.raises(ValueError, match="empty batch"):
        reference.invert(eps, eps, x, x, m, cond, cond, abar, PGDConfig(steps=1), keys=[])
    with pytest.raises(ValueError, match="empty batch"):
        Engine(eps, eps, cond, cond, abar, SHAPE, PGDConfig(steps=1)).invert(x, x, m, [])


class Eps(torch.nn.Module):
    """A denoiser module called as an ``EpsFn``, ``model(x_t, t, cond)``: no UNet's keywords."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = torch.nn.Conv2d(SHAPE[0], SHAPE[0], 3, padding=1)

    def forward(self, x, t, cond):
        return self.conv(x) + cond.mean()


def test_the_engine_runs_any_module_invert_runs_and_names_a_bad_mask():
    ft, pre = Eps(1), Eps(2)
    abar = abar_schedule()
    x0 = torch.randn(2, *SHAPE)
    mask = (torch.rand(SHAPE) > 0.5).float()
    cond = torch.randn(1, 4, 8)
    keys = rng.image_keys(0, ["a", "b"])
    cfg = PGDConfig(steps=2)
    want = reference.invert(ft, pre, x0, x0, mask, cond, cond, abar, cfg, keys=keys)
    engine = Engine(ft, pre, cond, cond, abar, SHAPE, cfg, batch=2, impl="ref")
    got = engine.invert(x0, x0, mask, keys)
    torch.testing.assert_close(got.x_rec, want.x_rec)
    assert engine.pair_pass.name == "sequential"
    for bad in (mask.permute(1, 0, 2), mask.flatten(), mask.expand(2, *SHAPE)):
        with pytest.raises(ValueError, match="one mask shared by the batch"):
            engine.invert(x0, x0, bad, keys)
    with pytest.raises(ValueError, match="past the model's last timestep"):
        Engine(ft, pre, cond, cond, abar[:900], SHAPE, cfg)
    with pytest.raises(ValueError, match="past the model's last timestep"):
        reference.invert(ft, pre, x0, x0, mask, cond, cond, abar[:900], cfg, keys=keys)
