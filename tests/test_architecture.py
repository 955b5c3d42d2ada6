"""The package's shape, read from its source: no import cycles anywhere, the runtime's rooms import only the rooms
below them, only the runtime's CLI room knows argparse, and every public import the README and docs show works.

Imports are read with `ast` (every `import` statement, function-level ones included; `if TYPE_CHECKING:` blocks,
which never run, excluded), so the test sees lazy imports too and needs nothing installed beyond the package."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

# The distribution's packages and the folders they live in (pyproject's package-dir).
PACKAGE_DIRS = {"edgepix": REPO / "edgepix", "edgepix.train": REPO / "train", "edgepix.export": REPO / "export",
                "edgepix.runtime": REPO / "runtime", "edgepix.benchmarks": REPO / "benchmarks"}

# The runtime's rooms from the bottom up; each may import the rooms before it (and itself), never one after it.
RUNTIME_ROOMS = ("core", "description", "data", "backends", "tasks", "streams", "batch", "cli")


def module_files(package_dirs: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} for every .py file under the package folders."""
    modules = {}
    for package, folder in package_dirs.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the module `name` (source at `path`) imports, lazily or not."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(), str(path))]
    while pending:
        node = pending.pop()
        if _type_checking_only(node):
            continue
        pending.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod.
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import edgepix.runtime.x.y` where y is a name: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(package_dirs: dict[str, Path]) -> dict[str, set[str]]:
    files = module_files(package_dirs)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(PACKAGE_DIRS)


def test_no_import_cycles_anywhere_in_the_package(graph):
    assert len(graph) > 120, f"only {len(graph)} modules found: is the walk looking in the right folders?"
    assert import_cycles(graph) == []


def test_a_planted_cycle_is_found(tmp_path):
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    files = {"__init__.py": "", "a.py": "from .sub import b\n", "c.py": "import os\n",
             "sub/__init__.py": "", "sub/b.py": "def f():\n    from ..a import thing  # a lazy import counts\n",
             "sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import x\n"}
    for rel, text in files.items():
        (tmp_path / "pkg" / rel).write_text(text)
    graph = import_graph({"pkg": tmp_path / "pkg"})
    assert graph["pkg.sub.d"] == set()  # imports for type checkers only are not edges
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b"]]


def _room(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if len(parts) > 2 and parts[:2] == ["edgepix", "runtime"] else None


def test_runtime_rooms_import_only_the_rooms_below_them(graph):
    wrong = []
    for module, targets in graph.items():
        room = _room(module)
        if room is None:
            continue
        for target in targets:
            if target.startswith("edgepix.") and not target.startswith("edgepix.runtime"):
                wrong.append(f"{module} -> {target} (the runtime imports no other edgepix package)")
            elif _room(target) is not None and RUNTIME_ROOMS.index(_room(target)) > RUNTIME_ROOMS.index(room):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_at_most_three_loose_modules_directly_in_runtime():
    loose = sorted(p.name for p in (REPO / "runtime").glob("*.py"))
    assert len(loose) <= 3, loose
    rooms = sorted(p.name for p in (REPO / "runtime").iterdir() if (p / "__init__.py").exists())
    assert rooms == sorted(RUNTIME_ROOMS)


def test_every_room_says_what_it_holds_and_may_import():
    for room in RUNTIME_ROOMS:
        doc = ast.get_docstring(ast.parse((REPO / "runtime" / room / "__init__.py").read_text())) or ""
        assert "May import:" in doc, f"runtime/{room}/__init__.py: its docstring must say what it may import"


def test_only_the_runtime_cli_room_imports_argparse():
    users = []
    for path in (REPO / "runtime").rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if "argparse" in names and path.relative_to(REPO / "runtime").parts[0] != "cli":
            users.append(str(path.relative_to(REPO)))
    assert users == []


def test_library_code_never_imports_a_cli_module(graph):
    cli_modules = {m for m in graph if m.startswith("edgepix.runtime.cli") or m.endswith(".cli")
                   or m in ("edgepix.commands", "edgepix.__main__")}
    wrong = [f"{m} -> {t}" for m, targets in graph.items() for t in targets
             if t in cli_modules and m not in cli_modules]
    assert wrong == []


# `from edgepix... import a, b` and `import edgepix...` lines in the README's and docs' code blocks.
_IMPORT_LINE = re.compile(r"^\s*((?:from edgepix[\w.]* import [\w, ]+)|(?:import edgepix[\w.]*))\s*(?:#.*)?$", re.M)


def _edgepix_imports(block: str) -> set[str]:
    """The edgepix imports of a code block: every statement where the block is Python, else single lines."""
    try:
        tree = ast.parse(block)
    except SyntaxError:  # shell, or Python with `...` placeholders: the one-line imports
        return {m.group(1).strip() for m in _IMPORT_LINE.finditer(block)}
    return {ast.unparse(n) for n in ast.walk(tree)
            if (isinstance(n, ast.ImportFrom) and (n.module or "").startswith("edgepix"))
            or (isinstance(n, ast.Import) and any(a.name.startswith("edgepix") for a in n.names))}


def shown_imports() -> list[str]:
    lines = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```[a-z]*\n(.*?)```", doc.read_text(), re.S):
            lines |= _edgepix_imports(block)
    return sorted(lines)


def test_every_import_the_readme_and_docs_show_works():
    lines = shown_imports()
    assert len(lines) >= 6, lines
    code = "\n".join(lines) + "\nprint('ok')"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", f"{r.stderr}\nimports tried:\n" + "\n".join(lines)
