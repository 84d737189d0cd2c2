"""The shape of the code: short functions, Lua in files called by SHA, the delivery check
written once."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from fleet.core import lua

PACKAGE = Path(__file__).resolve().parents[2] / "fleet"
MAX_FUNCTION_LINES = 80


def test_no_function_is_over_80_lines():
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_lua_lives_in_files_and_is_called_one_way():
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "register_script" not in text, f"{path}: scripts go through fleet.core.lua"
        assert not re.search(r"\bredis\.call\(", text), f"{path}: Lua text inline in Python"
        assert not re.search(r"""\(\s*["']eval["']""", text), f"{path}: EVAL of a script's text"
    # Every script file is loaded by the module beside it.
    import fleet.core.loops
    import fleet.inference.slots  # noqa: E401, F401
    import fleet.run.store
    import fleet.run.usage
    import fleet.scheduling.admitted
    import fleet.scheduling.backlog  # noqa: E401, F401
    import fleet.scheduling.quotas
    import fleet.scheduling.recount
    loaded = {s.name for s in lua.scripts()}
    files = {p.stem for p in PACKAGE.rglob("*.lua") if p.parent.name != "lua_fragments"}
    assert files == loaded


def test_the_delivery_check_is_written_once():
    fragments = [p for p in PACKAGE.rglob("*.lua") if "cjson.decode" in p.read_text() and "worker" in p.read_text()]
    assert [p.name for p in fragments] == ["delivery.lua"]
    includers = sorted(p.name for p in PACKAGE.rglob("*.lua") if "--!include delivery.lua" in p.read_text())
    assert includers == ["add_usage-3.lua", "charge-2.lua"]
