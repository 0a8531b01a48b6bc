"""The registry view across a NATS restart: never a 404 for a declared op, and it recovers."""

from __future__ import annotations

import asyncio

import pytest

from nexus_bus import Gateway, NoResponders, UnknownOperation, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import CircuitOpen, NexusError
from tests.conftest import make_settings
from tests.integration.registry_ops import group


async def test_an_op_declared_after_a_restart_is_never_404(
    local_nats: ServerProcess, redis_url: str, uid: str
) -> None:
    settings = make_settings(local_nats.url, redis_url)
    gw = await Gateway.connect(settings)
    try:
        with pytest.raises(UnknownOperation):  # the gateway's view is running now
            await gw.request(f"before{uid}", "x", {})
        local_nats.restart()  # same port and JetStream directory; the watch's consumer is lost
        op = f"after{uid}"
        worker = Worker(settings, [group(op)])
        for _ in range(100):  # the worker's connection comes up once the server is back
            try:
                await worker.start()
                break
            except NexusError:
                await asyncio.sleep(0.1)
        assert await gw.request(op, "hello", {}, timeout=5) == {"hello": op}
        await worker.drain(1)
        for _ in range(3):  # declared after the restart: 503 from the first answer on
            # (no responders, until the op's breaker opens on them: circuit_open, 503 too)
            with pytest.raises((NoResponders, CircuitOpen)) as refused:
                await gw.request(op, "hello", {}, timeout=5)
            assert refused.value.http_status == 503
        # And the view works again: the watch lost with the server is re-read in the
        # background (a question never waits longer than registry.sync_timeout_s on it, so
        # the first answers may still be 503), and an undeclared name is 404 once more.
        for _ in range(50):
            try:
                await gw.request(f"never{uid}", "x", {}, timeout=5)
            except UnknownOperation:
                break
            except (NoResponders, CircuitOpen):
                await asyncio.sleep(0.1)
        else:
            raise AssertionError("the registry view did not recover within 5 s")
    finally:
        await gw.close()
