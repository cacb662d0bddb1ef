"""Tiny models written in the single-file LDM and kohya LoRA formats load through the real
diffusers loaders into exactly the models they were written from."""
import os
import shutil
import socket

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    create_diffusers_clip_model_from_ldm,
)
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from cgidm.testing.convert import (
    peft_lora_to_kohya,
    text_encoder_to_ldm,
    unet_to_ldm,
    write_single_file_checkpoint,
)
from cgidm.testing.tiny import LORA_TARGETS, build_tiny_pipeline

TE_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any attempt to reach a hub fails the test instead of silently hanging or downloading."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            raise AssertionError(f"network access attempted: {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", guarded)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """A base pipeline and a 'fine-tune' of it whose UNet and text encoder both differ."""
    root = tmp_path_factory.mktemp("convert")
    base, finetuned = root / "base", root / "finetuned"
    build_tiny_pipeline(base)
    shutil.copytree(base, finetuned)
    g = torch.Generator().manual_seed(1)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    te = CLIPTextModel.from_pretrained(base / "text_encoder")
    with torch.no_grad():
        for p in [*unet.parameters(), *te.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    unet.save_pretrained(finetuned / "unet")
    te.save_pretrained(finetuned / "text_encoder")
    return base, finetuned


def _unet_inputs():
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 700]),
            torch.randn(2, 7, 32, generator=g))


@torch.no_grad()
def _unet_out(unet):
    x, t, c = _unet_inputs()
    return unet.eval()(x, t, encoder_hidden_states=c).sample


@torch.no_grad()
def _te_out(te):
    ids = torch.randint(0, 512, (2, 77), generator=torch.Generator().manual_seed(3))
    return te.eval()(ids)[0]


def _assert_same_state(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# Real SD 1.x LDM key names, one or more from each structural case: resnets with and
# without skip connections, attentions, downsamplers at .0.op, upsamplers at .1.conv
# (block without attention) and .2.conv (block with attention), middle block.
SD1_LDM_KEYS = [
    "time_embed.0.weight", "time_embed.2.bias", "input_blocks.0.0.weight", "out.0.weight", "out.2.bias",
    "input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.2.weight",
    "input_blocks.1.0.emb_layers.1.weight", "input_blocks.1.0.out_layers.0.bias",
    "input_blocks.1.0.out_layers.3.weight", "input_blocks.1.1.proj_in.weight",
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.2.1.norm.weight",
    "input_blocks.3.0.op.weight", "input_blocks.4.0.skip_connection.weight", "input_blocks.6.0.op.bias",
    "input_blocks.7.0.skip_connection.weight", "input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
    "input_blocks.9.0.op.weight", "input_blocks.11.0.out_layers.3.weight",
    "middle_block.0.in_layers.2.weight", "middle_block.1.transformer_blocks.0.ff.net.0.proj.weight",
    "middle_block.2.emb_layers.1.bias",
    "output_blocks.0.0.skip_connection.weight", "output_blocks.2.1.conv.weight",
    "output_blocks.3.1.proj_out.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.bias",
    "output_blocks.11.1.transformer_blocks.0.norm3.weight", "output_blocks.11.0.skip_connection.weight",
]
# Keys that would exist only in a wrong layout (no attention in the last down / first up
# block of SD 1.x, no downsampler after the last down block, no upsampler after the last up block).
NOT_SD1_LDM_KEYS = ["input_blocks.10.1.proj_in.weight", "input_blocks.12.0.op.weight",
                    "output_blocks.1.1.proj_in.weight", "output_blocks.2.2.conv.weight",
                    "output_blocks.11.2.conv.weight", "output_blocks.11.1.conv.weight"]


def test_unet_to_ldm_sd1_layout_round_trips_through_diffusers():
    # SD 1.x structure (4 blocks, 2 layers, attention in the first three down blocks) at toy width.
    config = dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(8, 16, 32, 32), norm_num_groups=4, cross_attention_dim=8, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    )
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**config)
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config)
    assert len(ldm) == len(state) == 686  # the parameter count of an SD 1.x UNet checkpoint
    assert all(k.startswith("model.diffusion_model.") for k in ldm)
    names = {k.removeprefix("model.diffusion_model.") for k in ldm}
    assert set(SD1_LDM_KEYS) <= names
    assert not names & set(NOT_SD1_LDM_KEYS)
    _assert_same_state(convert_ldm_unet_checkpoint(ldm, unet.config), state)


def test_unet_to_ldm_refuses_parameters_without_an_ldm_place(dirs):
    unet = UNet2DConditionModel.from_pretrained(dirs[0] / "unet")
    state = dict(unet.state_dict())
    state["class_embedding.linear_1.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="class_embedding"):
        unet_to_ldm(state, unet.config)


def test_text_encoder_to_ldm_accepts_both_transformers_spellings():
    w = torch.zeros(1)
    flat = text_encoder_to_ldm({"encoder.layers.0.mlp.fc1.weight": w, "embeddings.position_ids": w})
    nested = text_encoder_to_ldm({"text_model.encoder.layers.0.mlp.fc1.weight": w})
    assert flat == nested == {"cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": w}


@pytest.fixture(scope="module")
def single_file(dirs, tmp_path_factory):
    path = tmp_path_factory.mktemp("single") / "finetuned.safetensors"
    write_single_file_checkpoint(dirs[1], path)
    return path


@pytest.mark.parametrize("as_dict", [False, True], ids=["path", "dict"])
def test_single_file_unet_loads_as_the_source_unet(dirs, single_file, as_dict):
    base, finetuned = dirs
    source = load_file(single_file) if as_dict else str(single_file)
    loaded = UNet2DConditionModel.from_single_file(
        source, config=str(base), subfolder="unet", local_files_only=True)
    expected = UNet2DConditionModel.from_pretrained(finetuned / "unet")
    _assert_same_state(loaded.state_dict(), expected.state_dict())
    out = _unet_out(loaded)
    assert torch.equal(out, _unet_out(expected))
    assert not torch.allclose(out, _unet_out(UNet2DConditionModel.from_pretrained(base / "unet")))


def test_single_file_text_encoder_loads_as_the_source_text_encoder(dirs, single_file):
    base, finetuned = dirs
    checkpoint = load_file(single_file)
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in checkpoint
    loaded = create_diffusers_clip_model_from_ldm(
        CLIPTextModel, checkpoint, config=str(base), subfolder="text_encoder", local_files_only=True)
    expected = CLIPTextModel.from_pretrained(finetuned / "text_encoder")
    assert not any(p.is_meta for p in loaded.parameters())
    _assert_same_state(loaded.state_dict(), expected.state_dict())
    out = _te_out(loaded)
    assert torch.equal(out, _te_out(expected))
    assert not torch.allclose(out, _te_out(CLIPTextModel.from_pretrained(base / "text_encoder")))


def test_single_file_loads_as_a_whole_pipeline(dirs, single_file):
    base, finetuned = dirs
    pipe = StableDiffusionPipeline.from_single_file(
        str(single_file), config=str(base), local_files_only=True,
        vae=None, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    _assert_same_state(pipe.unet.state_dict(),
                       UNet2DConditionModel.from_pretrained(finetuned / "unet").state_dict())
    _assert_same_state(pipe.text_encoder.state_dict(),
                       CLIPTextModel.from_pretrained(finetuned / "text_encoder").state_dict())


def _perturb_lora_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("lora_alpha", [4, 8])
def test_kohya_unet_lora_loads_as_the_peft_adapter(dirs, tmp_path, lora_alpha):
    base = dirs[0]
    torch.manual_seed(0)
    adapted = UNet2DConditionModel.from_pretrained(base / "unet")
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=lora_alpha, init_lora_weights="gaussian",
                                   target_modules=LORA_TARGETS))
    _perturb_lora_b(adapted, 4)
    peft_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(adapted).items()}
    assert any(".conv1.lora_A." in k for k in peft_state)

    kohya = peft_lora_to_kohya(peft_state, alpha=None if lora_alpha == 4 else lora_alpha)
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert kohya[f"{stem}.lora_down.weight"].shape == (4, 64)
    assert kohya[f"{stem}.lora_up.weight"].shape == (64, 4)
    assert kohya[f"{stem}.alpha"].item() == lora_alpha
    assert kohya["lora_unet_up_blocks_1_resnets_1_conv2.lora_down.weight"].shape == (4, 32, 3, 3)
    assert len(kohya) == len(peft_state) // 2 * 3
    path = tmp_path / "kohya.safetensors"
    save_file(kohya, path)

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    fresh = UNet2DConditionModel.from_pretrained(base / "unet")
    plain = _unet_out(fresh)
    fresh.load_lora_adapter(state, prefix="unet", network_alphas=alphas)
    name = next(iter(fresh.peft_config))
    loaded_state = {f"unet.{k}": v for k, v in get_peft_model_state_dict(fresh, adapter_name=name).items()}
    _assert_same_state(loaded_state, peft_state)

    out = _unet_out(fresh)
    expected = _unet_out(adapted)
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_kohya_text_encoder_lora_loads_as_the_peft_adapter(dirs, tmp_path):
    base = dirs[0]
    torch.manual_seed(0)
    adapted = CLIPTextModel.from_pretrained(base / "text_encoder")
    adapted.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                   target_modules=TE_LORA_TARGETS))
    _perturb_lora_b(adapted, 5)
    peft_state = {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(adapted).items()}
    kohya = peft_lora_to_kohya(peft_state)
    assert "lora_te_text_model_encoder_layers_1_mlp_fc2.lora_up.weight" in kohya
    path = tmp_path / "kohya_te.safetensors"
    save_file(kohya, path)

    state, alphas = StableDiffusionPipeline.lora_state_dict(str(path))
    fresh = CLIPTextModel.from_pretrained(base / "text_encoder")
    plain = _te_out(fresh)
    StableDiffusionPipeline.load_lora_into_text_encoder(
        state, network_alphas=alphas, text_encoder=fresh, prefix="text_encoder")
    expected = _te_out(adapted)
    assert not torch.allclose(expected, plain, atol=1e-3)
    torch.testing.assert_close(_te_out(fresh), expected, atol=1e-5, rtol=0)


def test_peft_lora_to_kohya_rejects_foreign_keys():
    with pytest.raises(ValueError, match="not a PEFT LoRA key"):
        peft_lora_to_kohya({"unet.conv_in.lora.down.weight": torch.zeros(1, 1)})
    with pytest.raises(ValueError, match="without both A and B"):
        peft_lora_to_kohya({"unet.conv_in.lora_A.weight": torch.zeros(1, 1)})
