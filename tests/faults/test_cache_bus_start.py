"""`CacheBus.start` that does not finish leaves no subscription behind (real nats-server)."""

from __future__ import annotations

import asyncio
import json
import signal
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from nexus_bus.cache.invalidation import CacheBus
from nexus_bus.cache.memory import MemoryEntryStore
from nexus_bus.cache.service import create_cache
from nexus_bus.config import CacheSettings
from nexus_bus.embedded import ServerProcess, free_port, nats_server
from tests import servers
from tests.helpers import pause

NAME = "cache-bus-under-test"


@pytest.fixture
def monitored_nats(tmp_path: Path) -> Iterator[tuple[ServerProcess, int]]:
    """A NATS server of this test's own with its monitoring port (the server's own view of
    every connection's subscriptions)."""
    port = free_port()
    with servers.local(nats_server(tmp_path / "nats", extra_args=["-m", str(port)])) as server:
        yield server, port


def subscriptions(monitor_port: int) -> int:
    """How many subscriptions the server holds for the connection named `NAME`."""
    url = f"http://127.0.0.1:{monitor_port}/connz?subs=1"
    with urllib.request.urlopen(url, timeout=5) as answer:
        connections = json.load(answer)["connections"]
    return sum(len(c.get("subscriptions_list", [])) for c in connections if c.get("name") == NAME)


async def test_a_start_cut_short_unsubscribes_what_it_subscribed(
    monitored_nats: tuple[ServerProcess, int],
) -> None:
    server, monitor = monitored_nats
    nc = await nats.connect(server.url, name=NAME)
    bus = CacheBus(nc, create_cache(MemoryEntryStore(), CacheSettings()), fence_timeout_s=0.5)
    assert server.proc is not None
    try:
        pause(server.proc)  # the SUBs wait in the socket, nothing comes back
        try:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.5):
                    await bus.start()
        finally:
            server.proc.send_signal(signal.SIGCONT)
        # Left subscribed, the half-started bus would take revocations and fences for a
        # cache nobody attached it to (and a second start would subscribe twice).
        await asyncio.sleep(1)  # the server reads what waited, the UNSUBs after the SUBs
        assert await asyncio.to_thread(subscriptions, monitor) == 0
    finally:
        await bus.close()
        await nc.close()
