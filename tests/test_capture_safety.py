"""What a CUDA graph captures must not sync with the host: a capture fails on ``.item()``,
on a tensor's truth value, on ``nonzero`` and on boolean-mask indexing (their output size
depends on the data). No GPU has run these captures yet, so this checks on CPU, under a
``TorchFunctionMode`` that records every such call, each step that is captured: the
authentication engine's (every pair pass that runs on CPU, full and LoRA pairs), the
protection engine's (identity codec and a VAE), and the extraction's pair call. And that
they make no host tensor (a capture cannot copy from pageable host memory): each runs once
on the meta device, where a host tensor in the arithmetic is an error."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cgidm import pairpass
from cgidm.config import ProtectConfig
from cgidm.engine import Engine
from cgidm.guidance import StaticPairCall
from cgidm.models import load_pair
from cgidm.protect_pgd import ProtectEngine, load_base
from cgidm.reference import PGDConfig
from cgidm.rng import image_keys

T = torch.Tensor
SYNCING = {T.item, T.__bool__, T.tolist, T.__int__, T.__float__, T.__index__, T.numpy, T.nonzero, torch.nonzero,
           torch.masked_select, T.masked_select, torch.unique, T.unique, T.cpu}


def _bool_index(func, args) -> bool:
    if func not in (T.__getitem__, T.__setitem__) or len(args) < 2:
        return False
    idx = args[1] if isinstance(args[1], tuple) else (args[1],)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx)


class HostSyncs(TorchFunctionMode):
    """Records the names of the calls that would sync a CUDA stream with the host."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCING or _bool_index(func, args):
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_the_mode_sees_what_it_looks_for():
    x = torch.arange(4.0)
    with HostSyncs() as mode:
        x.sum().item()
        _ = x[x > 1]
        if x.max() > 0:
            pass
        torch.nonzero(x)
    assert mode.calls == ["item", "__getitem__", "__bool__", "nonzero"]


def _pair(tiny_world, kind):
    ft = {"full": (tiny_world / "finetuned", None), "lora": (None, tiny_world / "lora.safetensors")}[kind]
    return load_pair(tiny_world / "base", *ft)


@pytest.mark.parametrize("name", ["sequential", "stacked", "lora_toggle", "lora_fused"])
@pytest.mark.parametrize("noise", ["shared", "paper"])
def test_the_authentication_step_never_syncs(tiny_world, name, noise):
    lora = name.startswith("lora")
    pair = _pair(tiny_world, "lora" if lora else "full")
    c_ft, c_pre = pair.encode_prompt("a photo")
    engine = Engine(pair.unet_ft, pair.unet_pre, c_ft, c_pre, pair.abar, pair.latent_shape,
                    PGDConfig(steps=2, noise=noise), batch=3, pair_pass=name)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, *pair.latent_shape, generator=g)
    mask = (torch.rand(pair.latent_shape, generator=g) > 0.5).float()
    engine.load(x0, x0 * 0, mask, image_keys(0, ["a", "b"]))
    with HostSyncs() as mode:
        engine._step()
        engine._step()
    if hasattr(engine.pair_pass, "remove"):
        engine.pair_pass.remove()
    assert mode.calls == [], mode.calls
    assert int(engine.step) == 2


@pytest.mark.parametrize("loss", ["advdm", "fused"])
@pytest.mark.parametrize("low_memory", [False, True])
def test_the_protection_step_never_syncs(tiny_world, loss, low_memory):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_protect_graph import vae_base  # a random SD-shaped base with a VAE

    from cgidm.protect_pgd import builtin_target, target_latent

    for model in (load_base(tiny_world / "base"), vae_base()):
        r = model.resolution
        for h, w in ((r, r), (r, r + 2 * model.pixel_multiple)):  # square, and a wide image (--cover full)
            cfg = ProtectConfig(steps=2, loss=loss, k=2, random_start=True, low_memory=low_memory)
            cond = torch.randn(1, 3, 8) if model.text_encoder is None else None
            z_t = target_latent(model, builtin_target(h, w)) if cfg.needs_target else None
            engine = ProtectEngine(model, cfg, 3, cond, z_t, size=(h, w))
            engine.load(torch.rand(2, 3, h, w) * 2 - 1, ["a", "b"])
            with HostSyncs() as mode:
                engine._step()
                engine._step()
            assert mode.calls == [], (type(model.codec).__name__, (h, w), mode.calls)
            assert int(engine.step) == 2


def test_the_extraction_pair_call_never_syncs(tiny_world):
    from cgidm import extract as X
    from cgidm.config import ExtractConfig

    pair = _pair(tiny_world, "lora")
    fn, _ = X.pair_pass(pair)
    c_ft, c_pre = X.conditioning(pair, ExtractConfig(prompt="a photo"))
    call = StaticPairCall(fn, c_ft, c_pre, 3, pair.latent_shape, "cpu", use_graph=False)
    call.x.normal_()
    call.t.fill_(500)
    with HostSyncs() as mode:
        call._run()
    call.close()
    if hasattr(fn, "remove"):
        fn.remove()
    assert mode.calls == [], mode.calls


# --------------------------------------------------------------------------- no host tensors
# A capture also fails on a copy from pageable host memory: every tensor a step makes must be
# made on the step's device. On the meta device (shapes only, no data) a host tensor mixed
# into the step's arithmetic is an error, so each step runs there once.


def _to_meta(pair):
    import copy

    pair = copy.copy(pair)
    pair.__dict__.pop("_prompts", None)
    seen = {}
    for name in ("unet_ft", "unet_pre"):
        m = getattr(pair, name)
        if id(m) not in seen:
            seen[id(m)] = copy.deepcopy(m).to("meta")
        setattr(pair, name, seen[id(m)])
    if hasattr(pair.unet_pre, "adapted"):  # a LoRA pair: AdaptersOff over the same module
        from cgidm.lora import AdaptersOff

        pair.unet_pre = AdaptersOff(pair.unet_ft)
    pair.abar = pair.abar.to("meta")
    return pair


@pytest.mark.parametrize("name", ["sequential", "lora_toggle", "lora_fused"])
def test_the_authentication_step_makes_no_host_tensor(tiny_world, name):
    lora = name.startswith("lora")
    cpu = _pair(tiny_world, "lora" if lora else "full")
    c_ft, c_pre = (c.to("meta") for c in cpu.encode_prompt("a photo"))
    pair = _to_meta(cpu)
    engine = Engine(pair.unet_ft, pair.unet_pre, c_ft, c_pre, pair.abar, pair.latent_shape,
                    PGDConfig(steps=2, k=2), batch=3, device="meta", impl="ref", pair_pass=name)
    engine._step()
    if hasattr(engine.pair_pass, "remove"):
        engine.pair_pass.remove()
    assert engine.delta.device.type == "meta"


def test_the_protection_step_makes_no_host_tensor():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_protect_graph import vae_base

    model = vae_base()
    model.unet.to("meta")
    model.codec.vae.to("meta")
    model.abar = model.abar.to("meta")
    cfg = ProtectConfig(steps=2, k=2, random_start=True)
    engine = ProtectEngine(model, cfg, 3, torch.zeros(1, 3, 8, device="meta"), impl="ref")
    engine._step()
    assert engine.delta.device.type == "meta"


def test_the_extraction_pair_call_makes_no_host_tensor(tiny_world):
    from cgidm import extract as X
    from cgidm.config import ExtractConfig

    cpu = _pair(tiny_world, "full")
    c_ft, c_pre = (c.to("meta") for c in X.conditioning(cpu, ExtractConfig(prompt="a photo")))
    pair = _to_meta(cpu)
    fn = pairpass.build("sequential", pair.unet_ft, pair.unet_pre)
    call = StaticPairCall(fn, c_ft, c_pre, 3, pair.latent_shape, "meta", use_graph=False)
    out_ft, out_pre = call._run()
    assert out_ft.device.type == out_pre.device.type == "meta"
