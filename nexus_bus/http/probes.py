"""`/healthz`, `/readyz`, `/metrics` and `/openapi.json`: the routes that are not operations.

Liveness says only that the event loop answers. Readiness says a load balancer may send
traffic here: NATS connected, Redis answering, and not draining; it turns false first when
the shim is told to stop, while in-flight requests still finish.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Final

import msgspec
import redis.exceptions
from prometheus_client import REGISTRY
from prometheus_client.exposition import choose_encoder

from nexus_bus.constants import CT_JSON, CT_PROBLEM, H_RETRY_AFTER, PROBLEM_TYPE_BASE
from nexus_bus.errors import Unavailable
from nexus_bus.http.problems import Answer
from nexus_bus.operations import Operations
from nexus_bus.redis_client import RedisClient
from nexus_bus.specs import openapi_document

_encoder: Final = msgspec.json.Encoder()
_CT_JSON: Final = CT_JSON.encode()
_CT_PROBLEM: Final = CT_PROBLEM.encode()
_ALIVE: Final = Answer(200, _CT_JSON, [], b'{"status":"ok"}')
_REDIS_PING_S: Final = 0.5
_RETRY_AFTER: Final = H_RETRY_AFTER.lower().encode()


class Probes:
    """Answers the health, readiness, metrics and OpenAPI routes."""

    def __init__(
        self,
        nats_connected: Callable[[], bool],
        redis: RedisClient | None,
        groups: Iterable[Operations],
        *,
        draining: Callable[[], bool],
        retry_after_s: int,
    ) -> None:
        self._nats_connected = nats_connected
        self._redis = redis
        self._groups = list(groups)
        self._draining = draining
        self._retry_after = str(retry_after_s).encode()
        self._openapi: bytes | None = None

    def healthz(self) -> Answer:
        """Alive (200) whenever the process answers at all, draining or not."""
        return _ALIVE

    async def readyz(self, request_id: str) -> Answer:
        """200 when NATS is connected, Redis answers and the shim is not draining; else 503."""
        checks = {
            "nats": self._nats_connected(),
            "redis": await self._redis_answers(),
            "draining": self._draining(),
        }
        if checks["nats"] and checks["redis"] and not checks["draining"]:
            return Answer(200, _CT_JSON, [], _encoder.encode({"status": "ready", "checks": checks}))
        failing = [n for n in ("nats", "redis") if not checks[n]]
        if checks["draining"]:
            failing.append("draining")
        error = Unavailable(f"not ready: {', '.join(failing)}")
        body = {
            "type": PROBLEM_TYPE_BASE + error.code,
            "title": error.title,
            "status": error.http_status,
            "code": error.code,
            "detail": error.detail,
            "request_id": request_id,
            "checks": checks,
        }
        headers = [(_RETRY_AFTER, self._retry_after)]
        return Answer(503, _CT_PROBLEM, headers, _encoder.encode(body))

    async def _redis_answers(self) -> bool:
        if self._redis is None:
            return False
        try:
            async with asyncio.timeout(_REDIS_PING_S):
                return bool(await self._redis.ping())
        except (redis.exceptions.RedisError, OSError, TimeoutError):
            return False

    def metrics(self, accept: str | None = None) -> Answer:
        """This process's metrics: OpenMetrics (with exemplars) when the scraper accepts it,
        else Prometheus's text format."""
        try:
            encode, content_type = choose_encoder(accept or "")
        except (TypeError, ValueError):
            # prometheus_client fails on a malformed `version=` parameter: what `*/*` gets.
            encode, content_type = choose_encoder("")
        return Answer(200, content_type.encode(), [], encode(REGISTRY))

    def openapi(self) -> Answer:
        """The OpenAPI document of the served operations, built once from their schemas."""
        if self._openapi is None:
            self._openapi = _encoder.encode(openapi_document(self._groups))
        return Answer(200, _CT_JSON, [], self._openapi)
