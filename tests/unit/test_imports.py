"""The package's import graph: the layers, written once here, and no cycles. Every import
counts: function-local ones and those under ``TYPE_CHECKING`` too (a type-only import still
ties two modules together). Clients do not load the step runtime, Sentry or the workers'
metrics."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "fleet"

#: The layers of ``fleet``, lowest first: a module may import from its own layer and those
#: below it, never from one above. ``root`` is the package's own modules (settings, keys,
#: errors, ...); the package itself (``fleet/__init__.py``) is the public API, above them all.
LAYERS = ("root", "core", "run", "broker", "inference", "scheduling", "ops", "steps", "surfaces")

# What only a worker process loads.
WORKER_ONLY = ["fleet.steps.tasks", "fleet.steps.pipeline", "fleet.steps.runtime", "fleet.steps.bodies",
               "fleet.steps.hooks", "fleet.ops.metrics", "fleet.ops.sentry", "sentry_sdk"]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The layer of a fleet module (None for the package itself, the public API)."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else "root"


def _imports(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """Every fleet module ``module`` imports, anywhere in its code (TYPE_CHECKING included)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # ``from fleet.steps.hooks import guards``
    return {name for name in found if name in known and name != module}


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(files)
    return {name: _imports(ast.parse(path.read_text()), name, path.name == "__init__.py", known)
            for name, path in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package importing its own submodules (``fleet.steps.hooks.routes`` -> its routers)
            # is how it assembles itself; the submodule importing the package's names is not a cycle.
            if nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := dfs(node)):
            return found
    return None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that run from a lower layer to a higher one (or to the public API)."""
    out = []
    for module, deps in sorted(graph.items()):
        low = layer_of(module)
        if low is None:
            continue
        for dep in sorted(deps):
            high = layer_of(dep)
            if high is None or LAYERS.index(high) > LAYERS.index(low):
                out.append(f"{module} ({low}) -> {dep} ({high or 'the public API'})")
    return out


def test_the_graph_sees_function_local_and_type_only_imports():
    graph = import_graph()
    assert "fleet.steps.runtime" in graph["fleet.steps.worker"]  # imported inside a signal handler
    assert "fleet.settings" in graph["fleet.connections"]  # imported only under TYPE_CHECKING
    assert len(graph) > 60


def test_every_module_is_in_a_layer_package():
    root = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")
    assert len(root) <= 12, f"the root of fleet/ holds {len(root)} modules: {root}"
    packages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(LAYERS[1:]), packages


def test_fleet_has_no_import_cycles():
    cycle = _cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_layer_imports_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_a_cycle_and_an_upward_import_are_found_when_there_is_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
    assert upward_imports({"fleet.run.store": {"fleet.steps.runtime", "fleet.core.lua"}, "fleet.core.lua": set(),
                           "fleet.steps.runtime": set()}) == [
        "fleet.run.store (run) -> fleet.steps.runtime (steps)"]


def test_every_package_says_what_it_owns():
    for init in PACKAGE.rglob("__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 12, f"{init.relative_to(PACKAGE.parent)} lacks a docstring of its own"


@pytest.mark.parametrize("entry", ["fleet", "fleet.surfaces.client", "fleet.surfaces.aio", "fleet.surfaces.cli",
                                   "fleet.surfaces.gateway", "fleet.surfaces.batch"])
def test_clients_do_not_load_the_step_runtime(entry):
    code = (f"import sys, json, {entry}\n"
            f"print(json.dumps(sorted(m for m in {WORKER_ONLY!r} if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
