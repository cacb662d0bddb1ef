"""The engine against the spec: same recovered latents as ``reference.invert`` with the
same per-image keys (counter-based draws), eager or replayed; padding that leaves the real
rows alone; frozen weights; the batch planner. CUDA-graph tests run only with a GPU."""
from __future__ import annotations

import copy

import pytest
import torch

from cgidm import reference
from cgidm.engine import Engine, plan_batch, plan_memory
from cgidm.reference import PGDConfig
from cgidm.rng import image_keys

SHAPE = (3, 16, 16)


@pytest.fixture(scope="module")
def unets(tmp_path_factory):
    """Two tiny random UNets from one pipeline directory, the second perturbed (a fake
    fine-tune), and their prompt embeddings."""
    from diffusers import UNet2DConditionModel

    from cgidm.testing.tiny import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_pipeline(root, size=16)
    pre = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    ft = UNet2DConditionModel.from_pretrained(root / "unet").eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    g = torch.Generator().manual_seed(2)
    c_ft = torch.randn(1, 5, 32, generator=g)
    c_pre = torch.randn(1, 5, 32, generator=g)
    return ft, pre, c_ft, c_pre


def abar():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def inputs(b, seed=3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, *SHAPE, generator=g)
    x_init = x0 + 0.5 * torch.randn(b, *SHAPE, generator=g)
    mask = (torch.rand(SHAPE, generator=g) > 0.5).float()
    return x0, x_init, mask


def keys(b, seed=10):
    """``[b]`` int64 keys of images ``img0 .. img{b-1}`` under run seed ``seed``."""
    return image_keys(seed, [f"img{i}" for i in range(b)])


def run_reference(unets, cfg, x0, x_init, mask):
    ft, pre, c_ft, c_pre = unets
    return reference.invert(
        reference.unet_eps_fn(ft), reference.unet_eps_fn(pre), x0, x_init, mask, c_ft, c_pre,
        abar(), cfg, keys=keys(x0.shape[0]), ops=reference.REFERENCE_OPS,
    )


def run_engine(unets, cfg, x0, x_init, mask, batch, impl="ref"):
    ft, pre, c_ft, c_pre = unets
    engine = Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=batch, impl=impl)
    return engine.invert(x0, x_init, mask, keys(x0.shape[0]))


CASES = [
    (PGDConfig(steps=3, alpha=0.5, eps=5.0, k=1), 1),
    (PGDConfig(steps=3, alpha=0.5, eps=5.0, k=2), 1),
    (PGDConfig(steps=3, alpha=0.5, eps=5.0, k=1), 3),
    (PGDConfig(steps=3, alpha=0.5, eps=5.0, k=2), 3),
    (PGDConfig(steps=3, alpha=0.5, eps=5.0, noise="paper"), 1),
    (PGDConfig(steps=3, alpha=0.5, eps=5.0, noise="paper"), 3),
]


@pytest.mark.parametrize("cfg,b", CASES, ids=[f"{c.noise}-k{c.k}-b{b}" for c, b in CASES])
def test_engine_equals_reference_invert(unets, cfg, b):
    x0, x_init, mask = inputs(b)
    want = run_reference(unets, cfg, x0, x_init, mask)
    got = run_engine(unets, cfg, x0, x_init, mask, batch=b)
    assert got.delta.abs().sum() > 0, "no step was taken: the comparison would be vacuous"
    # same keys, same draws, same kernels at the same batch: bit for bit
    assert torch.equal(got.x_rec, want.x_rec)
    assert torch.equal(got.delta, want.delta)
    assert torch.equal(got.skipped_steps, want.skipped_steps)
    assert got.loss_history == want.loss_history


@pytest.mark.parametrize("which", ["reference", "engine"])
@pytest.mark.parametrize("noise", ["paper", "shared"])
def test_a_batch_of_3_equals_3_runs_of_1(unets, which, noise):
    """Paper mode is the official batch-1 loop at any batch size: every image its own t,
    noise pair, gradient norm, projection and skip. Equal up to fp32 rounding of the
    UNet's batched convolutions (measured: <= 4e-7 on the recovered latent);
    tests/test_reference.py checks it bit for bit with elementwise models."""
    ft, pre, c_ft, c_pre = unets
    cfg = PGDConfig(steps=3, alpha=0.5, eps=5.0, noise=noise)
    x0, x_init, mask = inputs(3)

    def run(idx):
        k = keys(3)[idx]
        if which == "reference":
            return reference.invert(reference.unet_eps_fn(ft), reference.unet_eps_fn(pre), x0[idx], x_init[idx],
                                    mask, c_ft, c_pre, abar(), cfg, keys=k)
        engine = Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=len(idx), impl="ref")
        return engine.invert(x0[idx], x_init[idx], mask, k)

    full = run([0, 1, 2])
    assert full.delta.abs().sum() > 0
    for i in range(3):
        one = run([i])
        torch.testing.assert_close(full.delta[i:i + 1], one.delta, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(full.x_rec[i:i + 1], one.x_rec, rtol=1e-5, atol=1e-6)
        assert torch.equal(full.skipped_steps[i:i + 1], one.skipped_steps)


def _toy_models():
    """Elementwise models: no arithmetic depends on the batch, so results compare bit for bit."""
    def ft(x, t, c):
        return torch.tanh(x) * 0.9 + 1e-3 * t.view(-1, 1, 1, 1)

    return ft, (lambda x, t, c: torch.sin(x))


TOY_CASES = [("paper", 1), ("shared", 1), ("shared", 2)]


@pytest.mark.parametrize("noise,k", TOY_CASES)
def test_exactly_the_reference_padded_or_not_batched_or_not(noise, k):
    """Same keys, same draws: the engine equals ``reference.invert`` bit for bit; a padded
    tail (3 images in a bucket of 4; 2 + 1 in a bucket of 2) equals the unpadded run; a
    batch of 3 equals 3 runs of 1."""
    ft, pre = _toy_models()
    cond = torch.zeros(1, 3, 4)
    cfg = PGDConfig(steps=4, alpha=0.5, eps=3.0, noise=noise, k=k)
    x0, x_init, mask = inputs(3)
    want = reference.invert(ft, pre, x0, x_init, mask, cond, cond, abar(), cfg, keys=keys(3))

    def engine(batch, idx=(0, 1, 2)):
        idx = list(idx)
        e = Engine(ft, pre, cond, cond, abar(), SHAPE, cfg, batch=batch, impl="ref")
        return e.invert(x0[idx], x_init[idx], mask, keys(3)[idx])

    assert want.delta.abs().sum() > 0
    for got in (engine(3), engine(4), engine(2)):
        assert torch.equal(got.delta, want.delta)
        assert torch.equal(got.x_rec, want.x_rec)
        assert torch.equal(got.skipped_steps, want.skipped_steps)
    assert engine(3).loss_history == want.loss_history
    # chunks of 2 + 1: each step's loss is the mean over all three images (it was the last chunk's)
    assert engine(2).loss_history == pytest.approx(want.loss_history, rel=1e-6)
    for i in range(3):
        assert torch.equal(engine(1, [i]).delta, want.delta[i:i + 1])


def test_the_step_counter_advances_in_the_step_and_restarts_per_batch(unets):
    ft, pre = _toy_models()
    cond = torch.zeros(1, 3, 4)
    cfg = PGDConfig(steps=3, alpha=0.5, eps=3.0)
    e = Engine(ft, pre, cond, cond, abar(), SHAPE, cfg, batch=2, impl="ref")
    x0, x_init, mask = inputs(2)
    e.invert(x0, x_init, mask, keys(2))
    assert e.step.dtype == torch.int64 and e.step.dim() == 0 and int(e.step) == 3
    e.load(x0, x_init, mask, keys(2))
    assert int(e.step) == 0 and e.keys.tolist() == keys(2).tolist()
    e.load(x0[:1], x_init[:1], mask, keys(1))
    assert e.keys.tolist() == [keys(1).item(), 0]  # a padded row: any key, its loss is cut out


@pytest.mark.parametrize("noise,k", [("shared", 1), ("shared", 2), ("paper", 1)])
def test_tail_batch_padding_leaves_the_real_rows_alone(unets, noise, k):
    cfg = PGDConfig(steps=3, alpha=0.5, eps=5.0, k=k, noise=noise)
    x0, x_init, mask = inputs(3)
    unpadded = run_engine(unets, cfg, x0, x_init, mask, batch=3)
    padded = run_engine(unets, cfg, x0, x_init, mask, batch=4)  # one padded row
    assert padded.x_rec.shape == unpadded.x_rec.shape
    torch.testing.assert_close(padded.x_rec, unpadded.x_rec, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded.delta, unpadded.delta, rtol=1e-5, atol=1e-5)
    assert torch.equal(padded.skipped_steps, unpadded.skipped_steps)


def test_chunks_with_a_padded_tail_equal_one_batch(unets):
    cfg = PGDConfig(steps=2, alpha=0.5, eps=5.0, k=2)
    x0, x_init, mask = inputs(5)
    one = run_engine(unets, cfg, x0, x_init, mask, batch=5)
    chunked = run_engine(unets, cfg, x0, x_init, mask, batch=2)  # 2 + 2 + 1 (padded)
    torch.testing.assert_close(chunked.x_rec, one.x_rec, rtol=1e-5, atol=1e-5)


def test_padded_rows_do_not_leak_nan_into_real_rows(unets):
    """A model that returns NaN on the padded row must not touch the real rows."""
    ft, pre, c_ft, c_pre = unets
    cfg = PGDConfig(steps=2, alpha=0.5, eps=5.0)
    x0, x_init, mask = inputs(1)
    eps_ft = reference.unet_eps_fn(ft)

    def nan_on_row_1(x_t, t, cond):
        out = eps_ft(x_t, t, cond)
        poison = torch.zeros_like(out)
        poison[1:] = float("nan")
        return out + poison

    engine = Engine(nan_on_row_1, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=2, impl="ref")
    got = engine.invert(x0, x_init, mask, keys(1))
    want = run_reference(unets, cfg, x0, x_init, mask)
    assert torch.isfinite(got.x_rec).all()
    torch.testing.assert_close(got.x_rec, want.x_rec, rtol=1e-5, atol=1e-5)
    assert got.skipped_steps.tolist() == [0]
    assert got.loss_history == pytest.approx(want.loss_history, rel=1e-5, abs=1e-6)


def test_weights_are_frozen_and_collect_no_grad(unets):
    ft, pre, c_ft, c_pre = (copy.deepcopy(u) for u in unets)
    ft.requires_grad_(True)
    pre.requires_grad_(True)
    cfg = PGDConfig(steps=2, alpha=0.5, eps=5.0, k=2)
    engine = Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=2, impl="ref")
    x0, x_init, mask = inputs(2)
    engine.invert(x0, x_init, mask, keys(2))
    for model in (ft, pre):
        for name, p in model.named_parameters():
            assert not p.requires_grad, name
            assert p.grad is None, name


@pytest.mark.skipif(not __import__("cgidm.ops", fromlist=["has_cpp"]).has_cpp(), reason="extension not built")
def test_compiled_ops_match_reference_ops(unets):
    # the C++ kernels in the engine against the plain-torch reference loop: without the
    # extension "cpp" would fall back to the reference and compare it with itself
    cfg = PGDConfig(steps=2, alpha=0.5, eps=5.0, k=2)
    x0, x_init, mask = inputs(2)
    got = run_engine(unets, cfg, x0, x_init, mask, batch=2, impl="cpp")
    want = run_reference(unets, cfg, x0, x_init, mask)
    torch.testing.assert_close(got.x_rec, want.x_rec, rtol=1e-4, atol=1e-4)


def test_engine_rejects_bad_input(unets):
    ft, pre, c_ft, c_pre = unets
    cfg = PGDConfig(steps=1)
    engine = Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=2, impl="ref")
    x0, x_init, mask = inputs(2)
    with pytest.raises(ValueError, match="one per image"):
        engine.invert(x0, x_init, mask, keys(1))
    with pytest.raises(TypeError, match="image_keys"):
        engine.invert(x0, x_init, mask, [torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="images for a bucket"):
        engine.load(*inputs(3), keys(3))
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=1, use_graph=True)


# --------------------------------------------------------------------------- plan_batch


@pytest.mark.parametrize(
    "free,per_sample,max_b,k,want",
    [
        (1000, 10, 100, 1, 90),  # 10 % reserve
        (1000, 10, 100, 3, 30),
        (1000, 10, 16, 1, 16),  # capped
        (100, 9, 100, 10, 1),  # exactly one image fits
        (10**11, 3 * 2**30, 64, 4, 6),  # 90 GB / (4 * 3 GiB) = 6.98: rounds down
    ],
)
def test_plan_batch(free, per_sample, max_b, k, want):
    assert plan_batch(free, per_sample, max_b, k) == want


def test_plan_batch_refuses_when_one_image_does_not_fit():
    with pytest.raises(MemoryError):
        plan_batch(100, 10, 8, 10)
    with pytest.raises(ValueError):
        plan_batch(100, 0, 8, 1)


def test_plan_memory_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("the refusal is for CPU-only machines")
    with pytest.raises(RuntimeError, match="needs CUDA"):
        plan_memory(lambda b: None, k=1, max_b=4)


# --------------------------------------------------------------------------- CUDA graphs


def needs_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")


def cuda_unets(unets):
    ft, pre, c_ft, c_pre = (copy.deepcopy(u) for u in unets)
    return ft.cuda(), pre.cuda(), c_ft, c_pre


@pytest.mark.parametrize("noise,k", [("shared", 1), ("shared", 2), ("paper", 1)])
def test_graph_replay_equals_eager_steps_and_the_reference(unets, noise, k):
    """Replays draw from the keys and the device step counter the captured step advances:
    the same draws as eager steps, so the same result (bit for bit: the same kernels run),
    and the reference's on the same device up to the bucket's padding row."""
    needs_cuda()
    ft, pre, c_ft, c_pre = cuda_unets(unets)
    cfg = PGDConfig(steps=4, alpha=0.5, eps=5.0, k=k, noise=noise)
    x0, x_init, mask = (t.cuda() for t in inputs(3))
    # bit for bit needs cuDNN's deterministic algorithms (a backward-data one may add atomically)
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, deterministic=True):
        graphed = Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=4, device="cuda", impl="ref")
        got = graphed.invert(x0, x_init, mask, keys(3))
        assert graphed.graph is not None and int(graphed.step) == cfg.steps
        eager = Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=4, device="cuda", impl="ref", use_graph=False)
        want = eager.invert(x0, x_init, mask, keys(3))
    assert torch.equal(got.delta, want.delta)
    ref = reference.invert(reference.unet_eps_fn(ft), reference.unet_eps_fn(pre), x0, x_init, mask, c_ft.cuda(),
                           c_pre.cuda(), abar(), cfg, keys=keys(3))
    torch.testing.assert_close(got.delta, ref.delta, rtol=1e-4, atol=1e-4)
    assert got.delta.abs().sum() > 0


def test_graph_is_captured_once_per_bucket(unets):
    needs_cuda()
    ft, pre, c_ft, c_pre = cuda_unets(unets)
    cfg = PGDConfig(steps=2, alpha=0.5, eps=5.0)
    engine = Engine(ft, pre, c_ft, c_pre, abar(), SHAPE, cfg, batch=2, device="cuda", impl="auto")
    x0, x_init, mask = (t.cuda() for t in inputs(3))
    engine.invert(x0, x_init, mask, keys(3))
    graph = engine.graph
    out = engine.invert(x0[:1], x_init[:1], mask, keys(1))  # a tail-sized batch: padded, not recaptured
    assert engine.graph is graph
    assert torch.isfinite(out.x_rec).all() and out.x_rec.shape == (1, *SHAPE)


# --------------------------------------------------------------------------- api switch


def test_recover_with_the_engine_equals_the_reference(unets):
    from types import SimpleNamespace

    from cgidm.api import AuthConfig, Prepared, recover

    ft, pre, c_ft, c_pre = unets
    pair = SimpleNamespace(unet_ft=ft, unet_pre=pre, abar=abar(), device=torch.device("cpu"),
                           encode_prompt=lambda prompt: (c_ft, c_pre))
    x0, x_init, mask = inputs(2)

    def prep():
        return Prepared(x0, x_init, mask, torch.zeros(2, 3, 16, 16), torch.zeros(2, 3, 16, 16), keys=keys(2),
                        ids=["img0", "img1"])

    pgd = PGDConfig(steps=2, alpha=0.5, eps=5.0, k=2)
    # a prompt given: this hand-built pair records none to resolve (its encode_prompt ignores it)
    want = recover(pair, prep(), AuthConfig(prompt="p", pgd=pgd))
    got = recover(pair, prep(), AuthConfig(prompt="p", pgd=pgd, engine="engine"))
    torch.testing.assert_close(got.x_rec, want.x_rec, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="engine must be"):
        recover(pair, prep(), AuthConfig(prompt="p", pgd=pgd, engine="fast"))


def test_the_engine_takes_a_pgd_config_and_says_so():
    """An AuthConfig given for the engine's cfg: the TypeError invert gives, not an
    AttributeError on a field it lacks."""
    from cgidm.config import AuthConfig
    from cgidm.engine import Engine

    f = lambda x, t, c: x.tanh()  # noqa: E731
    with pytest.raises(TypeError, match=r"cfg must be a PGDConfig, got AuthConfig \(pass its .pgd\)"):
        Engine(f, f, torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.linspace(0.99, 0.01, 1000), (4, 4, 4),
               AuthConfig(prompt="p"))
