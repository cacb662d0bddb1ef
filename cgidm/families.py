"""Model families: everything that differs between the checkpoints users bring, in one
place (docs/families.md). The inversion, the engine and the ops never test which family
they run; they get what they need from here:

- the regression target of the denoising loss per sample (``Family.target``: ``None``
  means the noise itself, epsilon-prediction; ``reference.v_target_ref`` for
  v-prediction), so the contrast is each model's loss in its own parametrisation;
- how a prompt becomes conditioning (``Family.text_encoders``, ``encode_text``) and the
  added conditioning some families need (``Family.added_cond``: SDXL's pooled text
  embedding and ``time_ids``, described by ``AddedCond``, not implemented yet);
- the VAE scaling factor, the latent size and the native resolution (recorded).

Families are detected from configs only (``detect_folder``: model_index.json, the UNet's
``cross_attention_dim`` and ``addition_embed_type``, a ``transformer/`` folder, the
scheduler's ``prediction_type``; ``detect_state_dict``: single-file key names), before
any weight is read. ``refuse_unsupported`` turns a family cgidm cannot run into one
``ModelLoadError`` line; ``check_same`` refuses a base and a fine-tune of two families.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from cgidm.checkpoints import ModelLoadError
from cgidm.reference import TargetFn, v_target_ref

# prediction type -> target; None: the noise itself (the ops' own epsilon path, unchanged)
TARGETS: dict[str, Optional[TargetFn]] = {"epsilon": None, "v_prediction": v_target_ref}
PREDICTION_TYPES = tuple(TARGETS)

# name -> (label, text encoder folders, added conditioning, VAE scaling, native resolution)
KNOWN = {
    "sd1": ("Stable Diffusion 1.x", ("text_encoder",), None, 0.18215, 512),
    "sd2": ("Stable Diffusion 2.x", ("text_encoder",), None, 0.18215, 768),
    "sdxl": ("Stable Diffusion XL", ("text_encoder", "text_encoder_2"), "text_time", 0.13025, 1024),
    "sd3": ("Stable Diffusion 3", ("text_encoder", "text_encoder_2", "text_encoder_3"), None, 1.5305, 1024),
    "flux": ("Flux", ("text_encoder", "text_encoder_2"), None, 0.3611, 1024),
    "unknown": ("an unknown model family", (), None, None, None),
}
SUPPORTED = ("sd1", "sd2")
WHY_NOT = {
    "sdxl": "SDXL is detected but not supported yet",
    "sd3": "Stable Diffusion 3 is a flow-matching transformer, not supported yet",
    "flux": "Flux is a flow-matching transformer, not supported yet",
    "unknown": "this model family is not supported yet",
}
TRANSFORMER_CLASSES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
PIPELINE_CLASSES = {
    "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLImg2ImgPipeline": "sdxl",
}
UNET_CLASS = "UNet2DConditionModel"
WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # the UNet's cross_attention_dim


@dataclass(frozen=True)
class AddedCond:
    """SDXL's added conditioning (the interface; SDXL itself is not implemented yet): the
    UNet takes ``added_cond_kwargs = {"text_embeds": pooled [N, 1280], "time_ids": [N, 6]}``
    beside ``encoder_hidden_states [N, 77, 2048]`` (both text encoders' penultimate states
    concatenated). ``pooled`` is the second text encoder's projected embedding of the
    prompt; ``time_ids`` = (original height, original width, crop top, crop left, target
    height, target width). Each model of a pair computes its own, as it does its prompt
    embedding; the engine would expand them to ``N = B*K`` like the prompt."""

    text_embeds: torch.Tensor  # [1, P] pooled text embedding
    time_ids: torch.Tensor  # [1, 6]


@dataclass(frozen=True)
class Family:
    """What one checkpoint is. ``prediction_type`` is ``None`` when the checkpoint does not
    say (a single file, a UNet folder without a scheduler): it is then the base's."""

    name: str  # a key of KNOWN
    prediction_type: Optional[str]  # "epsilon", "v_prediction", "flow_matching", other, None
    evidence: str  # the file the family was read from
    cross_attention_dim: Optional[int] = None
    latent_size: Optional[int] = None  # the UNet's sample_size
    vae_scaling_factor: Optional[float] = None  # vae/config.json's, else the family's
    native_resolution: Optional[int] = None
    detail: str = ""  # what made an unknown family unknown

    @property
    def label(self) -> str:
        return KNOWN[self.name][0]

    @property
    def text_encoders(self) -> tuple[str, ...]:
        return KNOWN[self.name][1]

    @property
    def added_cond(self) -> Optional[str]:
        return KNOWN[self.name][2]

    @property
    def supported(self) -> bool:
        return self.name in SUPPORTED and self.prediction_type in (*PREDICTION_TYPES, None)

    @property
    def target(self) -> Optional[TargetFn]:
        """The loss's regression target (``None``: the noise, epsilon-prediction)."""
        return TARGETS[self.prediction_type or "epsilon"]

    def describe(self) -> str:
        """One line: ``Stable Diffusion 2.x (v_prediction; cross-attention 1024; from ...)``."""
        parts = [self.prediction_type or "prediction type not given"]
        if self.cross_attention_dim is not None:
            parts.append(f"cross-attention {self.cross_attention_dim}")
        if self.detail:
            parts.append(self.detail)
        parts.append(f"from {self.evidence}")
        return f"{self.label} ({'; '.join(parts)})"

    def record(self) -> str:
        """The readable line kept in ``pair.info["family"]``."""
        bits = [self.name, self.prediction_type or "epsilon"]
        if self.latent_size is not None:
            bits.append(f"latent {self.latent_size}")
        if self.native_resolution is not None:
            bits.append(f"resolution {self.native_resolution}")
        if self.vae_scaling_factor is not None:
            bits.append(f"vae scaling {self.vae_scaling_factor:g}")
        return " ".join(bits)

    def inherit(self, base: "Family") -> "Family":
        """A checkpoint that does not name its prediction type predicts like its base."""
        return self if self.prediction_type is not None else replace(self, prediction_type=base.prediction_type)


def _json(path: Path) -> Optional[dict]:
    """A config file, ``None`` when absent; an unreadable one is named."""
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: unreadable config (not a JSON object)")
    return cfg


def prediction_type(scheduler_folder: Path) -> Optional[str]:
    """The scheduler config's ``prediction_type`` (diffusers' default: epsilon); ``None``
    without a scheduler config."""
    cfg = _json(scheduler_folder / "scheduler_config.json")
    return None if cfg is None else str(cfg.get("prediction_type", "epsilon"))


def _vae(folder: Path) -> tuple[Optional[float], int]:
    """``(scaling_factor, spatial factor)`` of ``folder/vae`` (identity codec: ``(None, 1)``)."""
    cfg = _json(folder / "vae" / "config.json")
    if cfg is None:
        return None, 1
    scale = cfg.get("scaling_factor")
    return (None if scale is None else float(scale)), 2 ** max(0, len(cfg.get("block_out_channels", [0])) - 1)


def detect_folder(folder: str | Path) -> Optional[Family]:
    """The family of a diffusers pipeline folder, a ``unet/`` folder or a UNet/transformer
    folder itself, from its configs; ``None`` when nothing there says."""
    folder = Path(folder)
    index = _json(folder / "model_index.json") or {}
    for sub in (folder / "transformer", folder):
        cfg = _json(sub / "config.json")
        if cfg is not None and cfg.get("_class_name") in TRANSFORMER_CLASSES:
            return Family(TRANSFORMER_CLASSES[cfg["_class_name"]], "flow_matching", str(sub / "config.json"))
    pipe = index.get("_class_name")
    if pipe in PIPELINE_CLASSES:
        name = PIPELINE_CLASSES[pipe]
        return Family(name, "flow_matching" if name in ("sd3", "flux") else None, str(folder / "model_index.json"))
    if (folder / "transformer").is_dir():
        return Family("unknown", None, str(folder / "transformer"), detail="a transformer denoiser")
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = _json(unet_dir / "config.json")
    if unet is None or (unet_dir == folder and unet.get("_class_name") not in (UNET_CLASS, None)):
        if pipe is not None and pipe != "StableDiffusionPipeline":
            return Family("unknown", None, str(folder / "model_index.json"), detail=f"pipeline {pipe}")
        return None
    where = str(unet_dir / "config.json")
    cls = unet.get("_class_name")
    width = unet.get("cross_attention_dim")
    width = int(width) if isinstance(width, int) else None
    added = unet.get("addition_embed_type")
    pred = prediction_type(folder / "scheduler") if unet_dir != folder else None
    scale, factor = _vae(folder)
    size = unet.get("sample_size")
    size = int(size) if isinstance(size, int) else None
    common = dict(cross_attention_dim=width, latent_size=size, native_resolution=None if size is None else size * factor)
    if cls not in (UNET_CLASS, None):
        return Family("unknown", pred, where, detail=f"denoiser {cls}", **common)
    encoders = index.get("text_encoder", [None, None])
    if added == "text_time" or width == 2048 or "text_encoder_2" in index or \
            (isinstance(encoders, list) and encoders[-1] == "CLIPTextModelWithProjection"):
        return Family("sdxl", pred, where, **common)
    if added is not None:
        return Family("unknown", pred, where, detail=f"added conditioning {added!r}", **common)
    # tiny test models have other widths: then the prediction type tells 2.x (v) from 1.x
    name = WIDTHS.get(width) or ("sd2" if pred == "v_prediction" else "sd1")
    if pred not in (None, "epsilon"):
        where = str(folder / "scheduler" / "scheduler_config.json")
    return Family(name, pred, where, vae_scaling_factor=scale, **common)


def detect_state_dict(state: dict, path: str | Path) -> Optional[Family]:
    """The family of a single-file checkpoint from its key names (``None``: a bare UNet of
    an unrecognised width). The prediction type is never in the keys: the base's."""
    keys = list(state)

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        return Family("sd3", "flow_matching", str(path))
    if has("model.diffusion_model.double_blocks.") or has("double_blocks."):
        return Family("flux", "flow_matching", str(path))
    if has("conditioner.embedders."):
        return Family("sdxl", None, str(path))
    width = None
    for k in keys:
        if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight"):
            width = int(state[k].shape[-1])
            break
    if has("cond_stage_model.model."):  # OpenCLIP ViT-H: SD 2.x
        return Family("sd2", None, str(path), cross_attention_dim=width)
    if width in WIDTHS:
        return Family(WIDTHS[width], None, str(path), cross_attention_dim=width)
    return None


def refuse_unsupported(family: Optional[Family], what: str) -> None:
    """One ``ModelLoadError`` line for a family cgidm cannot run (``what``: the path)."""
    if family is None or family.supported:
        return
    why = WHY_NOT.get(family.name, "not supported yet")
    if family.name in SUPPORTED:
        why = f"prediction_type {family.prediction_type!r} is not supported yet (epsilon and v_prediction are)"
    raise ModelLoadError(f"{what}: {family.describe()}: {why}")


def check_same(base: Family, finetuned: Optional[Family], what: str) -> Family:
    """The fine-tune's family (its prediction type inherited when it does not say); a
    fine-tune of another family than the base is refused in one line naming both."""
    if finetuned is None:
        return base
    refuse_unsupported(finetuned, what)
    finetuned = finetuned.inherit(base)
    if (finetuned.name, finetuned.prediction_type) != (base.name, base.prediction_type):
        raise ModelLoadError(
            f"{what}: the fine-tune is {finetuned.describe()} but the base is {base.describe()}; "
            "a fine-tune must be compared with a base of its own family"
        )
    return finetuned


def encode_text(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    """SD 1.x/2.x conditioning: one CLIP text encoder's last hidden state, ``[1, L, D]``
    fp32 (SDXL would add its second encoder and ``AddedCond``)."""
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0].float()
