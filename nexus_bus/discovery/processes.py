"""Discovery for one process: what the worker and the shim start and stop, in one call each.

The worker answers `$SRV` for its op groups and (with `consul.enabled`) registers each group
with a TTL check; the shim registers itself with an HTTP check on `/readyz`. Both deregister
before their process exits. Nothing here runs on the request path.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import nats.errors
from nats.aio.client import Client
from nats.nuid import NUID

from nexus_bus.bus.connection import round_trip
from nexus_bus.bus.replies import Expired, Reply
from nexus_bus.config import Settings
from nexus_bus.discovery.documents import (
    ServiceRegistration,
    shim_registration,
    worker_registrations,
)
from nexus_bus.discovery.endpoint_stats import EndpointStats
from nexus_bus.discovery.lifecycle import HealthProbe, Registration, create_backoff
from nexus_bus.discovery.micro import MicroResponder, MicroService
from nexus_bus.discovery.registry import ConsulRegistry, ServiceRegistry
from nexus_bus.operations import Operations
from nexus_bus.specs.base import package_version

_UNSAFE_ID = re.compile(r"[^A-Za-z0-9_-]")
# Leaves room for the worker's drain: deregistering is the first step of shutting down.
_DEREGISTER_TIMEOUT_S = 3.0
_EXPIRED_ERROR = "504:dropped, its deadline had passed"


def new_instance_id() -> str:
    """A unique instance id, shaped like the ids nats.micro services use (a NUID)."""
    return NUID().next().decode()


def advertised_address(configured: str, listen_host: str = "") -> str:
    """The address others reach this process at.

    `configured` wins; then a specific listen host; else this host's own address (what a
    container's name resolves to on its network), or, where the host name resolves to
    loopback, the address of the interface its default route leaves by.
    """
    if configured:
        return configured
    if listen_host:
        try:
            if not ipaddress.ip_address(listen_host).is_unspecified:
                return listen_host
        except ValueError:
            return listen_host  # a host name
    try:
        resolved = socket.gethostbyname(socket.gethostname())
    except OSError:
        resolved = "127.0.0.1"
    if ipaddress.ip_address(resolved).is_loopback:
        # Debian and Ubuntu map the host name to 127.0.1.1 (/etc/hosts): registered, it is
        # an address Consul's DNS would hand to other hosts.
        return _routed_address() or resolved
    return resolved


def _routed_address() -> str | None:
    """The address of the interface the default route leaves by (None: no route).

    Connecting a UDP socket only picks the route: nothing is sent.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 9))  # any address off this host
        except OSError:
            return None
        return str(probe.getsockname()[0])


def _groups_of(groups: Iterable[Operations]) -> list[tuple[str, list[str]]]:
    return [(g.op, [o.action for o in g]) for g in groups]


def _registration(
    settings: Settings,
    registry: ServiceRegistry,
    registrations: list[ServiceRegistration],
    health: HealthProbe | None = None,
) -> Registration:
    consul = settings.consul
    return Registration(
        registry,
        registrations,
        health=health,
        heartbeat_s=consul.ttl_s / 3,
        backoff=create_backoff(consul.retry_base_s, consul.retry_max_s),
    )


class WorkerDiscovery:
    """A worker's `$SRV` services, endpoint counters and Consul registration."""

    def __init__(
        self,
        settings: Settings,
        groups: Iterable[Operations],
        *,
        unhealthy: Callable[[], str | None],
        registry: ServiceRegistry | None = None,
    ) -> None:
        """Args:
        settings: the whole settings object (reads `worker.micro` and `consul`).
        groups: the op groups the worker serves.
        unhealthy: why the worker cannot serve now (None: it can); read for TTL checks.
        registry: where to register (default: Consul, when `consul.enabled`).

        Raises:
            ConfigError: the Consul address is malformed or the token file unreadable.
        """
        self.settings = settings
        self.groups = list(groups)
        self.instance = new_instance_id()
        self.version = package_version()
        self.stats = EndpointStats(_groups_of(self.groups))
        self._unhealthy = unhealthy
        if registry is None and settings.consul.enabled:
            registry = ConsulRegistry(settings.consul)  # before anything opens: bad config fails
        self._registry = registry
        self._nc: Client | None = None
        self._responder: MicroResponder | None = None
        self.registration: Registration | None = None

    async def start(self, nc: Client) -> None:
        """Answer `$SRV` on `nc` and start registering with Consul (returns at once)."""
        self._nc = nc
        address = advertised_address(self.settings.consul.service_address)
        if self.settings.worker.micro:
            started = datetime.now(UTC)
            services = [
                MicroService(
                    g,
                    self.stats,
                    instance=self.instance,
                    version=self.version,
                    started=started,
                    address=address,
                )
                for g in self.groups
            ]
            self._responder = MicroResponder(
                nc, services, inbox_prefix=self.settings.nats.inbox_prefix
            )
            await self._responder.start()
        consul = self.settings.consul
        if self._registry is not None:
            registrations = worker_registrations(
                consul,
                _groups_of(self.groups),
                instance=self.instance,
                address=address,
                version=self.version,
            )
            self.registration = _registration(
                self.settings, self._registry, registrations, self._health
            )
            self.registration.start()

    def count(self, op: str, action: str, started_ns: int, result: Reply | Expired) -> None:
        """Count one request the worker handled (`started_ns`: `perf_counter_ns()` before)."""
        elapsed = time.perf_counter_ns() - started_ns
        if isinstance(result, Expired):
            self.stats.record(op, action, elapsed, _EXPIRED_ERROR)
        else:
            self.stats.record_reply(op, action, elapsed, result.status, result.headers)

    async def _health(self) -> str | None:
        problem = self._unhealthy()
        if problem is not None or self._nc is None:
            return problem or "not started"
        try:
            # A message through the server and back: the connection really carries traffic
            # both ways, not just "open" (a PING/PONG flush given up would leave it deaf).
            await round_trip(self._nc, timeout_s=max(1.0, self.settings.consul.ttl_s / 3))
        except (nats.errors.Error, TimeoutError) as exc:
            return f"NATS round trip failed: {type(exc).__name__}"
        return None

    async def stop(self) -> None:
        """Deregister from Consul and stop answering `$SRV` (first step of a drain)."""
        if self.registration is not None:
            await self.registration.stop(_DEREGISTER_TIMEOUT_S)
        if self._registry is not None:
            await self._registry.close()
        if self._responder is not None:
            await self._responder.stop()


class ShimDiscovery:
    """The shim's Consul registration (HTTP check on `/readyz`)."""

    def __init__(self, settings: Settings, registry: ServiceRegistry | None = None) -> None:
        """Args: registry: where to register (default: Consul).

        Raises:
            ConfigError: the Consul address is malformed or the token file unreadable.
        """
        self.settings = settings
        self._registry = registry or ConsulRegistry(settings.consul)
        self.registration: Registration | None = None

    def start(self, port: int, ops: Iterable[str]) -> None:
        """Start registering the shim listening on `port` (returns at once)."""
        consul = self.settings.consul
        address = advertised_address(consul.service_address, self.settings.http.host)
        instance = _UNSAFE_ID.sub("-", f"{socket.gethostname()}-{port}")
        registration = shim_registration(
            consul,
            instance=instance,
            address=address,
            port=port,
            version=package_version(),
            ops=ops,
        )
        self.registration = _registration(self.settings, self._registry, [registration])
        self.registration.start()

    async def stop(self) -> None:
        """Deregister (before the shim exits)."""
        if self.registration is not None:
            await self.registration.stop(_DEREGISTER_TIMEOUT_S)
        await self._registry.close()


async def wait_registered(registration: Registration, timeout_s: float) -> None:
    """Wait until `registration` is registered (for tests and `up`).

    Raises:
        TimeoutError: not registered within `timeout_s`.
    """
    async with asyncio.timeout(timeout_s):
        while registration.state.value != "registered":
            registration.changed.clear()
            await registration.changed.wait()
