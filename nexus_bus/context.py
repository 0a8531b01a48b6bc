"""What a handler receives besides its request: identity, tracing, deadline and services."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nexus_bus.bus.metadata import LazyTrace, TraceContext

if TYPE_CHECKING:
    from nexus_bus.services import Services


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent the request, as established by the token service."""

    subject: str
    scopes: frozenset[str] = frozenset()
    jti: str | None = None
    expires_at: int | None = None


class RequestContext:
    """Per-request context passed to every handler.

    `trace` is this hop's trace context; when the dispatcher passes none it is worked out
    from the request headers on first use (`metadata.LazyTrace`).
    """

    __slots__ = (
        "_trace", "action", "attempt", "deadline_ms", "extras", "headers", "idempotency_key",
        "op", "principal", "request_id", "services",
    )

    def __init__(
        self,
        *,
        op: str,
        action: str,
        request_id: str,
        deadline_ms: int,
        services: Services,
        trace: TraceContext | LazyTrace | None = None,
        headers: Mapping[str, str] | None = None,
        principal: Principal | None = None,
        idempotency_key: str | None = None,
        attempt: int = 1,
        extras: dict[str, Any] | None = None,
    ) -> None:
        self.op = op
        self.action = action
        self.request_id = request_id
        self.deadline_ms = deadline_ms
        self.services = services
        self.headers: Mapping[str, str] = headers if headers is not None else {}
        self._trace = trace if trace is not None else LazyTrace(self.headers)
        self.principal = principal
        self.idempotency_key = idempotency_key
        self.attempt = attempt
        self.extras: dict[str, Any] = extras if extras is not None else {}

    @property
    def trace(self) -> TraceContext:
        """This hop's W3C trace context (the caller's trace, a new span)."""
        trace = self._trace
        if isinstance(trace, LazyTrace):
            trace = self._trace = trace.get()
        return trace

    @trace.setter
    def trace(self, value: TraceContext) -> None:
        self._trace = value

    def remaining_s(self, now: float | None = None) -> float:
        """Seconds left before the caller's deadline (never negative)."""
        now_ms = (time.time() if now is None else now) * 1000
        return max(0.0, (self.deadline_ms - now_ms) / 1000)

    def __repr__(self) -> str:
        return (
            f"RequestContext(op={self.op!r}, action={self.action!r}, "
            f"request_id={self.request_id!r})"
        )
