"""Output files written so that a crash never leaves half of one: temporary file +
rename (and an fsync of the folder) for whole files, one ``write`` per JSONL line for
appends. Every JSON file cgidm writes goes through ``json_text``: strict JSON, with
non-finite numbers written as ``null``, because other tools' parsers refuse ``NaN``
and ``Infinity``.

A write that fails (full disk, permission) raises ``OutputError`` naming the file, after
removing its temporary file or cutting the half-written line back off: what was complete
before stays complete, and nothing half-written is left where results are read.
"""
from __future__ import annotations

import errno as _errno
import hashlib
import json
import logging
import math
import os
import stat
import threading
import unicodedata
from pathlib import Path
from typing import Any

import numpy as np

MAX_NAME_CHARS = 120  # + "-" + 16 hex + a suffix stays far below NAME_MAX (255 bytes)


class OutputError(OSError):
    """An output file that could not be written: ``path``, ``errno``, ``strerror``."""

    def __init__(self, path, cause: OSError) -> None:
        strerror = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(cause.errno if cause.errno is not None else _errno.EIO, strerror, str(path))
        self.path = str(path)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.strerror}"


def _tmp_path(path: Path) -> Path:
    # a leading dot and no image suffix: never listed as an input image or taken for a
    # result; pid and thread in the name: writer threads and processes never share one.
    # At most 24 characters of the name and a hash of it: a temporary of a file whose own
    # name is near the file system's limit (255 bytes) must still fit
    name = path.name
    if len(name) > 24:
        name = f"{name[:24]}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
    return path.with_name(f".{name}.tmp{os.getpid()}-{threading.get_ident()}")


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink()
    except OSError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` survive a power cut: the file's own fsync
    does not cover its directory entry. Some platforms and file systems refuse to open or
    fsync a directory; there the rename is as durable as it gets."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_from_tmp(path: Path, write) -> None:
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OutputError:
        _discard(tmp)
        raise
    except OSError as e:
        _discard(tmp)
        raise OutputError(path, e) from e
    except BaseException:
        _discard(tmp)
        raise


def output_dirs(out: Path, *names: str) -> None:
    """``out`` and its subfolders ``names``, made if missing; a failure (permission, full
    disk) is an ``OutputError`` naming the folder. A subfolder that is a link is refused:
    a run writes and removes files in it by name (an earlier run's triptychs), which a link
    would have it do in another folder."""
    try:
        Path(out).mkdir(parents=True, exist_ok=True)
        for name in names:
            sub = Path(out) / name
            if sub.is_symlink():
                raise OutputError(sub, OSError(f"a link (to {os.readlink(sub)}), not a folder of this output's own: "
                                               "a run writes and removes files in it"))
            sub.mkdir(exist_ok=True)
    except OutputError:
        raise
    except OSError as e:
        raise OutputError(e.filename or out, e) from e


def shown(text) -> str:
    """``text`` fit for a terminal line or a report: every character that is not printable
    (escape sequences that clear the screen or set the window title, newlines, bidi
    overrides that reverse what follows) written as its Python escape; in a text that is not
    in NFC, every character past ASCII too (``cafe\\u0301``), so that a decomposed name
    (combining marks, conjoining jamo, a singleton such as the Angstrom sign) is not shown as
    the composed one beside it, a different file. A backslash is written doubled, so that a
    name holding the six characters ``\\u202e`` is not shown as one holding the override.
    In a word that mixes Latin, Greek and Cyrillic letters, its letters past ASCII are
    escaped too (``p\\u0430ypal``), so that a Cyrillic a does not pass for a Latin one.
    File names are untrusted input."""
    text = str(text)
    composed = text.isascii() or _is_nfc(text)
    mixed = set() if text.isascii() else _mixed_script_letters(text)
    if composed and text.isprintable() and "\\" not in text and not mixed:
        return text
    return "".join(c if c.isprintable() and c != "\\" and (composed or c.isascii()) and i not in mixed
                   else c.encode("unicode_escape", "backslashreplace").decode("ascii") for i, c in enumerate(text))


_LOOK_ALIKE = {"LATIN", "GREEK", "CYRILLIC"}  # scripts whose letters pass for each other's


def _mixed_script_letters(text: str) -> set[int]:
    """Positions of the letters past ASCII in the words (runs of letters) of ``text`` that
    mix two of ``_LOOK_ALIKE``'s scripts; words of one script each (``Ελληνικά_photo``)
    and scripts that are not look-alikes (kana beside kanji) are left alone."""
    out: set[int] = set()
    word: list[int] = []
    for i, c in enumerate(text + " "):
        if c.isalpha() or unicodedata.category(c).startswith("M"):  # a mark (an invisible joiner) is of its word
            word.append(i)
            continue
        scripts = {unicodedata.name(text[j], "?").split(" ")[0] for j in word if text[j].isalpha()} & _LOOK_ALIKE
        if len(scripts) > 1:
            out.update(j for j in word if not text[j].isascii())
        word = []
    return out


def counted(n: int, word: str) -> str:
    """``1 sample``, ``3 samples``: a count with its noun (an English plural in -s)."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def fraction(v, digits: int = 3) -> str:
    """A fraction (AUC, accuracy, a rate) to ``digits`` decimals, with more where rounding
    would show 1 or 0 for what is not exactly that: 0.9996 is ``0.9996``, not ``1.000``."""
    if not isinstance(v, (int, float)):
        return "" if v is None else str(v)
    if not math.isfinite(v):
        return str(v)
    text = f"{v:.{digits}f}"
    while digits < 6 and float(text) in (0.0, 1.0) and v not in (0, 1):
        digits += 1
        text = f"{v:.{digits}f}"
    return text


def _is_nfc(text: str) -> bool:
    try:
        return unicodedata.is_normalized("NFC", text)
    except (ValueError, UnicodeError):  # not expected for str; a name is shown rather than refused
        return True


class ShownFilter(logging.Filter):
    """A log handler's filter: a message that is not printable is logged as ``shown``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        said = shown(message)
        if said != message:
            record.msg, record.args = said, None
        return True


def atomic_write_text(path: Path, text: str) -> None:
    """``path`` replaced atomically by ``text`` in UTF-8; a file name that is not UTF-8 (held
    as surrogates) is written as its escape, ``\\udce9``, not refused."""
    _replace_from_tmp(path, lambda f: f.write(text.encode("utf-8", "backslashreplace")))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _replace_from_tmp(path, lambda f: f.write(data))


def atomic_save_image(image, path: Path) -> None:
    _replace_from_tmp(path, lambda f: image.save(f, format="PNG"))


def json_values(obj: Any) -> Any:
    """``obj`` as its JSON file holds it: with numpy scalars and arrays made plain Python, tuples made lists, and
    every NaN or infinity (a threshold past the last score, a failed metric) made None."""
    if isinstance(obj, dict):
        return {json_values(k) if isinstance(k, np.generic) else k: json_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_values(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_values(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_text(obj: Any, **kw) -> str:
    """Strict JSON text of ``obj`` (keywords as for ``json.dumps``): non-finite floats,
    also numpy ones and nested anywhere in dicts, lists and tuples, become ``null``.
    Anything still not JSON raises instead of writing ``NaN``/``Infinity``."""
    kw["allow_nan"] = False
    return json.dumps(json_values(obj), **kw)


def atomic_write_json(path: Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """``path`` replaced atomically by ``json_text(obj)`` and a final newline."""
    text = json_text(obj, indent=indent, sort_keys=sort_keys) + "\n"
    _replace_from_tmp(path, lambda f: f.write(text.encode()))


def atomic_write_jsonl(path: Path, rows) -> None:
    """``rows`` as JSON lines (keys sorted, as ``append_jsonl`` writes them), replacing
    ``path`` atomically."""
    atomic_write_text(path, "".join(json_text(r, sort_keys=True) + "\n" for r in rows))


def append_jsonl(path: Path, row: dict) -> None:
    """One complete line or nothing: a single ``write`` of the whole line, then fsync.
    A short or failed write (a full disk) is cut back off before ``OutputError``."""
    line = (json_text(row, sort_keys=True) + "\n").encode()
    created = not os.path.exists(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as e:
        raise OutputError(path, e) from e
    try:
        start = os.fstat(fd).st_size
        done = 0
        try:
            while done < len(line):
                n = os.write(fd, line[done:])
                if n <= 0:
                    raise OSError(_errno.ENOSPC, os.strerror(_errno.ENOSPC))
                done += n
            os.fsync(fd)
        except OSError as e:
            try:
                if os.fstat(fd).st_size > start:
                    os.ftruncate(fd, start)
            except OSError:
                pass
            raise OutputError(path, e) from e
    finally:
        os.close(fd)
    if created:
        _fsync_dir(Path(path).parent)


def safe_name(image_id: str) -> str:
    """A file name from an image id that cannot leave the output folder: ASCII letters,
    digits, ``-_.`` only (no separators, no NUL, no leading dot, so no ``..``), at most
    ``MAX_NAME_CHARS`` + 17 characters, and a hash of the whole id so that ids differing
    only in dropped characters (or past the cut) still get different names."""
    keep = "".join(
        c if (c.isascii() and c.isalnum()) or c in "-_." else "_" for c in image_id.replace("/", "__")
    )
    keep = keep.lstrip(".") or "image"
    digest = hashlib.sha256(image_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return keep[:MAX_NAME_CHARS] + "-" + digest


def output_path(folder: str | Path, image_id: str, suffix: str = ".png") -> Path:
    """``folder / (safe_name(image_id) + suffix)``, checked to stay directly in ``folder``."""
    folder = Path(folder)
    name = safe_name(image_id) + suffix
    path = folder / name
    if path.parent != folder or path.name != name or os.sep in name or (os.altsep and os.altsep in name):
        raise ValueError(f"unsafe output name for image id {image_id!r}")
    return path


class NotAFile(OSError):
    """A path given as a file that is a pipe, a socket, a device or a folder."""


def regular_file(path) -> None:
    """Raise ``NotAFile`` unless ``path`` (through symlinks) is a regular file, before it is
    opened: a named pipe blocks the open forever, a device (``/dev/zero``) never ends, and
    neither gives way to Ctrl-C while a thread reads it. ``OSError`` if it is not there."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = ("a folder" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
                else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                else "not a plain file")
        raise NotAFile(f"not a regular file ({kind})")


def unwritable_reason(folder) -> str:
    """Why a folder ``os.access`` refuses cannot be written: a read-only file system (a
    permission change would not help) or the permissions."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "a read-only file system"
    except (OSError, AttributeError):  # no statvfs (Windows): the permissions, as before
        pass
    return "permission denied"
