"""JSON-lines logging on loguru, one object per line.

Fields: `timestamp`, `level`, `service`, `message`, `trace_id`, `correlation_id` (the request
id) and, where bound, `op`, `action`, `status`, `duration_ms`. Bind per request with
`logger.contextualize(...)`; secrets are never passed to the logger.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Final, TextIO

import msgspec
from loguru import logger

if TYPE_CHECKING:
    from loguru import Record

__all__ = ["configure_logging", "logger"]

_encoder: Final = msgspec.json.Encoder()
_EXTRA_FIELDS: Final = ("op", "action", "status", "duration_ms", "code", "transport")


def _json_line(record: Record, service: str) -> bytes:
    extra = record["extra"]
    doc: dict[str, Any] = {
        "timestamp": record["time"].isoformat(),
        "level": record["level"].name,
        "service": extra.get("service", service),
        "message": record["message"],
        "trace_id": extra.get("trace_id"),
        "correlation_id": extra.get("correlation_id"),
    }
    for name in _EXTRA_FIELDS:
        if name in extra:
            doc[name] = extra[name]
    if record["exception"] is not None:
        exc = record["exception"]
        doc["exception"] = f"{exc.type.__name__ if exc.type else 'Exception'}: {exc.value}"
    return _encoder.encode(doc)


def configure_logging(
    service: str, level: str = "INFO", *, json_lines: bool = True, sink: TextIO | None = None
) -> None:
    """Replace loguru's handlers with one writing to `sink` (stderr by default).

    Call once at the process edge; libraries only log.
    """
    out = sink or sys.stderr
    if json_lines:

        def write(message: Any) -> None:
            out.write(_json_line(message.record, service).decode() + "\n")
            out.flush()

        logger.configure(handlers=[{"sink": write, "level": level, "format": "{message}"}])
    else:
        logger.configure(
            handlers=[
                {
                    "sink": out,
                    "level": level,
                    "format": "{time:HH:mm:ss.SSS} {level: <7} {message} {extra}",
                }
            ]
        )
