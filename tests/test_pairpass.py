"""Pair passes against two separate passes: outputs and input gradients, odd batches,
LoRA scales other than 1, the adapter state left as it was, and the choice of variant.

Tolerance: 1e-5 of the largest magnitude of each compared tensor (fp32). Batched and
unbatched fp32 convolutions and GEMMs sum in different orders; on the tiny UNet the
difference measured 1.3e-6 at most. Every case also checks that the two models differ by
far more than that, so a variant that ran the wrong model on either side would fail.
"""
from __future__ import annotations

import copy

import pytest
import torch

from cgidm import pairpass

TOL = 1e-5
SHAPE = (3, 16, 16)
TOKENS = 8


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()


@pytest.fixture(scope="module")
def base():
    from diffusers import UNet2DConditionModel

    from cgidm.testing.tiny import tiny_unet_config

    torch.manual_seed(0)
    return UNet2DConditionModel(**tiny_unet_config(SHAPE[-1])).eval().requires_grad_(False)


def _lora_state(base, rank: int = 4) -> dict:
    """A LoRA on ``LORA_TARGETS`` with random A and B (PEFT's init leaves B at zero), in
    the diffusers file layout (``unet.`` prefix)."""
    from peft import LoraConfig, get_peft_model_state_dict

    from cgidm.testing.tiny import LORA_TARGETS

    src = copy.deepcopy(base)
    src.add_adapter(LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in src.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return {f"unet.{k}": v.clone() for k, v in get_peft_model_state_dict(src).items()}


@pytest.fixture(scope="module")
def lora_state(base):
    return _lora_state(base)


def adapted(base, state: dict, scale: float = 1.0):
    """``base`` plus the LoRA, loaded the way ``cgidm.models`` loads one."""
    unet = copy.deepcopy(base)
    unet.load_lora_adapter(state, prefix="unet", adapter_name="ft")
    if scale != 1.0:
        unet.set_adapters(["ft"], weights=[scale])
    return unet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def full_ft(base):
    """A fake full fine-tune: every weight of the base perturbed."""
    ft = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ft.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ft


def inputs(n: int, shared: bool = False, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    x_ft = torch.randn(n, *SHAPE, generator=g)
    x_pre = x_ft if shared else torch.randn(n, *SHAPE, generator=g)
    t = torch.randint(1, 1000, (n,), generator=g)
    cond_ft = torch.randn(n, TOKENS, 32, generator=g)
    cond_pre = torch.randn(n, TOKENS, 32, generator=g)
    seeds = (torch.randn(n, *SHAPE, generator=g), torch.randn(n, *SHAPE, generator=g))
    return (x_ft, x_pre, t, cond_ft, cond_pre), seeds


def forward_backward(pair, args, seeds) -> list[torch.Tensor]:
    """``[eps_ft, eps_pre, d/dx_ft, d/dx_pre]`` of ``<eps_ft, s1> - <eps_pre, s2>``;
    with shared noise (``x_pre is x_ft``) one leaf gets both gradients."""
    x_ft, x_pre, t, cond_ft, cond_pre = args
    a = x_ft.clone().requires_grad_(True)
    b = a if x_pre is x_ft else x_pre.clone().requires_grad_(True)
    eps_ft, eps_pre = pair(a, b, t, cond_ft, cond_pre)
    assert eps_ft.shape == a.shape and eps_pre.shape == b.shape
    loss = (eps_ft * seeds[0]).sum() - (eps_pre * seeds[1]).sum()
    grads = torch.autograd.grad(loss, (a,) if b is a else (a, b))
    return [eps_ft.detach(), eps_pre.detach(), *grads]


def assert_matches(got: list, want: list, what: str) -> None:
    names = ["eps_ft", "eps_pre", "grad x_ft", "grad x_pre"]
    for name, g, w in zip(names, got, want):
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        err = rel_err(g, w)
        assert err <= TOL, f"{what}: {name} differs from two passes by {err:.2e} of its scale (tolerance {TOL})"


def assert_models_differ(a: list, b: list, what: str) -> None:
    """The fine-tuned side differs from the pretrained one by far more than ``TOL``."""
    err = rel_err(a[0], b[0])
    assert err > 100 * TOL, f"{what}: the two models differ by only {err:.2e}; the test could not fail"


# --------------------------------------------------------------------------- LoRA pairs


@pytest.mark.parametrize("name", ["lora_toggle", "lora_fused"])
@pytest.mark.parametrize("scale", [1.0, 0.6])
@pytest.mark.parametrize("n,shared", [(3, False), (1, False), (2, True)])
def test_lora_variant_equals_two_copies(base, lora_state, name, scale, n, shared):
    unet = adapted(base, lora_state, scale)
    args, seeds = inputs(n, shared)
    want = forward_backward(pairpass.sequential(unet, base), args, seeds)
    plain = forward_backward(pairpass.sequential(base, base), args, seeds)
    assert_models_differ(want, plain, "LoRA")
    pair = pairpass.build(name, unet)
    assert pair.name == name
    assert_matches(forward_backward(pair, args, seeds), want, f"{name} scale {scale} N={n}")


def test_lora_scale_changes_the_fine_tuned_side(base, lora_state):
    args, seeds = inputs(3)
    one = forward_backward(pairpass.lora_fused(adapted(base, lora_state, 1.0)), args, seeds)
    part = forward_backward(pairpass.lora_fused(adapted(base, lora_state, 0.6)), args, seeds)
    assert rel_err(part[0], one[0]) > 100 * TOL
    assert rel_err(part[1], one[1]) <= TOL  # the pretrained side has no LoRA at any scale


def test_lora_toggle_leaves_adapter_state_and_grads_alone(base, lora_state):
    unet = adapted(base, lora_state)
    layers = pairpass._lora_layers(unet)
    args, seeds = inputs(2)
    pair = pairpass.lora_toggle(unet)
    forward_backward(pair, args, seeds)
    assert not any(m.disable_adapters for m in layers)
    assert not any(p.requires_grad for p in unet.parameters())
    bad = (args[0], args[1], args[2], args[3][:, :, :5], args[4])  # cond of the wrong width
    with pytest.raises(Exception):
        pair(*bad)
    assert not any(m.disable_adapters for m in layers)
    # an adapter switched off by the caller stays off after a call
    unet.disable_adapters()
    pair(*args)
    assert all(m.disable_adapters for m in layers)
    unet.enable_adapters()


def test_lora_fused_hooks_act_only_during_a_call(base, lora_state):
    unet = adapted(base, lora_state)
    args, seeds = inputs(3)
    want = forward_backward(pairpass.sequential(unet, base), args, seeds)
    pair = pairpass.lora_fused(unet)
    # the UNet called on its own, hooks registered: still the adapted model, any batch
    alone = forward_backward(pairpass.sequential(unet, base), args, seeds)
    assert_matches(alone, want, "adapted UNet with inert hooks")
    pair.remove()
    with pytest.raises(RuntimeError, match="hooks removed"):
        pair(*args)
    assert_matches(forward_backward(pairpass.sequential(unet, base), args, seeds), want, "hooks removed")


def test_lora_fused_needs_one_shape_for_both_sides(base, lora_state):
    pair = pairpass.lora_fused(adapted(base, lora_state))
    (x_ft, x_pre, t, c_ft, c_pre), _ = inputs(3)
    with pytest.raises(ValueError, match="one shape"):
        pair(x_ft, x_pre[:2], t, c_ft, c_pre)


def test_lora_variants_need_an_unmerged_adapter(base, lora_state):
    for make in (pairpass.lora_toggle, pairpass.lora_fused):
        with pytest.raises(ValueError, match="no active LoRA"):
            make(copy.deepcopy(base))
    merged = adapted(base, lora_state)
    merged.fuse_lora()
    for make in (pairpass.lora_toggle, pairpass.lora_fused):
        with pytest.raises(ValueError, match="merged"):
            make(merged)


def test_lora_fused_refuses_dora(base):
    from peft import LoraConfig

    unet = copy.deepcopy(base)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, use_dora=True, target_modules=["to_q"]))
    with pytest.raises(NotImplementedError, match="DoRA"):
        pairpass.lora_fused(unet)
    pairpass.lora_toggle(unet)  # switching adapters off is fine for any variant


# --------------------------------------------------------------------------- full pairs


@pytest.mark.parametrize("n,shared", [(3, False), (2, True)])
def test_stacked_equals_two_passes(base, full_ft, n, shared):
    args, seeds = inputs(n, shared)
    want = forward_backward(pairpass.sequential(full_ft, base), args, seeds)
    assert_models_differ(want, forward_backward(pairpass.sequential(base, base), args, seeds), "full")
    pair = pairpass.stacked(full_ft, base)
    got = forward_backward(pair, args, seeds)
    assert_matches(got, want, f"stacked N={n}")
    assert all(g.abs().max() > 0 for g in got[2:])
    assert isinstance(pair.fallback_ops, list)
    # the second call runs with the fallback warning silenced and gives the same numbers
    assert_matches(forward_backward(pair, args, seeds), got, "stacked, second call")
    # the weights are held once: the models' own tensors are views of the stack, unchanged
    for model in (full_ft, base):
        for name, p in model.named_parameters():
            assert p.untyped_storage().data_ptr() == pair.params[name].untyped_storage().data_ptr(), name
    assert_matches(forward_backward(pairpass.sequential(full_ft, base), args, seeds), want, "the models after")


def test_stacked_needs_one_architecture(base):
    from diffusers import UNet2DConditionModel

    from cgidm.testing.tiny import tiny_unet_config

    other = UNet2DConditionModel(**{**tiny_unet_config(SHAPE[-1]), "block_out_channels": (16, 32)})
    with pytest.raises(ValueError, match="one architecture"):
        pairpass.stacked(base, other)
    with pytest.raises(TypeError):
        pairpass.stacked(pairpass._eps_fn(base), base)


def test_sequential_takes_eps_fns():
    calls = []

    def fn(name):
        def eps(x, t, cond):
            calls.append(name)
            return x * 2 if name == "ft" else x * 3

        return eps

    x = torch.ones(1, *SHAPE)
    eps_ft, eps_pre = pairpass.sequential(fn("ft"), fn("pre"))(x, x, torch.zeros(1, dtype=torch.long), None, None)
    assert calls == ["ft", "pre"] and eps_ft.max() == 2 and eps_pre.max() == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n", [3, 1])
def test_two_streams_equals_two_passes(base, full_ft, n, no_tf32):
    ft, pre = copy.deepcopy(full_ft).cuda(), copy.deepcopy(base).cuda()
    args, seeds = inputs(n)
    args = tuple(a.cuda() for a in args)
    seeds = tuple(s.cuda() for s in seeds)
    want = forward_backward(pairpass.sequential(ft, pre), args, seeds)
    for _ in range(3):  # reuse of the side stream and of freed memory
        assert_matches(forward_backward(pairpass.two_streams(ft, pre), args, seeds), want, f"two_streams N={n}")


def test_two_streams_refuses_cpu(base, full_ft):
    with pytest.raises(RuntimeError, match="CUDA"):
        pairpass.two_streams(full_ft, base)


# --------------------------------------------------------------------------- choice


def test_variants_and_build():
    assert pairpass.variants("lora") == ("lora_toggle", "lora_fused")
    assert pairpass.variants("full") == ("sequential", "stacked", "two_streams")
    with pytest.raises(ValueError, match="pair kind"):
        pairpass.variants("dora")
    with pytest.raises(ValueError, match="unknown pair pass"):
        pairpass.build("fastest", torch.nn.Identity(), torch.nn.Identity())
    with pytest.raises(ValueError, match="no model_pre"):
        pairpass.build("lora_toggle", torch.nn.Identity(), torch.nn.Identity())
    with pytest.raises(ValueError, match="both models"):
        pairpass.build("sequential", torch.nn.Identity())


def test_choose_defaults_without_a_measurement():
    name, why = pairpass.choose("lora", "cpu", None)
    assert name == "lora_toggle" and "no measurement" in why and "default" in why
    name, why = pairpass.choose("full", torch.device("cpu"), {})
    assert name == "sequential" and "no measurement" in why
    # measured on another device only: still the default
    other = {"nvidia-h200": {"lora": {"lora_fused": 0.001, "lora_toggle": 0.002}}}
    assert pairpass.choose("lora", "cpu", other)[0] == "lora_toggle"
    # measured, but only for the other kind of pair
    assert pairpass.choose("full", "nvidia-h200", other)[0] == "sequential"


def test_choose_picks_the_fastest_measured_here():
    measured = {
        "nvidia-h200": {
            "lora": {"lora_fused": 0.010, "lora_toggle": 0.012, "sequential": 0.001},
            "full": {"sequential": 0.020, "stacked": 0.025, "two_streams": 0.018},
        },
        "cpu": {"full": {"two_streams": 0.001, "stacked": 0.5, "sequential": 0.6}},
    }
    name, why = pairpass.choose("lora", "nvidia-h200", measured)
    assert name == "lora_fused", why  # the two-copies baseline is never chosen
    assert "10 ms" in why and "lora_toggle 12 ms" in why
    assert pairpass.choose("full", "nvidia-h200", measured)[0] == "two_streams"
    assert pairpass.choose("full", "cpu", measured)[0] == "stacked"  # two_streams cannot run on CPU
    bad = {"cpu": {"lora": {"lora_fused": float("nan"), "lora_toggle": None}}}
    assert pairpass.choose("lora", "cpu", bad)[0] == "lora_toggle"
    with pytest.raises(ValueError, match="pair kind"):
        pairpass.choose("both", "cpu", measured)
    # one UNet on both sides: never stacked (it would hold the same weights twice)
    measured["nvidia-h200"]["same"] = {"stacked": 0.001, "two_streams": 0.002, "sequential": 0.02}
    assert pairpass.choose("same", "nvidia-h200", measured)[0] == "sequential"


def test_measured_from_rows():
    rows = [
        {"device_key": "cpu", "results": [
            {"kind": "lora", "variant": "lora_fused", "median_ms": 30.0, "ok": True},
            {"kind": "full", "variant": "stacked", "median_ms": None, "ok": False},
        ]},
        {"device_key": "cpu", "results": [{"kind": "lora", "variant": "lora_toggle", "median_ms": 20.0, "ok": True}]},
    ]
    measured = pairpass.measured_from_rows(rows)
    assert measured == {"cpu": {"lora": {"lora_fused": 0.03, "lora_toggle": 0.02}}}
    assert pairpass.choose("lora", "cpu", measured)[0] == "lora_toggle"


def test_device_key():
    assert pairpass.device_key("cpu") == "cpu"
    assert pairpass.device_key(torch.device("cpu")) == "cpu"
    assert pairpass.device_key("nvidia-h200") == "nvidia-h200"
