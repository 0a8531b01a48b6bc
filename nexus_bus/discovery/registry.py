"""The `ServiceRegistry` seam and its one real adapter, Consul through py-consul.

py-consul (the maintained fork of python-consul2, same `consul` API; docs/discovery.md says
why) is used through its synchronous client, run on one thread of this adapter's own: no call
ever blocks the event loop, a hung agent occupies one thread and never the loop's shared
executor (which resolves host names for the request path), and the per-call timeout is
py-consul's own `connections_timeout`. Every exception of the library is mapped here, once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, TypeVar

from nexus_bus.config import ConfigError, ConsulSettings
from nexus_bus.discovery.documents import ServiceRegistration
from nexus_bus.errors import Unavailable

T = TypeVar("T")
_DEFAULT_PORTS = {"http": 8500, "https": 8501}


class CheckStatus(StrEnum):
    """A Consul check's status, worst last."""

    PASSING = "passing"
    WARNING = "warning"
    CRITICAL = "critical"


_RANK = {CheckStatus.PASSING: 0, CheckStatus.WARNING: 1, CheckStatus.CRITICAL: 2}


def worst(statuses: list[str]) -> CheckStatus:
    """The worst of some check statuses (unknown ones count as critical; none is passing)."""
    found = CheckStatus.PASSING
    for status in statuses:
        known = CheckStatus(status) if status in CheckStatus.__members__.values() else None
        current = known or CheckStatus.CRITICAL
        if _RANK[current] > _RANK[found]:
            found = current
    return found


@dataclass(frozen=True, slots=True, kw_only=True)
class Instance:
    """One registered instance of a service as the registry reports it."""

    name: str
    service_id: str
    address: str
    port: int
    status: CheckStatus
    meta: dict[str, str] = field(default_factory=dict)
    tags: tuple[str, ...] = ()


class RegistryUnavailable(Unavailable):
    """The registry (the Consul agent) cannot be reached or refused the call."""


class NotRegistered(RegistryUnavailable):
    """The agent does not know the service or check (it restarted, or reaped us)."""


class ServiceRegistry(Protocol):
    """Where processes register themselves and where `nexus-bus services` looks them up."""

    async def register(self, registration: ServiceRegistration) -> None:
        """Register (or replace) one service instance with its check.

        Raises:
            RegistryUnavailable: the registry cannot be reached.
        """

    async def deregister(self, service_id: str) -> None:
        """Remove one service instance (and its check); unknown ids are not an error.

        Raises:
            RegistryUnavailable: the registry cannot be reached.
        """

    async def update_check(self, check_id: str, status: CheckStatus, note: str = "") -> None:
        """Set a TTL check's status (passing resets its TTL).

        Raises:
            NotRegistered: the registry does not know the check.
            RegistryUnavailable: the registry cannot be reached.
        """

    async def local_ids(self) -> set[str]:
        """The ids of the services registered with this agent.

        Raises:
            RegistryUnavailable: the registry cannot be reached.
        """

    async def service_names(self) -> list[str]:
        """Every service name the registry knows.

        Raises:
            RegistryUnavailable: the registry cannot be reached.
        """

    async def instances(self, name: str) -> list[Instance]:
        """The instances of service `name`, each with its aggregated health.

        Raises:
            RegistryUnavailable: the registry cannot be reached.
        """

    async def close(self) -> None:
        """Release the client (pending calls are abandoned)."""


def split_address(address: str) -> tuple[str, str, int]:
    """`scheme://host:port` (scheme and port optional) as (scheme, host, port).

    Raises:
        ValueError: an address that is not http(s)://host[:port].
    """
    scheme, sep, rest = address.partition("://")
    if not sep:
        scheme, rest = "http", address
    if scheme not in _DEFAULT_PORTS:
        raise ValueError(f"unsupported Consul address scheme {scheme!r}")
    rest = rest.rstrip("/")
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = rest.partition(":")
    if not host:
        raise ValueError(f"no host in Consul address {address!r}")
    return scheme, host, int(port_text) if port_text else _DEFAULT_PORTS[scheme]


def read_token(settings: ConsulSettings) -> str | None:
    """The ACL token from `token` or `token_file` (stripped), or None.

    Raises:
        ConfigError: the token file cannot be read (its path is named, never its content).
    """
    if settings.token is not None:
        return settings.token.get_secret_value()
    if settings.token_file is None:
        return None
    try:
        return settings.token_file.read_text().strip() or None
    except OSError as exc:
        raise ConfigError(f"cannot read consul.token_file {settings.token_file}") from exc


def _mapped(call: Callable[[], T], what: str) -> T:
    """Run a py-consul call, translating every library exception (the one mapping)."""
    import consul  # type: ignore[import-untyped]  # loaded by ConsulRegistry already
    import requests

    try:
        return call()
    except consul.ConsulException as exc:
        # The message is the agent's answer (status and body), never our request headers.
        raise RegistryUnavailable(f"consul {what}: {type(exc).__name__}: {exc}") from exc
    except (requests.RequestException, OSError) as exc:
        raise RegistryUnavailable(f"consul {what}: {type(exc).__name__}") from exc


class ConsulRegistry:
    """`ServiceRegistry` on a Consul agent's HTTP API."""

    def __init__(self, settings: ConsulSettings) -> None:
        """Create the client; nothing is sent until the first call.

        Raises:
            ConfigError: the address is malformed, or the token file cannot be read.
        """
        try:
            scheme, host, port = split_address(settings.address)
        except ValueError as exc:
            raise ConfigError(f"consul.address: {exc}") from exc
        tls = settings.tls
        verify: bool | str = str(tls.ca_file) if tls.ca_file else tls.verify
        if tls.key_file is not None and tls.cert_file is None:
            raise ConfigError("consul.tls.key_file needs consul.tls.cert_file")
        # A cert_file alone holds the key too (requests takes either form).
        cert = (
            (str(tls.cert_file), str(tls.key_file)) if tls.key_file
            else str(tls.cert_file) if tls.cert_file else None
        )
        # Any TLS setting means https (docs/discovery.md), `verify = false` alone included.
        https = tls.enabled or not tls.verify
        if verify is False:
            # Chosen in the settings: not urllib3's warning on every call (each TTL pass).
            import urllib3

            warnings.filterwarnings(
                "ignore",
                message=re.escape(f"Unverified HTTPS request is being made to host '{host}'"),
                category=urllib3.exceptions.InsecureRequestWarning,
            )
        # Imported here: py-consul brings requests, urllib3 and psutil (17 MB of a process),
        # and a process with Consul off (the default) never needs them.
        import consul

        self._token_file = settings.token_file
        self._client = consul.Consul(
            host=host,
            port=port,
            scheme="https" if https else scheme,
            token=read_token(settings),
            dc=settings.datacenter,
            verify=verify,
            cert=cert,
            connections_timeout=settings.request_timeout_s,
        )
        # A connect and a read timeout each: a call never takes longer than twice this.
        self._call_timeout_s = 2 * settings.request_timeout_s + 0.5
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="consul")

    def _reread_token(self) -> None:
        """Take the token file's content again (on this adapter's thread): a mounted secret
        is rewritten in place when the token rotates. A file unreadable or empty for now
        (mid-rotation) keeps the token read before; CONSUL_HTTP_TOKEN still wins."""
        if self._token_file is None or "CONSUL_HTTP_TOKEN" in os.environ:
            return
        try:
            token = self._token_file.read_text().strip()
        except OSError:
            return
        if token:
            self._client.token = token

    def _call(self, call: Callable[[], T], what: str) -> T:
        self._reread_token()
        return _mapped(call, what)

    async def _run(self, call: Callable[[], T], what: str) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, functools.partial(self._call, call, what))
        try:
            async with asyncio.timeout(self._call_timeout_s):
                return await future
        except TimeoutError as exc:
            raise RegistryUnavailable(f"consul {what}: no answer in time") from exc

    async def register(self, registration: ServiceRegistration) -> None:
        """PUT /v1/agent/service/register (replacing an earlier registration of the same id)."""
        doc = registration.to_consul()
        service = self._client.agent.service
        await self._run(
            lambda: service.register(
                doc["Name"],
                service_id=doc["ID"],
                address=doc["Address"],
                port=doc.get("Port"),
                tags=doc["Tags"],
                meta=doc["Meta"],
                check=doc["Check"],
                replace_existing_checks=True,
            ),
            "register",
        )

    async def deregister(self, service_id: str) -> None:
        """PUT /v1/agent/service/deregister/<id>."""
        service = self._client.agent.service
        await self._run(lambda: service.deregister(service_id), "deregister")

    async def update_check(self, check_id: str, status: CheckStatus, note: str = "") -> None:
        """PUT /v1/agent/check/pass|warn|fail/<id>."""
        check = self._client.agent.check
        update: Callable[..., Any] = {
            CheckStatus.PASSING: check.ttl_pass,
            CheckStatus.WARNING: check.ttl_warn,
            CheckStatus.CRITICAL: check.ttl_fail,
        }[status]
        known = await self._run(lambda: update(check_id, notes=note or None), "check update")
        if not known:  # py-consul answers False for the agent's 404
            raise NotRegistered(f"the agent does not know check {check_id}")

    async def local_ids(self) -> set[str]:
        """GET /v1/agent/services."""
        services = await self._run(self._client.agent.services, "agent services")
        return set(services or {})

    async def service_names(self) -> list[str]:
        """GET /v1/catalog/services."""
        catalog = self._client.catalog
        _, names = await self._run(catalog.services, "catalog")
        return sorted(names or {})

    async def instances(self, name: str) -> list[Instance]:
        """GET /v1/health/service/<name>."""
        health = self._client.health
        _, entries = await self._run(lambda: health.service(name), "health")
        found = []
        for entry in entries or []:
            service = entry.get("Service") or {}
            node = entry.get("Node") or {}
            found.append(
                Instance(
                    name=service.get("Service", name),
                    service_id=service.get("ID", ""),
                    address=service.get("Address") or node.get("Address", ""),
                    port=int(service.get("Port") or 0),
                    status=worst([c.get("Status", "") for c in entry.get("Checks") or []]),
                    meta=dict(service.get("Meta") or {}),
                    tags=tuple(service.get("Tags") or ()),
                )
            )
        return found

    async def close(self) -> None:
        """Stop the client's thread (a call still hanging is abandoned)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
