"""What a model folder holds beside the weights its loaders read, folders and links this
user cannot use, and LoRA files given in ways that would mislead: each loads as it should
or is refused naming the file, never a crash (exit 4) and never a silently wrong model."""
import os
import shutil
from pathlib import Path

import pytest
import torch

from cgidm.models import ModelLoadError, load_pair


def _unet_out(pair):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, pair.latent_channels, pair.latent_size, pair.latent_size, generator=g)
    c = pair.encode_prompt("a sks pattern")[0]
    with torch.no_grad():
        return pair.unet_ft(x, torch.tensor([500]), encoder_hidden_states=c).sample


@pytest.fixture
def copy(tiny_world, tmp_path):
    """A copy of the world's full fine-tune to add files to."""
    return Path(shutil.copytree(tiny_world / "finetuned", tmp_path / "ft"))


def test_files_the_loaders_do_not_read_are_not_checked(tiny_world, copy):
    """A macOS ``._`` file, an unused damaged variant, a broken link named as a variant and
    a folder named like weights sat beside good weights and refused the whole model."""
    (copy / "unet" / "._diffusion_pytorch_model.safetensors").write_bytes(b"\x00\x05\x16\x07" + b"\xff" * 60)
    (copy / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    os.symlink(copy / "nowhere", copy / "text_encoder" / "model.fp16.safetensors")
    (copy / "unet" / "old.safetensors").mkdir()
    want = _unet_out(load_pair(tiny_world / "base", tiny_world / "finetuned"))
    torch.testing.assert_close(_unet_out(load_pair(tiny_world / "base", copy)), want, rtol=0, atol=0)
    # the file that is read is still checked
    main = copy / "unet" / "diffusion_pytorch_model.safetensors"
    main.write_bytes(main.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="diffusion_pytorch_model.safetensors: truncated safetensors file"):
        load_pair(tiny_world / "base", copy)


def test_only_a_variants_weights_are_named_as_such(tiny_world, copy):
    unet = copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.fp16.safetensors")
    with pytest.raises(ModelLoadError, match=r"no weights file \(expected diffusion_pytorch_model.safetensors or "
                                             r"model.safetensors\); it holds diffusion_pytorch_model.fp16.safetensors: "
                                             "another variant's weights"):
        load_pair(tiny_world / "base", copy)


def test_sharded_weights_are_checked_shard_by_shard(tiny_world, copy):
    """A UNet saved in shards loads as the whole file; a damaged shard is named."""
    from diffusers import UNet2DConditionModel

    shutil.rmtree(copy / "unet")
    UNet2DConditionModel.from_pretrained(tiny_world / "finetuned" / "unet").save_pretrained(
        copy / "unet", max_shard_size="300KB")
    shards = sorted((copy / "unet").glob("diffusion_pytorch_model-*.safetensors"))
    assert len(shards) > 1 and (copy / "unet" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    whole, sharded = load_pair(tiny_world / "base", tiny_world / "finetuned"), load_pair(tiny_world / "base", copy)
    # the same weights, bit for bit; the outputs agree to rounding (CPU kernels sum in an order that
    # depends on where a memory-mapped tensor starts, and a file's header length moves that)
    want, got = whole.unet_ft.state_dict(), sharded.unet_ft.state_dict()
    assert sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    torch.testing.assert_close(_unet_out(sharded), _unet_out(whole), rtol=1e-5, atol=1e-6)
    shards[-1].write_bytes(shards[-1].read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=f"{shards[-1].name}: truncated safetensors file"):
        load_pair(tiny_world / "base", copy)
    (copy / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text("{}")
    with pytest.raises(ModelLoadError, match="unreadable shard index"):
        load_pair(tiny_world / "base", copy)


def test_a_folder_this_user_may_not_enter_or_read_is_a_model_error(tiny_world, copy, monkeypatch):
    """Permission denied anywhere in loading (listing a component folder, testing for a
    config inside one this user may not enter) is the model that cannot load, naming the
    path: it was a PermissionError, exit 4."""
    real_listdir, real_is_file = os.listdir, Path.is_file

    def listdir(path="."):
        if Path(path) == copy / "unet":
            raise PermissionError(13, "Permission denied", str(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(ModelLoadError, match=r"ft/unet: cannot read \(Permission denied\)"):
        load_pair(tiny_world / "base", copy)
    monkeypatch.setattr(os, "listdir", real_listdir)

    def is_file(self):
        if self.parent == copy / "unet":
            raise PermissionError(13, "Permission denied", str(self))
        return real_is_file(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.raises(ModelLoadError, match=r"ft/unet/\S+: .*Permission denied"):
        load_pair(tiny_world / "base", copy)


def test_a_link_to_nothing_is_said_to_be_one(tiny_world, tmp_path):
    loop = tmp_path / "loop.safetensors"
    os.symlink(loop, loop)
    os.symlink(tmp_path / "gone.safetensors", tmp_path / "broken.safetensors")
    for p in (loop, tmp_path / "broken.safetensors"):
        with pytest.raises(ModelLoadError, match=r"a link that leads to no file \(broken, or a loop of links\)"):
            load_pair(tiny_world / "base", p)


def test_one_lora_given_twice_is_refused(tiny_world, tmp_path):
    """As the fine-tune and as --lora (also through a link) it stacked on itself at twice
    its strength, without a word."""
    os.symlink(tiny_world / "lora.safetensors", tmp_path / "again.safetensors")
    with pytest.raises(ModelLoadError, match="given as both the fine-tune and --lora: it would be applied twice"):
        load_pair(tiny_world / "base", tiny_world / "lora.safetensors", tmp_path / "again.safetensors")


def test_text_encoder_lora_layers_the_encoder_lacks_are_misfits(tiny_world, tmp_path):
    """Text-encoder layers none of which the encoder has (layer 5 of a 2-layer encoder):
    diffusers' loader fails on them with an IndexError, which was the message; now they
    count as layers that do not fit, and --allow-partial-lora goes on without them."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_world / "lora.safetensors"))
    name = "text_encoder.text_model.encoder.layers.5.self_attn.q_proj"
    g = torch.Generator().manual_seed(0)
    state.update({f"{name}.lora_A.weight": torch.randn(4, 32, generator=g),
                  f"{name}.lora_B.weight": torch.randn(32, 4, generator=g)})
    save_file(state, str(tmp_path / "te_bogus.safetensors"))
    n = len({k.split(".lora_")[0] for k in state})
    with pytest.raises(ModelLoadError, match=f"only {n - 1} of {n} LoRA layers fit the base model "
                                             r"\(first that does not: encoder.layers.5.self_attn.q_proj\)"):
        load_pair(tiny_world / "base", lora=tmp_path / "te_bogus.safetensors")
    pair = load_pair(tiny_world / "base", lora=tmp_path / "te_bogus.safetensors", allow_partial_lora=True)
    assert pair.info["lora_match"] == {"matched": n - 1, "total": n}
    c_ft, c_pre = pair.encode_prompt("a sks pattern")
    torch.testing.assert_close(c_ft, c_pre, rtol=0, atol=0)  # nothing went on the encoder


def test_unhelpful_library_messages_are_worded(tiny_world, tmp_path):
    """An empty pickle said ``cannot load with weights_only=True ()``; a PEFT adapter saved
    on its own was told a diffusers/PEFT LoRA's keys start with ``unet.``."""
    from safetensors.torch import load_file, save_file

    (tmp_path / "empty.ckpt").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"cannot load with weights_only=True \(an empty file\)"):
        load_pair(tiny_world / "base", tmp_path / "empty.ckpt", allow_pickle=True)
    state = {k.replace("unet.", "base_model.model.", 1): v
             for k, v in load_file(str(tiny_world / "lora.safetensors")).items()}
    save_file(state, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(ModelLoadError, match="a PEFT adapter saved on its own .* is not read: save it with "
                                             "diffusers' save_lora_weights"):
        load_pair(tiny_world / "base", lora=tmp_path / "adapter_model.safetensors")
