"""A connection whose server goes silent without closing it (a partition, frozen here by a
relay) is declared stale after `max_outstanding_pings` unanswered PINGs sent
`ping_interval_s` apart, and replaced. With nats-py's defaults (120 s, 2) a worker or shim
cut off that way hears nothing for up to 6 minutes.
"""

from __future__ import annotations

import asyncio
import time

import nats
from nats.aio.msg import Msg

from nexus_bus.bus.connection import broker_options, connect_nats
from nexus_bus.config import NatsSettings
from nexus_bus.embedded import ServerProcess
from tests.relay import relay_to


async def test_a_connection_gone_silent_is_replaced_within_its_ping_bound(
    local_nats: ServerProcess, uid: str
) -> None:
    async with relay_to(local_nats) as relay:
        settings = NatsSettings(
            url=f"nats://127.0.0.1:{relay.port}",
            ping_interval_s=1,
            max_outstanding_pings=1,
            reconnect_wait_s=0.2,
        )
        nc = await connect_nats(settings)
        other = await nats.connect(local_nats.url)
        heard: asyncio.Queue[bytes] = asyncio.Queue()

        async def hear(msg: Msg) -> None:
            heard.put_nowait(msg.data)

        try:
            await nc.subscribe(f"part.{uid}", cb=hear)
            await nc.flush()
            reconnects = nc.stats["reconnects"]
            relay.freeze()  # the old connection stays open and carries nothing
            frozen = time.monotonic()
            while nc.stats["reconnects"] == reconnects:
                # Stale after two silent intervals; a new connection through the relay.
                assert time.monotonic() - frozen < 6, "still on the silent connection"
                await asyncio.sleep(0.05)
            async with asyncio.timeout(5):  # resubscribed on the new connection
                while heard.empty():
                    await other.publish(f"part.{uid}", b"after")
                    await asyncio.sleep(0.1)
            assert await heard.get() == b"after"
        finally:
            await nc.close()
            await other.close()


def test_workers_connect_with_the_same_ping_bound() -> None:
    settings = NatsSettings(ping_interval_s=7, max_outstanding_pings=3)
    options = broker_options(settings)
    assert (options["ping_interval"], options["max_outstanding_pings"]) == (7, 3)
    assert (NatsSettings().ping_interval_s, NatsSettings().max_outstanding_pings) == (10, 2)
