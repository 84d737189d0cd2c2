"""Built-in tools: the calculator parses arithmetic and never evaluates Python."""

from __future__ import annotations

import pytest

from fleet.errors import PermanentError
from fleet.run.tools import calculator, run_tool, word_count


@pytest.mark.parametrize(
    ("expr", "value"),
    [("12 * 7 + 3", 87), ("(17 + 4) * 3", 63), ("2 ^ 10 - 24", 1000), ("7 / 2", 3.5), ("-3 + 5", 2),
     ("10 // 3", 3), ("10 % 4", 2), ("1.5 * 4", 6)],
)
def test_calculator_computes(expr, value):
    assert calculator(expr) == value


@pytest.mark.parametrize(
    "expr",
    ["__import__('os').system('id')", "open('/etc/passwd')", "x + 1", "[1, 2]", "1 if 1 else 2",
     "(lambda: 1)()", "9 ** 9999", "1 / 0", "", "1 +", "a" * 300],
)
def test_calculator_refuses_anything_but_arithmetic(expr):
    with pytest.raises(PermanentError):
        calculator(expr)


@pytest.mark.parametrize("expr", ["1e999", "-1e999", "1e999 - 1e999", "1e300 ** 2", "1e99 * 1e99", "10 ** 100 * 10"])
def test_calculator_keeps_every_number_finite_and_in_range(expr):
    # Never inf or nan as a result, never an OverflowError that would not be a permanent error.
    with pytest.raises(PermanentError, match="out of range"):
        calculator(expr)


def test_word_count_and_unknown_tool():
    assert word_count("How many words are here?") == 5
    assert run_tool("word_count", "a b") == 2
    with pytest.raises(PermanentError, match="unknown tool 'nope'"):
        run_tool("nope", "x")
