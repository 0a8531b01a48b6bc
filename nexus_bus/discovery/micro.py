"""The NATS micro protocol (`$SRV.PING|INFO|STATS`, ADR-32) for the op groups a worker serves.

Every worker answers, for each op group it serves, as one service named `nexus-<op>` with an
endpoint per action (subject `nexus.<op>.<action>`, queue group `nexus.<op>`): on `$SRV.<VERB>`,
`$SRV.<VERB>.nexus-<op>` and `$SRV.<VERB>.nexus-<op>.<id>`. The documents are nats-py's own
`nats.micro` types, so their JSON is exactly what nats.micro services send.

Why not `nats.micro.add_service` (docs/discovery.md): its endpoints subscribe their own
handlers and count only what passes through them, while the worker serves its subjects
with FastStream subscribers, bounded concurrency, deadlines and auth; and its service has
no public way to feed it counts from elsewhere. So the responder here answers the control
subjects, and the counts are the worker's own (`EndpointStats`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Final

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.service import (
    EndpointInfo,
    ServiceInfo,
    ServicePing,
    ServiceStats,
    ServiceVerb,
    control_subject,
)
from nats.micro.service import EndpointStats as MicroEndpointStats

from nexus_bus.bus.subjects import is_inbox, operation_subject, queue_group
from nexus_bus.constants import (
    CONSUL_META_QUEUE_GROUP,
    MICRO_META_ADDRESS,
    MICRO_META_OP,
    MICRO_META_SCHEMA_REPLY,
    MICRO_META_SCHEMA_REQUEST,
)
from nexus_bus.discovery.documents import service_name
from nexus_bus.discovery.endpoint_stats import EndpointStats
from nexus_bus.observability import logger
from nexus_bus.operations import Operations
from nexus_bus.specs.json_schema import SCHEMA_ID_BASE

_encoder: Final = msgspec.json.Encoder()


def schema_reference(op: str, action: str, part: str) -> str:
    """Where the JSON Schema of an action's `request` or `reply` lives (schemas/jsonschema)."""
    return f"{SCHEMA_ID_BASE}{op}.{action}.json#/$defs/{part}"


class MicroService:
    """One op group as a NATS micro service: its identity and its three documents."""

    def __init__(
        self,
        group: Operations,
        stats: EndpointStats,
        *,
        instance: str,
        version: str,
        started: datetime,
        address: str = "",
    ) -> None:
        """Args:
        group: the op group.
        stats: the worker's counters.
        instance: the service id (the worker's instance id, shared by its groups).
        version: the nexus-bus version.
        started: when the worker started serving.
        address: the worker host's address (metadata `address`, for `nexus-bus services`).
        """
        self.op = group.op
        self.name = service_name(group.op)
        self.instance = instance
        self.version = version
        self.description = group.description
        self.actions = sorted(operation.action for operation in group)
        self.metadata = {MICRO_META_OP: group.op, CONSUL_META_QUEUE_GROUP: queue_group(group.op)}
        if address:
            self.metadata[MICRO_META_ADDRESS] = address
        self._stats = stats
        self._started = started

    def ping(self) -> ServicePing:
        """The `io.nats.micro.v1.ping_response` document."""
        return ServicePing(
            id=self.instance, name=self.name, version=self.version, metadata=self.metadata
        )

    def info(self) -> ServiceInfo:
        """The `io.nats.micro.v1.info_response` document: an endpoint per action."""
        endpoints = [
            EndpointInfo(
                name=action,
                subject=operation_subject(self.op, action),
                queue_group=queue_group(self.op),
                metadata={
                    MICRO_META_OP: self.op,
                    MICRO_META_SCHEMA_REQUEST: schema_reference(self.op, action, "request"),
                    MICRO_META_SCHEMA_REPLY: schema_reference(self.op, action, "reply"),
                },
            )
            for action in self.actions
        ]
        return ServiceInfo(
            id=self.instance,
            name=self.name,
            version=self.version,
            description=self.description,
            endpoints=endpoints,
            metadata=self.metadata,
        )

    def stats(self) -> ServiceStats:
        """The `io.nats.micro.v1.stats_response` document: the worker's real counts."""
        counters = self._stats.of(self.op)
        endpoints = []
        for action in self.actions:
            found = counters.get(action)
            if found is None:
                continue
            endpoints.append(
                MicroEndpointStats(
                    name=action,
                    subject=operation_subject(self.op, action),
                    queue_group=queue_group(self.op),
                    num_requests=found.requests,
                    num_errors=found.errors,
                    processing_time=found.processing_ns,
                    average_processing_time=found.average_ns,
                    last_error=found.last_error,
                )
            )
        return ServiceStats(
            id=self.instance,
            name=self.name,
            version=self.version,
            started=self._started,
            endpoints=endpoints,
            metadata=self.metadata,
        )


class MicroResponder:
    """Answers `$SRV.PING|INFO|STATS` for the given services on a NATS connection."""

    def __init__(
        self, nc: Client, services: Iterable[MicroService], *, inbox_prefix: str = "_INBOX"
    ) -> None:
        """Args:
        nc: the worker's connection.
        services: one per op group.
        inbox_prefix: answers go only to subjects under it (`nats.inbox_prefix`).
        """
        self._nc = nc
        self._services = list(services)
        self._inbox_prefix = inbox_prefix
        self._subscriptions: list[Subscription] = []

    async def start(self) -> None:
        """Subscribe every control subject (all, by name, by name and id) of every service."""
        for service in self._services:
            for verb in ServiceVerb:
                handler = self._handler(service, verb)
                for subject in (
                    control_subject(verb),
                    control_subject(verb, name=service.name),
                    control_subject(verb, name=service.name, id=service.instance),
                ):
                    self._subscriptions.append(await self._nc.subscribe(subject, cb=handler))
        logger.debug("answering $SRV for {}", ",".join(s.name for s in self._services))

    def _handler(
        self, service: MicroService, verb: ServiceVerb
    ) -> Callable[[Msg], Awaitable[None]]:
        async def answer(msg: Msg) -> None:
            # As for requests (docs/runtime.md): answering any reply subject would let anyone
            # who may publish on $SRV make every worker publish onto a subject of their choice.
            if not msg.reply or not is_inbox(msg.reply, self._inbox_prefix):
                return
            match verb:
                case ServiceVerb.PING:
                    document = service.ping().to_dict()
                case ServiceVerb.INFO:
                    document = service.info().to_dict()
                case _:
                    document = service.stats().to_dict()
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(_encoder.encode(document))

        return answer

    async def stop(self) -> None:
        """Stop answering (before the worker drains its connection)."""
        for subscription in self._subscriptions:
            with contextlib.suppress(nats.errors.Error):
                await subscription.unsubscribe()
        self._subscriptions.clear()
