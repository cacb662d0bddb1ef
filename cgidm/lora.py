"""LoRAs applied on the base model: any of PEFT, diffusers or kohya naming, with a count of
the file's layers that really landed (a partly fitting LoRA is refused unless allowed) and
the loaders' many lines of log turned into one (docs/architecture.md, "Stages": load)."""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from cgidm.checkpoints import PICKLE_SUFFIXES, ModelLoadError, _one_line, adapter_metadata, metadata_of
from cgidm.progress import library_quiet

log = logging.getLogger(__name__)


def is_lora_state_dict(state: dict) -> bool:
    return any(("lora" in k and (k.endswith(".weight") or k.endswith(".alpha"))) for k in state)


DIFFUSERS_LORA_FILE = "pytorch_lora_weights.safetensors"  # what diffusers' LoRA training scripts save


def lora_in_folder(path) -> Optional[Path]:
    """The LoRA file a LoRA training run's output folder holds, for a folder given where a
    model or a LoRA is asked for: diffusers' ``pytorch_lora_weights.safetensors``, else the
    folder's one LoRA ``.safetensors`` at its top level (kohya's ``<name>.safetensors``).
    ``None`` for a file, a model folder (``unet/`` or ``config.json``) or a folder without
    a LoRA file; several LoRA files (a run's epochs) are refused, naming them."""
    p = Path(path).expanduser() if path is not None else None
    if p is None or not p.is_dir() or (p / "unet").is_dir() or (p / "config.json").is_file():
        return None
    if (p / DIFFUSERS_LORA_FILE).is_file():
        return p / DIFFUSERS_LORA_FILE
    found = sorted(f for f in p.glob("*.safetensors") if not f.name.startswith(".") and is_lora_file(f))
    if len(found) > 1:
        names = ", ".join(f.name for f in found[:4]) + (", ..." if len(found) > 4 else "")
        raise ModelLoadError(f"{p}: {len(found)} LoRA files in this folder ({names}): give the one to test")
    return found[0] if found else None


def is_lora_file(path) -> Optional[bool]:
    """Whether ``path`` is a LoRA file: for ``.safetensors`` from its header's names alone
    (no tensor is read); ``None`` (cannot tell without unpickling it) for a pickle file
    (``checkpoints.PICKLE_SUFFIXES``); ``False`` for a folder, anything else, or a
    file that cannot be read (loading it says why)."""
    from pathlib import Path

    if path is None or not Path(path).is_file():
        return False
    suffix = Path(path).suffix.lower()
    if suffix in PICKLE_SUFFIXES:
        return None
    if suffix != ".safetensors":
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return is_lora_state_dict(dict.fromkeys(f.keys()))
    except Exception:  # noqa: BLE001 - a broken file is the loader's to report
        return False


# the adapter name of the first LoRA on a model; a LoRA stacked on it (``--finetuned`` a
# LoRA file and ``--lora`` another) gets the next free one of ``ft_2``, ``ft_3``, ...
LORA_ADAPTER = "ft"
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


def _applied(model, name: str, parts: dict[str, torch.Tensor], adapter: str = LORA_ADAPTER) -> bool:
    """Whether layer ``name`` of ``model`` carries the file's A and B weights under
    ``adapter``: the only proof that the library applied it (it skips what it cannot place
    and just logs)."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        return False
    for part in ("lora_A", "lora_B"):
        holder = getattr(mod, part, None)
        if part not in parts or holder is None or adapter not in holder:
            return False
        w = holder[adapter].weight
        t = parts[part]
        if w.shape != t.shape or not torch.equal(w.detach().cpu(), t.to(w.dtype)):
            return False
    return True


@dataclass
class _LoraFit:
    matched: int = 0
    total: int = 0
    unmatched: list = field(default_factory=list)

    def add(self, model, peft_state: dict, adapter: str = LORA_ADAPTER) -> None:
        layers = _peft_layers(peft_state)
        ok = {n for n, parts in layers.items() if _applied(model, n, parts, adapter)}
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


def _te_peft_state(te_keys: dict, text_encoder, prefix: str = "text_encoder") -> dict:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    state = {k.removeprefix(prefix + "."): v for k, v in te_keys.items()}
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    if not hasattr(text_encoder, "text_model"):
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The names of the LoRA adapters ``model`` holds, in the order they were loaded."""
    names = dict.fromkeys(getattr(model, "peft_config", None) or {})
    for m in adapter_layers(model):
        names.update(dict.fromkeys(m.lora_A))
    return list(names)


def _free_adapter_name(model: torch.nn.Module) -> str:
    """``LORA_ADAPTER`` on a model without one, else the first of ``ft_2``, ``ft_3``, ... free."""
    taken = set(adapter_names(model))
    name, i = LORA_ADAPTER, 1
    while name in taken:
        i += 1
        name = f"{LORA_ADAPTER}_{i}"
    return name


def _stack(model: torch.nn.Module, adapter: str, scale: float) -> None:
    """Every LoRA adapter of ``model`` active on its layers, so that LoRAs loaded one after
    the other add up, each at the scale it was loaded with, and ``adapter`` at ``scale``.
    (The loaders make the adapter loaded last the only active one; PEFT's ``set_adapter``
    turns ``requires_grad`` on, so the flags are restored.)"""
    names = adapter_names(model)
    for m in adapter_layers(model):
        grads = [(p, p.requires_grad) for p in m.parameters()]
        m.set_adapter(names)
        for p, g in grads:
            p.requires_grad_(g)
        m.set_scale(adapter, scale)  # a layer without this adapter is left as it is


# what the loaders say when a LoRA's layers are not the model's (names or shapes)
_SHAPE_MISFIT = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([^\]]*)\]\) from "
                           r"checkpoint, the shape in current model is torch\.Size\(\[([^\]]*)\]\)")
_MISFIT = re.compile(r"size mismatch|not found in the base model|Error\(s\) in loading state_dict|"
                     r"(missing|unexpected) keys?\b|shape", re.IGNORECASE)


def _load_error(path: Path, model: str, e: Exception, hint: str = "") -> ModelLoadError:
    """A loader's error, blamed on the LoRA not fitting ``model`` only when it is a misfit
    (a layer name or shape the model does not have); anything else is a failure to load."""
    try:
        from peft.utils.error import NoMatchingPeftModuleError as no_match
    except ImportError:  # an older PEFT: its message says "not found in the base model"
        no_match = KeyError
    shapes = _SHAPE_MISFIT.findall(str(e))
    if shapes:  # torch's message is a header line and then one line per layer
        name, have, want = shapes[0]
        name = re.sub(r"\.ft(_\d+)?\.", ".", name)  # our adapters' names are not the file's
        return ModelLoadError(
            f"{path}: LoRA does not fit the base {model}: {len(shapes)} LoRA weight shape(s) differ from the "
            f"model's, e.g. {name}: [{have}] in the file, [{want}] in the model "
            "(a LoRA for another model family or size?)")
    if isinstance(e, (no_match, KeyError)) or _MISFIT.search(str(e)):
        return ModelLoadError(f"{path}: LoRA does not fit the base {model}{hint} ({_one_line(e, 160)})")
    return ModelLoadError(f"{path}: the LoRA could not be loaded into the base {model} ({_one_line(e)})")


def _apply_lora(state: dict, unet_base, text_encoder_base, path: Path, scale: float,
                allow_partial: bool = False, copy_unet: bool = True, text_encoder_keep=None):
    """Copies of the base UNet (and text encoder, if the LoRA touches it) with the LoRA on,
    and ``{"matched": m, "total": n}``: how many of the file's LoRA layers were applied.
    Fewer than all is refused unless ``allow_partial``; none is always refused.

    The LoRA goes on as a new adapter: on a model that already has one (a LoRA loaded
    before) both are active and add up, each at its own ``scale``. ``copy_unet=False``
    puts it on ``unet_base`` itself. ``text_encoder_keep``: the text encoder(s) that must
    stay as they are (the pretrained side's); only those are copied before the LoRA goes on,
    other encoders of ``text_encoder_base`` take it in place. ``None``: copy every one."""
    with library_quiet() as said:
        unet, te, fit = _apply_lora_quietly(state, unet_base, text_encoder_base, path, scale, copy_unet,
                                            text_encoder_keep)
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


def _encoders(text_encoder) -> tuple:
    from cgidm.families import DualTextEncoder

    if isinstance(text_encoder, DualTextEncoder):
        return text_encoder.encoder, text_encoder.encoder_2
    return (text_encoder,)


def _check_ranks(meta: Optional[dict], keys: dict, prefix: str, path: Path) -> None:
    """A LoRA's metadata ranks (``<prefix>.r``, ``<prefix>.rank_pattern``) are whole numbers
    no larger than its tensors' largest: PEFT builds every adapter at the metadata's rank
    before the tensors are read, so a rank of millions in a 1 MB file would take all the
    memory first. (Not "one of the tensors' ranks": a default ``r`` that a full
    ``rank_pattern`` overrides everywhere is no tensor's.)"""
    if not meta:
        return
    ranks = {int(v.shape[0]) for k, v in keys.items() if k.endswith("lora_A.weight") and v.dim() >= 1}
    given = [meta.get(f"{prefix}.r")] + list((meta.get(f"{prefix}.rank_pattern") or {}).values())
    bad = [r for r in given if r is not None and (not isinstance(r, int) or isinstance(r, bool) or r < 1
                                                 or (ranks and r > max(ranks)))]
    if bad:
        raise ModelLoadError(f"{path}: the LoRA settings in the file's metadata give rank {bad[0]!r}, its tensors "
                             f"have rank {', '.join(map(str, sorted(ranks)))}: a damaged or forged file")


def _apply_lora_quietly(state: dict, unet_base, text_encoder_base, path: Path, scale: float, copy_unet: bool,
                        text_encoder_keep=None):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from cgidm.families import DualTextEncoder

    xl = isinstance(text_encoder_base, DualTextEncoder)
    _refuse_unsupported(state, path)
    metadata = adapter_metadata(path)
    try:
        if xl:  # kohya's SDXL LoRAs name the UNet's blocks as SGM does (input_blocks_4_1_...)
            converted, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(state), unet_config=unet_base.config)
        else:
            converted, alphas = StableDiffusionPipeline.lora_state_dict(dict(state))
    except Exception as e:
        raise ModelLoadError(f"{path}: not a LoRA that diffusers can read ({_one_line(e)})") from e
    alphas = _fix_alpha_names(alphas)
    # the text encoders a LoRA can train: SDXL's second is "text_encoder_2"
    te_prefixes = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    unet_keys = {k: v for k, v in converted.items() if k.startswith("unet.")}
    te_keys = {p: {k: v for k, v in converted.items() if k.startswith(p + ".")} for p in te_prefixes}
    if not unet_keys and not any(te_keys.values()):
        raise ModelLoadError(f"{path}: LoRA keys match neither the UNet nor the text encoder (e.g. {next(iter(state))}; "
                             "a diffusers LoRA's keys start with 'unet.' or 'text_encoder.', a kohya LoRA's with "
                             "'lora_unet_' or 'lora_te'"
                             + ("; a PEFT adapter saved on its own (base_model.model.*, its settings in "
                                "adapter_config.json) is not read: save it with diffusers' save_lora_weights"
                                if any(k.startswith("base_model.model.") for k in state) else "") + ")")
    # layers the converter kept under no known prefix count against the fit
    file_names = _layer_names(state)
    known = set(unet_keys).union(*(set(d) for d in te_keys.values()))
    fit = _LoraFit(total=len(_layer_names(set(converted) - known)))
    unet = copy.deepcopy(unet_base) if copy_unet else unet_base
    for prefix, keys in (("unet", unet_keys), *te_keys.items()):
        _check_ranks(metadata_of(metadata, prefix), keys, prefix, path)
    if unet_keys:
        # the file's settings where it has them (the loaders take one or the other)
        u_meta = metadata_of(metadata, "unet")
        u_alphas = None if u_meta else {k: v for k, v in (alphas or {}).items() if k.startswith("unet.")} or None
        name = _free_adapter_name(unet)
        try:
            unet.load_lora_adapter(unet_keys, prefix="unet", network_alphas=u_alphas, metadata=u_meta,
                                   adapter_name=name)
        except Exception as e:
            sgm = not xl and any(k.startswith(("lora_unet_input_blocks_", "lora_unet_output_blocks_")) for k in state)
            hint = ": its kohya layer names (lora_unet_input_blocks_...) are SGM's, as kohya names SDXL's: a LoRA for " \
                   "Stable Diffusion XL?"
            raise _load_error(path, "UNet", e, hint if sgm else "") from e
        _stack(unet, name, scale)
        fit.add(unet, _unet_peft_state(unet_keys), name)
    bases = _encoders(text_encoder_base)
    keep = {id(m) for m in (_encoders(text_encoder_keep) if text_encoder_keep is not None else bases)}
    encoders = list(bases)
    for i, prefix in enumerate(te_prefixes):
        keys = _te_old_names_to_peft(te_keys[prefix])
        if not keys:
            continue
        peft = _te_peft_state(keys, bases[i], prefix)
        if not set(_peft_layers(peft)) & {n for n, _ in bases[i].named_modules()}:
            # none of its layers is the encoder's (its loader fails on that with an IndexError):
            # each counts as a misfit, so only --allow-partial-lora goes on, without them
            fit.add(bases[i], peft)
            continue
        te = copy.deepcopy(bases[i]) if id(bases[i]) in keep else bases[i]
        t_meta = metadata_of(metadata, prefix)
        t_alphas = None if t_meta else _te_alpha_names(
            {k: v for k, v in (alphas or {}).items() if k.startswith(prefix + ".")}, te, prefix) or None
        name = _free_adapter_name(te)
        try:
            # scale 1 here: the loader would scale every active adapter, not just this one
            StableDiffusionPipeline.load_lora_into_text_encoder(
                keys, t_alphas, text_encoder=te, prefix=prefix, lora_scale=1.0, adapter_name=name, metadata=t_meta,
            )
        except Exception as e:
            raise _load_error(path, f"text encoder {prefix}", e) from e
        _stack(te, name, scale)
        fit.add(te, peft, name)
        encoders[i] = te
    te_out = text_encoder_base.with_encoders(*encoders) if xl else encoders[0]
    # the converter may drop or merge what it cannot name: never count fewer layers
    # than the file has
    fit.total = max(fit.total, len(file_names))
    return unet, te_out, fit


def _refuse_unsupported(state: dict, path: Path) -> None:
    """Adapters in a LoRA file that the loaders would drop or misread, refused by name:
    kohya's DoRA magnitudes (diffusers drops ``.dora_scale`` with a log line: the file
    would run as a plain LoRA) and LyCORIS's LoHa/LoKr factors."""
    dora = [k for k in state if k.endswith(".dora_scale")]
    if dora:
        raise ModelLoadError(f"{path}: a DoRA in kohya's naming ({len(dora)} '.dora_scale' tensors, e.g. {dora[0]}): "
                             "its magnitudes would be dropped and it would run as a plain LoRA; not supported "
                             "(a DoRA in PEFT's naming, '.lora_magnitude_vector', is)")
    lycoris = [k for k in state if re.search(r"\.(hada|lokr)_", k)]
    if lycoris:
        raise ModelLoadError(f"{path}: LyCORIS LoHa/LoKr weights ({len(lycoris)} tensors, e.g. {lycoris[0]}): "
                             "not a LoRA; not supported")


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


# A kohya text-encoder module in diffusers' old naming, what its conversion gives: the
# attention's under the old processor names (``self_attn.to_q_lora``), the MLP's under
# ``mlp.fc1.lora_linear_layer``; then a LoRA factor (``.down.weight``, ``.up.weight``) or the
# module's alpha (``.down.weight.alpha``).
_TE_OLD_MODULE = r"\.(?:self_attn\.to_(q|k|v|out)_lora|(mlp\.fc[12])\.lora_linear_layer)"
_TE_OLD_NAME = re.compile(_TE_OLD_MODULE + r"\.(down|up)\.weight$")
_TE_ALPHA_NAME = re.compile(_TE_OLD_MODULE + r"\.down\.weight\.alpha$")


def _te_module(m: re.Match) -> str:
    """The module (``self_attn.q_proj``, ``mlp.fc1``) an old-naming match names."""
    return f"self_attn.{m.group(1)}_proj" if m.group(1) else m.group(2)


def _te_old_names_to_peft(keys: dict) -> dict:
    """A text encoder's LoRA keys in diffusers' old naming (what kohya files convert to:
    ``self_attn.to_q_lora.down.weight``, ``mlp.fc1.lora_linear_layer.up.weight``) in PEFT's
    (``self_attn.q_proj.lora_A.weight``). diffusers tells the old naming apart by an
    ``out_proj`` LoRA and refused a file that trained only some projections (q and v:
    PEFT's default for CLIP)."""
    def fix(k: str) -> str:
        m = _TE_OLD_NAME.search(k)
        if not m:
            return k
        return f"{k[: m.start()]}.{_te_module(m)}.lora_{'A' if m.group(3) == 'down' else 'B'}.weight"

    return {fix(k): v for k, v in keys.items()}


def _te_alpha_names(alphas: dict, text_encoder, prefix: str) -> dict:
    """Rename a text encoder's per-module alphas so that diffusers finds each one's module.
    It names a module by the alpha's key less its last two parts before ``.down.``, which
    for the attention's is ``self_attn`` (no module) and for the MLP's keeps a
    ``text_model.`` prefix that a text encoder of transformers 5 no longer has: any alpha
    other than the most common fell back to it, so those layers got the wrong scale."""
    strip = not hasattr(text_encoder, "text_model")

    def fix(k: str) -> str:
        m = _TE_ALPHA_NAME.search(k)
        if not m:
            return k
        module = f"{k[: m.start()]}.{_te_module(m)}".removeprefix(prefix + ".")
        if strip:
            module = module.removeprefix("text_model.")
        return f"{prefix}.{module}.lora.down.weight.alpha"  # diffusers keeps what is before ".lora.down."

    return {fix(k): v for k, v in alphas.items()}


# --------------------------------------------------------------------------- one copy of the base


def adapter_layers(unet: torch.nn.Module) -> list:
    """The PEFT LoRA layers of ``unet``."""
    from peft.tuners.lora import LoraLayer

    return [m for m in unet.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(layers: list, disabled: bool | Sequence[bool] = True):
    """Every LoRA layer's ``_disable_adapters`` flag set for the duration (one value for
    all, or one per layer), then restored. The flag is set directly: PEFT's
    ``enable_adapters`` also turns ``requires_grad`` back on for the adapter weights, and
    only input gradients are ever taken here."""
    before = [m._disable_adapters for m in layers]
    flags = [disabled] * len(layers) if isinstance(disabled, bool) else list(disabled)
    for m, d in zip(layers, flags):
        m._disable_adapters = d
    try:
        yield
    finally:
        for m, d in zip(layers, before):
            m._disable_adapters = d


class AdaptersOff(torch.nn.Module):
    """The pretrained UNet inside a LoRA-adapted one: calls run the shared module with its
    adapters off, so a LoRA pair holds ONE copy of the base weights (the fine-tuned side is
    the same module with the adapters on). Its parameters are the shared module's."""

    def __init__(self, adapted: torch.nn.Module) -> None:
        super().__init__()
        self.adapted = adapted
        layers = adapter_layers(adapted)
        if not layers or not all(hasattr(m, "_disable_adapters") for m in layers):
            raise ValueError("AdaptersOff needs a UNet with PEFT LoRA layers")
        object.__setattr__(self, "_layers", layers)  # not submodules: they belong to `adapted`

    @property
    def config(self):
        return self.adapted.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.adapted.parameters()).dtype

    @property
    def unet_call(self) -> bool:
        """Called as what it wraps (``reference.takes_unet_call``): a UNet."""
        from cgidm.reference import takes_unet_call

        return takes_unet_call(self.adapted)

    def forward(self, *args, **kwargs):
        with adapters_disabled(self._layers):
            return self.adapted(*args, **kwargs)
