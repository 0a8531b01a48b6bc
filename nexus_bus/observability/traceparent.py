"""The W3C `traceparent` header's fields, read one way for every reader.

The request path (`bus.metadata`: log lines, the next hop's header with tracing off) and the
tracer (`tracing.py`: the parent of a span) both continue a caller's trace; reading its header
by one rule keeps them on the same trace.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["traceparent_fields"]

_LENGTH: Final = 55  # version 00: 2 + 1 + 32 + 1 + 16 + 1 + 2
_FIELDS: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


def traceparent_fields(value: str | None) -> tuple[str, str, str] | None:
    """The trace id, parent span id and flags of a `traceparent` value, in lower-case hex;
    None when absent or not valid as the W3C Trace Context specification reads it: any
    version but `ff`, neither id all zeros, and only a later version than `00` may append
    fields (after a `-`)."""
    if not value:
        return None
    if len(value) != _LENGTH:
        value = value.strip()
    found = _FIELDS.match(value)
    if found is None:
        return None
    version, trace_id, span_id, flags = found.groups()
    if version == "ff" or (len(value) > _LENGTH and (version == "00" or value[_LENGTH] != "-")):
        return None
    if trace_id == _ZERO_TRACE or span_id == _ZERO_SPAN:
        return None
    return trace_id, span_id, flags
