"""Asking what is running: every `$SRV` answer on NATS, and Consul's `nexus-*` services."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.micro.service import ServiceVerb, control_subject

from nexus_bus.constants import SERVICE_PREFIX
from nexus_bus.discovery.inventory import ServiceRow, merge, rows_from_srv
from nexus_bus.discovery.registry import Instance, RegistryUnavailable, ServiceRegistry

_decoder = msgspec.json.Decoder(dict[str, Any])


async def gather_srv_stats(
    nc: Client, *, wait_s: float, quiet_s: float = 0.25
) -> list[dict[str, Any]]:
    """Every answer to `$SRV.STATS`: at most `wait_s`, and once one came, until `quiet_s`
    passes without another.

    Like `nats micro ls`, a request with many answers: each service instance replies itself.
    The first answer may take a while (a busy worker answers late): it is waited for.
    """
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []
    subscription = await nc.subscribe(inbox)
    try:
        await nc.publish(control_subject(ServiceVerb.STATS), b"", reply=inbox)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while (left := deadline - loop.time()) > 0:
            try:
                timeout = min(quiet_s, left) if answers else left
                msg = await subscription.next_msg(timeout=timeout)
            except nats.errors.TimeoutError:
                break
            with contextlib.suppress(msgspec.DecodeError):
                answers.append(_decoder.decode(msg.data))
    finally:
        with contextlib.suppress(nats.errors.Error):
            await subscription.unsubscribe()
    return answers


async def consul_instances(registry: ServiceRegistry) -> list[Instance]:
    """Every instance of every `nexus-*` service Consul knows, with its health.

    Raises:
        RegistryUnavailable: Consul cannot be reached.
    """
    found: list[Instance] = []
    for name in await registry.service_names():
        if name.startswith(SERVICE_PREFIX):
            found.extend(await registry.instances(name))
    return found


async def survey(
    nc: Client | None, registry: ServiceRegistry | None, *, wait_s: float
) -> tuple[list[ServiceRow], str | None]:
    """The rows of `nexus-bus services` from whichever sources are given, and why Consul
    could not be asked (None: it answered, or was not given): the `$SRV` rows still count,
    a Consul outage being when an operator needs them most."""
    srv = rows_from_srv(await gather_srv_stats(nc, wait_s=wait_s)) if nc is not None else []
    try:
        consul = await consul_instances(registry) if registry is not None else []
    except RegistryUnavailable as exc:
        return merge(srv, []), exc.detail
    return merge(srv, consul), None
