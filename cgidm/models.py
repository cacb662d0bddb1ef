"""Offline loading of a model pair: the pretrained base and the suspect fine-tune.

Base: a diffusers pipeline directory. Fine-tune: (a) a diffusers pipeline directory, or a
``unet/`` (+ optional ``text_encoder/``) folder, or a UNet folder itself; (b) a single-file
SD 1.x checkpoint (``.safetensors``); (c) a LoRA (diffusers/PEFT or kohya key names)
applied on the base. Nothing is ever downloaded. Pickle files (``.ckpt``, ``.bin``,
``.pt``, ``.pth``) are refused unless ``allow_pickle``, and then only loaded with
``torch.load(weights_only=True)``. A LoRA must fit the base in full (every layer in the
file applied) unless ``allow_partial_lora``.

``find_prompt`` reads the instance prompt a fine-tune was trained with from where
trainers record it (safetensors metadata, a DreamBooth folder's training arguments).
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from cgidm.codec import IDENTITY_CODEC_CLASS, IdentityCodec, VaeCodec

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; real headers are a few MB at most


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with the file and the reason."""


@dataclass
class ModelPair:
    """The pretrained and fine-tuned denoisers with everything the algorithm needs.

    Both UNets have ``requires_grad`` off: only the input gradient is ever taken.
    """

    unet_pre: torch.nn.Module
    unet_ft: torch.nn.Module
    text_encoder_pre: torch.nn.Module
    text_encoder_ft: torch.nn.Module
    tokenizer_pre: object
    tokenizer_ft: object
    codec: object
    abar: torch.Tensor  # [T] alphas_cumprod, fp64
    info: dict = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return int(self.unet_pre.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.unet_pre.config.in_channels)

    @property
    def resolution(self) -> int:
        return self.latent_size * self.codec.factor

    @property
    def device(self) -> torch.device:
        return next(self.unet_pre.parameters()).device

    def to(self, device=None, dtype=None) -> "ModelPair":
        mods = {id(m): m for m in (self.unet_pre, self.unet_ft, self.text_encoder_pre, self.text_encoder_ft)}
        kw = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        for m in mods.values():
            m.to(**kw)
        self.codec.to(**kw)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model encodes the prompt with its own text encoder: ``(c_ft, c_pre)``,
        each ``[1, L, D]`` fp32."""
        return (
            _encode(self.tokenizer_ft, self.text_encoder_ft, prompt, self.device),
            _encode(self.tokenizer_pre, self.text_encoder_pre, prompt, self.device),
        )


def _encode(tokenizer, text_encoder, prompt: str, device) -> torch.Tensor:
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length,
        truncation=True, return_tensors="pt",
    ).input_ids.to(device)
    return text_encoder(ids)[0].float()


# --------------------------------------------------------------------------- file checks


def _check_local(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        looks_like_hub_id = "/" in str(path) and not str(path).startswith((".", "/", "~"))
        hint = (
            " It looks like a model-hub id: cgidm never downloads. Download the model"
            " yourself and pass its local folder."
            if looks_like_hub_id
            else ""
        )
        raise ModelLoadError(f"{what} not found: {path}.{hint}")
    return p


def check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{path}: pickle checkpoints can run arbitrary code when loaded and are refused. "
            "Use a .safetensors file, or pass --allow-pickle to load it with "
            "torch.load(weights_only=True) if you trust its source."
        )


def read_safetensors_header(path: Path) -> dict:
    """Parse and bound-check the JSON header of a safetensors file before loading it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ModelLoadError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_SAFETENSORS_HEADER or n > size - 8:
            raise ModelLoadError(
                f"{path}: malformed safetensors header (declares {n} bytes, file has {size - 8})"
            )
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # RecursionError: "[[[[..." nesting
            raise ModelLoadError(f"{path}: malformed safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: malformed safetensors header (not a JSON object)")
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (
            isinstance(offsets, list) and len(offsets) == 2
            and all(type(v) is int for v in offsets) and 0 <= offsets[0] <= offsets[1]
        ):
            raise ModelLoadError(f"{path}: malformed safetensors entry {key[:80]!r} (bad data_offsets)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ModelLoadError(f"{path}: truncated safetensors file ({size} bytes, needs {8 + n + end})")
    return header


def load_state_dict(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """A checkpoint file's tensors: safetensors, or pickle only with ``allow_pickle``
    (and then ``weights_only=True``)."""
    p = _check_local(path, "checkpoint")
    if p.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        read_safetensors_header(p)
        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types
            raise ModelLoadError(f"{p}: cannot read safetensors file ({e})") from e
    check_pickle_allowed(p, allow_pickle)
    if p.suffix.lower() not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{p}: unknown checkpoint format {p.suffix!r} (expected .safetensors)")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ModelLoadError(f"{p}: cannot load with weights_only=True ({e})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{p}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _weights_in(folder: Path, allow_pickle: bool) -> bool:
    """Whether a component folder's weights may be loaded; ``True`` = use safetensors."""
    found = sorted(folder.glob("*.safetensors"))
    if found:
        # diffusers would only say the folder failed; this names the file and the fault
        for f in found:
            read_safetensors_header(f)
        return True
    pickles = [p for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        check_pickle_allowed(pickles[0], allow_pickle)
        return False
    raise ModelLoadError(f"{folder}: no weights file (expected *.safetensors)")


# --------------------------------------------------------------------------- components


def _load_component(cls, folder: Path, what: str, allow_pickle: bool):
    """A diffusers/transformers component folder (config.json + weights)."""
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder}: missing {what} config.json")
    use_st = _weights_in(folder, allow_pickle)
    try:
        return cls.from_pretrained(folder, local_files_only=True, use_safetensors=use_st)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load {what} ({e})") from e


def _load_unet(folder: Path, allow_pickle: bool):
    from diffusers import UNet2DConditionModel

    return _load_component(UNet2DConditionModel, folder, "UNet", allow_pickle)


def _load_text_encoder(folder: Path, allow_pickle: bool):
    from transformers import CLIPTextModel

    return _load_component(CLIPTextModel, folder, "text encoder", allow_pickle)


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: missing tokenizer folder")
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load tokenizer ({e})") from e


def _load_codec(base: Path, allow_pickle: bool):
    if (base / "vae").is_dir():
        from diffusers import AutoencoderKL

        use_st = _weights_in(base / "vae", allow_pickle)
        try:
            vae = AutoencoderKL.from_pretrained(base / "vae", local_files_only=True, use_safetensors=use_st)
        except Exception as e:
            raise ModelLoadError(f"{base / 'vae'}: cannot load VAE ({e})") from e
        return VaeCodec(vae.eval().requires_grad_(False))
    cfg = base / "codec" / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("_class_name") == IDENTITY_CODEC_CLASS:
        return IdentityCodec()
    raise ModelLoadError(f"{base}: missing component 'vae' (no vae/ folder)")


def _prediction_type(folder: Path) -> str:
    path = folder / "scheduler_config.json"
    if not path.exists():
        raise ModelLoadError(f"{folder}: missing scheduler_config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable scheduler config ({e})") from e
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path}: unreadable scheduler config (not a JSON object)")
    return str(cfg.get("prediction_type", "epsilon"))


def _load_abar(base: Path) -> torch.Tensor:
    from diffusers import DDPMScheduler

    folder = base / "scheduler"
    pred = _prediction_type(folder)
    if pred != "epsilon":
        raise ModelLoadError(
            f"{folder}: prediction_type {pred!r} is not supported; CGI-DM as specified uses "
            "epsilon-prediction models (Stable Diffusion 1.x)"
        )
    try:
        sched = DDPMScheduler.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load scheduler ({e})") from e
    return sched.alphas_cumprod.double()


def _base_dir(base: str | Path) -> Path:
    p = _check_local(base, "base model")
    if not p.is_dir():
        raise ModelLoadError(f"{p}: the base model must be a diffusers pipeline directory")
    for comp in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not (p / comp).is_dir():
            raise ModelLoadError(f"{p}: missing component '{comp}' (not a diffusers pipeline directory?)")
    return p


# --------------------------------------------------------------------------- fine-tunes


def is_lora_state_dict(state: dict) -> bool:
    return any(("lora" in k and (k.endswith(".weight") or k.endswith(".alpha"))) for k in state)


LORA_ADAPTER = "ft"
_LIBRARY_LOGGERS = ("diffusers", "peft", "transformers")


def _one_line(text, limit: int = 200) -> str:
    """The first non-empty line of a library message, cut to ``limit`` characters:
    diffusers and peft put whole key lists in their errors. An exception other than
    cgidm's own keeps its type name (``IndexError: ...`` says more than the message)."""
    line = next((ln.strip() for ln in str(text).splitlines() if ln.strip()), "")
    if isinstance(text, BaseException) and not isinstance(text, ModelLoadError):
        line = f"{type(text).__name__}: {line}" if line else type(text).__name__
    line = line or "no reason given"
    return line if len(line) <= limit else line[: limit - 1] + "…"


@contextlib.contextmanager
def _library_quiet():
    """Collect instead of print what diffusers, peft and transformers log (warning and
    above) or warn while a LoRA is loaded: a LoRA that does not fit makes them print
    dozens of lines of key names; cgidm says it in one. Yields the list of messages."""
    messages: list[str] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    keep = _Keep(logging.WARNING)
    saved = []
    for name in _LIBRARY_LOGGERS:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers = [keep]
        lg.propagate = False
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        for lg, handlers, propagate in saved:
            lg.handlers = handlers
            lg.propagate = propagate


# the layer a LoRA key belongs to: the key less its LoRA part, in the naming of PEFT,
# diffusers (old and new) and kohya
_LORA_PART = re.compile(
    r"(\.lora_[AB](\.\w+)?|[._]lora[._](down|up)|\.lora_linear_layer\.(down|up))\.(weight|bias)$"
    r"|\.(alpha|lora_magnitude_vector|dora_scale)$"
)
_PEFT_PART = re.compile(r"\.(lora_A|lora_B)\.weight$")


def _layer_names(keys) -> set[str]:
    names = set()
    for k in keys:
        m = _LORA_PART.search(k)
        names.add(k[: m.start()] if m else k)  # an unknown key is a layer nothing applies
    return names


def _peft_layers(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """``{module name: {"lora_A": w, "lora_B": w}}`` of a PEFT-named state dict; a layer
    whose keys are not both there gets what it has (and counts as not applied)."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        m = _PEFT_PART.search(k)
        if m:
            layers.setdefault(k[: m.start()], {})[m.group(1)] = v
        else:
            layers.setdefault(_LORA_PART.sub("", k), {})
    return layers


def _applied(model, name: str, parts: dict[str, torch.Tensor]) -> bool:
    """Whether layer ``name`` of ``model`` carries the file's A and B weights: the only
    proof that the library applied it (it skips what it cannot place and just logs)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return False
    for part in ("lora_A", "lora_B"):
        holder = getattr(mod, part, None)
        if part not in parts or holder is None or LORA_ADAPTER not in holder:
            return False
        w = holder[LORA_ADAPTER].weight
        t = parts[part]
        if w.shape != t.shape or not torch.equal(w.detach().cpu(), t.to(w.dtype)):
            return False
    return True


@dataclass
class _LoraFit:
    matched: int = 0
    total: int = 0
    unmatched: list = field(default_factory=list)

    def add(self, model, peft_state: dict) -> None:
        layers = _peft_layers(peft_state)
        ok = {n for n, parts in layers.items() if _applied(model, n, parts)}
        self.matched += len(ok)
        self.total += len(layers)
        self.unmatched += sorted(set(layers) - ok)


def _unet_peft_state(unet_keys: dict) -> dict:
    from diffusers.utils import convert_unet_state_dict_to_peft

    state = {k.removeprefix("unet."): v for k, v in unet_keys.items()}
    # the same test diffusers' load_lora_adapter makes before converting
    if state and "lora_A" not in next(iter(state)):
        state = convert_unet_state_dict_to_peft(state)
    return state


def _te_peft_state(te_keys: dict, text_encoder) -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    state = {k.removeprefix("text_encoder."): v for k, v in te_keys.items()}
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(text_encoder, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def _apply_lora(state: dict, unet_base, text_encoder_base, path: Path, scale: float,
                allow_partial: bool = False):
    """Copies of the base UNet (and text encoder, if the LoRA touches it) with the LoRA on,
    and ``{"matched": m, "total": n}``: how many of the file's LoRA layers were applied.
    Fewer than all is refused unless ``allow_partial``; none is always refused."""
    with _library_quiet() as said:
        unet, te, fit = _apply_lora_quietly(state, unet_base, text_encoder_base, path, scale)
    if said:
        log.debug("%s: the LoRA loaders said: %s", path, " | ".join(_one_line(m) for m in said))
    if fit.matched == 0:
        raise ModelLoadError(f"{path}: LoRA keys match no layer of the base model (0 of {fit.total} layers)")
    if fit.matched < fit.total:
        if not allow_partial:
            first = _one_line(fit.unmatched[0], 120) if fit.unmatched else "dropped by the converter"
            raise ModelLoadError(
                f"{path}: only {fit.matched} of {fit.total} LoRA layers fit the base model "
                f"(first that does not: {first}); "
                "a partly applied fine-tune is refused: pass --allow-partial-lora "
                "(allow_partial_lora=True) to use it anyway"
            )
        log.warning("%s: applied %d of %d LoRA layers (partial LoRA allowed)", path, fit.matched, fit.total)
    else:
        log.info("%s: applied %d of %d LoRA layers", path, fit.matched, fit.total)
    return unet, te, {"matched": fit.matched, "total": fit.total}


def _apply_lora_quietly(state: dict, unet_base, text_encoder_base, path: Path, scale: float):
    from diffusers import StableDiffusionPipeline

    try:
        converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
    except Exception as e:
        raise ModelLoadError(f"{path}: not a LoRA that diffusers can read ({_one_line(e)})") from e
    alphas = _fix_alpha_names(alphas)
    unet_keys = {k: v for k, v in converted.items() if k.startswith("unet.")}
    te_keys = {k: v for k, v in converted.items() if k.startswith("text_encoder.")}
    if not unet_keys and not te_keys:
        raise ModelLoadError(f"{path}: LoRA keys match neither the UNet nor the text encoder")
    # layers the converter kept under neither prefix count against the fit
    file_names = _layer_names(state)
    other = len(_layer_names(set(converted) - set(unet_keys) - set(te_keys)))
    fit = _LoraFit(total=other)
    unet = copy.deepcopy(unet_base)
    if unet_keys:
        u_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")} or None
        try:
            unet.load_lora_adapter(unet_keys, prefix="unet", network_alphas=u_alphas, adapter_name=LORA_ADAPTER)
        except Exception as e:
            raise ModelLoadError(f"{path}: LoRA does not fit the base UNet ({_one_line(e)})") from e
        if scale != 1.0:
            unet.set_adapters([LORA_ADAPTER], weights=[scale])
        fit.add(unet, _unet_peft_state(unet_keys))
    te = text_encoder_base
    if te_keys:
        te = copy.deepcopy(text_encoder_base)
        t_alphas = {k: v for k, v in (alphas or {}).items() if k.startswith("text_encoder.")} or None
        try:
            StableDiffusionPipeline.load_lora_into_text_encoder(
                te_keys, t_alphas, text_encoder=te, prefix="text_encoder", lora_scale=scale,
                adapter_name=LORA_ADAPTER,
            )
        except Exception as e:
            raise ModelLoadError(f"{path}: LoRA does not fit the base text encoder ({_one_line(e)})") from e
        fit.add(te, _te_peft_state(te_keys, te))
    # the converter may drop or merge what it cannot name: never count fewer layers
    # than the file has
    fit.total = max(fit.total, len(file_names))
    return unet, te, fit


_ALPHA_NAME = re.compile(r"\.processor\.to_(q|k|v|out)_lora\.down\.weight\.alpha$")


def _fix_alpha_names(alphas: Optional[dict]) -> Optional[dict]:
    """diffusers files kohya attention alphas under ``...processor.to_q_lora.down.weight.alpha``,
    a name no module has, so a per-module alpha would silently fall back to the most common
    one; rename them to the module the alpha belongs to."""
    if not alphas:
        return alphas

    def fix(k: str) -> str:
        m = _ALPHA_NAME.search(k)
        if not m:
            return k
        proj = "to_out.0" if m.group(1) == "out" else f"to_{m.group(1)}"
        return k[: m.start()] + f".{proj}.alpha"

    return {fix(k): v for k, v in alphas.items()}


def _single_file(state: dict, base: Path, path: Path, text_encoder_base):
    from diffusers import UNet2DConditionModel

    if not any(k.startswith("model.diffusion_model.") for k in state):
        raise ModelLoadError(
            f"{path}: not an SD 1.x single-file checkpoint (no 'model.diffusion_model.' keys) "
            "and not a LoRA"
        )
    try:
        unet = UNet2DConditionModel.from_single_file(
            state, config=str(base), subfolder="unet", local_files_only=True
        )
    except Exception as e:
        raise ModelLoadError(f"{path}: UNet does not match the base model's architecture ({e})") from e
    te = text_encoder_base
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
        from transformers import CLIPTextModel

        try:
            te = create_diffusers_clip_model_from_ldm(
                CLIPTextModel, state, config=str(base), subfolder="text_encoder", local_files_only=True
            )
        except Exception as e:
            raise ModelLoadError(f"{path}: text encoder does not match the base model's ({e})") from e
    return unet, te


def _check_compatible(unet_pre, unet_ft, te_ft, codec, where: str) -> None:
    a, b = unet_pre.config, unet_ft.config
    for key in ("in_channels", "out_channels", "cross_attention_dim", "sample_size"):
        if a.get(key) != b.get(key):
            # 1024 vs 768 is the usual case: an SD 2.x fine-tune against an SD 1.x base
            hint = " (Stable Diffusion 2.x against 1.x?)" if key == "cross_attention_dim" else ""
            raise ModelLoadError(
                f"{where}: fine-tuned UNet does not match the base: {key} {b.get(key)} vs {a.get(key)}{hint}"
            )
    if int(a["in_channels"]) != codec.latent_channels:
        raise ModelLoadError(
            f"{where}: UNet expects {a['in_channels']} latent channels, the codec gives {codec.latent_channels}"
        )
    width = int(te_ft.config.hidden_size)
    if width != int(b["cross_attention_dim"]):
        raise ModelLoadError(
            f"{where}: text encoder width {width} does not match the UNet's cross-attention "
            f"width {b['cross_attention_dim']}"
        )


def load_pair(
    base: str | Path,
    finetuned: str | Path | None = None,
    lora: str | Path | None = None,
    *,
    allow_pickle: bool = False,
    lora_scale: float = 1.0,
    allow_partial_lora: bool = False,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
) -> ModelPair:
    """Load the base pipeline and the fine-tune (directory, single file or LoRA).

    ``lora`` is applied on top of the fine-tuned UNet (the base's when ``finetuned`` is
    None); a LoRA file passed as ``finetuned`` is detected and treated the same way.
    A LoRA with layers the base does not have is refused (``ModelLoadError``) unless
    ``allow_partial_lora``; ``info["lora_match"] = {"matched": m, "total": n}`` counts the
    applied layers against those in the file (summed when two LoRA files are given).
    """
    if finetuned is None and lora is None:
        raise ModelLoadError("give a fine-tuned model (--finetuned) or a LoRA (--lora)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    base_p = _base_dir(base)
    unet_pre = _load_unet(base_p / "unet", allow_pickle)
    te_pre = _load_text_encoder(base_p / "text_encoder", allow_pickle)
    tok = _load_tokenizer(base_p / "tokenizer")
    codec = _load_codec(base_p, allow_pickle)
    abar = _load_abar(base_p)
    unet_ft, te_ft, tok_ft = unet_pre, te_pre, tok
    info = {"base": str(base_p)}

    def count(match: dict) -> None:
        old = info.get("lora_match", {"matched": 0, "total": 0})
        info["lora_match"] = {k: old[k] + match[k] for k in ("matched", "total")}

    if finetuned is not None:
        fp = _check_local(finetuned, "fine-tuned model")
        info["finetuned"] = str(fp)
        if fp.is_dir():
            if (fp / "unet").is_dir():
                has_sched = (fp / "scheduler" / "scheduler_config.json").exists()
                pred = _prediction_type(fp / "scheduler") if has_sched else "epsilon"
                if pred != "epsilon":
                    raise ModelLoadError(
                        f"{fp / 'scheduler'}: the fine-tune is a {pred!r}-prediction model "
                        "(Stable Diffusion 2.x?); the base predicts 'epsilon'"
                    )
                unet_ft = _load_unet(fp / "unet", allow_pickle)
                if (fp / "text_encoder").is_dir():
                    te_ft = _load_text_encoder(fp / "text_encoder", allow_pickle)
                if (fp / "tokenizer").is_dir():
                    tok_ft = _load_tokenizer(fp / "tokenizer")
                info["finetuned_format"] = "diffusers"
            elif (fp / "config.json").exists():
                unet_ft = _load_unet(fp, allow_pickle)
                info["finetuned_format"] = "diffusers-unet"
            else:
                raise ModelLoadError(f"{fp}: missing component 'unet' (no unet/ folder or UNet config.json)")
        else:
            state = load_state_dict(fp, allow_pickle)
            if is_lora_state_dict(state):
                unet_ft, te_ft, match = _apply_lora(state, unet_pre, te_pre, fp, lora_scale, allow_partial_lora)
                count(match)
                info["finetuned_format"] = "lora"
            else:
                unet_ft, te_ft = _single_file(state, base_p, fp, te_pre)
                info["finetuned_format"] = "single-file"
    if lora is not None:
        lp = _check_local(lora, "LoRA")
        state = load_state_dict(lp, allow_pickle)
        if not is_lora_state_dict(state):
            raise ModelLoadError(f"{lp}: no LoRA weights in this file (no lora_* keys)")
        unet_ft, te_ft, match = _apply_lora(state, unet_ft, te_ft, lp, lora_scale, allow_partial_lora)
        count(match)
        info["lora"] = str(lp)
    _check_compatible(unet_pre, unet_ft, te_ft, codec, str(finetuned or lora))

    for m in {id(m): m for m in (unet_pre, unet_ft, te_pre, te_ft)}.values():
        m.eval().requires_grad_(False)
    pair = ModelPair(unet_pre, unet_ft, te_pre, te_ft, tok, tok_ft, codec, abar, info)
    return pair.to(device=device, dtype=dtype)


# --------------------------------------------------------------------------- prompt

PROMPT_METADATA_KEYS = ("modelspec.trigger_phrase", "ss_instance_prompt", "instance_prompt")
TRAINING_ARGS_FILES = ("args.json", "training_args.json", "train_config.json")
MAX_PROMPT_CHARS = 300
MAX_TRAINING_ARGS_BYTES = 1024 * 1024
_KOHYA_DATASET_DIR = re.compile(r"^\d+_(.+)$")  # kohya: "<repeats>_<instance prompt>"


def _clean_prompt(value) -> Optional[str]:
    """A prompt fit to use and to print, or None: one line, printable (no terminal
    escapes from an untrusted file), at most ``MAX_PROMPT_CHARS``."""
    if not isinstance(value, str):
        return None
    text = " ".join(value.split())
    if not text or len(text) > MAX_PROMPT_CHARS or not text.isprintable():
        return None
    return text


def _most_frequent_tag(raw: str) -> Optional[str]:
    """kohya's ``ss_tag_frequency``, ``{dataset folder: {tag: count}}``: the tag seen most
    often over all folders (ties: the alphabetically first); with no tags, the prompt in
    a DreamBooth folder name ``<repeats>_<prompt>``."""
    try:
        freq = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return None
    if not isinstance(freq, dict):
        return None
    counts: dict[str, int] = {}
    for tags in freq.values():
        if isinstance(tags, dict):
            for tag, n in tags.items():
                tag = _clean_prompt(tag)
                if tag and type(n) is int and n > 0:
                    counts[tag] = counts.get(tag, 0) + n
    if counts:
        return min(counts, key=lambda t: (-counts[t], t))
    for folder in sorted(freq):
        m = _KOHYA_DATASET_DIR.match(str(folder))
        prompt = _clean_prompt(m.group(1)) if m else None
        if prompt:
            return prompt
    return None


def _prompt_in_safetensors(path: Path) -> tuple[Optional[str], str]:
    try:
        header = read_safetensors_header(path)
    except (ModelLoadError, OSError) as e:
        return None, f"{path}: metadata unreadable ({_one_line(e)})"
    meta = header.get("__metadata__")
    meta = meta if isinstance(meta, dict) else {}
    for key in PROMPT_METADATA_KEYS:
        prompt = _clean_prompt(meta.get(key))
        if prompt:
            return prompt, f"{key} in the metadata of {path}"
    prompt = _most_frequent_tag(meta.get("ss_tag_frequency"))
    if prompt:
        return prompt, f"the most frequent tag of ss_tag_frequency in the metadata of {path}"
    return None, f"{path}: no trigger phrase, instance prompt or tag frequencies in its metadata"


def _instance_prompt_of(args) -> Optional[str]:
    """``instance_prompt`` at the top of a training-arguments object or one level down
    (some trainers nest their arguments under a section)."""
    if not isinstance(args, dict):
        return None
    prompt = _clean_prompt(args.get("instance_prompt"))
    if prompt:
        return prompt
    for value in args.values():
        if isinstance(value, dict):
            prompt = _clean_prompt(value.get("instance_prompt"))
            if prompt:
                return prompt
    return None


def _prompt_in_folder(folder: Path) -> tuple[Optional[str], str]:
    # a UNet folder passed alone: its pipeline folder above may hold the arguments
    folders = [folder]
    if not (folder / "unet").is_dir() and (folder.parent / "unet").is_dir():
        folders.append(folder.parent)
    for d in folders:
        for name in TRAINING_ARGS_FILES:
            f = d / name
            try:
                if not f.is_file() or f.stat().st_size > MAX_TRAINING_ARGS_BYTES:
                    continue
                args = json.loads(f.read_text())
            except (OSError, ValueError, RecursionError):
                continue
            prompt = _instance_prompt_of(args)
            if prompt:
                return prompt, f"instance_prompt in {f}"
    return None, f"{folder}: no instance_prompt in {', '.join(TRAINING_ARGS_FILES)}"


def _prompt_in(path: Path) -> tuple[Optional[str], str]:
    if path.is_dir():
        return _prompt_in_folder(path)
    if not path.is_file():
        return None, f"{path}: not found"
    if path.suffix.lower() == ".safetensors":
        return _prompt_in_safetensors(path)
    return None, f"{path}: not a safetensors file, no metadata read"  # never unpickled


def find_prompt(
    finetuned: str | Path | None = None, lora: str | Path | None = None
) -> tuple[Optional[str], str]:
    """The instance prompt the fine-tune was trained with, as ``(prompt, where)``, or
    ``(None, why not)`` when no checkpoint records one.

    Looked for, the LoRA first (it is the fine-tune on top): in a ``.safetensors`` file's
    metadata ``modelspec.trigger_phrase``, ``ss_instance_prompt``/``instance_prompt``, then
    the most frequent tag of kohya's ``ss_tag_frequency``; in a folder (a DreamBooth
    output) ``instance_prompt`` in ``args.json``, ``training_args.json`` or
    ``train_config.json``. Only safetensors headers and small JSON files are read;
    nothing is unpickled or loaded.
    """
    looked = []
    for given in (lora, finetuned):
        if given is None:
            continue
        prompt, where = _prompt_in(Path(given).expanduser())
        if prompt is not None:
            return prompt, where
        looked.append(where)
    if not looked:
        return None, "no fine-tuned model or LoRA given"
    return None, "no instance prompt recorded (" + "; ".join(looked) + ")"
