"""Offline loading of a model pair: the pretrained base and the suspect fine-tune.

Base: a diffusers pipeline directory. Fine-tune: (a) a diffusers pipeline directory, or a
``unet/`` (+ optional ``text_encoder/``) folder, or a UNet folder itself; (b) a single-file
SD 1.x checkpoint (``.safetensors``); (c) a LoRA (diffusers/PEFT or kohya key names)
applied on the base. Nothing is ever downloaded. Pickle files (``.ckpt``, ``.bin``,
``.pt``, ``.pth``) are refused unless ``allow_pickle``, and then only loaded with
``torch.load(weights_only=True)``. A LoRA must fit the base in full (every layer in the
file applied) unless ``allow_partial_lora``.

File checks and the instance prompt live in ``cgidm.checkpoints``, LoRAs in ``cgidm.lora``.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from cgidm.checkpoints import (  # noqa: F401 (find_prompt, read_safetensors_header: re-exported)
    ModelLoadError, _check_local, _one_line, check_finite_modules, check_loaded, check_weight_values, find_prompt,
    load_state_dict, model_loader, read_safetensors_header, warn_if_same_weights, weights_in,
)
from cgidm import families
from cgidm.config import library_runtime
from cgidm.codec import IDENTITY_CODEC_CLASS, IdentityCodec, VaeCodec
from cgidm.families import encode_text as _encode  # noqa: F401 (cgidm.protect_pgd imports it from here)
from cgidm.lora import AdaptersOff, _apply_lora, adapter_layers, is_lora_file, is_lora_state_dict, lora_in_folder
from cgidm.progress import library_bars_off, library_quiet
from cgidm.single_file import single_file_parts

log = logging.getLogger(__name__)


class LatentGeometry:
    """The latent's size and channels, the image resolution and the device of a model (or a
    pair), read from its UNet (``_geometry_unet``) and its codec."""

    codec: object

    @property
    def _geometry_unet(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def latent_size(self) -> int:
        return int(self._geometry_unet.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self._geometry_unet.config.in_channels)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.latent_channels, self.latent_size, self.latent_size)

    @property
    def resolution(self) -> int:
        return self.latent_size * self.codec.factor

    @property
    def device(self) -> torch.device:
        return next(self._geometry_unet.parameters()).device


@dataclass
class ModelPair(LatentGeometry):
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
    family: Optional[families.Family] = None  # the base's (the fine-tune's is the same); None: epsilon

    @property
    def _geometry_unet(self) -> torch.nn.Module:
        return self.unet_pre

    def to(self, device=None, dtype=None) -> "ModelPair":
        mods = {id(m): m for m in (self.unet_pre, self.unet_ft, self.text_encoder_pre, self.text_encoder_ft)}
        for m in mods.values():
            # casting to the dtype a module already has is a no-op that diffusers warns about
            same = dtype is None or next(m.parameters()).dtype == dtype
            m.to(**({"device": device} if device is not None else {}), **({} if same else {"dtype": dtype}))
        self.codec.to(**{k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None})
        if device is not None:  # indexed by timesteps on the device (kept fp64)
            self.abar = self.abar.to(device)
        return self

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model encodes the prompt with its own text encoder: ``(c_ft, c_pre)``,
        each ``[1, L, D]`` fp32 on the pair's device. Embeddings are kept per prompt; on a
        GPU the text encoders then move to the CPU, so that the inversion has their memory
        (they are needed again only for a new prompt)."""
        cache = self.__dict__.setdefault("_prompts", {})
        if prompt not in cache:
            device = self.device
            encoders = {id(m): m for m in (self.text_encoder_ft, self.text_encoder_pre)}.values()
            for m in encoders:
                m.to(device)
            cache[prompt] = (
                _encode(self.tokenizer_ft, self.text_encoder_ft, prompt, device),
                _encode(self.tokenizer_pre, self.text_encoder_pre, prompt, device),
            )
            if device.type == "cuda":
                for m in encoders:
                    m.to("cpu")
        return cache[prompt]


# --------------------------------------------------------------------------- components


def _load_component(cls, folder: Path, what: str, allow_pickle: bool):
    """A diffusers/transformers component folder (config.json + weights)."""
    if not (folder / "config.json").exists():
        raise ModelLoadError(f"{folder}: missing {what} config.json")
    use_st = weights_in(folder, allow_pickle)
    with library_bars_off(), library_quiet() as said:
        try:
            model, loaded = cls.from_pretrained(folder, local_files_only=True, use_safetensors=use_st,
                                                output_loading_info=True)
        except Exception as e:
            # transformers puts the tensor at fault in a report it logs, not in the error
            report = [" ".join(ln.split()) for m in said for ln in m.splitlines() if "| MISMATCH" in ln]
            detail = f"; {report[0]}" + (f" (and {len(report) - 1} more)" if len(report) > 1 else "") if report else ""
            raise ModelLoadError(f"{folder}: cannot load {what} ({e}{detail})") from e
    check_loaded(model, loaded, folder, what)  # says what a load report would (missing, unused tensors)
    for m in said:
        if "LOAD REPORT" not in m:
            log.warning("%s: %s", folder, _one_line(m))
    return model


def _load_unet(folder: Path, allow_pickle: bool):
    from diffusers import UNet2DConditionModel

    return _load_component(UNet2DConditionModel, folder, "UNet", allow_pickle)


def _load_text_encoder(folder: Path, allow_pickle: bool, projection: bool = False):
    """A CLIP text encoder folder; ``projection``: with its text projection (SDXL's second
    encoder, ``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _load_component(cls, folder, "text encoder", allow_pickle)


def _load_text_side(folder: Path, family: families.Family, resolution: int, allow_pickle: bool,
                    te_base=None, tok_base=None):
    """``(text encoder, tokenizer)`` of a pipeline folder for ``family``: for SDXL both
    encoders as one ``DualTextEncoder`` and both tokenizers as a tuple. With ``te_base``
    (a fine-tune's folder), components the folder lacks are the base's."""
    if family.name != "sdxl":
        te = _load_text_encoder(folder / "text_encoder", allow_pickle) if (folder / "text_encoder").is_dir() else te_base
        tok = _load_tokenizer(folder / "tokenizer") if (folder / "tokenizer").is_dir() else tok_base
        return te, tok
    old_te = (te_base.encoder, te_base.encoder_2) if te_base is not None else (None, None)
    old_tok = tuple(tok_base) if tok_base is not None else (None, None)
    encoders, tokenizers = [], []
    for i, name in enumerate(("text_encoder", "text_encoder_2")):
        tname = name.replace("text_encoder", "tokenizer")
        enc = _load_text_encoder(folder / name, allow_pickle, projection=i == 1) if (folder / name).is_dir() else old_te[i]
        tok = _load_tokenizer(folder / tname) if (folder / tname).is_dir() else old_tok[i]
        if enc is None or tok is None:
            raise ModelLoadError(f"{folder}: missing component '{name if enc is None else tname}' (an SDXL pipeline has two)")
        encoders.append(enc)
        tokenizers.append(tok)
    te = te_base.with_encoders(*encoders) if te_base is not None else families.DualTextEncoder(*encoders, resolution)
    return te, tuple(tokenizers)


def _load_tokenizer(folder: Path):
    from transformers import CLIPTokenizer

    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: missing tokenizer folder")
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load tokenizer ({e})") from e


def _load_codec(base: Path, allow_pickle: bool, family: Optional[families.Family] = None):
    if (base / "vae").is_dir():
        from diffusers import AutoencoderKL

        vae = _load_component(AutoencoderKL, base / "vae", "VAE", allow_pickle)
        # SDXL's VAE overflows in fp16: its config asks to be kept in fp32 (force_upcast)
        upcast = family is not None and family.name == "sdxl" and bool(vae.config.get("force_upcast", False))
        return VaeCodec(vae.eval().requires_grad_(False), fp16_in_fp32=upcast)
    cfg = base / "codec" / "config.json"
    if cfg.exists() and json.loads(cfg.read_text()).get("_class_name") == IDENTITY_CODEC_CLASS:
        return IdentityCodec()
    raise ModelLoadError(f"{base}: missing component 'vae' (no vae/ folder)")


def _checked(check, *args):
    """``check(*args)``, its ``ValueError`` a ``ModelLoadError`` (a model that cannot be used)."""
    try:
        return check(*args)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def _load_abar(base: Path, allowed: tuple[str, ...] = ("epsilon",)) -> torch.Tensor:
    """The base scheduler's ``alphas_cumprod``; a prediction type outside ``allowed`` is
    refused (the default, epsilon only, is protection's: its loss predicts the noise)."""
    from diffusers import DDPMScheduler

    folder = base / "scheduler"
    pred = families.prediction_type(folder)
    if pred is None:
        raise ModelLoadError(f"{folder}: missing scheduler_config.json")
    _checked(families.check_timesteps, folder)
    if pred not in allowed:
        raise ModelLoadError(
            f"{folder}: prediction_type {pred!r} is not supported here (supported: {', '.join(allowed)})"
        )
    try:
        sched = DDPMScheduler.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ModelLoadError(f"{folder}: cannot load scheduler ({e})") from e
    return sched.alphas_cumprod.double()


def _base_dir(base: str | Path, pair: bool = True) -> Path:
    """The base model's folder, checked; ``pair``: for a command with a fine-tune beside it
    (``protect`` has none: its errors do not point at --finetuned)."""
    p = _check_local(base, "base model")
    if not p.is_dir():
        if is_lora_file(p):  # the suspect's own file given as the base
            raise ModelLoadError(f"{p}: a LoRA, given as --base: the base is the pretrained model folder the LoRA was "
                                 "trained on; " + ("give the LoRA as --finetuned (or --lora), the pretrained model as "
                                                   "--base" if pair else "protect against that pretrained model"))
        raise ModelLoadError(f"{p}: the base model must be a diffusers pipeline directory (the pretrained model"
                             + (" the fine-tune started from" if pair else "") + "; a single file converts to one "
                             "with diffusers: StableDiffusionPipeline.from_single_file(FILE).save_pretrained(DIR))"
                             + ("; if this file is the suspect fine-tune, give it as --finetuned" if pair else ""))
    family = families.detect_folder(p)
    families.refuse_unsupported(family, str(p))
    extra = ("text_encoder_2", "tokenizer_2") if family is not None and family.name == "sdxl" else ()
    for comp in ("unet", "text_encoder", "tokenizer", "scheduler", *extra):
        if not (p / comp).is_dir():
            raise ModelLoadError(f"{p}: missing component '{comp}' (not a diffusers pipeline directory?)")
    return p


# --------------------------------------------------------------------------- fine-tunes


def _note_base_parts(pipeline: Path, given: Path, family: families.Family, info: dict) -> None:
    """Say (log and ``info["finetuned_uses_base"]``) which of a fine-tune's parts are the
    base's: those its folder lacks (a DreamBooth run that trained the UNet alone), all but
    the UNet when ``given`` is the ``unet/`` folder of a pipeline, and always the codec."""
    text = ("text_encoder", "tokenizer", *(("text_encoder_2", "tokenizer_2") if family.name == "sdxl" else ()))
    alone = given != pipeline
    reused = [c for c in text if alone or not (pipeline / c).is_dir()]
    if reused:
        info["finetuned_uses_base"] = reused
        own = [c for c in reused if (pipeline / c).is_dir()]
        why = f"only its UNet was given (pass {pipeline} to use its {', '.join(own)})" if own else "it has none of its own"
        log.info("%s: the base's %s used: %s", given, ", ".join(reused), why)
    if (pipeline / "vae").is_dir():
        log.info("%s: its vae/ is not used; both models share the base's codec", pipeline)


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


def _with_text_time(unet_pre, unet_ft):
    """SDXL UNets called with packed conditioning (``families.TextTimeUNet``); a LoRA pair
    keeps its one copy of the weights, the pretrained side being the wrapped adapted UNet
    with its adapters off."""
    if isinstance(unet_pre, AdaptersOff) and unet_pre.adapted is unet_ft:
        wrapped = families.TextTimeUNet(unet_ft)
        return AdaptersOff(wrapped), wrapped
    return families.TextTimeUNet(unet_pre), families.TextTimeUNet(unet_ft)


def _pretrained_side(unet_ft: torch.nn.Module) -> torch.nn.Module:
    """The pretrained UNet of a pair whose fine-tune is the base UNet with LoRAs on: that
    UNet with its adapters off, or the UNet itself when the LoRAs touch only the text
    encoder (then it has no adapter to switch off)."""
    return AdaptersOff(unet_ft) if adapter_layers(unet_ft) else unet_ft


@model_loader
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
    Two LoRA files (``finetuned`` one, ``lora`` the other) stack: both on, each at
    ``lora_scale`` (recorded in ``info["lora_scale"]``). A ``lora_scale`` that is not
    finite, or other than 1 without any LoRA, is refused (``ValueError``).
    """
    if finetuned is None and lora is None:
        raise ModelLoadError("give a fine-tuned model (--finetuned) or a LoRA (--lora)")
    finetuned, lora = lora_in_folder(finetuned) or finetuned, lora_in_folder(lora) or lora  # a LoRA run's folder
    device, dtype = library_runtime(device, dtype)  # before anything loads
    if isinstance(lora_scale, bool) or not isinstance(lora_scale, numbers.Real):
        raise TypeError(f"lora_scale must be a number, got {lora_scale!r}")
    if not math.isfinite(lora_scale):
        raise ValueError(f"--lora-scale must be a finite number, got {lora_scale}")
    if lora_scale == 0:
        log.warning("--lora-scale 0: the LoRA adds nothing, so the fine-tuned side is its base")
    base_p = _base_dir(base)
    base_family = families.detect_folder(base_p) or families.Family("sd1", None, str(base_p))
    families.refuse_unsupported(base_family, str(base_p))
    unet_pre = _load_unet(base_p / "unet", allow_pickle)
    codec = _load_codec(base_p, allow_pickle, base_family)
    resolution = _checked(families.check_latent_size, unet_pre, base_p / "unet") * codec.factor
    te_pre, tok = _load_text_side(base_p, base_family, resolution, allow_pickle)
    abar = _load_abar(base_p, families.PREDICTION_TYPES)
    family = base_family
    unet_ft, te_ft, tok_ft = unet_pre, te_pre, tok
    info = {"base": os.path.abspath(base_p)}  # absolute: the evidence names the models wherever it is read
    loras = 0  # LoRA files applied

    def count(match: dict) -> None:
        old = info.get("lora_match", {"matched": 0, "total": 0})
        info["lora_match"] = {k: old[k] + match[k] for k in ("matched", "total")}

    if finetuned is not None:
        fp = _check_local(finetuned, "fine-tuned model")
        info["finetuned"] = os.path.abspath(fp)
        if fp.is_dir():
            family = families.check_same(base_family, families.detect_folder(fp), str(fp))
            if (fp / "unet").is_dir():
                unet_ft = _load_unet(fp / "unet", allow_pickle)
                te_ft, tok_ft = _load_text_side(fp, base_family, resolution, allow_pickle, te_pre, tok)
                info["finetuned_format"] = "diffusers"
                _note_base_parts(fp, fp, base_family, info)
            elif (fp / "config.json").exists():
                unet_ft = _load_unet(fp, allow_pickle)
                info["finetuned_format"] = "diffusers-unet"
                if families.in_pipeline(fp):
                    _note_base_parts(fp.parent, fp, base_family, info)
            else:
                raise ModelLoadError(f"{fp}: missing component 'unet' (no unet/ folder or UNet config.json)")
        else:
            state = load_state_dict(fp, allow_pickle)
            is_lora = is_lora_state_dict(state)
            check_weight_values(state, fp, finite=is_lora)
            if is_lora:
                unet_ft, te_ft, match = _apply_lora(state, unet_pre, te_pre, fp, lora_scale, allow_partial_lora,
                                                    copy_unet=False, text_encoder_keep=te_pre)
                unet_pre = _pretrained_side(unet_ft)
                loras += 1
                count(match)
                info["finetuned_format"] = "lora"
            else:
                family = families.check_same(base_family, families.detect_state_dict(state, fp), str(fp))
                unet_ft, te_ft = single_file_parts(state, base_p, fp, te_pre, base_family.describe())
                info["finetuned_format"] = "single-file"
    if finetuned is not None and not loras and lora is None:
        if warn_if_same_weights(unet_ft, unet_pre, info["finetuned"]):
            info["same_as_base"] = True  # said again where the run's outputs are read
    if loras or lora is not None:
        info["lora_scale"] = float(lora_scale)
    if lora is None and not loras and lora_scale != 1.0:
        raise ValueError(f"--lora-scale applies to a LoRA; none was given (lora_scale={lora_scale:g}; "
                         f"the fine-tune {finetuned} is not a LoRA file and there is no --lora)")
    if lora is not None:
        lp = _check_local(lora, "LoRA")
        if loras and os.path.samefile(lp, fp):
            raise ModelLoadError(f"{lp} is given as both the fine-tune and --lora: it would be applied twice (at "
                                 "twice its strength); give it once")
        if lp.is_dir():
            raise ModelLoadError(f"{lp}: a folder without a LoRA .safetensors file at its top level: give the LoRA "
                                 f"file" + (" (a model folder goes to --finetuned)" if (lp / "unet").is_dir() else ""))
        state = load_state_dict(lp, allow_pickle)
        check_weight_values(state, lp, finite=True)
        if not is_lora_state_dict(state):
            raise ModelLoadError(f"{lp}: no LoRA weights in this file (no lora_* keys)"
                                 + (": a full fine-tune's weights? give it as --finetuned" if lp.is_file() else ""))
        # on the base, or stacked on a LoRA fine-tune of it (both adapters on, each at
        # lora_scale): ONE copy of the base weights, the pretrained side being the same UNet
        # with all its adapters off (taken again: the LoRA may add layers); on a separate
        # fine-tune: that UNet itself
        on_base = unet_ft is unet_pre or (isinstance(unet_pre, AdaptersOff) and unet_pre.adapted is unet_ft)
        unet_ft, te_ft, match = _apply_lora(state, unet_ft, te_ft, lp, lora_scale, allow_partial_lora,
                                            copy_unet=False, text_encoder_keep=te_pre)
        if on_base:
            unet_pre = _pretrained_side(unet_ft)
        loras += 1
        count(match)
        info["lora"] = os.path.abspath(lp)
    _check_compatible(unet_pre, unet_ft, te_ft, codec, str(finetuned or lora))
    if family.added_cond == "text_time":
        unet_pre, unet_ft = _with_text_time(unet_pre, unet_ft)
    info["family"] = family.record()
    log.info("model family: %s", info["family"])

    for m in {id(m): m for m in (unet_pre, unet_ft, te_pre, te_ft)}.values():
        m.eval().requires_grad_(False)
    pair = ModelPair(unet_pre, unet_ft, te_pre, te_ft, tok, tok_ft, codec, abar, info, family)
    pair.to(device=device, dtype=dtype)
    base_parts = (("unet", unet_pre), ("text encoder", te_pre), ("vae", getattr(codec, "vae", None)))
    check_finite_modules([(f"{where} ({part})", m) for where, parts in (
        (info["base"], base_parts), (finetuned or lora, (("unet", unet_ft), ("text encoder", te_ft))))
        for part, m in parts if m is not None])
    info["memory_plan"] = memory_plan(pair)
    return pair


def _bytes(*modules) -> int:
    """Bytes of the distinct parameters and buffers of ``modules`` (a tensor two modules
    share counts once: a LoRA pair's base weights)."""
    seen = {}
    for m in modules:
        if isinstance(m, torch.nn.Module):
            for t in (*m.parameters(), *m.buffers()):
                seen[id(t)] = t.numel() * t.element_size()
    return sum(seen.values())


def _size(n: int) -> str:
    return f"{n / 1024 ** 3:.2f} GiB" if n >= 0.1 * 1024 ** 3 else f"{n / 1024 ** 2:.1f} MiB"


def memory_plan(pair: ModelPair) -> dict:
    """The weights a pair holds, by component, in the dtypes they were loaded in: the
    planner's static part (docs/families.md, "Memory"). Activations per sample are what
    the engine measures on a GPU (``engine.plan_memory``)."""
    unet = _bytes(pair.unet_pre, pair.unet_ft)
    shared = unet < _bytes(pair.unet_pre) + _bytes(pair.unet_ft)
    text = _bytes(pair.text_encoder_pre, pair.text_encoder_ft)
    vae = _bytes(getattr(pair.codec, "vae", None))
    summary = (f"UNet weights {_size(unet)} ({'one copy for both sides' if shared else 'two models'}), "
               f"text encoders {_size(text)} (moved off the GPU once the prompt is encoded), VAE {_size(vae)}; "
               "activations are measured on the GPU")
    return {"unet_bytes": unet, "unet_shared": shared, "text_encoder_bytes": text, "vae_bytes": vae,
            "inversion_weights_bytes": unet + vae, "summary": summary}
