"""The UNet and text encoders of a single-file checkpoint (an original-layout ``.safetensors``:
``model.diffusion_model.*``, ``cond_stage_model.*``, ``conditioner.embedders.*``), built in the
base's configuration by diffusers' converters (docs/families.md). ``cgidm.models`` loads the
file (``checkpoints.load_state_dict``: no pickles by default) and hands its tensors here."""
from __future__ import annotations

from pathlib import Path

from cgidm import families
from cgidm.checkpoints import ModelLoadError, check_loaded


def single_file_parts(state: dict, base: Path, path: Path, text_encoder_base, base_kind: str = "the base model"):
    """The UNet (and text encoder, when the file has one) of a single-file checkpoint, in the
    base's configuration; ``base_kind`` names the base's family in a misfit's message."""
    from diffusers import UNet2DConditionModel

    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise ModelLoadError(
            f"{path}: not a single-file Stable Diffusion checkpoint (no 'model.diffusion_model.' keys) "
            "and not a LoRA"
        )
    try:
        unet = UNet2DConditionModel.from_single_file(
            state, config=str(base), subfolder="unet", local_files_only=True
        )
    except Exception as e:
        raise ModelLoadError(f"{path}: its UNet does not fit the base's architecture ({base_kind}): a fine-tune of "
                             f"another model family or size, or an incomplete file? ({' '.join(str(e).split())[:200]})") from e
    check_loaded(unet, {}, path, "UNet")
    if isinstance(text_encoder_base, families.DualTextEncoder):
        return unet, _sdxl_text_encoders(state, base, path, text_encoder_base)
    te = text_encoder_base
    # SD 1.x keeps CLIP under cond_stage_model.transformer., SD 2.x OpenCLIP under .model.
    if any(k.startswith(("cond_stage_model.transformer.", "cond_stage_model.model.")) for k in state):
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel

        try:
            te = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, state, config=str(base), subfolder="text_encoder", local_files_only=True
            )
        except Exception as e:
            raise ModelLoadError(f"{path}: text encoder does not match the base model's ({e})") from e
        check_loaded(te, {}, path, "text encoder")
    return unet, te


def _sdxl_text_encoders(state: dict, base: Path, path: Path, te_base):
    """SDXL single files keep CLIP ViT-L under ``conditioner.embedders.0.transformer.`` and
    OpenCLIP bigG under ``conditioner.embedders.1.model.``; either may be absent (then the
    base's)."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    encoders = [te_base.encoder, te_base.encoder_2]
    for i, (prefix, cls, sub) in enumerate((("conditioner.embedders.0.transformer.", CLIPTextModel, "text_encoder"),
                                            ("conditioner.embedders.1.model.", CLIPTextModelWithProjection,
                                             "text_encoder_2"))):
        if not any(k.startswith(prefix) for k in state):
            continue
        try:
            encoders[i] = create_diffusers_clip_model_from_ldm(cls, state, config=str(base), subfolder=sub,
                                                               local_files_only=True)
        except Exception as e:
            raise ModelLoadError(f"{path}: text encoder {i + 1} does not match the base model's ({e})") from e
        check_loaded(encoders[i], {}, path, f"text encoder {i + 1}")
    return te_base.with_encoders(*encoders)
