"""Model families: everything that differs between the checkpoints users bring, in one
place (docs/families.md). The inversion, the engine and the ops never test which family
they run; they get what they need from here:

- the regression target of the denoising loss per sample (``Family.target``: ``None``
  means the noise itself, epsilon-prediction; ``reference.v_target_ref`` for
  v-prediction), so the contrast is each model's loss in its own parametrisation;
- how a prompt becomes conditioning (``Family.text_encoders``, ``encode_text``) and the
  added conditioning some families need (``Family.added_cond``: SDXL's pooled text
  embedding and ``time_ids``, carried as one extra row of the conditioning tensor,
  ``pack_text_time``, and handed to the UNet by ``TextTimeUNet``; docs/families.md,
  "SDXL");
- the VAE scaling factor, the latent size and the native resolution (recorded).

Families are detected from configs only (``detect_folder``: model_index.json, the UNet's
``cross_attention_dim`` and ``addition_embed_type``, a ``transformer/`` folder, the
scheduler's ``prediction_type``; ``detect_state_dict``: single-file key names), before
any weight is read. ``refuse_unsupported`` turns a family cgidm cannot run into one
``ModelLoadError`` line; ``check_same`` refuses a base and a fine-tune of two families.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from cgidm.checkpoints import ModelLoadError
from cgidm.reference import TargetFn, v_target_ref

log = logging.getLogger(__name__)

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
SUPPORTED = ("sd1", "sd2", "sdxl")
WHY_NOT = {
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
        """A checkpoint that does not say (a single file: no scheduler, no UNet config)
        predicts like its base and has its base's sizes."""
        return replace(self, **{k: getattr(base, k) for k in ("prediction_type", "latent_size", "vae_scaling_factor",
                                                                "native_resolution") if getattr(self, k) is None})


def _json(path: Path) -> Optional[dict]:
    """A config file, ``None`` when absent; an unreadable one is named (a folder this user
    may not enter too: ``is_file`` raises there)."""
    try:
        if not path.is_file():
            return None
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable config ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: unreadable config (not a JSON object)")
    return cfg


def in_pipeline(folder: Path) -> bool:
    """Whether ``folder`` is the ``unet/`` folder of a diffusers pipeline folder."""
    return folder.name == "unet" and (folder.parent / "model_index.json").is_file()


def prediction_type(scheduler_folder: Path) -> Optional[str]:
    """The scheduler config's ``prediction_type`` (diffusers' default: epsilon); ``None``
    without a scheduler config."""
    cfg = _json(scheduler_folder / "scheduler_config.json")
    return None if cfg is None else str(cfg.get("prediction_type", "epsilon"))


MAX_TIMESTEPS = 100_000  # a scheduler's num_train_timesteps (SD's: 1000); past it, refused
MAX_LATENT = 1024  # a UNet's sample_size (SD's: 64, 96, 128), 8192 px images; past it, refused


def _whole_in(n, most: int) -> bool:
    """``n`` a whole number (not a bool) from 1 to ``most``."""
    return isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= most


def check_timesteps(scheduler_folder: Path) -> None:
    """``ValueError`` for a ``num_train_timesteps`` that is not a whole number in
    1..``MAX_TIMESTEPS``: the scheduler allocates its schedule at that length before any
    check of its own (3e9 in an untrusted config took 12 GB)."""
    n = (_json(scheduler_folder / "scheduler_config.json") or {}).get("num_train_timesteps", 1000)
    if not _whole_in(n, MAX_TIMESTEPS):
        raise ValueError(f"{scheduler_folder}: num_train_timesteps {n!r} in scheduler_config.json is not a whole "
                         f"number from 1 to {MAX_TIMESTEPS:,} (Stable Diffusion's is 1000)")


def check_latent_size(unet, where) -> int:
    """The UNet's ``sample_size``, a whole number in 1..``MAX_LATENT`` (``ValueError``
    otherwise: images are resized to it times the codec's factor, so 200000 in an untrusted
    config asked for 40 GB)."""
    n = unet.config.sample_size
    if not _whole_in(n, MAX_LATENT):
        raise ValueError(f"{where}: sample_size {n!r} in the UNet's config is not a whole number from 1 to "
                         f"{MAX_LATENT} (Stable Diffusion's: 64, 96, 128)")
    return n


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
    if PIPELINE_CLASSES.get(pipe) in ("sd3", "flux"):
        return Family(PIPELINE_CLASSES[pipe], "flow_matching", str(folder / "model_index.json"))
    if (folder / "transformer").is_dir():
        return Family("unknown", None, str(folder / "transformer"), detail="a transformer denoiser")
    unet_dir = folder / "unet" if (folder / "unet").is_dir() else folder
    unet = _json(unet_dir / "config.json")
    if unet is None or (unet_dir == folder and unet.get("_class_name") not in (UNET_CLASS, None)):
        if PIPELINE_CLASSES.get(pipe) == "sdxl":
            return Family("sdxl", None, str(folder / "model_index.json"))
        if pipe is not None and pipe != "StableDiffusionPipeline":
            return Family("unknown", None, str(folder / "model_index.json"), detail=f"pipeline {pipe}")
        return None
    where = str(unet_dir / "config.json")
    cls = unet.get("_class_name")
    width = unet.get("cross_attention_dim")
    width = int(width) if isinstance(width, int) else None
    added = unet.get("addition_embed_type")
    # a UNet folder inside a pipeline (``.../unet``) predicts as its pipeline's scheduler
    # says; a UNet folder alone, as its base
    sched = folder / "scheduler" if unet_dir != folder else folder.parent / "scheduler"
    pred = prediction_type(sched) if unet_dir != folder or in_pipeline(folder) else None
    scale, factor = _vae(folder)
    size = unet.get("sample_size")
    size = int(size) if isinstance(size, int) else None
    common = dict(cross_attention_dim=width, latent_size=size, native_resolution=None if size is None else size * factor)
    if cls not in (UNET_CLASS, None):
        return Family("unknown", pred, where, detail=f"denoiser {cls}", **common)
    encoders = index.get("text_encoder", [None, None])
    if added == "text_time" or width == 2048 or "text_encoder_2" in index or \
            (isinstance(encoders, list) and encoders[-1] == "CLIPTextModelWithProjection"):
        if pred not in (None, "epsilon"):
            where = str(sched / "scheduler_config.json")
        return Family("sdxl", pred, where, vae_scaling_factor=scale, **common)
    if added is not None:
        return Family("unknown", pred, where, detail=f"added conditioning {added!r}", **common)
    # tiny test models have other widths: SD 2.x's UNets project into their transformers
    # with linear layers (1.x: 1x1 convolutions), and a v-prediction UNet is 2.x
    name = WIDTHS.get(width) or ("sd2" if pred == "v_prediction" or unet.get("use_linear_projection") else "sd1")
    if pred not in (None, "epsilon"):
        where = str(sched / "scheduler_config.json")
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
    # both models run through the base's codec: its scaling and resolution, whatever a
    # fine-tune folder without vae/ (factor 1) would make of its own sample_size
    return replace(finetuned, vae_scaling_factor=base.vae_scaling_factor, native_resolution=base.native_resolution)


def encode_text(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    """A prompt's conditioning, ``[1, L, D]`` fp32: SD 1.x/2.x, one CLIP text encoder's
    last hidden state; SDXL (``text_encoder`` a ``DualTextEncoder``, ``tokenizer`` its two
    tokenizers), both encoders' penultimate states and the added conditioning packed in
    one more row (``pack_text_time``: ``L = 78``)."""
    if isinstance(text_encoder, DualTextEncoder):
        return text_encoder.encode(tokenizer, prompt, device)
    return text_encoder(_ids(tokenizer, prompt, device))[0].float()


_CUT_SAID: set = set()  # (prompt, limit) already warned about: a run encodes its prompt per pair


def _ids(tokenizer, prompt: str, device) -> torch.Tensor:
    """The prompt's token ids, cut to the encoder's length (77 for CLIP) as diffusers'
    pipelines cut it; a cut is warned about once per prompt."""
    limit = tokenizer.model_max_length
    if (prompt, limit) not in _CUT_SAID and len(prompt) >= limit // 4:  # a shorter one cannot reach it
        n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
        if n > limit:
            _CUT_SAID.add((prompt, limit))
            log.warning("the prompt is %d tokens; the text encoder reads its first %d (as diffusers' pipelines "
                        "do), the rest is left out", n, limit)
    return tokenizer(
        [prompt], padding="max_length", max_length=limit,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)


# ----------------------------------------------------------------------------- SDXL
TIME_IDS = 6  # (original height, original width, crop top, crop left, target height, target width)


def sdxl_time_ids(resolution: int) -> torch.Tensor:
    """``[1, 6]``: an uncropped square image at the model's resolution, as SDXL's pipeline
    builds ``add_time_ids`` for an image it generates (original = target size, crop 0)."""
    return torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32)


def pack_text_time(hidden: torch.Tensor, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` text states, ``[B, P]`` pooled embedding and ``[B, 6]`` time ids as one
    ``[B, L + 1, D]`` tensor: the last row is ``pooled | time_ids | 0``. Everything that
    moves conditioning (the engine's expansion to ``B*K`` samples, the pair passes, CUDA
    graph buffers, casts) moves it unchanged; ``TextTimeUNet`` unpacks it. Needs
    ``P + 6 <= D`` (SDXL: 1280 + 6 <= 2048)."""
    b, _, d = hidden.shape
    p = pooled.shape[-1]
    if p + TIME_IDS > d:
        raise ValueError(f"cannot pack a {p}-wide pooled embedding and {TIME_IDS} time ids into width {d}")
    row = hidden.new_zeros(b, 1, d)
    row[:, 0, :p] = pooled.to(hidden.dtype)
    row[:, 0, p:p + TIME_IDS] = time_ids.to(hidden.dtype).expand(b, -1)
    return torch.cat([hidden, row], dim=1)


def unpack_text_time(cond: torch.Tensor, pooled_width: int) -> tuple[torch.Tensor, dict]:
    """The inverse of ``pack_text_time``: ``(hidden [B, L, D], added_cond_kwargs)``."""
    row = cond[:, -1]
    return cond[:, :-1], {"text_embeds": row[:, :pooled_width], "time_ids": row[:, pooled_width:pooled_width + TIME_IDS]}


def zero_text(cond: torch.Tensor, pooled_width: int) -> torch.Tensor:
    """SDXL's unconditional input where its pipeline zeroes the empty prompt
    (``force_zeros_for_empty_prompt``): the text states and the pooled embedding of a packed
    conditioning zero, its time ids kept (docs/extract.md, "Conditioning")."""
    out = cond.clone()
    out[:, :-1] = 0
    out[:, -1, :pooled_width] = 0
    return out


def zeros_for_empty_prompt(base) -> bool:
    """The base pipeline's ``force_zeros_for_empty_prompt`` (``model_index.json``); diffusers'
    SDXL pipelines default to True where the file does not say."""
    import json
    from pathlib import Path

    try:
        index = json.loads((Path(base) / "model_index.json").read_text())
    except (OSError, ValueError):
        index = {}
    return bool(index.get("force_zeros_for_empty_prompt", True)) if isinstance(index, dict) else True


class TextTimeUNet(torch.nn.Module):
    """An SDXL UNet called like an SD 1.x one: ``encoder_hidden_states`` is the packed
    conditioning (``pack_text_time``), unpacked into the text states and the
    ``added_cond_kwargs`` the UNet takes. Its parameters are the UNet's (``unet.*``)."""

    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet
        cfg = unet.config
        self.pooled_width = int(cfg.projection_class_embeddings_input_dim) - TIME_IDS * int(cfg.addition_time_embed_dim)

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def forward(self, sample, timestep, encoder_hidden_states, **kwargs):
        hidden, added = unpack_text_time(encoder_hidden_states, self.pooled_width)
        return self.unet(sample, timestep, encoder_hidden_states=hidden, added_cond_kwargs=added, **kwargs)


class DualTextEncoder(torch.nn.Module):
    """SDXL's two text encoders as one: ``encoder`` (CLIP ViT-L, ``CLIPTextModel``) and
    ``encoder_2`` (OpenCLIP ViT-bigG, ``CLIPTextModelWithProjection``). ``encode`` gives
    what SDXL's pipeline gives the UNet for a prompt without classifier-free guidance:
    both encoders' penultimate hidden states concatenated, the second's projected pooled
    embedding, and the time ids of an uncropped image at ``resolution``, packed."""

    def __init__(self, encoder: torch.nn.Module, encoder_2: torch.nn.Module, resolution: int) -> None:
        super().__init__()
        self.encoder, self.encoder_2 = encoder, encoder_2
        self.resolution = int(resolution)

    @property
    def config(self):
        from types import SimpleNamespace

        return SimpleNamespace(hidden_size=int(self.encoder.config.hidden_size) + int(self.encoder_2.config.hidden_size))

    def with_encoders(self, encoder: torch.nn.Module, encoder_2: torch.nn.Module) -> "DualTextEncoder":
        """Itself when both encoders are its own, else a new one at the same resolution (a
        fine-tune, a single file or a LoRA that replaced either)."""
        if encoder is self.encoder and encoder_2 is self.encoder_2:
            return self
        return DualTextEncoder(encoder, encoder_2, self.resolution)

    @torch.no_grad()
    def encode(self, tokenizers, prompt: str, device) -> torch.Tensor:
        states, pooled = [], None
        for tok, enc in zip(tokenizers, (self.encoder, self.encoder_2)):
            out = enc(_ids(tok, prompt, device), output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled = out[0].float()  # the last encoder's: CLIPTextModelWithProjection's text_embeds
        hidden = torch.cat(states, dim=-1)
        return pack_text_time(hidden, pooled, sdxl_time_ids(self.resolution).to(hidden.device))
