"""Tools that tool steps run, registered by name.

A tool takes one string (rendered from the run state or chosen by the model) and returns
a JSON-serializable value. Bad input raises :class:`PermanentError`: the step is
dead-lettered instead of retried. Extra tools come from the modules named in
``FLEET_TOOL_MODULES``; each registers its tools with :func:`tool` on import.

A tool also describes itself to a model (:func:`tool_spec`): what it does (its docstring's
first line, or ``description``) and its one string parameter (``argument``), which a model
that calls tools natively fills in.
"""

from __future__ import annotations

import ast
import importlib
import json
import math
import operator
import re
from collections.abc import Callable, Iterable
from typing import Any

from fleet.core import tracing
from fleet.errors import PermanentError
from fleet.run.messages import ToolSpec

ToolFn = Callable[[str], Any]
TOOLS: dict[str, ToolFn] = {}
_SPECS: dict[str, ToolSpec] = {}


def tool(name: str, *, description: str | None = None, argument: str = "text") -> Callable[[ToolFn], ToolFn]:
    """Register a function as the tool ``name``; a model sees ``description`` (by default the
    function's docstring, first line) and one string parameter named ``argument``."""

    def register(fn: ToolFn) -> ToolFn:
        TOOLS[name] = fn
        said = description or (fn.__doc__ or name).strip().splitlines()[0]
        _SPECS[name] = ToolSpec(name, said, {
            "type": "object",
            "properties": {argument: {"type": "string", "description": f"The {argument} the tool works on."}},
            "required": [argument],
        })
        return fn

    return register


def tool_spec(name: str) -> ToolSpec:
    """How the tool ``name`` describes itself to a model. Raises KeyError for an unknown tool."""
    return _SPECS[name]


def tool_input(name: str, arguments: dict[str, Any]) -> str:
    """The one string a tool takes, from the arguments of a model's native call to it."""
    wanted = next(iter(_SPECS[name].parameters["properties"])) if name in _SPECS else None
    if wanted is not None and isinstance(arguments.get(wanted), str):
        return arguments[wanted]
    if len(arguments) == 1:
        value = next(iter(arguments.values()))
        return value if isinstance(value, str) else json.dumps(value)
    raise PermanentError(f"the model called {name} with arguments {json.dumps(arguments)[:200]}, "
                         f"not one string{f' named {wanted!r}' if wanted else ''}")


def load_tool_modules(modules: Iterable[str]) -> None:
    """Import modules that register extra tools."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"FLEET_TOOL_MODULES: cannot import {module!r}: {exc}") from exc


def run_tool(name: str, tool_input: str) -> Any:
    """Run a registered tool (a span of its own when traced); an unknown name is a permanent error."""
    fn = TOOLS.get(name)
    if fn is None:
        raise PermanentError(f"unknown tool '{name}'")
    with tracing.tool_call(name):
        return fn(tool_input)


# --- calculator: parses arithmetic, never evaluates Python ----------------------------

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_MAX_EXPRESSION_CHARS = 200
_MAX_EXPONENT = 100
_MAX_MAGNITUDE = 1e100


def _in_range(value: float | int) -> float | int:
    """Every number the calculator holds is finite and at most 1e100 in magnitude."""
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
        raise PermanentError("calculator: number out of range (at most 1e100 in magnitude)")
    return value


def _evaluate(node: ast.AST) -> float | int:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _in_range(node.value)  # a literal like 1e999 is already infinite
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_EXPONENT:
            raise PermanentError(f"calculator: exponent {right} is too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise PermanentError("calculator: division by zero") from None
        except OverflowError:  # float ** float past the largest float
            raise PermanentError("calculator: number out of range (at most 1e100 in magnitude)") from None
        return _in_range(value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    raise PermanentError(f"calculator: unsupported expression element {type(node).__name__}")


@tool("calculator", argument="expression")
def calculator(expression: str) -> int | float:
    """Arithmetic on numbers: + - * / // % ** (or ^) and parentheses."""
    text = expression.strip().replace("^", "**")
    if not text or len(text) > _MAX_EXPRESSION_CHARS:
        raise PermanentError(
            f"calculator: expression must be 1 to {_MAX_EXPRESSION_CHARS} characters"
        )
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise PermanentError(f"calculator: cannot parse {expression!r}") from None
    value = _evaluate(tree.body)
    if isinstance(value, float) and value.is_integer() and not math.isinf(value):
        return int(value)
    return value


@tool("word_count")
def word_count(text: str) -> int:
    """Number of words in the text."""
    return len(re.findall(r"\S+", text))


@tool("reverse")
def reverse(text: str) -> str:
    """The text, reversed."""
    return text[::-1]


@tool("split", argument="text")
def split(text: str) -> list[str]:
    """The text's items: its lines, or its parts between semicolons, without blanks."""
    parts = text.splitlines() if "\n" in text else text.split(";")
    return [p.strip() for p in parts if p.strip()]
