"""Output files written so that a crash never leaves half of one: temporary file +
rename for whole files, one ``write`` per JSONL line for appends."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_save_image(image, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    image.save(tmp)
    os.replace(tmp, path)


def append_jsonl(path: Path, row: dict) -> None:
    """One complete line or nothing: a single ``write`` of the whole line, then fsync."""
    line = (json.dumps(row, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def safe_name(image_id: str) -> str:
    """A file name from an image id that cannot leave the output folder."""
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id.replace("/", "__"))
    keep = keep.lstrip(".") or "image"
    return keep[:120] + "-" + hashlib.sha256(image_id.encode()).hexdigest()[:8]
