"""Offline loaders on the tiny world: every fine-tune format, and what is refused."""
import json
import os
import pickle
import re
import shutil

import pytest
import torch

from cgidm.models import ModelLoadError, load_pair, load_state_dict, read_safetensors_header


def _out(pair, x=None):
    """The fine-tuned and pretrained UNets' outputs on a fixed input."""
    g = torch.Generator().manual_seed(0)
    c = pair.latent_channels
    s = pair.latent_size
    x = torch.randn(1, c, s, s, generator=g) if x is None else x
    t = torch.tensor([500])
    c_ft, c_pre = pair.encode_prompt("a sks pattern")
    with torch.no_grad():
        return (pair.unet_ft(x, t, encoder_hidden_states=c_ft).sample,
                pair.unet_pre(x, t, encoder_hidden_states=c_pre).sample)


def test_diffusers_directory_pair(tiny_world):
    pair = load_pair(tiny_world / "base", tiny_world / "finetuned")
    ft, pre = _out(pair)
    assert not torch.allclose(ft, pre)
    assert pair.info["finetuned_format"] == "diffusers"
    assert not any(p.requires_grad for p in pair.unet_ft.parameters())
    assert not any(p.requires_grad for p in pair.unet_pre.parameters())
    assert pair.resolution == 16 and pair.latent_channels == 3


def test_moving_a_pair_moves_its_schedule(tiny_world):
    """``abar`` is indexed by timesteps on the models' device: it moves with them, fp64."""
    pair = load_pair(tiny_world / "base", tiny_world / "finetuned").to("meta")
    assert next(pair.unet_ft.parameters()).device.type == "meta"
    assert pair.abar.device.type == "meta" and pair.abar.dtype == torch.float64


def test_unet_folder_alone(tiny_world):
    a = load_pair(tiny_world / "base", tiny_world / "finetuned")
    b = load_pair(tiny_world / "base", tiny_world / "finetuned" / "unet")
    assert b.info["finetuned_format"] == "diffusers-unet"
    assert torch.equal(_out(a)[0], _out(b)[0])


def test_the_parts_a_finetune_takes_from_its_base_are_said(tiny_world, tmp_path, caplog):
    with caplog.at_level("INFO", logger="cgidm"):
        whole = load_pair(tiny_world / "base", tiny_world / "finetuned")
        inner = load_pair(tiny_world / "base", tiny_world / "finetuned" / "unet")
    assert "finetuned_uses_base" not in whole.info
    assert inner.info["finetuned_uses_base"] == ["text_encoder", "tokenizer"]
    assert (f"the base's text_encoder, tokenizer used: only its UNet was given (pass {tiny_world / 'finetuned'} "
            "to use its text_encoder, tokenizer)") in caplog.text
    unet_only = tmp_path / "ft"
    shutil.copytree(tiny_world / "finetuned", unet_only, ignore=shutil.ignore_patterns("text_encoder", "tokenizer"))
    caplog.clear()
    with caplog.at_level("INFO", logger="cgidm"):
        assert load_pair(tiny_world / "base", unet_only).info["finetuned_uses_base"] == ["text_encoder", "tokenizer"]
        assert load_pair(tiny_world / "base", unet_only / "unet").info["finetuned_uses_base"] == \
            ["text_encoder", "tokenizer"]
    assert "it has none of its own" in caplog.text and "to use its" not in caplog.text


def test_lora_on_base_changes_only_the_finetuned_side(tiny_world):
    base_only = load_pair(tiny_world / "base", tiny_world / "base")
    pair = load_pair(tiny_world / "base", lora=tiny_world / "lora.safetensors")
    ft, pre = _out(pair)
    ft0, pre0 = _out(base_only)
    assert torch.equal(pre, pre0)  # the base copy is untouched
    assert not torch.allclose(ft, ft0, atol=1e-4)
    # a LoRA file given as --finetuned is detected
    same = load_pair(tiny_world / "base", tiny_world / "lora.safetensors")
    assert same.info["finetuned_format"] == "lora"
    assert torch.allclose(_out(same)[0], ft)


def test_a_lora_training_runs_folder_stands_for_its_lora_file(tiny_world, tmp_path, monkeypatch):
    """The folder a LoRA training run saves (diffusers' pytorch_lora_weights.safetensors,
    or one kohya <name>.safetensors, logs and checkpoints beside) may be given as --lora or
    --finetuned: its LoRA file is loaded. Several LoRA files are refused naming them; a
    folder without one, or a full fine-tune's file as --lora, says what to give instead."""
    import shutil

    want = _out(load_pair(tiny_world / "base", lora=tiny_world / "lora.safetensors"))[0]
    run = tmp_path / "lora-run"
    (run / "checkpoint-500").mkdir(parents=True)
    shutil.copy(tiny_world / "lora.safetensors", run / "pytorch_lora_weights.safetensors")
    shutil.copy(tiny_world / "lora.safetensors", run / "checkpoint-500" / "pytorch_lora_weights.safetensors")
    (run / "README.md").write_text("model card")
    for pair in (load_pair(tiny_world / "base", lora=run), load_pair(tiny_world / "base", run)):
        assert torch.allclose(_out(pair)[0], want)
        assert str(run / "pytorch_lora_weights.safetensors") in (pair.info.get("lora"), pair.info.get("finetuned"))
    monkeypatch.setenv("HOME", str(tmp_path))  # a quoted "~/..." as the other paths take it
    assert load_pair(tiny_world / "base", lora="~/lora-run").info["lora"].endswith("lora-run/pytorch_lora_weights.safetensors")
    kohya = tmp_path / "kohya-run"
    kohya.mkdir()
    shutil.copy(tiny_world / "lora_kohya.safetensors", kohya / "style.safetensors")
    assert load_pair(tiny_world / "base", lora=kohya).info["lora"] == str(kohya / "style.safetensors")
    shutil.copy(tiny_world / "lora_kohya.safetensors", kohya / "style-000002.safetensors")
    with pytest.raises(ModelLoadError, match="2 LoRA files in this folder .*style-000002.safetensors"):
        load_pair(tiny_world / "base", lora=kohya)
    with pytest.raises(ModelLoadError, match="without a LoRA .safetensors file.*goes to --finetuned"):
        load_pair(tiny_world / "base", lora=tiny_world / "finetuned")
    with pytest.raises(ModelLoadError, match="give it as --finetuned"):
        load_pair(tiny_world / "base", lora=tiny_world / "finetuned.safetensors")
    with pytest.raises(ModelLoadError, match="from_single_file"):
        load_pair(tiny_world / "finetuned.safetensors", tiny_world / "finetuned")


def test_lora_scale_zero_is_the_base(tiny_world):
    pair = load_pair(tiny_world / "base", lora=tiny_world / "lora.safetensors", lora_scale=0.0)
    ft, pre = _out(pair)
    assert torch.allclose(ft, pre, atol=1e-6)


def test_hub_id_fails_at_once_without_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="never downloads"):
        load_pair("runwayml/stable-diffusion-v1-5", "someone/suspect")
    # a mistyped path is only "not found": a weight file's name, a folder that exists, or deeper
    (tmp_path / "models").mkdir()
    for path in ("someone/suspect.safetensors", "models/suspect", "a/b/c"):
        with pytest.raises(ModelLoadError, match="not found") as e:
            load_pair(path, "x")
        assert "hub" not in str(e.value), path


def test_missing_component_is_named(tiny_world, tmp_path):
    broken = tmp_path / "base"
    shutil.copytree(tiny_world / "base", broken)
    shutil.rmtree(broken / "scheduler")
    with pytest.raises(ModelLoadError, match="scheduler"):
        load_pair(broken, tiny_world / "finetuned")
    empty = tmp_path / "ft"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="unet"):
        load_pair(tiny_world / "base", empty)


def _pickle_folder(tiny_world, tmp_path):
    src = tiny_world / "finetuned" / "unet"
    dst = tmp_path / "ft_bin" / "unet"
    dst.mkdir(parents=True)
    shutil.copy(src / "config.json", dst / "config.json")
    from safetensors.torch import load_file

    torch.save(load_file(str(src / "diffusion_pytorch_model.safetensors")), dst / "diffusion_pytorch_model.bin")
    return dst.parent


def test_pickle_refused_by_default_and_weights_only_when_allowed(tiny_world, tmp_path):
    ft_bin = _pickle_folder(tiny_world, tmp_path)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_pair(tiny_world / "base", ft_bin)
    pair = load_pair(tiny_world / "base", ft_bin, allow_pickle=True)
    ref = load_pair(tiny_world / "base", tiny_world / "finetuned")
    # same weights; tensors loaded from a pickle differ in layout, so the last bits may too
    assert torch.allclose(_out(pair)[0], _out(ref)[0], atol=1e-5)


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['CGIDM_PWNED']}",))


def test_malicious_pickle_never_runs(tmp_path, monkeypatch):
    flag = tmp_path / "pwned"
    monkeypatch.setenv("CGIDM_PWNED", str(flag))
    evil = tmp_path / "evil.ckpt"
    with open(evil, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_state_dict(evil)
    with pytest.raises(ModelLoadError, match="weights_only"):
        load_state_dict(evil, allow_pickle=True)
    assert not flag.exists()


def test_safetensors_header_bounds(tmp_path):
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**12).to_bytes(8, "little") + b"{}")
    with pytest.raises(ModelLoadError, match="malformed"):
        read_safetensors_header(huge)
    trunc = tmp_path / "trunc.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    trunc.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    with pytest.raises(ModelLoadError, match="truncated"):
        load_state_dict(trunc)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{{{{{")
    with pytest.raises(ModelLoadError, match="malformed"):
        load_state_dict(junk)


def test_mismatched_architecture_is_refused_before_compute(tiny_world, tmp_path):
    from diffusers import UNet2DConditionModel

    from cgidm.testing.tiny import tiny_unet_config

    cfg = tiny_unet_config(16)
    cfg["cross_attention_dim"] = 48
    UNet2DConditionModel(**cfg).save_pretrained(tmp_path / "wide" / "unet")
    with pytest.raises(ModelLoadError, match="cross_attention_dim"):
        load_pair(tiny_world / "base", tmp_path / "wide")
    cfg = tiny_unet_config(16)
    cfg["in_channels"] = cfg["out_channels"] = 4
    UNet2DConditionModel(**cfg).save_pretrained(tmp_path / "four" / "unet")
    with pytest.raises(ModelLoadError, match="in_channels"):
        load_pair(tiny_world / "base", tmp_path / "four")


def test_lora_matching_nothing_is_refused(tiny_world, tmp_path):
    from safetensors.torch import save_file

    bogus = tmp_path / "bogus.safetensors"
    save_file({"unet.nowhere.block.lora_A.weight": torch.zeros(4, 8),
               "unet.nowhere.block.lora_B.weight": torch.zeros(8, 4)}, str(bogus))
    with pytest.raises(ModelLoadError):
        load_pair(tiny_world / "base", lora=bogus)


def test_single_file_checkpoint_equals_the_directory(tiny_world):
    a = load_pair(tiny_world / "base", tiny_world / "finetuned")
    b = load_pair(tiny_world / "base", tiny_world / "finetuned.safetensors")
    assert b.info["finetuned_format"] == "single-file"
    sa, sb = a.unet_ft.state_dict(), b.unet_ft.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.allclose(_out(a)[0], _out(b)[0], atol=1e-5)
    assert torch.equal(_out(a)[1], _out(b)[1])


def test_kohya_lora_equals_the_peft_lora(tiny_world):
    a = load_pair(tiny_world / "base", lora=tiny_world / "lora.safetensors")
    b = load_pair(tiny_world / "base", lora=tiny_world / "lora_kohya.safetensors")
    assert torch.allclose(_out(a)[0], _out(b)[0], atol=1e-5)


def test_single_file_pickle_checkpoint_is_refused_then_loaded_weights_only(tiny_world, tmp_path):
    from safetensors.torch import load_file

    ckpt = tmp_path / "suspect.ckpt"
    torch.save({"state_dict": load_file(str(tiny_world / "finetuned.safetensors"))}, ckpt)
    with pytest.raises(ModelLoadError, match="allow-pickle"):
        load_pair(tiny_world / "base", ckpt)
    pair = load_pair(tiny_world / "base", ckpt, allow_pickle=True)
    ref = load_pair(tiny_world / "base", tiny_world / "finetuned")
    assert torch.allclose(_out(pair)[0], _out(ref)[0], atol=1e-5)


def _edit_weights(file, drop=(), add=None):
    from safetensors.torch import load_file, save_file

    state = {k: v for k, v in load_file(str(file)).items() if not k.startswith(tuple(drop))}
    state.update(add or {})
    save_file(state, str(file))


def test_weights_missing_from_a_file_are_refused_not_made_up(tiny_world, tmp_path, caplog):
    # transformers fills a missing tensor with random values and diffusers leaves it on the
    # meta device: either would give scores that mean nothing
    cases = [("text_encoder/model.safetensors", "encoder.layers.0.", "text encoder weights missing"),
             ("unet/diffusion_pytorch_model.safetensors", "conv_out.weight", "UNet weights missing")]
    for i, (name, drop, message) in enumerate(cases):
        ft = tmp_path / f"ft{i}"
        shutil.copytree(tiny_world / "finetuned", ft)
        _edit_weights(ft / name, drop=[drop])
        with pytest.raises(ModelLoadError, match=f"{message} in its file: .*{drop.rstrip('.')}"):
            load_pair(tiny_world / "base", ft)
    # a tensor of another shape: the error names it (transformers logs it in a report and
    # raises "look at the above report")
    grown = tmp_path / "grown"
    shutil.copytree(tiny_world / "finetuned", grown)
    _edit_weights(grown / "text_encoder/model.safetensors",
                  add={"encoder.layers.0.mlp.fc1.weight": torch.zeros(65, 32)})
    with pytest.raises(ModelLoadError, match=r"encoder\.layers\.0\.mlp\.fc1\.weight .*65, 32"):
        load_pair(tiny_world / "base", grown)
    single = tmp_path / "ft.safetensors"
    shutil.copy(tiny_world / "finetuned.safetensors", single)
    _edit_weights(single, drop=["cond_stage_model.transformer.text_model.encoder.layers.0."])
    with pytest.raises(ModelLoadError, match="text encoder weights missing in its file"):
        load_pair(tiny_world / "base", single)
    # a tensor the model does not use is only logged
    extra = tmp_path / "extra"
    shutil.copytree(tiny_world / "finetuned", extra)
    _edit_weights(extra / "unet/diffusion_pytorch_model.safetensors", add={"bogus.weight": torch.zeros(2)})
    with caplog.at_level("WARNING", logger="cgidm"):
        pair = load_pair(tiny_world / "base", extra)
    assert "1 tensor(s) in the UNet's file that it does not use, ignored (bogus.weight)" in caplog.text
    assert torch.allclose(_out(pair)[0], _out(load_pair(tiny_world / "base", tiny_world / "finetuned"))[0], atol=1e-5)


def test_a_full_fine_tune_or_base_with_nan_or_inf_weights_is_refused(tiny_world, tmp_path):
    """NaN or inf in a full fine-tune (a single file, a diffusers folder) or in the base
    loaded and gave NaN everywhere: every PGD step skipped, "stalled", exit 0. Now it is
    refused at loading, naming the model, the part and a tensor; a finite fine-tune still loads."""
    from safetensors.torch import load_file, save_file

    from cgidm.protect_pgd import load_base

    def said(where, part, tensor=""):
        return re.escape(f"{where} ({part}): 1 weight tensor(s) hold NaN or inf (e.g. {tensor}") + (
            "" if tensor else r"\S+") + re.escape(", as loaded in float32)")

    single = load_file(str(tiny_world / "finetuned.safetensors"))
    key = next(k for k in single if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    bad = single[key].clone()
    bad.view(-1)[bad.numel() // 2] = float("nan")
    save_file({**single, key: bad}, str(tmp_path / "nan.safetensors"))
    with pytest.raises(ModelLoadError, match=said(tmp_path / "nan.safetensors", "unet")):
        load_pair(tiny_world / "base", tmp_path / "nan.safetensors")

    def poisoned(name: str, part: str):
        folder = tmp_path / name
        shutil.copytree(tiny_world / "finetuned", folder)
        weights = next((folder / part).glob("*.safetensors"))
        state = load_file(str(weights))
        tensor = sorted(k for k in state if k.endswith(".bias"))[0]
        state[tensor] = state[tensor].clone().fill_(float("inf"))
        save_file(state, str(weights))
        return folder, tensor

    folder, name = poisoned("ft", "unet")
    with pytest.raises(ModelLoadError, match=said(folder, "unet", name)):
        load_pair(tiny_world / "base", folder)
    # the same folder as the base: refused as the base, by authenticate's loading and protect's
    with pytest.raises(ModelLoadError, match=said(folder, "unet", name)):
        load_pair(folder, tiny_world / "finetuned")
    with pytest.raises(ModelLoadError, match=said(folder, "unet", name)):
        load_base(folder)
    folder, name = poisoned("bad-text", "text_encoder")  # (the tiny worlds have no VAE to poison)
    with pytest.raises(ModelLoadError, match=said(folder, "text encoder")):
        load_base(folder)
    with pytest.raises(ModelLoadError, match=said(folder, "text encoder")):
        load_pair(folder, tiny_world / "finetuned")
    assert load_pair(tiny_world / "base", tiny_world / "finetuned.safetensors").info["finetuned_format"] == "single-file"


def test_weights_that_cannot_be_a_models_are_refused(tiny_world, tmp_path):
    """Integer weights (a single file or a LoRA) and NaN in a LoRA loaded and gave NaN
    outputs: every PGD step skipped and an AUC without meaning, exit 0."""
    from safetensors.torch import load_file, save_file

    single = load_file(str(tiny_world / "finetuned.safetensors"))
    key = next(k for k in single if k.startswith("model.diffusion_model.") and k.endswith(".weight"))
    save_file({**single, key: single[key].to(torch.int32)}, str(tmp_path / "int.safetensors"))
    with pytest.raises(ModelLoadError, match=f"weight tensor\\(s\\) of an integer type \\(e.g. {key}: torch.int32\\)"):
        load_pair(tiny_world / "base", tmp_path / "int.safetensors")
    lora = load_file(str(tiny_world / "lora_kohya.safetensors"))
    up = next(k for k in lora if k.endswith(".lora_up.weight"))
    nan = lora[up].clone()
    nan[0, 0] = float("nan")
    save_file({**lora, up: nan}, str(tmp_path / "nan.safetensors"))
    for args in ((tmp_path / "nan.safetensors",), (None, tmp_path / "nan.safetensors")):
        with pytest.raises(ModelLoadError, match=f"1 tensor\\(s\\) hold NaN or inf \\(e.g. {up}\\)"):
            load_pair(tiny_world / "base", *args)
    # a kohya alpha saved from an integer rank is a LoRA's own
    alphas = {k: torch.tensor(int(v.item()) if v.numel() == 1 else 4) for k, v in lora.items() if k.endswith(".alpha")}
    save_file({**lora, **alphas}, str(tmp_path / "int_alpha.safetensors"))
    assert load_pair(tiny_world / "base", tmp_path / "int_alpha.safetensors").info["lora_match"]["matched"] > 0


def test_a_float8_lora_loads_as_its_values(tiny_world, tmp_path):
    """A LoRA saved in float8 (its NaN check had no float8 kernel: a crash, exit 4) loads,
    and is the same LoRA as its values saved in float32; a NaN in it is still found."""
    from safetensors.torch import load_file, save_file

    lora = load_file(str(tiny_world / "lora.safetensors"))
    f8 = {k: v.to(torch.float8_e4m3fn) for k, v in lora.items()}
    save_file(f8, str(tmp_path / "f8.safetensors"))
    save_file({k: v.float() for k, v in f8.items()}, str(tmp_path / "f32.safetensors"))
    a = load_pair(tiny_world / "base", lora=tmp_path / "f8.safetensors")
    b = load_pair(tiny_world / "base", lora=tmp_path / "f32.safetensors")
    assert a.info["lora_match"] == b.info["lora_match"] and a.info["lora_match"]["matched"] > 0
    sa, sb = a.unet_ft.state_dict(), b.unet_ft.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)
    key = next(iter(f8))
    nan = f8[key].clone()
    nan.view(torch.uint8)[0] = 0x7F  # e4m3fn's NaN
    save_file({**f8, key: nan}, str(tmp_path / "f8nan.safetensors"))
    with pytest.raises(ModelLoadError, match="hold NaN or inf"):
        load_pair(tiny_world / "base", lora=tmp_path / "f8nan.safetensors")


def test_a_finetune_with_the_bases_weights_is_said(tiny_world, tmp_path, caplog):
    """The base given as the fine-tune (or a copy of it): both sides are one model, said in
    a warning naming the path; a real fine-tune is not."""
    caplog.set_level("WARNING", logger="cgidm.checkpoints")
    assert "same_as_base" not in load_pair(tiny_world / "base", tiny_world / "finetuned").info
    assert "the base model's weights exactly" not in caplog.text
    copy = shutil.copytree(tiny_world / "base", tmp_path / "copy")
    for suspect in (tiny_world / "base", copy):
        caplog.clear()
        pair = load_pair(tiny_world / "base", suspect)
        assert f"{suspect}: its UNet has the base model's weights exactly" in caplog.text
        assert pair.info["same_as_base"] is True  # said again in extract's outputs (tests/test_extract.py)
