"""argparse types for the CLI's numbers: a value out of range is a usage error (exit 2).

argparse's own `type=int` and `type=float` take any integer and any float, `nan` and `-1`
included; a negative timeout then went out as a request already timed out, a port over 65535
ended in a traceback (or, given to uvicorn, listened on another port).
"""

from __future__ import annotations

import argparse
import math
from typing import TypeVar

_PORT_MAX = 65535
N = TypeVar("N", int, float)


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    value = _number(text, int, "a port (0-65535)")
    if not 0 <= value <= _PORT_MAX:
        raise argparse.ArgumentTypeError(f"{text!r}: not a port (0-65535)")
    return value


def count(text: str) -> int:
    """A whole number of at least 1."""
    value = _number(text, int, "a whole number of at least 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: not a whole number of at least 1")
    return value


def seconds(text: str) -> float:
    """A finite number above 0 (a timeout)."""
    value = _number(text, float, "a number above 0")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: not a number above 0")
    return value


def wait_seconds(text: str) -> float:
    """A finite number of 0 or more (how long to wait; 0: not at all)."""
    value = _number(text, float, "a number of 0 or more")
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: not a number of 0 or more")
    return value


def _number(text: str, kind: type[N], what: str) -> N:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not {what}") from None
