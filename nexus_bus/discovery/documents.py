"""Consul registration documents, built without I/O: what the shim and the workers register.

The shim registers `nexus-shim` with an HTTP check on `/readyz`; every op group a worker
serves registers `nexus-<op>` with a TTL check the worker keeps passing. The documents use
Consul's own field names (agent API, `PUT /v1/agent/service/register`), so what a test reads
back from an agent is what this module built.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nexus_bus.bus.subjects import queue_group
from nexus_bus.config import ConsulSettings
from nexus_bus.constants import (
    CONSUL_META_ACTIONS,
    CONSUL_META_INSTANCE,
    CONSUL_META_OPS,
    CONSUL_META_QUEUE_GROUP,
    CONSUL_META_VERSION,
    CONSUL_TAG,
    HTTP_READYZ,
    SERVICE_PREFIX,
    SHIM_SERVICE,
)


def go_duration(seconds: float) -> str:
    """A duration as Consul reads it (Go's `time.ParseDuration`): `5s`, `500ms`.

    Raises:
        ValueError: a negative duration.
    """
    if seconds < 0:
        raise ValueError("durations are never negative")
    millis = math.ceil(seconds * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def service_name(op: str) -> str:
    """The Consul and `$SRV` service name of an op group: `nexus-<op>`."""
    return SERVICE_PREFIX + op


def op_of(name: str) -> str | None:
    """The op a worker service name stands for (`nexus-data` -> `data`); None for the shim."""
    if name == SHIM_SERVICE or not name.startswith(SERVICE_PREFIX):
        return None
    return name[len(SERVICE_PREFIX) :]


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckDefinition:
    """One health check of a registration: an HTTP check, or a TTL check when `ttl` is set."""

    check_id: str
    name: str
    http: str | None = None
    interval: str | None = None
    timeout: str | None = None
    ttl: str | None = None
    deregister_after: str

    def to_consul(self) -> dict[str, Any]:
        """The check in Consul's JSON shape (`CheckType` of the agent API)."""
        doc: dict[str, Any] = {
            "CheckID": self.check_id,
            "Name": self.name,
            "DeregisterCriticalServiceAfter": self.deregister_after,
        }
        if self.http is not None:
            doc.update(HTTP=self.http, Method="GET", Interval=self.interval, Timeout=self.timeout)
        if self.ttl is not None:
            doc["TTL"] = self.ttl
        return doc


@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRegistration:
    """One service instance as registered with the local Consul agent."""

    name: str
    service_id: str
    address: str
    port: int
    tags: tuple[str, ...] = ()
    meta: dict[str, str] = field(default_factory=dict)
    check: CheckDefinition

    def to_consul(self) -> dict[str, Any]:
        """The registration in Consul's JSON shape (`PUT /v1/agent/service/register`)."""
        doc: dict[str, Any] = {
            "Name": self.name,
            "ID": self.service_id,
            "Address": self.address,
            "Tags": list(self.tags),
            "Meta": dict(self.meta),
            "Check": self.check.to_consul(),
        }
        if self.port:
            doc["Port"] = self.port
        return doc


# Consul refuses a service whose meta value is longer (400 Invalid Service Meta).
META_VALUE_MAX = 512


def listed(names: Iterable[str]) -> str:
    """Names as one meta value, comma-separated and sorted; when they do not fit in Consul's
    512 characters, as many as fit, then `+N more` (the full list is in `$SRV` INFO and
    `nexus-bus ops`)."""
    ordered = sorted(set(names))
    text = ",".join(ordered)
    kept = len(ordered)
    while len(text) > META_VALUE_MAX:
        kept -= 1
        text = ",".join([*ordered[:kept], f"+{len(ordered) - kept} more"])
    return text


def _tags(settings: ConsulSettings, *extra: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys((CONSUL_TAG, *extra, *settings.tags)))


def shim_registration(
    settings: ConsulSettings,
    *,
    instance: str,
    address: str,
    port: int,
    version: str,
    ops: Iterable[str],
) -> ServiceRegistration:
    """The shim's registration: an HTTP check on `/readyz` at the configured interval/timeout.

    Args:
        settings: the `consul` section (interval 5 s and timeout 3 s by default).
        instance: this process's instance id (unique among shims).
        address: the address Consul's agent reaches the shim at.
        port: the shim's HTTP port.
        version: the nexus-bus version.
        ops: the operations the shim forwards.
    """
    service_id = f"{SHIM_SERVICE}-{instance}"
    check = CheckDefinition(
        check_id=f"service:{service_id}",
        name=f"{SHIM_SERVICE} readiness",
        http=f"http://{_host(address)}:{port}{HTTP_READYZ}",
        interval=go_duration(settings.check_interval_s),
        timeout=go_duration(settings.check_timeout_s),
        deregister_after=go_duration(settings.deregister_after_s),
    )
    return ServiceRegistration(
        name=SHIM_SERVICE,
        service_id=service_id,
        address=address,
        port=port,
        tags=_tags(settings, "http"),
        meta={
            CONSUL_META_VERSION: version,
            CONSUL_META_OPS: listed(ops),
            CONSUL_META_INSTANCE: instance,
        },
        check=check,
    )


def worker_registrations(
    settings: ConsulSettings,
    groups: Sequence[tuple[str, Sequence[str]]],
    *,
    instance: str,
    address: str,
    version: str,
) -> list[ServiceRegistration]:
    """One registration per op group a worker serves, each with a TTL check.

    Args:
        settings: the `consul` section (`ttl_s`, `deregister_after_s`, tags).
        groups: (op, actions) per op group.
        instance: the worker's instance id, the same as its `$SRV` service id.
        address: the worker's host address (workers listen on no port: NATS reaches them).
        version: the nexus-bus version.
    """
    found = []
    for op, actions in groups:
        name = service_name(op)
        service_id = f"{name}-{instance}"
        found.append(
            ServiceRegistration(
                name=name,
                service_id=service_id,
                address=address,
                port=0,
                tags=_tags(settings, "nats"),
                meta={
                    CONSUL_META_VERSION: version,
                    CONSUL_META_QUEUE_GROUP: queue_group(op),
                    CONSUL_META_ACTIONS: listed(actions),
                    CONSUL_META_INSTANCE: instance,
                },
                check=CheckDefinition(
                    check_id=f"service:{service_id}",
                    name=f"{name} worker alive",
                    ttl=go_duration(settings.ttl_s),
                    deregister_after=go_duration(settings.deregister_after_s),
                ),
            )
        )
    return found


def _host(address: str) -> str:
    """An address as the host part of a URL (IPv6 literals in brackets)."""
    return f"[{address}]" if ":" in address and not address.startswith("[") else address
