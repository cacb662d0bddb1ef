"""Which model files a run used, by contents (docs/architecture.md, "Provenance"): each
file of the models that loading reads (``manifest.model_files``) with its size, time and
SHA-256, so that evidence names the models it was made with, not only their paths, which
anyone can save over.

``cgidm screen`` records them always (it digests the model files anyway, to tell a model
saved over since a row was made); ``authenticate`` and ``extract`` with ``--hash-models``
(reading every file once more before the run; docs/architecture.md gives what it costs).
Digests go through ``resume.DigestCache`` in the output folder, so a rerun into it reads a
file again only when its size or times changed. A file that changes during the run
is named at its end (``changed``).
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Optional

from cgidm.files import shown

log = logging.getLogger(__name__)

ROLES = ("base", "finetuned", "lora")


def record(models: Iterable[str], sha256: Callable[[Path], str]) -> dict:
    """``{model path: [{"file", "bytes", "mtime_ns", "ctime_ns", "sha256"}]}`` for each model folder or
    file of ``models`` (each once, by its absolute path); ``file`` is the name inside the model (empty for a single
    file). A file that cannot be read is recorded with its error instead of a digest."""
    from cgidm.manifest import model_files

    out = {}
    for model in dict.fromkeys(os.path.abspath(os.path.expanduser(m)) for m in models):
        entries = []
        for name, f in _listed(model, model_files):
            try:
                st = f.stat()
                entries.append({"file": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
                                "ctime_ns": st.st_ctime_ns, "sha256": sha256(f)})
            except OSError as e:
                entries.append({"file": name, "error": e.strerror or str(e)})
        out[model] = entries
    return out


def folder_digest(entries) -> Optional[str]:
    """One SHA-256 for a model folder's recorded files: of the lines ``<sha256>  <file>``
    (as ``sha256sum`` prints them), sorted by name; None if a file has no digest."""
    import hashlib

    if not isinstance(entries, list) or not entries or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) for e in entries):
        return None
    lines = "".join(f"{e['sha256']}  {e['file']}\n" for e in sorted(entries, key=lambda e: str(e["file"])))
    return hashlib.sha256(lines.encode("utf-8", "surrogateescape")).hexdigest()


def model_digests(models: Iterable[str], out: Path, progress: bool = False) -> dict:
    """``record`` of ``models`` through the digest cache of the output folder ``out``
    (warmed on several threads: a pair's files are read in parallel), with a bar of the
    bytes read when ``progress``."""
    from tqdm.auto import tqdm

    from cgidm.manifest import model_files
    from cgidm.progress import bar_options
    from cgidm.resume import DigestCache

    models = list(dict.fromkeys(os.path.abspath(os.path.expanduser(m)) for m in models))
    if not models:
        log.warning("no model paths to hash (a pair built without load_pair records none): no model_files")
    files = [f for m in models for _, f in _listed(m, model_files)]
    sizes = {}
    for f in files:
        try:
            sizes[os.path.abspath(f)] = f.stat().st_size
        except OSError:
            sizes[os.path.abspath(f)] = 0
    try:
        Path(out).mkdir(parents=True, exist_ok=True)  # for the cache, when hashed before the run makes it
    except OSError:
        pass  # the cache is not written (a warning); the digests are
    digests = DigestCache(out)
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="model files' SHA-256",
              disable=not progress, **bar_options()) as bar:
        digests.warm(files, done=lambda p: bar.update(sizes.get(p, 0)))
    try:
        return record(models, digests.sha256)
    finally:
        digests.save()


def _listed(model: str, model_files) -> list:
    """``model_files`` of ``model``; a folder that cannot be listed is one entry that cannot
    be read (its error recorded), not a stop before the loader says what is wrong."""
    try:
        return model_files(Path(model))
    except OSError:
        return [("", Path(model))]


def pair_models(info: Optional[dict]) -> list[str]:
    """The model paths of a pair's ``info`` (``load_pair``; ``PairSpec.info``)."""
    return [info[k] for k in ROLES if isinstance(info, dict) and isinstance(info.get(k), str)]


def changed(files) -> list[str]:
    """The files of a ``record`` saved over since they were hashed (or gone), so that the
    digest may not be of the bytes used: another size, or, where a time moved (a ``touch``,
    ``cp -p`` or ``touch -d`` putting the old time back, a ``chmod``, a hard link), other
    contents, read again to tell. ``model path/file`` each."""
    out = []
    for r in rows(files):
        if "sha256" not in r:
            continue
        path = Path(_path_of(r))
        try:
            st = path.stat()
            same = st.st_size == r.get("bytes")
            if same and (st.st_mtime_ns != r.get("mtime_ns") or r.get("ctime_ns", st.st_ctime_ns) != st.st_ctime_ns):
                from cgidm.resume import sha256_file

                same = sha256_file(path) == r["sha256"]
        except OSError:
            same = False
        if not same:
            out.append(_path_of(r))
    return out


def check_unchanged(summary: dict) -> None:
    """Adds ``model_files_changed`` to ``summary`` (with a warning) where a model file it
    records changed since it was hashed."""
    moved = changed(summary.get("model_files"))
    if moved:
        summary["model_files_changed"] = moved
        log.warning("%d model file%s changed after %s hashed (first: %s): the recorded SHA-256 may not be of the "
                    "bytes used", len(moved), "s" if len(moved) != 1 else "", "they were" if len(moved) != 1 else
                    "it was", shown(moved[0]))


def rows(files) -> list[dict]:
    """The entries of a summary's ``model_files`` as flat rows with their ``model``."""
    if not isinstance(files, dict):
        return []
    return [{"model": model, **e} for model, entries in files.items() if isinstance(entries, list)
            for e in entries if isinstance(e, dict)]


TABLE = """<details class="files"{% if moved %} open{% endif %}><summary>Model files: {{ rows|length }} file{{ 's' if rows|length != 1 else '' }},
{{ "{:,}".format(total) }} bytes, each by its SHA-256 when the run started (what was tested, whatever is at these
paths later){% if unread %}; <span class="error">{{ unread }} could not be read</span>{% endif %}{% if moved %};
<span class="error">{{ moved|length }} changed after they were hashed, marked below: their SHA-256 may not be of the
bytes used</span>{% endif %}</summary>
<table><thead><tr><th>model</th><th>file</th><th>bytes</th><th>SHA-256</th></tr></thead><tbody>
{% for r in rows %}<tr><td><code>{{ r.model|shown }}</code></td><td><code>{{ (r.file or '(the file itself)')|shown }}</code></td>
<td>{{ "{:,}".format(r.bytes) if r.bytes is number else '' }}</td><td>{% if r.sha256 %}<code>{{ r.sha256|shown }}</code>{% if r.changed %} <span class="error">changed after it was hashed</span>{% endif %}{% else %}<span class="error">not read: {{ r.error|shown }}</span>{% endif %}</td></tr>
{% endfor %}</tbody></table></details>"""


def table(summary: dict):
    """The report's table of ``summary["model_files"]`` (escaped HTML, a
    ``markupsafe.Markup``), or an empty string where the run recorded none."""
    from jinja2 import Environment
    from markupsafe import Markup

    found = rows(summary.get("model_files"))
    if not found:
        return ""
    env = Environment(autoescape=True)
    env.filters["shown"] = shown
    total = _total_bytes(found)
    moved = summary.get("model_files_changed")
    moved = moved if isinstance(moved, list) else []
    for r in found:
        r["changed"] = _path_of(r) in moved
    return Markup(env.from_string(TABLE).render(rows=found, total=total, moved=moved,
                                                unread=sum("sha256" not in r for r in found)))


def said(summary: dict, where: str = "the summary") -> str:
    """One terminal line for a summary's ``model_files`` (``where``: the file they are in)."""
    found = rows(summary.get("model_files"))
    unread = [r for r in found if "sha256" not in r]
    total = _total_bytes(found)
    line = (f"model files: {len(found)} ({total / 2**20:,.1f} MiB) of {len(summary['model_files'])} model"
            f"{'s' if len(summary['model_files']) != 1 else ''}, each by its SHA-256 in {where} and the report")
    if unread:
        first = unread[0]
        line += f"; {len(unread)} could not be read (first: {shown(_path_of(first))}: {shown(first.get('error'))})"
    moved = summary.get("model_files_changed")
    if isinstance(moved, list) and moved:
        line += f"; {len(moved)} changed after they were hashed (model_files_changed)"
    return line


def _total_bytes(found: list[dict]) -> int:
    return sum(r["bytes"] for r in found if isinstance(r.get("bytes"), int))


def _path_of(r: dict) -> str:
    return str(Path(str(r["model"])) / str(r["file"])) if r.get("file") else str(r["model"])
