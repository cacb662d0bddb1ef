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
    """``{model path: [{"file", "bytes", "mtime_ns", "sha256"}]}`` for each model folder or
    file of ``models`` (each once, by its absolute path); ``file`` is the name inside the model (empty for a single
    file). A file that cannot be read is recorded with its error instead of a digest."""
    from cgidm.manifest import model_files

    out = {}
    for model in dict.fromkeys(os.path.abspath(os.path.expanduser(m)) for m in models):
        entries = []
        for name, f in model_files(Path(model)):
            try:
                st = f.stat()
                entries.append({"file": name, "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha256(f)})
            except OSError as e:
                entries.append({"file": name, "error": e.strerror or str(e)})
        out[model] = entries
    return out


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
    files = [f for m in models for _, f in model_files(Path(m))]
    sizes = {}
    for f in files:
        try:
            sizes[os.path.abspath(f)] = f.stat().st_size
        except OSError:
            sizes[os.path.abspath(f)] = 0
    digests = DigestCache(out)
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="model files' SHA-256",
              disable=not progress, **bar_options()) as bar:
        digests.warm(files, done=lambda p: bar.update(sizes.get(p, 0)))
    try:
        return record(models, digests.sha256)
    finally:
        digests.save()


def pair_models(info: Optional[dict]) -> list[str]:
    """The model paths of a pair's ``info`` (``load_pair``; ``PairSpec.info``)."""
    return [info[k] for k in ROLES if isinstance(info, dict) and isinstance(info.get(k), str)]


def changed(files) -> list[str]:
    """The files of a ``record`` whose size or modification time is not what was recorded
    (or that are gone): saved over during the run, so the digest may not be of the bytes
    used. ``model path/file`` each."""
    out = []
    for r in rows(files):
        if "sha256" not in r:
            continue
        path = Path(r["model"]) / r["file"] if r["file"] else Path(r["model"])
        try:
            st = path.stat()
            same = (st.st_size, st.st_mtime_ns) == (r.get("bytes"), r.get("mtime_ns"))
        except OSError:
            same = False
        if not same:
            out.append(str(path))
    return out


def check_unchanged(summary: dict) -> None:
    """Adds ``model_files_changed`` to ``summary`` (with a warning) where a model file it
    records changed since it was hashed."""
    moved = changed(summary.get("model_files"))
    if moved:
        summary["model_files_changed"] = moved
        log.warning("%d model files changed during the run (first: %s): their recorded SHA-256 may not be of "
                    "the bytes used", len(moved), shown(moved[0]))


def rows(files) -> list[dict]:
    """The entries of a summary's ``model_files`` as flat rows with their ``model``."""
    if not isinstance(files, dict):
        return []
    return [{"model": model, **e} for model, entries in files.items() if isinstance(entries, list)
            for e in entries if isinstance(e, dict)]


TABLE = """<details class="files"><summary>Model files: {{ rows|length }} file{{ 's' if rows|length != 1 else '' }},
{{ "{:,}".format(total) }} bytes, each by its SHA-256 when the run started (what was tested, whatever is at these
paths later){% if moved %}; <span class="error">{{ moved|length }} changed during the run</span>{% endif %}</summary>
<table><thead><tr><th>model</th><th>file</th><th>bytes</th><th>SHA-256</th></tr></thead><tbody>
{% for r in rows %}<tr><td><code>{{ r.model|shown }}</code></td><td><code>{{ (r.file or '(the file itself)')|shown }}</code></td>
<td>{{ "{:,}".format(r.bytes) if r.bytes is number else '' }}</td><td>{% if r.sha256 %}<code>{{ r.sha256|shown }}</code>{% else %}<span class="error">not read: {{ r.error|shown }}</span>{% endif %}</td></tr>
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
    total = sum(r["bytes"] for r in found if isinstance(r.get("bytes"), int))
    moved = summary.get("model_files_changed")
    return Markup(env.from_string(TABLE).render(rows=found, total=total,
                                                moved=moved if isinstance(moved, list) else []))


def said(summary: dict) -> str:
    """One terminal line for a summary's ``model_files``."""
    found = rows(summary.get("model_files"))
    unread = [r for r in found if "sha256" not in r]
    total = sum(r["bytes"] for r in found if isinstance(r.get("bytes"), int))
    line = (f"model files: {len(found)} ({total / 2**20:,.1f} MiB) of {len(summary['model_files'])} model"
            f"{'s' if len(summary['model_files']) != 1 else ''}, each by its SHA-256 in the summary and the report")
    if unread:
        first = unread[0]
        line += f"; {len(unread)} could not be read (first: {shown(first['file'] or first['model'])}: " \
                f"{shown(first.get('error'))})"
    return line
