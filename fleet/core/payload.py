"""What a JSON value from outside (a run input, a batch line, a replay patch) may hold.

JSON parsers accept more than the fleet can carry safely: nesting deep enough to exhaust
the stack of whoever walks it next, strings with a lone surrogate (no UTF-8 encoding
exists for them) or NUL (cut short by C code downstream, the model server's included),
numbers that overflow to infinity or run to thousands of digits. :func:`parse_json` and
:func:`check_value` refuse them at the door with :class:`~fleet.errors.InvalidSubmission`
naming where the value is.
"""

from __future__ import annotations

import json
import math
from typing import Any

from fleet.errors import InvalidSubmission

MAX_DEPTH = 32
MAX_INT = 2**63 - 1


def parse_json(text: str | bytes, field: str) -> Any:
    """``json.loads`` that fails with :class:`InvalidSubmission` for anything it cannot take."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidSubmission(f"{field}: JSON nested too deeply (at most {MAX_DEPTH} levels)", field) from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidSubmission(f"{field}: not valid JSON: {exc}", field) from None
    check_value(value, field)
    return value


def check_value(value: Any, field: str, _depth: int = 0) -> None:
    """Raise :class:`InvalidSubmission` where ``value`` holds what the fleet refuses."""
    if _depth > MAX_DEPTH:
        raise InvalidSubmission(f"{field}: nested too deeply (at most {MAX_DEPTH} levels)", field)
    if isinstance(value, str):
        _check_text(value, field)
    elif isinstance(value, bool) or value is None:
        return
    elif isinstance(value, int):
        if abs(value) > MAX_INT:
            raise InvalidSubmission(f"{field}: integer out of range (at most 2^63 - 1 in magnitude)", field)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidSubmission(f"{field}: number out of range (not finite)", field)
    elif isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidSubmission(f"{field}: keys must be strings", field)
            _check_text(key, field)
            check_value(item, f"{field}.{key}", _depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            check_value(item, f"{field}.{i}", _depth + 1)
    else:
        raise InvalidSubmission(f"{field}: {type(value).__name__} is not a JSON value", field)


def _check_text(text: str, field: str) -> None:
    if "\x00" in text:
        raise InvalidSubmission(f"{field}: text holds a NUL character", field)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSubmission(f"{field}: text holds a lone surrogate (not valid Unicode)", field) from None
