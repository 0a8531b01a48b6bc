"""What a handler receives besides its request: identity, tracing, deadline and services."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nexus_bus.metadata import TraceContext

if TYPE_CHECKING:
    from nexus_bus.services import Services


@dataclass(frozen=True, slots=True)
class Principal:
    """Who sent the request, as established by the token service."""

    subject: str
    scopes: frozenset[str] = frozenset()
    jti: str | None = None
    expires_at: int | None = None


@dataclass(slots=True)
class RequestContext:
    """Per-request context passed to every handler."""

    op: str
    action: str
    request_id: str
    trace: TraceContext
    deadline_ms: int
    services: Services
    headers: Mapping[str, str] = field(default_factory=dict)
    principal: Principal | None = None
    idempotency_key: str | None = None
    attempt: int = 1
    extras: dict[str, Any] = field(default_factory=dict)

    def remaining_s(self, now: float | None = None) -> float:
        """Seconds left before the caller's deadline (never negative)."""
        now_ms = (time.time() if now is None else now) * 1000
        return max(0.0, (self.deadline_ms - now_ms) / 1000)
