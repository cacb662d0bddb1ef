"""Write tiny models in the formats users bring, so the real diffusers loaders can be tested.

Fine-tuned Stable Diffusion models circulate as diffusers directories, as single-file
checkpoints in the original LDM/CompVis key layout, and as LoRAs in kohya key layout.
No hub is reachable from the test machines, so the tiny pipelines of
:mod:`cgidm.testing.tiny` are converted here into the latter two formats:

- :func:`unet_to_ldm` inverts ``diffusers.loaders.single_file_utils.convert_ldm_unet_checkpoint``;
- :func:`text_encoder_to_ldm` inverts ``convert_ldm_clip_checkpoint``;
- :func:`write_single_file_checkpoint` combines both into one SD-1.x-style ``.safetensors``;
- :func:`peft_lora_to_kohya` inverts diffusers' kohya LoRA conversion
  (``lora_conversion_utils._convert_non_diffusers_lora_to_diffusers``).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

LDM_UNET_PREFIX = "model.diffusion_model."
LDM_CLIP_PREFIX = "cond_stage_model.transformer."

# Sub-module names inside a resnet; everything else keeps its name under the new prefix,
# because LDM's SpatialTransformer and diffusers' Transformer2DModel share inner names.
_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

_TOP_LEVEL_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    # SDXL's added conditioning MLP (pooled text embedding and time ids)
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# where each family's single files keep their text encoders (docs/families.md)
LDM_CLIP_XL_PREFIX = "conditioner.embedders.0.transformer."
OPEN_CLIP_PREFIX = {"sd2": "cond_stage_model.model.", "sdxl": "conditioner.embedders.1.model."}


def _layers_per_block(config: Mapping) -> int:
    lpb = config["layers_per_block"]
    if isinstance(lpb, int):
        return lpb
    # diffusers' LDM reader derives block boundaries from a single count.
    if len(set(lpb)) != 1:
        raise ValueError(f"per-block layers_per_block={lpb} has no LDM single-file layout")
    return int(lpb[0])


def _unet_module_map(state_dict: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, tuple[str, bool]]:
    """diffusers module prefix -> (LDM module prefix, is_resnet).

    LDM numbers ``input_blocks``/``output_blocks`` consecutively over all blocks: each
    down block contributes ``layers_per_block`` (resnet[, attention]) entries plus one
    for its downsampler, each up block ``layers_per_block + 1`` entries with the
    upsampler appended to the last one. Whether a block has attentions or a resampler
    is read from the state dict, so block type names need not be interpreted.
    """
    modules = {key.rsplit(".", 1)[0] for key in state_dict}

    def has(prefix: str) -> bool:
        return any(m == prefix or m.startswith(prefix + ".") for m in modules)

    lpb = _layers_per_block(config)
    mapping = {d: (ldm, False) for d, ldm in _TOP_LEVEL_TO_LDM.items()}

    i = 1
    for b in range(len(config["down_block_types"])):
        for layer in range(lpb):
            mapping[f"down_blocks.{b}.resnets.{layer}"] = (f"input_blocks.{i}.0", True)
            if has(f"down_blocks.{b}.attentions.{layer}"):
                mapping[f"down_blocks.{b}.attentions.{layer}"] = (f"input_blocks.{i}.1", False)
            i += 1
        if has(f"down_blocks.{b}.downsamplers.0"):
            mapping[f"down_blocks.{b}.downsamplers.0.conv"] = (f"input_blocks.{i}.0.op", False)
            i += 1

    # diffusers reads middle_block.{odd} as attention: only the cross-attention mid block
    # (resnet, attention, resnet) round-trips.
    if not has("mid_block.attentions.0"):
        raise ValueError("only a mid block with attention (UNetMidBlock2DCrossAttn) has an LDM layout")
    mapping["mid_block.resnets.0"] = ("middle_block.0", True)
    mapping["mid_block.attentions.0"] = ("middle_block.1", False)
    mapping["mid_block.resnets.1"] = ("middle_block.2", True)

    j = 0
    for b in range(len(config["up_block_types"])):
        for layer in range(lpb + 1):
            mapping[f"up_blocks.{b}.resnets.{layer}"] = (f"output_blocks.{j}.0", True)
            attention = has(f"up_blocks.{b}.attentions.{layer}")
            if attention:
                mapping[f"up_blocks.{b}.attentions.{layer}"] = (f"output_blocks.{j}.1", False)
            if layer == lpb and has(f"up_blocks.{b}.upsamplers.0"):
                slot = 2 if attention else 1
                mapping[f"up_blocks.{b}.upsamplers.0.conv"] = (f"output_blocks.{j}.{slot}.conv", False)
            j += 1
    return mapping


def unet_to_ldm(state_dict: Mapping[str, torch.Tensor], unet_config: Mapping) -> dict[str, torch.Tensor]:
    """diffusers ``UNet2DConditionModel`` state dict -> LDM keys (``model.diffusion_model.*``).

    General in the number of blocks and ``layers_per_block``; raises ``ValueError`` on any
    parameter that has no place in the SD-1.x LDM layout (class/addition embeddings,
    mid blocks without attention, ...) rather than dropping it silently.
    """
    mapping = _unet_module_map(state_dict, unet_config)
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, value in state_dict.items():
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in mapping:
                break
        else:
            unmapped.append(key)
            continue
        ldm_prefix, is_resnet = mapping[prefix]
        rest = parts[n:]
        if is_resnet:
            if rest[0] not in _RESNET_TO_LDM:
                unmapped.append(key)
                continue
            rest = [_RESNET_TO_LDM[rest[0]], *rest[1:]]
        new_key = LDM_UNET_PREFIX + ".".join([ldm_prefix, *rest])
        if new_key in out:
            raise ValueError(f"two UNet parameters map to {new_key}")
        out[new_key] = value
    if unmapped:
        raise ValueError(f"UNet parameters without an LDM place: {sorted(unmapped)[:10]}")
    return out


def text_encoder_to_ldm(state_dict: Mapping[str, torch.Tensor], prefix: str = LDM_CLIP_PREFIX) -> dict[str, torch.Tensor]:
    """``CLIPTextModel`` state dict -> ``cond_stage_model.transformer.text_model.*`` keys.

    transformers >= 5.6 saves ``CLIPTextModel`` without the ``text_model.`` level that SD
    checkpoints (and diffusers' ``is_clip_model`` detection) expect, older versions with
    it; both are accepted.
    """
    out = {}
    for key, value in state_dict.items():
        # A derived buffer (arange of positions); checkpoints differ on whether they carry it.
        if key.endswith("embeddings.position_ids"):
            continue
        if not key.startswith("text_model."):
            key = "text_model." + key
        out[prefix + key] = value
    return out


_OPEN_CLIP_PARTS = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def text_encoder_to_open_clip(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text encoder's state dict -> OpenCLIP keys under ``prefix`` (SD 2.x's
    ``cond_stage_model.model.``, SDXL's second encoder ``conditioner.embedders.1.model.``):
    the inverse of diffusers' ``convert_open_clip_checkpoint``. q, k and v projections
    become one ``in_proj``; the text projection is stored transposed."""
    src = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
           for k, v in state_dict.items() if not k.endswith("embeddings.position_ids")}
    out = {
        prefix + "token_embedding.weight": src.pop("text_model.embeddings.token_embedding.weight"),
        prefix + "positional_embedding": src.pop("text_model.embeddings.position_embedding.weight"),
        prefix + "ln_final.weight": src.pop("text_model.final_layer_norm.weight"),
        prefix + "ln_final.bias": src.pop("text_model.final_layer_norm.bias"),
    }
    if "text_projection.weight" in src:
        out[prefix + "text_projection"] = src.pop("text_projection.weight").T.contiguous()
    layers = sorted({int(k.split(".")[3]) for k in src if k.startswith("text_model.encoder.layers.")})
    for n in layers:
        d, o = f"text_model.encoder.layers.{n}.", f"{prefix}transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[o + f"attn.in_proj_{kind}"] = torch.cat([src.pop(d + f"self_attn.{q}_proj.{kind}") for q in "qkv"])
            for dname, oname in _OPEN_CLIP_PARTS.items():
                out[o + f"{oname}.{kind}"] = src.pop(d + f"{dname}.{kind}")
    if src:
        raise ValueError(f"text encoder parameters without an OpenCLIP place: {sorted(src)[:10]}")
    return out


def write_single_file_checkpoint(pipeline_dir: str | Path, path: str | Path, family: str = "sd1") -> Path:
    """Write the UNet and text encoder(s) of a diffusers pipeline directory as one
    single-file ``.safetensors`` checkpoint in ``family``'s layout: the UNet in the LDM
    layout; the text encoder as CLIP (SD 1.x), OpenCLIP (SD 2.x), or both (SDXL: CLIP
    ViT-L under ``conditioner.embedders.0.transformer.``, OpenCLIP under
    ``conditioner.embedders.1.model.``).

    Only UNet and text encoder are written: the tiny pipelines have an identity codec in
    place of a VAE. A directory with a ``vae/`` raises, since a checkpoint silently
    missing its VAE would load the wrong autoencoder downstream.
    """
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPTextModel

    pipeline_dir, path = Path(pipeline_dir), Path(path)
    if (pipeline_dir / "vae").exists():
        raise NotImplementedError("VAE conversion to the LDM layout is not implemented")
    unet = UNet2DConditionModel.from_pretrained(pipeline_dir / "unet")
    text_encoder = CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder")
    state = unet_to_ldm(unet.state_dict(), unet.config)
    if family == "sdxl":
        from transformers import CLIPTextModelWithProjection

        te2 = CLIPTextModelWithProjection.from_pretrained(pipeline_dir / "text_encoder_2")
        state.update(text_encoder_to_ldm(text_encoder.state_dict(), LDM_CLIP_XL_PREFIX))
        state.update(text_encoder_to_open_clip(te2.state_dict(), OPEN_CLIP_PREFIX["sdxl"]))
    elif family == "sd2":
        state.update(text_encoder_to_open_clip(text_encoder.state_dict(), OPEN_CLIP_PREFIX["sd2"]))
    else:
        state.update(text_encoder_to_ldm(text_encoder.state_dict()))
    state = {k: v.detach().contiguous() for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, path, metadata={"format": "pt"})
    return path


_PEFT_TO_KOHYA_PREFIX = {"unet.": "lora_unet_", "text_encoder.": "lora_te_"}
# kohya's SDXL files: the two text encoders are te1 and te2
_PEFT_TO_KOHYA_PREFIX_XL = {"unet.": "lora_unet_", "text_encoder.": "lora_te1_", "text_encoder_2.": "lora_te2_"}
_PEFT_TO_KOHYA_SUFFIX = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight"}


def peft_lora_to_kohya(state_dict: Mapping[str, torch.Tensor], alpha: float | None = None,
                       sgm_unet: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """diffusers/PEFT LoRA (``unet.<module>.lora_A.weight`` / ``lora_B``) -> kohya layout
    (``lora_unet_<module with _>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``).

    kohya scales each update by ``alpha / rank``; PEFT files do not store ``lora_alpha``,
    so pass the ``lora_alpha`` the adapter was trained with. ``None`` writes
    ``alpha = rank`` (scale 1, i.e. ``lora_alpha == r``). One alpha for all modules only:
    diffusers 0.42 files the alphas of attention (``to_q``...) and text-encoder modules
    under names that match no module, so per-module alphas there are not read back and
    those modules take the most common alpha.

    kohya trains SD 1.x on the diffusers UNet, so module paths are diffusers' own with
    dots turned into underscores. Linear and conv LoRA (resnet ``conv1``/``conv2``) are
    both supported: diffusers maps ``resnets_N_conv1``/``conv2`` back unchanged, and the
    down/up weight shapes of a conv LoRA are the same in both formats.

    Text-encoder LoRA keys (``text_encoder.*``) become ``lora_te_text_model_*``, the kohya
    spelling, whether or not the PEFT keys carry transformers' ``text_model.`` level.

    ``sgm_unet`` (the SDXL UNet the LoRA is for): kohya trains SDXL on the SGM UNet, so UNet
    modules are named by their LDM place (``lora_unet_input_blocks_4_1_transformer_...``,
    a resnet's ``conv1`` as ``in_layers_2``) and the text encoders are ``lora_te1_`` and
    ``lora_te2_`` (``text_encoder_2.*``).
    """
    out: dict[str, torch.Tensor] = {}
    prefixes = _PEFT_TO_KOHYA_PREFIX_XL if sgm_unet is not None else _PEFT_TO_KOHYA_PREFIX
    ldm = None if sgm_unet is None else _unet_module_map(sgm_unet.state_dict(), sgm_unet.config)
    for key, value in state_dict.items():
        src_prefix = next((p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(p)), None)
        suffix = next((s for s in _PEFT_TO_KOHYA_SUFFIX if key.endswith(s)), None)
        if src_prefix is None or suffix is None:
            raise ValueError(f"not a PEFT LoRA key with a unet./text_encoder. prefix: {key}")
        module = key[len(src_prefix):-len(suffix)]
        if src_prefix.startswith("text_encoder") and not module.startswith("text_model."):
            module = "text_model." + module
        if ldm is not None and src_prefix == "unet.":
            module = _to_sgm(module, ldm)
        name = prefixes[src_prefix] + module.replace(".", "_")
        out[name + _PEFT_TO_KOHYA_SUFFIX[suffix]] = value.contiguous()
        if suffix == ".lora_A.weight":
            rank = value.shape[0]
            out[name + ".alpha"] = torch.tensor(float(rank if alpha is None else alpha))
    downs = {k[: -len(".lora_down.weight")] for k in out if k.endswith(".lora_down.weight")}
    ups = {k[: -len(".lora_up.weight")] for k in out if k.endswith(".lora_up.weight")}
    if downs != ups:
        raise ValueError(f"LoRA modules without both A and B: {sorted(downs ^ ups)[:10]}")
    return out


def _to_sgm(module: str, ldm: Mapping[str, tuple[str, bool]]) -> str:
    """A diffusers UNet module path -> its SGM/LDM path (``_unet_module_map``)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ldm:
            ldm_prefix, is_resnet = ldm[prefix]
            rest = parts[n:]
            if is_resnet and rest and rest[0] in _RESNET_TO_LDM:
                rest = [_RESNET_TO_LDM[rest[0]], *rest[1:]]
            return ".".join([ldm_prefix, *rest])
    raise ValueError(f"UNet module without an SGM place: {module}")
