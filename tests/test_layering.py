"""The package's layers, read from its import statements (those inside functions too):

- the trusted side and the accelerator never import each other, not even through other modules;
- `legrace.wiring` is the only module that imports both;
- the boundary imports neither side, and privacy accounting imports neither;
- no core module (trusted, boundary, accelerator, privacy, wiring) reaches attacks, bench or the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
CORE = ("legrace.trusted", "legrace.boundary", "legrace.accelerator", "legrace.privacy", "legrace.wiring")
TOOLS = ("legrace.attacks", "legrace.bench", "legrace.cli", "legrace.train")


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, name: str, is_package: bool) -> set[str]:
    """The legrace modules a module's source imports (`from legrace.x import y` counts y when
    legrace.x.y is a module: resolved later against the modules that exist)."""
    found: set[str] = set()
    package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m == "legrace" or m.startswith("legrace.")}


def import_graph(root: Path = SRC) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in (root / "legrace").rglob("*.py")}
    graph = {}
    for name, path in files.items():
        raw = imports_of(path.read_text(), name, path.name == "__init__.py")
        graph[name] = {m for m in raw if m in files and m != name and m != "legrace"}
    return graph


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def violations(graph: dict[str, set[str]]) -> list[str]:
    found = []
    for name, direct in sorted(graph.items()):
        reached = reach(graph, name)
        if under(name, "legrace.trusted") and any(under(m, "legrace.accelerator", "legrace.wiring") for m in reached):
            found.append(f"{name} (trusted) reaches the accelerator")
        if under(name, "legrace.accelerator") and any(under(m, "legrace.trusted", "legrace.privacy") for m in reached):
            found.append(f"{name} (accelerator) reaches the trusted side")
        if under(name, "legrace.boundary", "legrace.privacy") and \
                any(under(m, "legrace.trusted", "legrace.accelerator", "legrace.wiring") for m in reached):
            found.append(f"{name} reaches a side of the boundary")
        if under(name, *CORE) and any(under(m, *TOOLS) for m in reached):
            found.append(f"{name} (core) reaches attacks, bench or the CLI")
        if name != "legrace.wiring" and any(under(m, "legrace.trusted") for m in direct) and \
                any(under(m, "legrace.accelerator") for m in direct):
            found.append(f"{name} imports both sides: only legrace.wiring may")
    return found


def test_the_package_keeps_its_layers():
    graph = import_graph()
    assert "legrace.wiring" in graph and "legrace.boundary.messages" in graph  # the layout is where we look
    assert violations(graph) == []


@pytest.mark.parametrize("module, source, why", [
    ("legrace.trusted.x", "from legrace.accelerator.compute import Accelerator", "(trusted) reaches the accelerator"),
    ("legrace.trusted.x", "def f():\n    import legrace.wiring", "(trusted) reaches the accelerator"),
    ("legrace.accelerator.x", "from legrace.trusted import split_conv", "(accelerator) reaches the trusted side"),
    ("legrace.boundary.x", "from ..trusted import engine", "reaches a side of the boundary"),
    ("legrace.privacy.x", "from legrace.attacks.tap import BoundaryTap", "(core) reaches attacks"),
    ("legrace.views", "from legrace.trusted import engine\nfrom legrace.accelerator import compute", "imports both sides"),
])
def test_each_rule_catches_its_breach(tmp_path, module, source, why):
    """The checker on a copy of the package with one breach added, through a module it imports."""
    for path in (SRC / "legrace").rglob("*.py"):
        copy = tmp_path / path.relative_to(SRC)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
    added = tmp_path / (module.replace(".", "/") + ".py")
    added.write_text(source + "\n")
    found = violations(import_graph(tmp_path))
    assert any(why in v for v in found), found
