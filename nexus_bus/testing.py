"""Test your operations in memory: no NATS, no Redis, the real request path.

    async with OperationsHarness(pricing_ops) as harness:
        token = harness.token("pricing:quote")
        assert await harness.request("pricing", "quote", {"sku": "a"}, token=token) == {...}

Each group is served by a FastStream NATS subscriber on `nexus.<op>.*` in queue group
`nexus.<op>`, as a worker serves it, under FastStream's `TestNatsBroker` (messages travel in
memory). Every request goes through the worker's own `Dispatcher`: a real `RequestContext`,
token authentication and scopes (Ed25519 tokens signed by a key made for the harness),
request validation against the handler's type, the handler's timeout, and the error mapping
into a problem reply, which `request()` turns back into the same `NexusError` the gateway
client raises. Handlers reach `ctx.services.records` and `ctx.services.events`, in-memory
twins of the JetStream KV store and event log; `ctx.services.nc`, `js` and `redis` do not
exist here (use the integration fixtures for code that needs them).
"""

from __future__ import annotations

import bisect
import itertools
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, cast

import msgspec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faststream.nats import NatsBroker, NatsMessage, NatsResponse, TestNatsBroker
from nats.aio.msg import Msg

from nexus_bus.auth.authenticator import TokenAuthenticator
from nexus_bus.auth.cache import VerificationCache
from nexus_bus.auth.keys import Keyring
from nexus_bus.auth.limiter import FailureLimiter
from nexus_bus.auth.revocation import MemoryRevocationStore
from nexus_bus.auth.tokens import TokenCodec, TokenPolicy
from nexus_bus.auth.verifier import TokenVerifier
from nexus_bus.bus import codec
from nexus_bus.bus.replies import Expired, error_of, status_of
from nexus_bus.bus.subjects import operation_subject, operation_wildcard, queue_group
from nexus_bus.config import Settings
from nexus_bus.constants import H_AUTHORIZATION, H_CONTENT_TYPE, T_TEST
from nexus_bus.errors import Conflict, NotFound, UpstreamTimeout
from nexus_bus.events import Appended, StoredEvent
from nexus_bus.operations import Operations
from nexus_bus.runtime.dispatch import Dispatcher
from nexus_bus.services import Services
from nexus_bus.store import Record

_KID: Final = "nexus-testing"


class MemoryRecordStore:
    """`RecordStore` in memory: revisions and compare-and-set as the JetStream KV store."""

    def __init__(self) -> None:
        self._records: dict[str, Record] = {}
        self._revision = itertools.count(1)

    async def get(self, key: str) -> Record:
        """The current record.

        Raises:
            NotFound: no live value under `key`.
        """
        found = self._records.get(key)
        if found is None:
            raise NotFound(f"get of key {key}: not found")
        return found

    async def put(self, key: str, value: bytes, *, expected_revision: int | None = None) -> int:
        """Write; with `expected_revision` only if current (0: only if absent).

        Raises:
            Conflict: the record is not at `expected_revision`.
        """
        current = self._records.get(key)
        at = current.revision if current else 0
        if expected_revision is not None and at != expected_revision:
            raise Conflict(f"put of key {key}: revision mismatch")
        revision = next(self._revision)
        self._records[key] = Record(key=key, value=value, revision=revision)
        return revision

    async def delete(self, key: str) -> bool:
        """Delete; whether a live value existed."""
        return self._records.pop(key, None) is not None

    async def keys(self, prefix: str = "", limit: int = 100) -> list[str]:
        """Live keys starting with `prefix`, sorted, at most `limit`."""
        return sorted(k for k in self._records if k.startswith(prefix))[:limit]


class MemoryEventLog:
    """`EventLog` in memory: one sequence for every topic, idempotent appends by event id."""

    def __init__(self) -> None:
        self._events: dict[str, list[StoredEvent]] = {}
        self._ids: dict[str, int] = {}
        self._seq = itertools.count(1)

    async def append(self, topic: str, data: bytes, *, event_id: str | None = None) -> Appended:
        """Append an event; a repeated `event_id` on the same topic is not stored twice."""
        key = f"{topic}:{event_id}"
        if event_id is not None and key in self._ids:
            return Appended(seq=self._ids[key], duplicate=True)
        seq = next(self._seq)
        self._events.setdefault(topic, []).append(
            StoredEvent(seq=seq, data=data, time=datetime.now(UTC))
        )
        if event_id is not None:
            self._ids[key] = seq
        return Appended(seq=seq, duplicate=False)

    async def read(self, topic: str, after_seq: int = 0, limit: int = 100) -> list[StoredEvent]:
        """Events of `topic` with sequence > `after_seq`, oldest first."""
        events = self._events.get(topic, [])
        start = bisect.bisect_right([e.seq for e in events], after_seq)
        return events[start : start + limit]


@dataclass(frozen=True, slots=True)
class TestReply:
    """A reply as it came back: its `Nexus-Status`, headers and body."""

    __test__ = False  # not a pytest test class

    status: int
    headers: Mapping[str, str]
    body: bytes


async def _raw_message(message: NatsMessage) -> Msg:
    """FastStream decoder handing the handler the NATS message untouched."""
    raw: Msg = message.raw_message
    return raw


class OperationsHarness:
    """Serves operation groups in memory for a test; use as an async context manager."""

    __test__ = False

    def __init__(
        self,
        *groups: Operations,
        settings: Settings | None = None,
        auth: bool = True,
    ) -> None:
        """Args:
        groups: the operation groups under test.
        settings: defaults otherwise (auth on, the default limits and timeouts).
        auth: verify tokens and scopes as a worker does; off, every request passes.
        """
        self.settings = settings or Settings()
        self.groups: list[Operations] = [g for g in groups if len(g)]
        key = Ed25519PrivateKey.generate()
        self.codec = TokenCodec(
            Keyring({}, {_KID: key}), TokenPolicy.from_settings(self.settings.auth)
        )
        self.records = MemoryRecordStore()
        self.events = MemoryEventLog()
        auth_settings = self.settings.auth
        verifier = TokenVerifier(
            self.codec,
            MemoryRevocationStore(),
            VerificationCache(
                ttl_s=auth_settings.cache_ttl_s, max_entries=auth_settings.cache_size
            ),
        )
        self.services = Services(
            settings=self.settings,
            nc=cast(Any, None),  # no connection in memory (see the module docstring)
            js=cast(Any, None),
            records=self.records,
            events=self.events,
            redis=cast(Any, None),
        )
        self.dispatcher = Dispatcher(
            self.settings,
            self.groups,
            self.services,
            authenticator=(
                TokenAuthenticator(verifier, FailureLimiter.from_settings(auth_settings))
                if auth
                else None
            ),
            transport=T_TEST,
        )
        # The handler takes the NATS message itself, as the worker's does (`_raw_message`).
        self.broker = NatsBroker(apply_types=False, decoder=_raw_message, logger=None)
        for group in self.groups:
            self.broker.subscriber(
                operation_wildcard(group.op),
                queue=queue_group(group.op),
                title=f"nexus.{group.op}",
                description=group.description or None,
            )(self._handler(group.op))
        self._testing: TestNatsBroker[NatsBroker] | None = None

    def _handler(self, op: str) -> Any:
        dispatcher = self.dispatcher

        async def handle(msg: Msg) -> NatsResponse:
            action = msg.subject.rsplit(".", 1)[-1]
            reply = await dispatcher.dispatch(op, action, msg.headers, msg.data)
            if isinstance(reply, Expired):  # a worker drops it; its caller times out
                raise UpstreamTimeout(f"{op}.{action}: the deadline had passed")
            return NatsResponse(reply.body, headers=dict(reply.headers))

        return handle

    async def __aenter__(self) -> OperationsHarness:
        self._testing = TestNatsBroker(self.broker)
        await self._testing.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._testing is not None:
            await self._testing.__aexit__(exc_type, exc, tb)
            self._testing = None

    def token(self, *scopes: str, subject: str = "test-user", ttl_s: int = 3600) -> str:
        """A bearer token signed by the harness's key, with these scopes (`op:action`,
        `op:*` or `*`)."""
        signed = self.codec.issue(
            subject, frozenset(scopes), ttl_s, now=int(time.time()), jti=uuid.uuid4().hex
        )
        return signed.token

    async def request_raw(
        self,
        op: str,
        action: str,
        body: bytes,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> TestReply:
        """Send `body` to `op.action` as a NATS client would, and return the reply as is."""
        if self._testing is None:
            raise RuntimeError("use the harness as `async with OperationsHarness(...)`")
        answer = await self.broker.request(
            body, operation_subject(op, action), headers=dict(headers or {}), timeout=timeout_s
        )
        reply_headers = {k: v for k, v in (answer.headers or {}).items() if isinstance(v, str)}
        return TestReply(status_of(reply_headers), reply_headers, answer.body)

    async def request(
        self,
        op: str,
        action: str,
        payload: Any = None,
        *,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float = 5.0,
    ) -> Any:
        """Call `op.action` with `payload` (encoded as JSON); its result as JSON types.

        Raises:
            NexusError: the error the reply carried, the same class the gateway client
                raises (`InvalidToken`, `Forbidden`, `InvalidRequest`, `NotFound`...).
        """
        sent = {H_CONTENT_TYPE: "application/json", **(headers or {})}
        if token is not None:
            sent[H_AUTHORIZATION] = f"Bearer {token}"
        body = payload if isinstance(payload, bytes) else codec.encode(payload)
        reply = await self.request_raw(op, action, body, headers=sent, timeout_s=timeout_s)
        if reply.status >= 400:
            raise error_of(reply.status, reply.body, dict(reply.headers))
        return msgspec.json.decode(reply.body) if reply.body else None


__all__ = [
    "MemoryEventLog",
    "MemoryRecordStore",
    "OperationsHarness",
    "TestReply",
]
