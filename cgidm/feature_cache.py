"""The validator's image features kept in the output folder across runs: a resumed screen
with ``--embedder`` embeds only the rows it has not embedded before (every row's original
and recovered image was embedded again at every run: 46 ms a row with the tiny test
embedder, an hour and more at 100k rows).

A row's features are found by a key over its id and both files' paths, sizes and
modification times, so an image or a recovery written anew is embedded anew. Each run
adds one file of the features it computed (``OUT/.cgidm-features/<embedder>/*.safetensors``,
float32, as computed); past ``MAX_CHUNKS`` files they are merged into one, keeping only the
rows asked for. The folder is named by the embedder (its kind, folder, feature size and
its files' sizes and times): another embedder never reads these features."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

FEATURES = ".cgidm-features"
MAX_CHUNKS = 8


def _stat(path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def embedder_key(embedder) -> str:
    folder = Path(str(embedder.folder))
    files = sorted((f.name, *_stat(f)) for f in folder.iterdir() if f.is_file()) if folder.is_dir() else []
    blob = json.dumps([embedder.kind, os.path.realpath(folder), int(embedder.dim), files])
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def row_key(row: dict, original: str, recovered: Path) -> Optional[str]:
    """The key of a row's two images as they are now; None if either cannot be read."""
    try:
        blob = json.dumps([row["id"], original, _stat(original), str(recovered), _stat(recovered)])
    except OSError:
        return None
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()


class FeatureCache:
    """``get(key)`` -> ``(original, recovered)`` feature rows or None; ``put`` them; ``save``."""

    def __init__(self, out: Path, embedder) -> None:
        self.folder = Path(out) / FEATURES / embedder_key(embedder)
        self.known: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.chunks = sorted(self.folder.glob("*.safetensors")) if self.folder.is_dir() else []
        for chunk in self.chunks:
            self._read(chunk)

    def _read(self, chunk: Path) -> None:
        from safetensors import safe_open

        try:
            with safe_open(str(chunk), framework="pt") as f:
                keys = json.loads((f.metadata() or {}).get("keys", "[]"))
                o, r = f.get_tensor("original"), f.get_tensor("recovered")
            if not (isinstance(keys, list) and len(keys) == o.shape[0] == r.shape[0]):
                raise ValueError("keys and features of different lengths")
        except Exception as e:  # noqa: BLE001 - a damaged file costs only the time to embed again
            log.warning("%s: features not read (%s); those images are embedded again", chunk, e)
            return
        for i, k in enumerate(keys):
            self.known[k] = (o[i], r[i])

    def get(self, key: Optional[str]):
        return None if key is None else self.known.get(key)

    def put(self, key: Optional[str], original: torch.Tensor, recovered: torch.Tensor) -> None:
        if key is not None:
            self.new[key] = self.known[key] = (original.detach().float().cpu(), recovered.detach().float().cpu())

    def save(self, wanted: Sequence[str]) -> None:
        """Write this run's features as one more file; past ``MAX_CHUNKS`` files, one file
        of the ``wanted`` keys' features instead of all of them. A failed write costs only
        time at the next run."""
        from safetensors.torch import save_file

        merge = len(self.chunks) + 1 > MAX_CHUNKS
        keep = {k: self.known[k] for k in dict.fromkeys(wanted) if k in self.known} if merge else self.new
        if not keep:
            return
        keys = list(keep)
        tmp = self.folder / f".{os.getpid()}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({"original": torch.stack([keep[k][0] for k in keys]).contiguous(),
                       "recovered": torch.stack([keep[k][1] for k in keys]).contiguous()},
                      str(tmp), metadata={"keys": json.dumps(keys)})
            name = self.folder / f"{len(self.chunks) if not merge else 0:04d}-{os.getpid()}.safetensors"
            os.replace(tmp, name)
            if merge:
                for chunk in self.chunks:
                    if chunk != name:
                        chunk.unlink(missing_ok=True)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            log.warning("%s: features not kept (%s); they are computed again at the next run", self.folder, e)
