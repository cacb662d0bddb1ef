"""Checkpoint files as untrusted input: pickles refused by default, safetensors headers
bounded before anything is loaded, and the instance prompt a fine-tune was trained with,
read from where trainers record it (safetensors metadata, a DreamBooth folder's training
arguments) without loading a tensor (docs/architecture.md, "Stages": load)."""
from __future__ import annotations

import json
import logging
import os
import re
import struct
import threading
from pathlib import Path
from typing import Optional

import torch

from cgidm.files import regular_file, shown

log = logging.getLogger(__name__)

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # bytes; real headers are a few MB at most


class ModelLoadError(ValueError):
    """A model that cannot be loaded, with the file and the reason."""


def _one_line(text, limit: int = 200) -> str:
    """The first non-empty line of a library message, cut to ``limit`` characters:
    diffusers and peft put whole key lists in their errors. An exception other than
    cgidm's own keeps its type name (``IndexError: ...`` says more than the message)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:  # "... these keys:" and the list below it
        line = f"{line} {lines[1]}" + (" ..." if len(lines) > 2 else "")
    if isinstance(text, BaseException) and not isinstance(text, ModelLoadError):
        line = f"{type(text).__name__}: {line}" if line else type(text).__name__
    line = shown(line or "no reason given")  # a file name in it may hold terminal escapes
    return line if len(line) <= limit else line[: limit - 1] + "…"


# --------------------------------------------------------------------------- file checks


def _check_local(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists() and os.path.islink(p):
        raise ModelLoadError(f"{what} {path}: a link that leads to no file (broken, or a loop of links)")
    if not p.exists():
        # owner/name, as a hub spells a repository: two parts, no file suffix, and no local
        # folder by the owner's name (a mistyped relative path is only "not found")
        parts = str(path).split("/")
        looks_like_hub_id = (len(parts) == 2 and all(parts) and not str(path).startswith((".", "~"))
                             and not Path(parts[0]).expanduser().exists()
                             and Path(parts[1]).suffix.lower() not in WEIGHT_SUFFIXES)
        hint = (
            " It looks like a model-hub id: cgidm never downloads. Download the model"
            " yourself and pass its local folder."
            if looks_like_hub_id
            else ""
        )
        raise ModelLoadError(f"{what} not found: {path}.{hint}")
    return p


_OFFLINE = {"lock": threading.Lock(), "loads": 0, "ours": False}


def model_loader(fn):
    """``fn`` (a loader) run with ``HF_HUB_OFFLINE=1`` where the user did not set it (every
    load also passes ``local_files_only``; the variable is the net under it), taken out again
    when the last load running ends, so a child process started later is not told otherwise
    (the hub library, imported during a load, reads it once: that process stays offline);
    and a ``PermissionError`` from anywhere inside it (a model folder this user may not enter
    or list, a config it may not read: the libraries open files of their own) raised as the
    ``ModelLoadError`` naming the path, not as a crash."""
    import functools

    @functools.wraps(fn)
    def loader(*args, **kwargs):
        with _OFFLINE["lock"]:  # loads in several threads: the first sets it, the last takes it out
            if _OFFLINE["loads"] == 0:
                _OFFLINE["ours"] = "HF_HUB_OFFLINE" not in os.environ
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
            _OFFLINE["loads"] += 1
        try:
            return fn(*args, **kwargs)
        except PermissionError as e:
            where = shown(e.filename) if e.filename else "a model file"
            raise ModelLoadError(f"{where}: {e.strerror or e} (a model's folders and files must be readable by "
                                 "this user)") from None
        finally:
            with _OFFLINE["lock"]:
                _OFFLINE["loads"] -= 1
                if _OFFLINE["loads"] == 0 and _OFFLINE["ours"]:
                    os.environ.pop("HF_HUB_OFFLINE", None)

    return loader


def check_pickle_allowed(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise ModelLoadError(
            f"{path}: pickle checkpoints can run arbitrary code when loaded and are refused. "
            "Use a .safetensors file, or pass --allow-pickle to load it with "
            "torch.load(weights_only=True) if you trust its source."
        )


# the weights file a component folder's loader reads (diffusers', transformers'), whole or
# as the shards its index lists
MAIN_WEIGHTS = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def _loaded_safetensors(folder: Path, names: list[str]) -> list[str]:
    """Of a folder's safetensors files, those its loader may read: the main file and the
    shards an index names; else every one but another variant's (``*.fp16.safetensors``).
    Others (macOS's ``._`` files, an unused variant, a backup) are not read, so not checked."""
    read = [n for n in MAIN_WEIGHTS if n in names]  # and the shards, where an index is there too
    for index in (n + ".index.json" for n in MAIN_WEIGHTS):
        if index in names:
            try:
                shards = json.loads((folder / index).read_text())["weight_map"].values()
                read += sorted({str(v) for v in shards} - set(read))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{folder / index}: unreadable shard index ({_one_line(e, 120)})") from None
    if read:
        return read
    return [n for n in names if n.lower().endswith(".safetensors") and not re.search(r"\.[\w-]+\.safetensors$", n)]


def weights_in(folder: Path, allow_pickle: bool) -> bool:
    """Whether a component folder's weights may be loaded; ``True`` = use safetensors."""
    try:
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    except OSError as e:
        raise ModelLoadError(f"{folder}: cannot read ({e.strerror or e})") from None
    found = _loaded_safetensors(folder, names)
    if found:
        # diffusers would only say the folder failed; this names the file and the fault
        for n in found:
            read_safetensors_header(folder / n)
        return True
    pickles = [n for n in names if Path(n).suffix.lower() in PICKLE_SUFFIXES]
    if pickles:
        check_pickle_allowed(folder / pickles[0], allow_pickle)
        return False
    variants = [n for n in names if n.lower().endswith(".safetensors")]
    raise ModelLoadError(f"{folder}: no weights file (expected {' or '.join(MAIN_WEIGHTS)})" + (
        f"; it holds {', '.join(variants[:3])}: another variant's weights, which cgidm does not pick (rename the "
        "file to load it)" if variants else ""))


def check_loaded(model, loaded: dict, where, what: str) -> None:
    """Refuse a model whose weights file left some of its tensors unset: the libraries fill
    them with random values (transformers) or leave them on the meta device (diffusers),
    and either gives scores that mean nothing. Tensors the model does not use are logged."""
    missing = sorted(loaded.get("missing_keys") or [])
    missing += sorted({n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta} - set(missing))
    mismatched = [f"{k[0]} {tuple(k[1])} vs {tuple(k[2])}" for k in loaded.get("mismatched_keys") or []]
    if missing or mismatched:
        bad = missing or mismatched
        raise ModelLoadError(
            f"{where}: {what} weights {'missing' if missing else 'of another shape'} in its file: {len(bad)} "
            f"tensor(s) ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): an incomplete or renamed "
            "checkpoint, or one of another model"
        )
    unused = sorted(loaded.get("unexpected_keys") or [])
    if unused:
        log.warning("%s: %d tensor(s) in the %s's file that it does not use, ignored (%s%s)", where, len(unused),
                    what, ", ".join(unused[:3]), ", ..." if len(unused) > 3 else "")


def _regular(path: Path) -> None:
    """A weights file that is a pipe (``--lora <(...)``) or a device would block the open or
    never end: refused before it is opened."""
    try:
        regular_file(path)
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: not found") from None
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None


def read_safetensors_header(path: Path) -> dict:
    """Parse and bound-check the JSON header of a safetensors file before loading it."""
    _regular(path)
    size = path.stat().st_size
    try:
        f = open(path, "rb")
    except OSError as e:  # not readable: said as the model that cannot load, not as a crash
        raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
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
    _regular(p)
    if p.suffix.lower() not in PICKLE_SUFFIXES:
        raise ModelLoadError(f"{p}: unknown checkpoint format {p.suffix!r} (expected .safetensors)")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as e:  # an empty file's EOFError says nothing of its own
        why = _one_line(e) if str(e).strip() else ("an empty file" if p.stat().st_size == 0 else type(e).__name__)
        raise ModelLoadError(f"{p}: cannot load with weights_only=True ({why})") from e
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{p}: expected a dict of tensors, found {type(obj).__name__}")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def check_weight_values(state: dict, path: Path, finite: bool = False) -> None:
    """Refuse a file whose weight tensors cannot be a model's: of an integer or bool type
    (``.weight``, ``.bias`` and LoRA factors; an integer ``position_ids`` buffer or a kohya
    ``.alpha`` saved from an integer rank is fine), or with ``finite``, holding NaN or inf
    (checked on LoRA files, which are small). Either ran before and gave NaN outputs: every
    PGD step skipped, scores without meaning."""
    ints = [k for k, v in state.items() if not (v.is_floating_point() or v.is_complex())
            and k.endswith((".weight", ".bias", ".lora_magnitude_vector"))]
    if ints:
        raise ModelLoadError(f"{path}: {len(ints)} weight tensor(s) of an integer type (e.g. {ints[0]}: "
                             f"{state[ints[0]].dtype}): not a model's weights")
    if finite:
        # float8 has no isfinite of its own: checked in float32 (a LoRA is small)
        bad = [k for k, v in state.items() if v.is_floating_point()
               and not bool(torch.isfinite(v if v.element_size() > 1 else v.float()).all())]
        if bad:
            raise ModelLoadError(f"{path}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[0]})")


def check_finite_modules(parts) -> None:
    """``ModelLoadError`` for a loaded model whose weights hold NaN or inf (``parts``:
    ``(where, module)`` pairs, a parameter shared by two checked once, for the first): a
    damaged file, or one saved from a training run that diverged, gives NaN everywhere it
    reaches, so every step would be skipped and the scores would mean nothing. One float32
    sum per tensor (NaN or inf in it makes the sum so) and one host sync a model; on the
    device the model runs on (a CPU checks an SD UNet in about a second)."""
    seen: set[int] = set()
    for where, module in parts:
        params = [(name, p) for name, p in module.named_parameters() if id(p) not in seen and p.is_floating_point()]
        seen.update(id(p) for _, p in params)
        sums = [p.detach().sum(dtype=torch.float32) for _, p in params]
        bad = (~torch.isfinite(torch.stack(sums))).nonzero().flatten().tolist() if sums else []
        if bad:
            name, first = params[bad[0]]
            raise ModelLoadError(f"{where}: {len(bad)} weight tensor(s) hold NaN or inf (e.g. {name}, as "
                                 f"loaded in {str(first.dtype).replace('torch.', '')}): a damaged file, one saved "
                                 "from a training run that diverged, or weights too large for that dtype")


SAME_AS_BASE = ("its UNet has the base model's weights exactly (the base itself, or a copy of it): the fine-tuned "
                "and pretrained sides are one model, with no contrast between them: nothing can be recovered or "
                "extracted; check --finetuned")


def warn_if_same_weights(finetuned, base, where) -> bool:
    """Warn (and True) when the fine-tuned UNet's weights equal the base's, tensor
    for tensor: ``where`` is the base itself or a copy of it, so both sides of every
    contrast are one model and nothing can be authenticated or extracted."""
    a, b = finetuned.state_dict(), base.state_dict()
    if finetuned is base or (a.keys() == b.keys() and all(
            x.shape == b[k].shape and x.dtype == b[k].dtype and torch.equal(x, b[k]) for k, x in a.items())):
        log.warning("%s: %s", shown(str(where)), SAME_AS_BASE)
        return True
    return False


# --------------------------------------------------------------------------- prompt

PROMPT_METADATA_KEYS = ("modelspec.trigger_phrase", "ss_instance_prompt", "instance_prompt")
TRAINING_ARGS_FILES = ("args.json", "training_args.json", "train_config.json")
MAX_PROMPT_CHARS = 300
MAX_TRAINING_ARGS_BYTES = 1024 * 1024
_KOHYA_DATASET_DIR = re.compile(r"^\d+_(.+)$")  # kohya: "<repeats>_<instance prompt>"


def _clean_prompt(value) -> Optional[str]:
    """A prompt fit to use and to print, or None: one line, printable (no terminal
    escapes from an untrusted file), at most ``MAX_PROMPT_CHARS``."""
    return None if _prompt_problem(value) else " ".join(value.split())


def _prompt_problem(value) -> Optional[str]:
    """Why ``value`` is no prompt ``_clean_prompt`` gives, or None when it is one."""
    if not isinstance(value, str):
        return f"is not text ({type(value).__name__})"
    text = " ".join(value.split())
    if not text:
        return "is empty"
    if len(text) > MAX_PROMPT_CHARS:
        return f"is over {MAX_PROMPT_CHARS} characters ({len(text)})"
    if not text.isprintable():
        return "has characters that are not printable"
    return None


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


def _instance_prompts(args) -> list:
    """The ``instance_prompt`` values of a training-arguments object, as they are: at its
    top, then one level down (some trainers nest their arguments under a section)."""
    if not isinstance(args, dict):
        return []
    found = [args["instance_prompt"]] if "instance_prompt" in args else []
    return found + [v["instance_prompt"] for v in args.values() if isinstance(v, dict) and "instance_prompt" in v]


def _instance_prompt_of(args) -> Optional[str]:
    """The first usable ``instance_prompt`` of a training-arguments object, or None."""
    return next((p for p in map(_clean_prompt, _instance_prompts(args)) if p), None)


def _prompt_in_folder(folder: Path) -> tuple[Optional[str], str]:
    # a UNet folder passed alone: its pipeline folder above may hold the arguments
    folders = [folder]
    if not (folder / "unet").is_dir() and (folder.parent / "unet").is_dir():
        folders.append(folder.parent)
    seen = []  # what the files held that was no prompt: said, rather than "no instance_prompt"
    for d in folders:
        for name in TRAINING_ARGS_FILES:
            f = d / name
            try:
                if not f.is_file():
                    continue
                if f.stat().st_size > MAX_TRAINING_ARGS_BYTES:
                    seen.append(f"{f} is over {MAX_TRAINING_ARGS_BYTES // 1024} kB, not read")
                    continue
                args = json.loads(f.read_text())
            except (OSError, ValueError, RecursionError) as e:
                seen.append(f"{f} is not readable JSON ({type(e).__name__})")
                continue
            prompt = _instance_prompt_of(args)
            if prompt:
                return prompt, f"instance_prompt in {f}"
            values = _instance_prompts(args)
            if values:  # there, but none usable: why the first is not
                seen.append(f"{f} has an instance_prompt that {_prompt_problem(values[0])}")
    if seen:
        return None, f"{folder}: no usable instance_prompt: " + "; ".join(seen)
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


# --------------------------------------------------------------------------- a LoRA file's settings


def adapter_metadata(path: Path) -> dict:
    """The LoRA settings diffusers writes into a safetensors file's metadata
    (``lora_adapter_metadata``: ``unet.r``, ``unet.lora_alpha``, ``alpha_pattern``,
    ``use_rslora``, ... per model prefix) as a dict, ``{}`` where there are none. Its own
    loader builds each adapter from them instead of from the tensors: without them a LoRA
    trained at ``lora_alpha`` != ``r`` ran at the wrong strength (docs/families.md, "LoRA")."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    meta = read_safetensors_header(Path(path)).get("__metadata__")
    raw = meta.get("lora_adapter_metadata") if isinstance(meta, dict) else None
    if raw is None:
        return {}
    try:
        out = json.loads(raw) if isinstance(raw, str) else None
    except (ValueError, RecursionError):
        out = None
    if not isinstance(out, dict):
        raise ModelLoadError(f"{path}: malformed LoRA settings in the file's metadata (lora_adapter_metadata is "
                             "not a JSON object)")
    # settings a newer PEFT wrote that this one does not have would stop the load (LoraConfig
    # takes no unknown keyword): left out, and said
    import dataclasses

    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = sorted(k for k in out if k.partition(".")[2] not in known)
    if unknown:
        log.warning("%s: LoRA settings in the file's metadata that this PEFT does not know, ignored: %s", path,
                    ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else ""))
    return {k: v for k, v in out.items() if k not in unknown}


def metadata_of(metadata: dict, prefix: str) -> Optional[dict]:
    """The metadata for one model of the LoRA (the loaders drop the ``prefix.`` themselves),
    None where it has none. Its ``init_lora_weights`` is always PEFT's default: the file's
    tensors replace the initial A and B, but some initialisations (PiSSA, OLoRA, LoftQ) first
    rewrite the base layer's weights, which here are also the pretrained side's, and
    ``False`` leaves a random B on a targeted layer the file has no tensors for."""
    own = {k: v for k, v in metadata.items() if k.startswith(prefix + ".")}
    if own:
        own[prefix + ".init_lora_weights"] = True
    return own or None
