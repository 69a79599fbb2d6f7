"""The house in floors: every import under cluster/ runs down the table of ARCHITECTURE.md, never up.

Read with `ast`, nothing imported: module-level and function-local imports alike, `import a.b`,
`from a import b` (b a module or a name) and relative imports. Three checks:
  (a) no import cycle, between modules or between the packages right under `cluster`;
  (b) no import against the floors below (FLOORS, RAY_ONLY_IN, TOP);
  (c) no file over MAX_LINES lines.
Each failure names the file and line of the import (or the file) that breaks it.
"""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest

# -- the floors, bottom to top as in ARCHITECTURE.md's Packages table ------------------------------
# package: (ONLY, what it may import beside the standard library and itself) or (NOT, what it must
# not import); a name covers the module and everything under it
ONLY, NOT = "only", "not"
FLOORS: dict[str, tuple[str, set[str]]] = {
    "cluster.config": (ONLY, {"yaml"}),
    "cluster.ops": (ONLY, {"torch", "triton", "cluster.platform"}),
    "cluster.parallel": (NOT, {"cluster.models", "cluster.engine", "cluster.runtime"}),
    "cluster.models": (NOT, {"cluster.engine", "cluster.disagg", "cluster.runtime", "cluster.api", "cluster.store"}),
    "cluster.engine": (NOT, {"cluster.runtime", "cluster.disagg", "cluster.api", "cluster.store",
                             "ray", "fastapi", "redis"}),
    "cluster.disagg": (NOT, {"cluster.runtime", "cluster.api", "cluster.store", "ray", "fastapi"}),
    "cluster.store": (NOT, {"cluster.engine", "cluster.runtime", "cluster.api"}),
    "cluster.runtime": (NOT, {"cluster.api", "cluster.autoscale", "fastapi"}),
    "cluster.autoscale": (NOT, {"cluster.api", "fastapi"}),
    "cluster.api": (NOT, {"cluster.runtime", "cluster.engine", "cluster.disagg", "cluster.store"}),  # takes a client
}
RAY_ONLY_IN = ("cluster.runtime", "cluster.app", "cluster.cli")
TOP = ("cluster.app", "cluster.cli")  # nothing imports these but what is above them (cli -> app)
MAX_LINES = 400
KNOWN: set[str] = set()  # "file:line -> target" the restructure (issue 14) has yet to remove

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "cluster"
STDLIB = sys.stdlib_module_names | {"__future__"}


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # what it names: a module of cluster/ where it resolves to one, else the full name
    path: str  # file:line

    def within(self, names) -> bool:
        return any(self.target == n or self.target.startswith(n + ".") for n in names)


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module of cluster/ that `name` (a module, or a name inside one) runs; else `name`."""
    probe = name
    while probe and probe not in MODULES:
        probe = probe.rpartition(".")[0]
    return probe if probe.startswith("cluster") else name


def _imports(module: str, path: Path) -> list[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    where = path.relative_to(ROOT)
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . / .. / .x import y
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([node.module] if node.module else []))
            # `from a import b`: the module a.b if there is one, else a name inside a
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for name in dict.fromkeys(names):
            target = _resolve(name)
            if target != module:
                out.append(Import(module, target, f"{where}:{node.lineno}"))
    return out


IMPORTS = [imp for module, path in MODULES.items() for imp in _imports(module, path)]


def _package(module: str) -> str:
    """cluster.engine.runner -> cluster.engine; cluster.llm -> cluster.llm; cluster -> cluster."""
    return ".".join(module.split(".")[:2])


def _cycles(edges: dict[str, dict[str, str]]) -> list[list[str]]:
    """Cycles of the strongly connected components of more than one node (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:  # the shortest cycle through each of its nodes, each cycle once
                for node in sorted(component):
                    cycle = _cycle_in(node, component, edges)[:-1]
                    first = cycle.index(min(cycle))
                    cycle = cycle[first:] + cycle[:first] + [cycle[first]]
                    if cycle not in found:
                        found.append(cycle)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def _cycle_in(start: str, component: set[str], edges) -> list[str]:
    """The shortest path start -> ... -> start inside `component` (breadth first)."""
    previous, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v]):
                if w == start:
                    path = [v]
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return path[::-1] + [start]
                if w in component and w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def _describe(cycle: list[str], edges) -> str:
    steps = [f"{a} -> {b} ({edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return "cycle: " + "; ".join(steps)


def _graph(key) -> dict[str, dict[str, str]]:
    edges: dict[str, dict[str, str]] = defaultdict(dict)
    for imp in IMPORTS:
        a, b = key(imp.source), key(imp.target)
        if b.startswith("cluster") and a != b:
            edges[a].setdefault(b, imp.path)
    return edges


def test_the_scan_sees_the_package():
    """Guards the checks below against passing on nothing."""
    assert len(MODULES) > 50 and "cluster.engine.runner" in MODULES
    assert any(i.source == "cluster.models.layers" and i.target == "cluster.ops.fused" for i in IMPORTS)
    assert any(i.source == "cluster.cli" and i.target == "cluster.app" for i in IMPORTS)  # function-local


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_cycle(level):
    edges = _graph((lambda m: m) if level == "module" else _package)
    cycles = [_describe(c, edges) for c in _cycles(edges)]
    if cycles:
        pytest.fail(f"import cycles between {level}s:\n  " + "\n  ".join(cycles), pytrace=False)


def _violation(imp: Import) -> str | None:
    source = imp.source
    for package, (kind, names) in FLOORS.items():
        if not (source == package or source.startswith(package + ".")):
            continue
        if kind == NOT and imp.within(names):
            return f"{package} must not import {imp.target}"
        if kind == ONLY and not (imp.target.split(".")[0] in STDLIB or imp.within(names | {package})):
            return f"{package} may import only the standard library and {sorted(names)}, not {imp.target}"
    if imp.within({"ray"}) and not any(source == p or source.startswith(p + ".") for p in RAY_ONLY_IN):
        return f"ray is imported only in {', '.join(RAY_ONLY_IN)}, not in {source}"
    if imp.within(TOP) and _package(source) not in TOP:
        return f"{imp.target} is the top floor: {source} must not import it"
    return None


def _violations() -> dict[str, str]:
    """"file:line -> target" -> why, for every import against the floors."""
    return {f"{imp.path} -> {imp.target}": why for imp in IMPORTS if (why := _violation(imp))}


def test_imports_follow_the_floors():
    found = [f"{key}: {why}" for key, why in _violations().items() if key not in KNOWN]
    if found:
        pytest.fail("imports against the floors (ARCHITECTURE.md, Packages):\n  " + "\n  ".join(found), pytrace=False)


def test_known_violations_are_still_there():
    """KNOWN lists only what still breaks a floor: once one is fixed, its entry goes."""
    fixed = KNOWN - set(_violations())
    if fixed:
        pytest.fail(f"fixed, remove from KNOWN: {sorted(fixed)}", pytrace=False)


def test_no_file_over_the_line_limit():
    """Every file of cluster/ but package data (models/data/: the tiny model's corpus)."""
    files = [p for p in PACKAGE.rglob("*") if p.is_file() and "data" not in p.relative_to(PACKAGE).parts[:-1]
             and "__pycache__" not in p.parts]
    long = [f"{path.relative_to(ROOT)}: {n} lines" for path in sorted(files)
            if (n := len(path.read_text().splitlines())) > MAX_LINES]
    if long:
        pytest.fail(f"files over {MAX_LINES} lines (split them by responsibility):\n  " + "\n  ".join(long), pytrace=False)
