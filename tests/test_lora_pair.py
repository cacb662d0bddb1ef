"""A LoRA on the base holds one copy of the UNet: the pretrained side is the same module
with its adapters off; the engine runs it as a LoRA pair pass and equals the reference."""
from __future__ import annotations

import torch

from cgidm.config import AuthConfig, PGDConfig
from cgidm.lora import AdaptersOff
from cgidm.models import load_pair
from cgidm.pipeline import prepare, recover


def _unique_params(*modules) -> int:
    seen = {}
    for m in modules:
        for p in m.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def test_one_copy_of_the_base_and_the_pretrained_side_is_the_base(tiny_world):
    shared = load_pair(tiny_world / "base", None, tiny_world / "lora.safetensors")
    plain = load_pair(tiny_world / "base", tiny_world / "finetuned")
    assert isinstance(shared.unet_pre, AdaptersOff) and shared.unet_pre.adapted is shared.unet_ft
    base_params = _unique_params(plain.unet_pre)
    lora_params = _unique_params(shared.unet_ft) - base_params
    assert 0 < lora_params < base_params / 2
    assert _unique_params(shared.unet_pre, shared.unet_ft) == base_params + lora_params  # not 2 x base
    x = torch.randn(2, 3, 16, 16)
    t = torch.tensor([10, 500])
    c_ft, c_pre = shared.encode_prompt("a sks pattern")
    with torch.no_grad():
        pre = shared.unet_pre(x, t, encoder_hidden_states=c_pre.expand(2, -1, -1)).sample
        base = plain.unet_pre(x, t, encoder_hidden_states=c_pre.expand(2, -1, -1)).sample
        ft = shared.unet_ft(x, t, encoder_hidden_states=c_ft.expand(2, -1, -1)).sample
    assert torch.allclose(pre, base, atol=1e-6), "adapters off = the pretrained UNet"
    assert (ft - pre).abs().max() > 1e-3, "adapters on = the fine-tune"
    assert any(not m._disable_adapters for m in shared.unet_pre._layers), "the adapters are back on after a call"


def test_engine_runs_a_lora_pair_pass_equal_to_the_reference(tiny_world):
    pair = load_pair(tiny_world / "base", None, tiny_world / "lora.safetensors")
    images = torch.rand(3, 3, 16, 16) * 2 - 1
    cfg = AuthConfig(prompt="a sks pattern", pgd=PGDConfig(steps=3, alpha=0.25, eps=10.0), batch_size=2)
    prep = prepare(pair, images, ["a", "b", "c"], cfg)
    eng = recover(pair, prep, cfg)
    ref = recover(pair, prep, cfg.replace(engine="reference"))
    assert pair.info["pair_pass"].startswith("lora_toggle (") and "default" in pair.info["pair_pass"]
    assert torch.allclose(eng.x_rec, ref.x_rec, atol=1e-6)
    assert torch.equal(eng.skipped_steps, ref.skipped_steps)
