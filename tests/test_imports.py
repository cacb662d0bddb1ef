"""The package's modules follow the data flow: no import cycle, and nothing below a runner
imports a runner or the command line (docs/architecture.md, "Runners")."""
from __future__ import annotations

import ast
from pathlib import Path

import cgidm

PKG = Path(cgidm.__file__).parent
RUNNERS = {"cgidm.api", "cgidm.screen", "cgidm.protect", "cgidm.extract"}
TOP = {"cgidm.cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for p in PKG.rglob("*.py"):
        rel = p.relative_to(PKG.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every cgidm module ``path`` imports, at module level or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            while n and n not in known:
                n = n.rpartition(".")[0]
            if n and n != "cgidm":
                found.add(n)
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(p, known) - {m} for m, p in mods.items() if m != "cgidm"}


def _cycle(graph: dict[str, set[str]]):
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_runners_and_cli_are_imported_only_from_above():
    graph = _graph()
    for m, deps in graph.items():
        if m in TOP:
            continue
        assert not deps & TOP, f"{m} imports the command line"
        if m in RUNNERS:
            assert not deps & RUNNERS, f"runner {m} imports another runner: {deps & RUNNERS}"
            continue
        assert not deps & RUNNERS, f"{m} (below the runners) imports {deps & RUNNERS}"


def test_modules_stay_small():
    long = {m: n for m, p in _modules().items() if (n := len(p.read_text().splitlines())) > 520}
    assert not long, f"modules over ~500 lines: {long}"


def test_public_names_stay_what_they_are_on_every_access():
    """``cgidm.screen`` is a submodule's name too: after it is imported (by the first lazy
    access, or by ``import cgidm.screen``) Python binds the module to the package's
    attribute. Calling it still screens; every other public name is the same object on
    each access, in a fresh interpreter."""
    import subprocess
    import sys

    code = (
        "import cgidm, cgidm.screen as m\n"
        "from cgidm.screen import screen\n"
        "assert callable(cgidm.screen) and callable(m) and m.screen is screen\n"
        "for name in cgidm.__all__:\n"
        "    a, b = getattr(cgidm, name), getattr(cgidm, name)\n"
        "    assert a is b or name == 'screen', name\n"
        "import unittest.mock as um\n"
        "with um.patch.object(m, 'screen', lambda *a, **k: ('called', a, k)):\n"
        "    assert cgidm.screen(1, out=2) == ('called', (1,), {'out': 2})\n"
    )
    for first in ("", "import cgidm.screen\n"):
        proc = subprocess.run([sys.executable, "-c", first + code], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_loading_models_draws_no_library_bars_and_keeps_the_libraries_settings(tiny_world, capfd):
    """transformers' "Loading weights" bar is off while cgidm loads, and back on after."""
    import transformers.utils.logging as tl

    from cgidm.models import load_pair

    was = tl.is_progress_bar_enabled()  # a CLI test in this worker may have turned it off
    tl.enable_progress_bar()  # as a notebook has it
    try:
        load_pair(tiny_world / "base", tiny_world / "finetuned")
        assert "Loading weights" not in capfd.readouterr().err
        assert tl.is_progress_bar_enabled()
    finally:
        if not was:
            tl.disable_progress_bar()


def test_every_cited_docs_section_exists():
    """Code, tests and docs cite sections as ``docs/<file>.md, "<Section>"``: each names a
    heading of that file, or a paragraph's bold label (its words, or the start of them), so
    a renamed section is found."""
    import re

    root = Path(__file__).resolve().parents[1]
    heading = re.compile(r"^(?:#+ (.+)|\*\*([^*]+?)\.?\*\*)", re.M)  # a heading, or a paragraph's bold label
    headings = {p.name: [(a or b).strip() for a, b in heading.findall(p.read_text())]
                for p in [*(root / "docs").glob("*.md"), root / "README.md"]}
    cite = re.compile(r"(?<![\w/])(docs/[\w-]+\.md|README\.md),\s+[\"'`]+([^\"'`\n]+)[\"'`]")
    files = [p for d in ("cgidm", "tests", "bench", "kernels", "csrc", "docs") for p in (root / d).rglob("*")
             if p.suffix in (".py", ".md", ".cpp", ".cu", ".h", ".txt") and p.is_file()] + [root / "README.md"]
    bad, seen = [], 0
    for p in files:
        for m in cite.finditer(p.read_text(errors="replace")):
            name, section = Path(m.group(1)).name, " ".join(m.group(2).split())
            seen += 1
            if name not in headings or not any(h.startswith(section) or section.startswith(h)
                                               for h in headings[name]):
                bad.append(f"{p.relative_to(root)}: {m.group(1)}, {section!r}")
    assert seen > 30 and not bad, bad
