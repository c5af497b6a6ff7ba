"""Layering: no module of the package imports one that imports it back (directly or through others)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["treerpo", *parts])


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules that `path` imports (relative imports, anywhere in the file, lazy ones too)."""
    own = _module_name(path)
    package = own if path.name == "__init__.py" else own.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            target = ".".join(base + ([node.module] if node.module else []))
            names = [f"{target}.{a.name}" for a in node.names]
            hits = [n for n in names if n in modules] or ([target] if target in modules else [])
            out.update(hits)
    out.discard(own)
    return out


def _graph(folders=("core", "cli")) -> dict[str, set[str]]:
    files = [p for f in folders for p in (ROOT / f).rglob("*.py")]
    modules = {_module_name(p) for p in files}
    return {_module_name(p): _imports(p, modules) for p in files}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycles_in_core_and_cli():
    graph = _graph()
    assert "treerpo.core.models.text" in graph and graph["treerpo.cli.train"], "the import graph was not read"
    # packages import their submodules lazily for cheap imports; a package's __init__ re-exporting
    # a child is not a cycle of layers, so leave package nodes out
    packages = {m for m in graph if (ROOT / Path(*m.split(".")[1:]) / "__init__.py").exists()}
    graph = {m: deps - packages for m, deps in graph.items() if m not in packages}
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
