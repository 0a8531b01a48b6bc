"""Waiting until every process of a stack answers, before `nexus-bus up` says it is up.

A process that has started is not yet serving: a worker connects, creates its streams and
loads its keys before it subscribes, and until then a request gets `no responders`. So `up`
asks each process what a client would: the shim's `GET /readyz` must answer 200, and each
op's queue group must answer a request on `nexus.<op>.<action>` — any reply counts (a 401 to
this unauthenticated probe proves a worker took it). The probe's body is not JSON, so a
public action fails validation before its handler: a probe never runs one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import nats.errors
from nats.aio.client import Client

from nexus_bus.bus.connection import connect_nats
from nexus_bus.bus.subjects import client_subject
from nexus_bus.config import NatsSettings
from nexus_bus.errors import Unavailable
from nexus_bus.operations import Operations

PROBE_BODY: Final = b"\xff"  # not JSON: never reaches a handler
_INTERVAL_S: Final = 0.1
_PROBE_TIMEOUT_S: Final = 0.5


@dataclass(frozen=True, slots=True)
class Probe:
    """One thing to wait for: a name to print and what to ask."""

    name: str
    subject: str | None = None  # a NATS request to this subject gets any reply
    url: str | None = None  # a GET to this URL answers 200


def op_probes(groups: Iterable[Operations]) -> list[Probe]:
    """A probe per op: a request to one of its declared actions, preferring a non-public one."""
    probes = []
    for group in groups:
        actions = list(group)
        if not actions:
            continue
        chosen = next((o for o in actions if not o.public), actions[0])
        probes.append(Probe(group.op, subject=client_subject(group.op, chosen.action)))
    return probes


async def _http_ok(url: str) -> bool:
    parts = urlsplit(url)
    try:
        async with asyncio.timeout(_PROBE_TIMEOUT_S):
            reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 80)
            try:
                writer.write(
                    f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                status_line = await reader.readline()
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return status_line.split(b" ")[1:2] == [b"200"]


async def _answers(nc: Client, subject: str) -> bool:
    try:
        await nc.request(subject, PROBE_BODY, timeout=_PROBE_TIMEOUT_S)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return False
    return True


async def wait_ready(
    nats_settings: NatsSettings,
    probes: list[Probe],
    *,
    timeout_s: float,
    report: Callable[[list[str]], None],
    alive: Callable[[], bool] = lambda: True,
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """Return once every probe passes; `report` gets the names still waited for on each change.

    Raises:
        Unavailable: `timeout_s` passed, or `alive()` turned false (a process exited).
    """
    pending = list(probes)
    deadline = clock() + timeout_s
    nc = await connect_nats(nats_settings, name="nexus-bus-up")
    try:
        reported: list[str] = []
        while pending:
            names = [p.name for p in pending]
            if names != reported:
                report(names)
                reported = names
            if not alive():
                raise Unavailable(f"a stack process exited while waiting for {', '.join(names)}")
            if clock() > deadline:
                raise Unavailable(f"no answer within {timeout_s:g}s from {', '.join(names)}")
            results = await asyncio.gather(*(_passes(nc, p) for p in pending))
            pending = [p for p, ok in zip(pending, results, strict=True) if not ok]
            if pending:
                await asyncio.sleep(_INTERVAL_S)
    finally:
        await nc.close()


async def _passes(nc: Client, probe: Probe) -> bool:
    if probe.url is not None and not await _http_ok(probe.url):
        return False
    return probe.subject is None or await _answers(nc, probe.subject)
