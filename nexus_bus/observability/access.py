"""Access lines: one JSON log line per request, in the shim and in every worker.

The shim's line and the worker's line of one request share `trace_id` (the trace the shim
forwarded) and `correlation_id` (the request id), so a request can be followed from the HTTP
edge to the handler with `grep`. Enabled by `log.access` (`NEXUS_LOG__ACCESS`, on by default)
when `log.level` lets INFO through. Callers check `access_log_enabled()` once, at start, and
call these functions only when it is true: nothing is built for a request otherwise.

Only names, ids, numbers and the client address are logged; never headers or the query
string, so tokens (a bearer token, a stream ticket in a URL) never reach a log line.
"""

from __future__ import annotations

from typing import Final

from nexus_bus.config import LogSettings
from nexus_bus.constants import T_HTTP
from nexus_bus.observability.logging import info_line

ACCESS_MESSAGE: Final = "access"
_ENABLED_LEVELS: Final = frozenset({"TRACE", "DEBUG", "INFO"})
_MAX_NAME: Final = 64  # op and action of a refused request come from the URL, unchecked


def access_log_enabled(settings: LogSettings) -> bool:
    """Whether this process writes access lines."""
    return settings.access and settings.level.upper() in _ENABLED_LEVELS


def log_http_access(
    *,
    method: str | None,
    route: str | None,
    op: str | None,
    action: str | None,
    status: int,
    duration_s: float | None,
    request_id: str,
    trace_id: str | None,
    client: str,
) -> None:
    """The shim's line for one HTTP request (`route` is the matched template, not the path).

    Method, route and duration are None for a request refused before it was parsed whole.
    """
    info_line(
        ACCESS_MESSAGE,
        transport=T_HTTP,
        method=method,
        route=route,
        op=op[:_MAX_NAME] if op is not None else None,
        action=action[:_MAX_NAME] if action is not None else None,
        status=status,
        duration_ms=round(duration_s * 1000, 3) if duration_s is not None else None,
        request_id=request_id,
        trace_id=trace_id,
        correlation_id=request_id,
        client=client,
    )


def log_served(
    *,
    transport: str,
    op: str,
    action: str,
    status: int,
    duration_s: float,
    request_id: str,
    trace_id: str,
) -> None:
    """A worker's line for one request it served (core request/reply or a job attempt)."""
    info_line(
        ACCESS_MESSAGE,
        transport=transport,
        op=op,
        action=action,
        status=status,
        duration_ms=round(duration_s * 1000, 3),
        request_id=request_id,
        trace_id=trace_id,
        correlation_id=request_id,
    )
