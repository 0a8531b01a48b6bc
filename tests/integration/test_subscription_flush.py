"""A subscription is live for every other connection once `round_trip` returns."""

from __future__ import annotations

import nats
from nats.aio.msg import Msg

from nexus_bus.bus.connection import round_trip


async def test_a_request_right_after_subscribing_finds_its_responder(
    nats_url: str, uid: str
) -> None:
    """nats-py's own `flush()` can return before its SUB is written (docs/runtime.md).

    Over 2,000 rounds a single `flush()` lets a few requests see `no responders` (measured:
    3 in 2,000 on this machine); `round_trip` must let none.
    """
    worker, client = await nats.connect(nats_url), await nats.connect(nats_url)

    async def respond(msg: Msg) -> None:
        await msg.respond(b"ok")

    try:
        for i in range(2000):
            subject = f"flush.{uid}.{i}"
            sub = await worker.subscribe(subject, queue="q", cb=respond)
            await round_trip(worker)
            assert (await client.request(subject, b"", timeout=5)).data == b"ok", i
            await sub.unsubscribe()
    finally:
        await worker.close()
        await client.close()
