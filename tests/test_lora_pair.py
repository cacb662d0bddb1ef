"""A LoRA on the base holds one copy of the UNet: the pretrained side is the same module
with its adapters off; the engine runs it as a LoRA pair pass and equals the reference.
A LoRA fine-tune with a second LoRA on it stacks (both on, each at its scale); --lora-scale
without any LoRA is refused."""
from __future__ import annotations

import copy

import pytest
import torch

from cgidm.config import AuthConfig, PGDConfig
from cgidm.lora import AdaptersOff
from cgidm.models import ModelLoadError, load_pair
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


# --------------------------------------------------------------------------- two LoRAs stacked


def _plain_unet(tiny_world):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_world / "base" / "unet").eval().requires_grad_(False)


def _lora_file(path, seed: int, unet, te, unet_layers, te_layers, rank: int = 4):
    """A PEFT-named LoRA with random A and B on ``unet_layers`` of ``unet`` and
    ``te_layers`` of the text encoder ``te`` (no alphas: scaling 1 at scale 1)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    state = {}
    for prefix, model, names in (("unet", unet, unet_layers), ("text_encoder.text_model", te, te_layers)):
        for n in names:
            w = model.get_submodule(n).weight  # [out, in] or [out, in, k, k]
            tail = [1, 1] if w.dim() == 4 else []
            state[f"{prefix}.{n}.lora_A.weight"] = 0.3 * torch.randn(rank, *w.shape[1:], generator=g)
            state[f"{prefix}.{n}.lora_B.weight"] = 0.3 * torch.randn(w.shape[0], rank, *tail, generator=g)
    save_file(state, str(path))
    return path


def _merged(plain: torch.nn.Module, *adapted_models) -> torch.nn.Module:
    """``plain`` with every active LoRA delta of ``adapted_models`` added to its weights
    (PEFT's ``get_delta_weight``, scale included): the reference a stack must equal."""
    from peft.tuners.lora import LoraLayer

    out = copy.deepcopy(plain)
    with torch.no_grad():
        for model in adapted_models:
            for name, m in model.named_modules():
                if isinstance(m, LoraLayer):
                    for a in m.active_adapters:
                        if a in m.lora_A:
                            out.get_submodule(name).weight.add_(m.get_delta_weight(a))
    return out


def _unet_out(unet, cond, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        return unet(x, t, encoder_hidden_states=cond.expand(2, -1, -1)).sample


def _te_out(te, tok):
    from cgidm.families import encode_text

    return encode_text(tok, te, "a sks pattern", torch.device("cpu"))


@pytest.fixture(scope="module")
def two_loras(tiny_world, tmp_path_factory):
    """Two random LoRAs on the tiny world: they share some UNet layers and a text-encoder
    layer, and each has layers the other lacks (the second a UNet layer no LoRA of the
    world touches)."""
    from safetensors.torch import load_file

    unet = _plain_unet(tiny_world)
    te = load_pair(tiny_world / "base", tiny_world / "finetuned").text_encoder_pre
    world = sorted({k.removeprefix("unet.").split(".lora_")[0]
                    for k in load_file(str(tiny_world / "lora.safetensors"))})
    folder = tmp_path_factory.mktemp("two_loras")
    a = _lora_file(folder / "a.safetensors", 1, unet, te, world[0::2],
                   ["encoder.layers.0.self_attn.q_proj"])
    b = _lora_file(folder / "b.safetensors", 2, unet, te, world[0::3] + ["time_embedding.linear_1"],
                   ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"])
    return a, b


def test_a_lora_fine_tune_plus_a_second_lora_is_the_base_with_both_deltas(tiny_world, two_loras):
    a, b = two_loras
    scale = 0.6
    pair = load_pair(tiny_world / "base", a, b, lora_scale=scale)
    only_a = load_pair(tiny_world / "base", a, lora_scale=scale)
    only_b = load_pair(tiny_world / "base", lora=b, lora_scale=scale)
    plain = _plain_unet(tiny_world)
    assert pair.info["finetuned_format"] == "lora" and pair.info["lora"] == str(b)
    total = only_a.info["lora_match"]["total"] + only_b.info["lora_match"]["total"]
    assert pair.info["lora_match"] == {"matched": total, "total": total}
    # one copy of the base: the pretrained side is the stacked UNet with ALL adapters off
    assert isinstance(pair.unet_pre, AdaptersOff) and pair.unet_pre.adapted is pair.unet_ft
    assert _unique_params(pair.unet_pre, pair.unet_ft) < 1.5 * _unique_params(plain)
    c_ft, c_pre = pair.encode_prompt("a sks pattern")
    assert torch.equal(c_pre, _te_out(only_a.text_encoder_pre, pair.tokenizer_pre)), "the base text encoder"
    assert torch.allclose(_unet_out(pair.unet_pre, c_pre), _unet_out(plain, c_pre), atol=1e-6), \
        "adapters off (the second LoRA's own layers too) = the pretrained UNet"
    # the fine-tuned side: the base with both deltas, each at its scale
    want_te = _te_out(_merged(only_a.text_encoder_pre, only_a.text_encoder_ft, only_b.text_encoder_ft),
                      pair.tokenizer_ft)
    assert torch.allclose(c_ft, want_te, atol=1e-5, rtol=1e-4)
    assert (c_ft - _te_out(only_a.text_encoder_ft, pair.tokenizer_ft)).abs().max() > 1e-2
    want = _unet_out(_merged(plain, only_a.unet_ft, only_b.unet_ft), c_ft)
    got = _unet_out(pair.unet_ft, c_ft)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    for one in (only_a, only_b):  # neither LoRA alone
        assert (got - _unet_out(one.unet_ft, c_ft)).abs().max() > 1e-2


def test_stacked_loras_each_keep_their_own_scale(tiny_world, two_loras):
    from cgidm.checkpoints import load_state_dict
    from cgidm.lora import _apply_lora, adapter_names

    a, b = two_loras
    sa, sb = load_state_dict(a), load_state_dict(b)
    te = load_pair(tiny_world / "base", tiny_world / "finetuned").text_encoder_pre
    plain = _plain_unet(tiny_world)
    unet, te_ab, _ = _apply_lora(sa, plain, te, a, 0.5)
    unet, te_ab, _ = _apply_lora(sb, unet, te_ab, b, 1.5, copy_unet=False, text_encoder_keep=te)
    assert adapter_names(unet) == ["ft", "ft_2"] and adapter_names(te_ab) == ["ft", "ft_2"]
    assert adapter_names(te) == [] and adapter_names(plain) == [], "the bases are left as they were"
    ua, ta, _ = _apply_lora(sa, plain, te, a, 0.5)
    ub, tb, _ = _apply_lora(sb, plain, te, b, 1.5)
    cond = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(4))
    want = _unet_out(_merged(plain, ua, ub), cond)
    got = _unet_out(unet, cond)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    tok = load_pair(tiny_world / "base", tiny_world / "finetuned").tokenizer_pre
    assert torch.allclose(_te_out(te_ab, tok), _te_out(_merged(te, ta, tb), tok), atol=1e-5, rtol=1e-4)


def test_each_delta_is_the_scale_times_b_a_read_from_the_files(tiny_world, two_loras):
    """Independent of the loader: on linear layers of the UNet and the text encoder, the
    fine-tuned side adds ``scale * (B_a A_a + B_b A_b) x`` (the files' own matrices; no
    alphas, so PEFT's scaling is 1) to the base layer's output; at scale 0 both prompts'
    encodings are the base's."""
    from safetensors.torch import load_file

    a, b = two_loras
    files = [load_file(str(a)), load_file(str(b))]
    g = torch.Generator().manual_seed(5)
    for scale in (0.0, 0.5, 1.5):
        pair = load_pair(tiny_world / "base", a, b, lora_scale=scale)
        for model, key in ((pair.unet_ft, "unet.time_embedding.linear_1"),
                           (pair.text_encoder_ft, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj"),
                           (pair.text_encoder_ft, "text_encoder.text_model.encoder.layers.1.mlp.fc1")):
            layer = model.get_submodule(key.removeprefix("unet.").removeprefix("text_encoder.text_model."))
            x = torch.randn(3, layer.base_layer.in_features, generator=g)
            delta = scale * sum(f[f"{key}.lora_B.weight"] @ f[f"{key}.lora_A.weight"] for f in files
                                if f"{key}.lora_A.weight" in f)
            with torch.no_grad():
                got = layer(x) - layer.base_layer(x)
            assert torch.allclose(got, x @ delta.T, atol=1e-5, rtol=1e-4), (scale, key)
        if scale == 0.0:
            c_ft, c_pre = pair.encode_prompt("a sks pattern")
            assert torch.allclose(c_ft, c_pre, atol=1e-6)


@pytest.mark.parametrize("name", ["lora_toggle", "lora_fused"])
def test_lora_pair_passes_run_both_stacked_adapters(tiny_world, two_loras, name):
    from cgidm import pairpass

    a, b = two_loras
    pair = load_pair(tiny_world / "base", a, b)
    assert pairpass.pair_kind(pair.unet_ft, pair.unet_pre) == ("lora", True)
    g = torch.Generator().manual_seed(6)
    x_ft, x_pre = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    t = torch.tensor([30, 700])
    c_ft, c_pre = (c.expand(2, -1, -1) for c in pair.encode_prompt("a sks pattern"))
    seeds = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)

    def run(pp):
        xa, xb = x_ft.clone().requires_grad_(True), x_pre.clone().requires_grad_(True)
        e_ft, e_pre = pp(xa, xb, t, c_ft, c_pre)
        grads = torch.autograd.grad((e_ft * seeds[0]).sum() - (e_pre * seeds[1]).sum(), (xa, xb))
        return [e_ft.detach(), e_pre.detach(), *grads]

    want = run(pairpass.sequential(pair.unet_ft, pair.unet_pre))
    pp = pairpass.build(name, pair.unet_ft)
    try:
        got = run(pp)
    finally:
        if name == "lora_fused":
            pp.remove()
    for g_, w in zip(got, want):
        assert (g_ - w).abs().max() <= 1e-5 * w.abs().max()
    assert (want[0] - _unet_out(pair.unet_pre, c_ft[:1])[:1]).abs().max() > 1e-3  # the test can fail


def test_cli_loads_a_lora_fine_tune_with_a_second_lora(tiny_world, tmp_path, capsys):
    from cgidm.cli import main

    code = main(["authenticate", "--base", str(tiny_world / "base"),
                 "--finetuned", str(tiny_world / "lora.safetensors"),
                 "--lora", str(tiny_world / "lora_kohya.safetensors"),
                 "--images", str(tiny_world / "images" / "members"), "--out", str(tmp_path / "out"),
                 "--steps", "2", "--quiet"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "does not fit" not in err and "already in use" not in err


def test_a_lora_on_the_text_encoder_only_loads(tiny_world, tmp_path, capsys):
    """No UNet layer to switch off: the pretrained and fine-tuned UNets are the base's,
    one module run twice (pair kind ``same``, never ``stacked``), and a run works."""
    from cgidm import pairpass
    from cgidm.cli import main

    te = load_pair(tiny_world / "base", tiny_world / "finetuned").text_encoder_pre
    path = _lora_file(tmp_path / "te.safetensors", 3, None, te, [], ["encoder.layers.0.self_attn.q_proj"])
    for pair in (load_pair(tiny_world / "base", lora=path), load_pair(tiny_world / "base", path)):
        assert pair.unet_pre is pair.unet_ft and pair.info["lora_match"] == {"matched": 1, "total": 1}
        assert pairpass.pair_kind(pair.unet_ft, pair.unet_pre) == ("same", False)
        c_ft, c_pre = pair.encode_prompt("a sks pattern")
        assert (c_ft - c_pre).abs().max() > 1e-2
    out = tmp_path / "out"
    code = main(["authenticate", "--base", str(tiny_world / "base"), "--lora", str(path),
                 "--images", str(tiny_world / "images" / "members"), "--out", str(out), "--steps", "2", "--quiet",
                 "--prompt", "a sks pattern"])
    assert code == 0, capsys.readouterr().err
    assert (out / "summary.json").is_file()


def test_kohya_text_encoder_alphas_per_module_scale_each_layer(tiny_world, tmp_path):
    """A kohya LoRA whose text-encoder layers have alphas of their own (attention 1 and 2,
    MLP 4, rank 4) equals the same LoRA with alpha / rank folded into its up weights: every
    layer fell back to the most common alpha before (diffusers names those alphas after no
    module of a transformers 5 CLIP)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_world / "lora_kohya.safetensors"))
    own, folded = dict(state), dict(state)
    g = torch.Generator().manual_seed(5)
    for mod, n_in, n_out, alpha in [("self_attn_q_proj", 32, 32, 2.0), ("self_attn_k_proj", 32, 32, 1.0),
                                    ("self_attn_v_proj", 32, 32, 1.0), ("self_attn_out_proj", 32, 32, 1.0),
                                    ("mlp_fc1", 32, 64, 4.0), ("mlp_fc2", 64, 32, 4.0)]:
        down, up = 0.3 * torch.randn(4, n_in, generator=g), 0.3 * torch.randn(n_out, 4, generator=g)
        name = f"lora_te_text_model_encoder_layers_0_{mod}"
        own.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)})
        folded.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up * (alpha / 4),
                       f"{name}.alpha": torch.tensor(4.0)})
    save_file(own, str(tmp_path / "own.safetensors"))
    save_file(folded, str(tmp_path / "folded.safetensors"))
    a = load_pair(tiny_world / "base", tmp_path / "own.safetensors")
    b = load_pair(tiny_world / "base", tmp_path / "folded.safetensors")
    c_a, c_b = a.encode_prompt("a sks pattern")[0], b.encode_prompt("a sks pattern")[0]
    assert (c_a - a.encode_prompt("a sks pattern")[1]).abs().max() > 1e-2  # the LoRA changes the encoding
    torch.testing.assert_close(c_a, c_b, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- --lora-scale without a LoRA


def test_lora_scale_without_a_lora_is_refused(tiny_world):
    with pytest.raises(ValueError, match="--lora-scale applies to a LoRA; none was given"):
        load_pair(tiny_world / "base", tiny_world / "finetuned", lora_scale=0.5)
    with pytest.raises(ValueError, match="--lora-scale applies to a LoRA; none was given"):
        load_pair(tiny_world / "base", tiny_world / "finetuned.safetensors", lora_scale=2.0)
    # with a LoRA (as the fine-tune or as --lora) the scale is used
    a = load_pair(tiny_world / "base", tiny_world / "lora.safetensors", lora_scale=0.5)
    b = load_pair(tiny_world / "base", tiny_world / "finetuned", tiny_world / "lora.safetensors", lora_scale=0.5)
    assert a.info["finetuned_format"] == "lora" and b.info["lora"]


def test_cli_lora_scale_without_a_lora_is_a_one_line_usage_error(tiny_world, tmp_path, capsys):
    from cgidm.cli import EXIT_USAGE, main

    code = main(["authenticate", "--base", str(tiny_world / "base"), "--finetuned", str(tiny_world / "finetuned"),
                 "--images", str(tiny_world / "images" / "members"), "--out", str(tmp_path / "out"),
                 "--steps", "2", "--quiet", "--lora-scale", "0.5"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE
    assert err.startswith("cgidm: error: --lora-scale applies to a LoRA; none was given") and "\n" not in err


# --------------------------------------------------------------------------- load errors said as they are


def test_only_a_misfit_is_said_not_to_fit(tiny_world, tmp_path):
    from safetensors.torch import load_file, save_file

    from cgidm.lora import _load_error
    from cgidm.models import ModelLoadError

    said = str(_load_error(tmp_path / "x.safetensors", "UNet", ValueError("Adapter name ft already in use")))
    assert "does not fit" not in said and "could not be loaded" in said and "already in use" in said
    said = str(_load_error(tmp_path / "x.safetensors", "UNet", RuntimeError("size mismatch for conv1.lora_A")))
    assert "does not fit the base UNet" in said
    # a LoRA whose A has the wrong width: a misfit
    state = load_file(str(tiny_world / "lora.safetensors"))
    k = next(k for k in state if k.endswith("conv1.lora_A.weight"))
    state[k] = torch.zeros(state[k].shape[0], state[k].shape[1] + 3, *state[k].shape[2:])
    save_file(state, str(tmp_path / "wide.safetensors"))
    with pytest.raises(ModelLoadError, match="does not fit the base UNet") as e:
        load_pair(tiny_world / "base", lora=tmp_path / "wide.safetensors")
    # torch's message is a bare header line and then the layers: they are counted and one is named
    name = k.removeprefix("unet.").replace(".lora_A.weight", ".lora_A.weight")
    w = list(state[k].shape)
    assert ("1 LoRA weight shape(s) differ from the model's, e.g. " in str(e.value)
            and f"[{', '.join(map(str, w))}] in the file, [{w[0]}, {w[1] - 3}" in str(e.value)), str(e.value)
    assert ".ft." not in str(e.value) and name.split(".")[-3] in str(e.value)


def test_adapters_the_loaders_would_drop_or_misread_are_refused_by_name(tiny_world, tmp_path):
    """A kohya DoRA ran as a plain LoRA (diffusers drops '.dora_scale' with a log line) and
    a LoHa was "not a LoRA that diffusers can read" with the key list cut off."""
    from safetensors.torch import load_file, save_file

    from cgidm.checkpoints import _one_line

    state = load_file(str(tiny_world / "lora_kohya.safetensors"))
    layer = next(k for k in state if k.endswith(".lora_down.weight")).removesuffix(".lora_down.weight")
    cases = {"dora": ({f"{layer}.dora_scale": torch.ones(1)}, "a DoRA in kohya's naming"),
             "loha": ({f"{layer}.hada_w1_a": torch.ones(2, 2)}, "LyCORIS LoHa/LoKr weights")}
    for name, (extra, message) in cases.items():
        save_file({**state, **extra}, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ModelLoadError, match=message):
            load_pair(tiny_world / "base", tmp_path / f"{name}.safetensors")
    # a library message that ends its first line with ':' keeps the line after it
    assert _one_line(ValueError("The following keys have not been renamed:\n a.alpha\n b.alpha")) == \
        "ValueError: The following keys have not been renamed: a.alpha ..."


def test_a_kohya_text_encoder_lora_of_some_projections_equals_its_peft_twin(tiny_world, tmp_path):
    """q and v only (PEFT's default for CLIP), and q, v and fc1: diffusers tells its old
    naming apart by an out_proj LoRA and refused these ("Could not automatically infer
    state dict type"), or matched them only in part."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    for mods in (["self_attn_q_proj", "self_attn_v_proj"], ["self_attn_q_proj", "self_attn_v_proj", "mlp_fc1"]):
        kohya, peft = {}, {}
        for mod in mods:
            n_out = 64 if mod == "mlp_fc1" else 32
            down, up = 0.3 * torch.randn(4, 32, generator=g), 0.3 * torch.randn(n_out, 4, generator=g)
            name = f"lora_te_text_model_encoder_layers_1_{mod}"
            kohya.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(4.0)})
            module = "text_encoder.text_model.encoder.layers.1." + mod.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            peft.update({f"{module}.lora_A.weight": down, f"{module}.lora_B.weight": up})
        save_file(kohya, str(tmp_path / "kohya.safetensors"))
        save_file(peft, str(tmp_path / "peft.safetensors"))
        a = load_pair(tiny_world / "base", tmp_path / "kohya.safetensors")
        b = load_pair(tiny_world / "base", tmp_path / "peft.safetensors")
        assert a.info["lora_match"] == {"matched": len(mods), "total": len(mods)}, mods
        c_a, c_pre = a.encode_prompt("a sks pattern")
        assert (c_a - c_pre).abs().max() > 1e-2, mods
        torch.testing.assert_close(c_a, b.encode_prompt("a sks pattern")[0], rtol=1e-5, atol=1e-5)


def test_a_loras_own_settings_in_its_metadata_set_its_strength(tiny_world, tmp_path, caplog):
    """diffusers writes a LoRA's PEFT settings into the file's metadata (``lora_alpha`` !=
    ``r``, per model): they are read, so the LoRA equals its twin with alpha / r folded into
    B (before, every layer ran at alpha / r = 1: here 2x too weak on the UNet, 2x too strong on
    the text encoder). The file's initialisation is not taken: PiSSA rewrites the base
    layers, which are also the pretrained side's (by up to 0.43 here). Metadata that is not a
    JSON object is refused."""
    import json

    from safetensors.torch import load_file, save_file

    unet = _plain_unet(tiny_world)
    te = load_pair(tiny_world / "base", tiny_world / "finetuned").text_encoder_pre
    layers = sorted({k.removeprefix("unet.").split(".lora_")[0]  # linear layers: PiSSA takes only those
                     for k in load_file(str(tiny_world / "lora.safetensors")) if ".attn" in k})[:6]
    te_layers = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1"]
    state = load_file(str(_lora_file(tmp_path / "plain.safetensors", 3, unet, te, layers, te_layers)))
    meta = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": layers, "unet.init_lora_weights": "pissa",
            "text_encoder.r": 4, "text_encoder.lora_alpha": 2,
            "text_encoder.target_modules": [n.split(".")[-1] for n in te_layers]}
    save_file(state, str(tmp_path / "meta.safetensors"), metadata={"lora_adapter_metadata": json.dumps(meta)})
    folded = {k: v * (2.0 if k.startswith("unet.") else 0.5) if ".lora_B." in k else v for k, v in state.items()}
    save_file(folded, str(tmp_path / "folded.safetensors"))
    a = load_pair(tiny_world / "base", lora=tmp_path / "meta.safetensors")
    b = load_pair(tiny_world / "base", lora=tmp_path / "folded.safetensors")
    assert a.info["lora_match"] == {"matched": 8, "total": 8}
    c_a, c_pre = a.encode_prompt("a sks pattern")
    c_b = b.encode_prompt("a sks pattern")[0]
    assert (c_a - c_pre).abs().max() > 1e-2
    torch.testing.assert_close(c_a, c_b, rtol=1e-5, atol=1e-5)
    out_a, out_b = _unet_out(a.unet_ft, c_b), _unet_out(b.unet_ft, c_b)
    assert (out_a - _unet_out(unet, c_b)).abs().max() > 1e-3
    torch.testing.assert_close(out_a, out_b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_unet_out(a.unet_pre, c_b), _unet_out(unet, c_b), rtol=0, atol=1e-6)
    # a setting a newer PEFT wrote is left out, with a warning (it stopped the load)
    newer = {**meta, "unet.some_future_field": 1}
    save_file(state, str(tmp_path / "newer.safetensors"), metadata={"lora_adapter_metadata": json.dumps(newer)})
    with caplog.at_level("WARNING", logger="cgidm.lora"):
        c = load_pair(tiny_world / "base", lora=tmp_path / "newer.safetensors")
    assert "this PEFT does not know, ignored: unet.some_future_field" in caplog.text
    torch.testing.assert_close(_unet_out(c.unet_ft, c_b), out_b, rtol=1e-4, atol=1e-5)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={"lora_adapter_metadata": "[1, 2]"})
    with pytest.raises(ModelLoadError, match="malformed LoRA settings in the file's metadata"):
        load_pair(tiny_world / "base", lora=tmp_path / "bad.safetensors")
    # a rank past the tensors' (PEFT would build every adapter at it first: all the memory)
    for forged in ({**meta, "unet.r": 5_000_000}, {**meta, "text_encoder.rank_pattern": {"q_proj": 10**9}},
                   {**meta, "unet.r": "4"}):
        save_file(state, str(tmp_path / "forged.safetensors"), metadata={"lora_adapter_metadata": json.dumps(forged)})
        with pytest.raises(ModelLoadError, match=r"metadata give rank .* its tensors have rank 4: a damaged or forged"):
            load_pair(tiny_world / "base", lora=tmp_path / "forged.safetensors")
