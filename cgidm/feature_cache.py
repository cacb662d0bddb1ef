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
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

log = logging.getLogger(__name__)

FEATURES = ".cgidm-features"
MAX_CHUNKS = 8


def _stat(path) -> list:
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def embedder_key(embedder) -> Optional[str]:
    """The embedder's identity: kind, folder, feature size, its files' sizes and times, and
    the dtype and device it runs in (their features differ in the last digits). None for
    an embedder without a folder of its own: nothing to tell two of them apart by."""
    folder = getattr(embedder, "folder", None)
    if folder is None or not Path(str(folder)).is_dir():
        return None
    folder = Path(str(folder))
    files = sorted((f.name, *_stat(f)) for f in folder.iterdir() if f.is_file())
    device = getattr(embedder, "device", None)
    blob = json.dumps([embedder.kind, os.path.realpath(folder), int(embedder.dim), files,
                       str(getattr(embedder, "dtype", None)), getattr(device, "type", str(device))])
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def row_key(row: dict, original: str, out: Path) -> Optional[bytes]:
    """The key of a row's two images as they are now (the recovery by its path inside
    ``out``: the same however ``--out`` is spelled or wherever it moved); None if either
    cannot be read."""
    try:
        blob = json.dumps([row["id"], original, _stat(original), row["recovered"], _stat(out / row["recovered"])])
    except OSError:
        return None
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).digest()


class FeatureCache:
    """``get(key)`` -> ``(original, recovered)`` feature rows or None; ``put`` them; ``save``.
    An embedder without a folder of its own is not cached (nothing is read or written)."""

    def __init__(self, out: Path, embedder) -> None:
        key = embedder_key(embedder)
        self.folder = Path(out) / FEATURES / key if key is not None else None
        self.known: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.new: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}
        self.chunks = []
        if self.folder is not None and self.folder.is_dir():
            for tmp in self.folder.glob(".*.tmp"):  # a save cut off (Ctrl-C, killed): the run holds the lock
                tmp.unlink(missing_ok=True)
            for chunk in sorted(self.folder.glob("*.safetensors")):
                if self._read(chunk):
                    self.chunks.append(chunk)

    def _read(self, chunk: Path) -> bool:
        from safetensors.torch import load_file

        try:
            data = load_file(str(chunk))
            keys, o, r = data["keys"], data["original"], data["recovered"]
            if not (keys.dtype == torch.uint8 and keys.dim() == 2 and keys.shape[1] == 32
                    and keys.shape[0] == o.shape[0] == r.shape[0]):
                raise ValueError("keys and features do not match")
        except Exception as e:  # noqa: BLE001 - a damaged file costs only the time to embed again
            log.warning("%s: features not read (%s); removed, those images are embedded again", chunk, e)
            chunk.unlink(missing_ok=True)  # our own file: said once, not at every run
            return False
        for i, k in enumerate(keys.numpy()):
            self.known[k.tobytes()] = (o[i], r[i])
        return True

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

        if self.folder is None:
            return
        merge = len(self.chunks) + 1 > MAX_CHUNKS
        keep = {k: self.known[k] for k in dict.fromkeys(wanted) if k in self.known} if merge else self.new
        if not keep:
            return
        keys = list(keep)
        tmp = self.folder / f".{os.getpid()}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # the keys as a tensor of digests, not JSON metadata: safetensors' header is
            # limited to 100 MB, which a screen of 1.4 M rows would pass
            save_file({"keys": torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).view(len(keys), 32),
                       "original": torch.stack([keep[k][0] for k in keys]).contiguous(),
                       "recovered": torch.stack([keep[k][1] for k in keys]).contiguous()}, str(tmp))
            name = self.folder / f"{time.time_ns():020d}-{os.getpid()}.safetensors"  # never an earlier one's
            os.replace(tmp, name)
            if merge:
                for chunk in self.chunks:
                    if chunk != name:
                        chunk.unlink(missing_ok=True)
        except Exception as e:  # noqa: BLE001 - safetensors' own errors too (a full disk)
            log.warning("%s: features not kept (%s); they are computed again at the next run", self.folder, e)
        finally:
            tmp.unlink(missing_ok=True)
