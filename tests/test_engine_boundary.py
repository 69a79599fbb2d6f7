"""The engine's boundary holds: `disagg/` and `runtime/` use what the engine exposes (kv_boundary.py,
EngineStats, StepStats, add_request/step/abort...), never its parts (scheduler, KV cache manager,
runner, executor, model, architecture, request table) nor a private attribute of any object but their own.
Read from the source with `ast`, so a new reach-in fails here with its file and line."""
from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "cluster"
CHECKED = ("disagg", "runtime")
# the engine's parts: what an engine (or a role worker's engine) holds but does not expose
ENGINE_PARTS = {"scheduler", "kv", "runner", "executor", "model", "arch", "requests", "kv_out", "in_flight", "forwarded"}
OWN = {"self", "cls"}


def _files():
    for package in CHECKED:
        yield from sorted((ROOT / package).rglob("*.py"))


def _names_engine(node: ast.expr) -> bool:
    """`engine`, `x.engine`, `self.engine`: an expression that is an engine by its name (`config.engine`
    is the engine's config, not an engine)."""
    if isinstance(node, ast.Name):
        return node.id == "engine"
    if isinstance(node, ast.Attribute) and node.attr == "engine":
        owner = node.value
        return not ((isinstance(owner, ast.Name) and owner.id == "config")
                    or (isinstance(owner, ast.Attribute) and owner.attr == "config"))
    return False


def violations(source: str, filename: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Attribute):
            continue
        where = f"{filename}:{node.lineno}"
        if _names_engine(node.value) and node.attr in ENGINE_PARTS:
            found.append(f"{where}: reaches into the engine's {node.attr!r}")
        private = node.attr.startswith("_") and not node.attr.startswith("__")
        if private and not (isinstance(node.value, ast.Name) and node.value.id in OWN):
            found.append(f"{where}: touches another object's private {node.attr!r}")
    return found


def test_disagg_and_runtime_use_only_the_engines_public_surface():
    found = [v for path in _files() for v in violations(path.read_text(), str(path.relative_to(ROOT.parent)))]
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, what", [
    ("def f(self):\n    return self.engine.scheduler.waiting\n", "'scheduler'"),
    ("def f(engine):\n    return engine.runner.read_kv(0, [1])\n", "'runner'"),
    ("def f(worker):\n    return worker._groups\n", "private '_groups'"),
])
def test_the_check_catches_a_reach_in(source, what):
    found = violations(source, "x.py")
    assert found and what in found[0]


def test_own_privates_and_public_surface_pass():
    source = "def f(self, engine):\n    self._x = engine.stats()\n    return engine.kv_layout, self._x\n"
    assert violations(source, "x.py") == []
