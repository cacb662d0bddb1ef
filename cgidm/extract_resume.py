"""The samples a stopped ``cgidm extract`` run had drawn, kept for the next run
(docs/extract.md, "Outputs"): ``OUT/.extract-partial.safetensors`` holds the final latents
drawn so far, by sample index, with a digest of everything that decides a sample (the
guidance, steps, seed, scheduler, latent shape, dtype and device type, both conditionings,
the models' identity and a checksum of every UNet parameter). A run with the same digest
draws only the samples missing; sample ``i``'s noise is keyed by ``i``, so the samples are
those of an uninterrupted run (up to the float rounding of another batch). A run with
another digest is refused, naming the settings that differ (they are kept in the file
beside the digest), so a stopped run's samples are never dropped without a word. A
safetensors file holds tensors only: reading it runs no code.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Optional

import torch

from cgidm.files import atomic_write_bytes
from cgidm.resume import differences

log = logging.getLogger(__name__)

PARTIAL = ".extract-partial.safetensors"
SAVE_EVERY_S = 30.0  # at most this much sampling is lost to a kill (each save rewrites the file)


FOUND_FACTS = ("same_as_base",)


def sampling_settings(pair, cfg, scheduler, latent_shape) -> dict:
    """The settings that decide a sample, as JSON values (part of the digest; said when a
    stopped run's differ)."""
    # what loading found (a fine-tune with its base's weights) is not a setting: the weights
    # are in the digest, and a fact found later must not refuse an earlier run's samples
    info = {k: v for k, v in pair.info.items()
            if isinstance(v, (str, int, float, bool, type(None))) and k not in FOUND_FACTS}
    weights = next(pair.unet_ft.parameters())
    return json.loads(json.dumps({
        # one type each: 3 and 3.0 draw the same samples
        "guidance": float(cfg.guidance), "correction": float(cfg.correction), "steps": int(cfg.steps),
        "seed": int(cfg.seed),
        "prompt": cfg.prompt, "pretrained_prompt": cfg.pretrained_prompt,
        "scheduler": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "shape": list(latent_shape), "dtype": str(weights.dtype), "device": weights.device.type, "models": info,
    }, sort_keys=True, default=str))


def sampling_digest(settings: dict, pair, c_ft: torch.Tensor, c_pre: torch.Tensor) -> str:
    """The hex SHA-256 of what decides sample ``i``'s final latent besides ``i``: the
    ``settings`` (``sampling_settings``), both conditionings and the UNets' parameters."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True).encode())
    for t in (c_ft, c_pre):
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    # each parameter once (a LoRA pair's two sides share theirs), its sum and absolute sum
    params = {id(p): p.detach() for unet in (pair.unet_ft, pair.unet_pre) for p in unet.parameters()}
    sums = [torch.stack([x.sum(), x.abs().sum()]) for x in (p.double() for p in params.values())]
    h.update(torch.stack(sums).cpu().numpy().tobytes())
    return h.hexdigest()


def load_partial(path: Path, digest: str, latent_shape, settings: dict) -> dict[int, torch.Tensor]:
    """``{index: latent}`` a stopped run with this ``digest`` drew, or ``{}`` (none, or a file
    that cannot be read). ``ValueError`` when a stopped run with another digest left
    samples: its settings and ``settings`` differ where the message says."""
    from safetensors import safe_open

    if not path.is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            n = f.get_slice("indices").get_shape()[0]
            mine = meta.get("digest") == digest
            latents, indices = (f.get_tensor("latents"), f.get_tensor("indices")) if mine else (None, None)
    except Exception as e:  # noqa: BLE001 - a damaged file is only work lost
        log.warning("%s: cannot read the samples of the run that stopped (%s); drawing them again", path, e)
        return {}
    if "settings" not in meta:  # an older cgidm's file: its digest is not this one's
        log.warning("%s: samples of a stopped run written by an older cgidm, which cannot be matched to "
                    "these settings; drawing them again", path)
        return {}
    if not mine:
        _refuse(path, n, meta["settings"], settings)
    if tuple(latents.shape[1:]) != tuple(latent_shape) or latents.shape[0] != indices.shape[0]:
        return {}
    return {int(i): latents[j].float() for j, i in enumerate(indices.tolist())}


def _dtype_word(value) -> Optional[str]:
    """A recorded ``"torch.float32"`` as ``--dtype`` says it (``fp32``; ``runtime.dtype_name``)."""
    from cgidm.runtime import dtype_name

    dtype = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else None
    return dtype_name(dtype) if isinstance(dtype, torch.dtype) else None


def _refuse(path: Path, n: int, theirs: str, ours: dict) -> None:
    try:
        old = json.loads(theirs)
    except ValueError:
        old = None
    if isinstance(old, dict):  # the scheduler's and the models' dicts: the keys that differ in them
        said = lambda k, v: _dtype_word(v) if k == "dtype" else None  # noqa: E731
        # the digest is of the exact values: --guidance 3 and 3.0000000001 draw other samples
        what = (differences(old, ours, said) or differences(old, ours, said, exact=True)
                or "the same settings, other model weights or prompt encodings")
    else:
        what = "settings not recorded"
    raise ValueError(f"{path.parent} holds {n} sample{'s' if n != 1 else ''} of a stopped extract run with other "
                     f"settings ({what}): run it again with those settings to finish it, use another --out, or "
                     f"delete {path} to start afresh")


class PartialSaver:
    """``add(indices, latents)`` after each batch; the file is rewritten at most every
    ``SAVE_EVERY_S`` seconds (and by ``flush``, which writes only what it has not written)."""

    def __init__(self, path: Path, digest: str, drawn: dict[int, torch.Tensor], settings: dict) -> None:
        self.path, self.digest, self.drawn, self.settings = path, digest, drawn, settings
        self.last, self.unsaved = time.monotonic(), False

    def add(self, indices, latents: torch.Tensor) -> None:
        for j, i in enumerate(indices):
            self.drawn[int(i)] = latents[j].detach().float().cpu()
        self.unsaved = True
        if time.monotonic() - self.last >= SAVE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        from safetensors.torch import save

        order = sorted(self.drawn)
        if order and self.unsaved:  # a save at the end of sampling just after the last batch's: once
            data = save({"latents": torch.stack([self.drawn[i] for i in order]).contiguous(),
                         "indices": torch.tensor(order, dtype=torch.int64)}, metadata={"digest": self.digest,
                                                                      "settings": json.dumps(self.settings)})
            atomic_write_bytes(self.path, data)
        self.last, self.unsaved = time.monotonic(), False
