"""Bounded text for log lines and spans.

Pure. An exception's message can hold a whole request (megabytes), and what carries it on
refuses big items whole: a log pipeline a line over its limit (Loki: 256 KB by default), a
trace collector a batch over its request limit. Text past a limit keeps its head and tail,
which usually say what failed and where, around a marker saying how much was left out.
"""

from __future__ import annotations

import traceback
from typing import Final

# Characters kept of a message, an exception's text, and one part of a traceback (a frame,
# the exception's line); and of a whole traceback. A character can take six bytes in a JSON
# line (a control character is `\u0001`), so a log line's message, exception and traceback
# together stay under 256 KB whatever they hold: 6 x (2 x 4096 + 32768) = 240 KiB.
MAX_TEXT: Final = 4096
MAX_TRACEBACK: Final = 32 * 1024


def text_of(exception: BaseException | None) -> str:
    """`str(exception)`, or what `traceback` writes when that raises (an exception of a
    handler's whose `__str__` fails must not fail the log line or span reporting it)."""
    try:
        return str(exception)
    except Exception:
        return "<exception str() failed>"


def cut(text: str, limit: int = MAX_TEXT) -> str:
    """`text`, or its head and tail around `...[N characters cut]...` when it is longer
    than `limit` characters."""
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}...[{len(text) - 2 * half} characters cut]...{text[-half:]}"


def cut_traceback(parts: list[str]) -> str:
    """A traceback from `traceback.format_exception`'s parts, each part and the whole cut to
    size, so a huge message leaves the frames before it readable."""
    return cut("".join(cut(part) for part in parts), MAX_TRACEBACK)


def bounded_traceback(exception: BaseException) -> str:
    """`exception`'s traceback, cut as `cut_traceback` does."""
    return cut_traceback(traceback.format_exception(exception))
