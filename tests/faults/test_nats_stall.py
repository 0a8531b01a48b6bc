"""A NATS server that stalls (SIGSTOP) past a round trip's timeout: the connection that gave
up waiting keeps hearing once the server resumes.

A nats-py `flush(timeout)` that times out leaves its PONG's future cancelled in the client's
queue. When that PONG arrives, the read loop stops for good (`InvalidStateError`), and the
connection stays "connected", hears nothing, and passes every later flush. The gateway's round
trips (`round_trip`: subscriptions made live, the worker's Consul health check, the jobs'
drain) go through a subscription of the connection's own instead.
"""

from __future__ import annotations

import asyncio
import signal

import nats
import pytest
from nats.aio.msg import Msg

from nexus_bus import Worker
from nexus_bus.bus.connection import round_trip
from nexus_bus.embedded import ServerProcess
from tests.conftest import make_settings
from tests.consul_double import ConsulAgentDouble
from tests.helpers import eventually, pause
from tests.integration.discovery_ops import discovery_ops


def resume(server: ServerProcess) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGCONT)


async def test_a_round_trip_given_up_leaves_the_connection_hearing(
    local_nats: ServerProcess, uid: str
) -> None:
    nc, other = await nats.connect(local_nats.url), await nats.connect(local_nats.url)
    heard: asyncio.Queue[bytes] = asyncio.Queue()

    async def hear(msg: Msg) -> None:
        heard.put_nowait(msg.data)

    try:
        await nc.subscribe(f"hear.{uid}", cb=hear)
        await round_trip(nc)
        pause(local_nats.proc)
        try:
            with pytest.raises(nats.errors.TimeoutError):
                await round_trip(nc, timeout_s=0.5)
        finally:
            resume(local_nats)
        await other.publish(f"hear.{uid}", b"after")
        async with asyncio.timeout(5):
            assert await heard.get() == b"after"  # a deaf read loop never delivers it
        await round_trip(nc, timeout_s=5)
    finally:
        await nc.close()
        await other.close()


async def test_a_worker_whose_server_stalled_past_a_health_check_still_answers(
    local_nats: ServerProcess, redis_url: str, uid: str
) -> None:
    op = f"stall{uid}"
    with ConsulAgentDouble() as consul:
        settings = make_settings(
            local_nats.url,
            redis_url,
            consul={"enabled": True, "address": consul.address, "ttl_s": 1.5},
        )
        worker = Worker(settings, [discovery_ops(op)])
        await worker.start()
        caller = await nats.connect(local_nats.url)
        try:

            def status() -> str | None:
                ids = [s["ID"] for s in consul.services.values() if s["Service"] == f"nexus-{op}"]
                check = consul.check_of(ids[0]) if ids else None
                return None if check is None else check.status

            await eventually(lambda: status() == "passing", "passing", 10)
            pause(local_nats.proc)
            try:
                # A check every 0.5 s, each given up after 1 s: critical, and the TTL lapses.
                await eventually(lambda: status() == "critical", "critical while stalled", 10)
            finally:
                resume(local_nats)
            await eventually(lambda: status() == "passing", "passing once resumed", 10)
            answer = await caller.request(f"nexus.{op}.ok", b'{"note":"n"}', timeout=5)
            assert answer.data == b'{"note":"n"}'
        finally:
            await caller.close()
            await worker.drain(1)
