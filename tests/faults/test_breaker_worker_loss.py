"""One of two workers killed with requests in flight does not open the op's breaker.

The requests it held time out together, seconds later, while the other worker answers calls
begun since. Counted as consecutive failures, they opened the op's breaker for every caller
on every replica (a chaos soak: `503 circuit_open` a few seconds after one of two workers
was SIGKILLed). Two real worker processes, real nats-server and redis-server.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import nats.aio.client
import nats.errors

from nexus_bus import Gateway
from nexus_bus.errors import UpstreamTimeout
from nexus_bus.resilience import BreakerState
from tests.conftest import make_settings
from tests.integration.test_worker_runtime import slowpoke_subscribed, slowpoke_worker

POLICY = {"defaults": {"attempts": 1, "breaker_failures": 3}}


async def _instances(nc: nats.aio.client.Client) -> int:
    """How many workers of `slowpoke` answer `$SRV.PING` within 0.3 s."""
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.PING.nexus-slowpoke", b"", reply=inbox)
    count = 0
    try:
        while True:
            await sub.next_msg(timeout=0.3)
            count += 1
    except nats.errors.TimeoutError:
        return count
    finally:
        await sub.unsubscribe()


async def test_a_worker_killed_with_requests_in_flight_leaves_the_breaker_closed(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    # Calls get the default budget, 2 s here: a shorter one would be the caller's haste, which
    # the breaker never counts (docs/resilience.md).
    settings = make_settings(
        nats_url, redis_url, resilience=POLICY, client={"default_timeout_ms": 2000}
    )
    doomed = slowpoke_worker(nats_url, redis_url, tmp_path)
    survivor = slowpoke_worker(nats_url, redis_url, tmp_path)
    nc = await nats.connect(nats_url)
    gateway = await Gateway.connect(settings)
    try:
        await slowpoke_subscribed(nc)
        for _ in range(100):  # until both answer the discovery ping
            if await _instances(nc) >= 2:
                break
            await asyncio.sleep(0.1)
        # 20 calls of 0.5 s: about half of them on the worker about to die.
        slow = [
            asyncio.create_task(
                gateway.request("slowpoke", "nap", {"seconds": 0.5})
            )
            for _ in range(20)
        ]
        await asyncio.sleep(0.3)
        doomed.kill()
        await asyncio.to_thread(doomed.wait, 10)  # its socket is closed: the server drops it
        await asyncio.sleep(0.1)
        quick = 0
        while not all(call.done() for call in slow):  # the survivor keeps answering
            await gateway.request("slowpoke", "nap", {"seconds": 0})
            quick += 1
            await asyncio.sleep(0.05)
        outcomes = await asyncio.gather(*slow, return_exceptions=True)
        lost = [o for o in outcomes if isinstance(o, UpstreamTimeout)]
        assert all(isinstance(o, dict | UpstreamTimeout) for o in outcomes), outcomes
        assert len(lost) >= 3, "too few calls on the killed worker to test anything"
        assert quick > 0
        # Before: the timeouts arrived within milliseconds, 3 in a row, and the breaker
        # opened while the survivor served; the next call was 503 circuit_open.
        assert gateway.policies is not None
        assert gateway.policies.guard.state("slowpoke") is BreakerState.CLOSED
        assert await gateway.request("slowpoke", "nap", {"seconds": 0})
    finally:
        await gateway.close()
        await nc.close()
        for proc in (doomed, survivor):
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
