"""JSON-lines logging on loguru, one object per line.

Fields: `timestamp`, `level`, `service`, `message`, `trace_id`, `correlation_id` (the request
id) and, where bound, `op`, `action`, `status`, `duration_ms`. Bind per request with
`bind_request(...)` / `release(token)` (or `log_context(...)`): one ContextVar set per
request, read only when a line is actually written; a bound value with a `resolve()` method
(`metadata.LazyTrace`) is resolved only then. loguru's own `contextualize` costs
several microseconds per request on the hot path whether anything is logged or not.
Secrets are never passed to the logger.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import datetime
from typing import TYPE_CHECKING, Any, Final, TextIO

import msgspec
from loguru import logger as _logger

from nexus_bus.observability.bounds import cut, cut_traceback, text_of
from nexus_bus.observability.tracing import TRACING

if TYPE_CHECKING:
    from loguru import Record

__all__ = ["bind_request", "configure_logging", "info_line", "log_context", "logger", "release"]

_context: ContextVar[dict[str, Any] | None] = ContextVar("nexus_log_context", default=None)


def _add_context(record: Record) -> None:
    fields = _context.get()
    if fields:
        extra = record["extra"]
        for name, value in fields.items():
            if name not in extra:  # values bound on the logger itself win
                # A value with resolve() is worked out only now, when a line is written.
                resolve = getattr(value, "resolve", None)
                extra[name] = resolve() if resolve is not None else value


logger = _logger.patch(_add_context)
# As loguru advises for libraries: silent inside someone else's program (a script using the
# gateway client) until the process edge calls `configure_logging`.
_logger.disable("nexus_bus")


def bind_request(**fields: Any) -> Token[dict[str, Any] | None]:
    """Add `fields` to every line logged in this context until `release(token)`."""
    current = _context.get()
    return _context.set({**current, **fields} if current else fields)


def release(token: Token[dict[str, Any] | None]) -> None:
    """Undo the `bind_request` that returned `token`."""
    _context.reset(token)


@contextmanager
def log_context(**fields: Any) -> Iterator[None]:
    """`bind_request` for a block."""
    token = bind_request(**fields)
    try:
        yield
    finally:
        release(token)

_encoder: Final = msgspec.json.Encoder()
_EXTRA_FIELDS: Final = (
    "op", "action", "status", "duration_ms", "code", "transport", "job_id",
    "method", "route", "request_id", "client",  # access lines (access.py)
)
_INFO_NO: Final = logger.level("INFO").no
_info_sink: TextIO | None = None  # configure_logging's JSON sink, when it lets INFO through
_info_service = ""
_info_instance: str | None = None


def _json_line(record: Record, service: str, instance: str | None) -> bytes:
    extra = record["extra"]
    doc: dict[str, Any] = {
        "timestamp": record["time"].isoformat(),
        "level": record["level"].name,
        "service": extra.get("service", service),
        "message": cut(record["message"]),
        "trace_id": extra.get("trace_id"),
        "correlation_id": extra.get("correlation_id"),
    }
    if instance:
        doc["instance"] = instance
    span_id = TRACING.current_span_id()
    if span_id:
        doc["span_id"] = span_id
    for name in _EXTRA_FIELDS:
        if name in extra:
            doc[name] = extra[name]
    if record["exception"] is not None:
        exc = record["exception"]
        name = exc.type.__name__ if exc.type else "Exception"
        doc["exception"] = cut(f"{name}: {text_of(exc.value)}")
        # The traceback, inside the one JSON line (a multi-line dump would split it).
        doc["traceback"] = cut_traceback(
            traceback.format_exception(exc.type, exc.value, exc.traceback)
        )
    return _encoder.encode(doc)


def configure_logging(
    service: str,
    level: str = "INFO",
    *,
    json_lines: bool = True,
    sink: TextIO | None = None,
    instance: str | None = None,
) -> None:
    """Replace loguru's handlers with one writing to `sink` (stderr by default).

    `service` names the process (`nexus-shim`, `nexus-worker-data`) and `instance` tells
    replicas apart. Call once at the process edge; until then nexus-bus logs nothing (as a
    library inside your program it stays quiet unless you call this).
    """
    global _info_sink, _info_service, _info_instance
    out = sink or sys.stderr
    _logger.enable("nexus_bus")
    # info_line() writes to the same sink, at the same level threshold.
    _info_sink = out if json_lines and logger.level(level).no <= _INFO_NO else None
    _info_service, _info_instance = service, instance
    if json_lines:

        def write(message: Any) -> None:
            out.write(_json_line(message.record, service, instance).decode() + "\n")
            out.flush()

        logger.configure(handlers=[{"sink": write, "level": level, "format": "{message}"}])
    else:
        logger.configure(
            handlers=[
                {
                    "sink": out,
                    "level": level,
                    "format": "{time:HH:mm:ss.SSS} {level: <7} {message} {extra}",
                    # loguru's default annotates each frame of a traceback with the values of
                    # its variables: a request's body and headers, a token among them.
                    "diagnose": False,
                }
            ]
        )


def info_line(message: str, **fields: Any) -> None:
    """Write one INFO line with `fields`, the JSON object the configured handler writes.

    For lines written per request (access.py): a loguru call costs 11-20 µs on the 2-core
    dev machine, this about 5, so it writes to the sink `configure_logging` set up itself.
    Without one (human-readable lines, or loguru configured by someone else) it is an
    ordinary `logger.info`.
    """
    sink = _info_sink
    if sink is None:
        logger.info(message, **fields)
        return
    doc: dict[str, Any] = {
        "timestamp": datetime.now().astimezone().isoformat(),
        "level": "INFO",
        "service": _info_service,
        "message": message,
        "trace_id": fields.pop("trace_id", None),
        "correlation_id": fields.pop("correlation_id", None),
    }
    if _info_instance:
        doc["instance"] = _info_instance
    span_id = TRACING.current_span_id()
    if span_id:
        doc["span_id"] = span_id
    doc.update(fields)
    sink.write(_encoder.encode(doc).decode() + "\n")
    sink.flush()
