"""Which model files a run read, by contents (docs/architecture.md, "Provenance"): each
file loading reads (``manifest.model_files``) with its size and SHA-256, so that evidence
names the models it was made with, not only their paths, which anyone can save over.

``cgidm screen`` records them always (it digests the model files anyway, to tell a model
saved over since a row was made); ``authenticate`` and ``extract`` with ``--hash-models``
(reading every file once more before the run; docs/architecture.md gives what it costs).
Digests go through ``resume.DigestCache`` in the output folder, so a rerun into it reads a
file again only when its size or time changed.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

from cgidm.files import shown
from cgidm.manifest import model_files
from cgidm.resume import DigestCache

ROLES = ("base", "finetuned", "lora")


def record(paths: dict, sha256: Callable[[Path], str]) -> dict:
    """``{role: [{"file", "bytes", "sha256"}]}`` for the roles of ``paths`` (``base``,
    ``finetuned``, ``lora``: a model folder or file, as ``load_pair`` records them in its
    ``info``); ``file`` is the name inside the model (empty for a single file). A file that
    cannot be read is recorded with its error instead of a digest."""
    out = {}
    for role in ROLES:
        if not paths.get(role):
            continue
        entries = []
        for name, f in model_files(Path(paths[role])):
            try:
                entries.append({"file": name, "bytes": f.stat().st_size, "sha256": sha256(f)})
            except OSError as e:
                entries.append({"file": name, "error": e.strerror or str(e)})
        out[role] = entries
    return out


def model_digests(paths: dict, out: Path, progress: bool = False) -> dict:
    """``record`` of ``paths`` through the digest cache of the output folder ``out``
    (warmed on several threads: a pair's files are read in parallel), with a bar of the
    bytes read when ``progress``."""
    from tqdm.auto import tqdm

    from cgidm.progress import bar_options

    files = [f for role in ROLES if paths.get(role) for _, f in model_files(Path(paths[role]))]
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
        return record(paths, digests.sha256)
    finally:
        digests.save()


def pair_paths(info: Optional[dict]) -> dict:
    """The model paths of a pair's ``info`` (``load_pair``)."""
    return {k: info[k] for k in ROLES if isinstance(info, dict) and isinstance(info.get(k), str)}


def rows(files) -> list[dict]:
    """The entries of a summary's ``model_files`` (one pair's ``{role: [...]}``, or screen's
    ``{pair key: {role: [...]}}``) as flat rows with their ``pair`` and ``role``."""
    if not isinstance(files, dict):
        return []
    single = set(files) <= set(ROLES)
    out = []
    for pair, roles in ([("", files)] if single else files.items()):
        for role, entries in (roles.items() if isinstance(roles, dict) else ()):
            for e in entries if isinstance(entries, list) else ():
                if isinstance(e, dict):
                    out.append({"pair": pair, "role": role, **e})
    return out


TABLE = """<details class="files"><summary>Model files read: {{ rows|length }} file{{ 's' if rows|length != 1 else '' }},
{{ "{:,}".format(total) }} bytes, each by its SHA-256 (what was tested, whatever is at these paths later)</summary>
<table><thead><tr>{% if pairs %}<th>pair</th>{% endif %}<th>model</th><th>file</th><th>bytes</th><th>SHA-256</th></tr></thead><tbody>
{% for r in rows %}<tr>{% if pairs %}<td>{{ r.pair|shown }}</td>{% endif %}<td>{{ r.role|shown }}</td><td><code>{{ (r.file or '(the file itself)')|shown }}</code></td>
<td>{{ "{:,}".format(r.bytes) if r.bytes is number else '' }}</td><td>{% if r.sha256 %}<code>{{ r.sha256|shown }}</code>{% else %}<span class="error">not read: {{ r.error|shown }}</span>{% endif %}</td></tr>
{% endfor %}</tbody></table></details>"""


def table(files):
    """The report's table of ``model_files`` (escaped HTML, a ``markupsafe.Markup``), or
    an empty string where the run recorded none."""
    from jinja2 import Environment
    from markupsafe import Markup

    found = rows(files)
    if not found:
        return ""
    env = Environment(autoescape=True)
    env.filters["shown"] = shown
    total = sum(r["bytes"] for r in found if isinstance(r.get("bytes"), int))
    return Markup(env.from_string(TABLE).render(rows=found, total=total, pairs=any(r["pair"] for r in found)))


def said(files) -> str:
    """One terminal line for a summary's ``model_files``."""
    found = rows(files)
    unread = [r for r in found if "sha256" not in r]
    total = sum(r["bytes"] for r in found if isinstance(r.get("bytes"), int))
    return (f"model files: {len(found)} read ({total / 2**20:,.1f} MiB), each by its SHA-256 in the summary and the "
            "report" + (f"; {len(unread)} could not be read (first: {shown(unread[0]['file'] or unread[0]['role'])}: "
                        f"{shown(unread[0].get('error'))})" if unread else ""))
