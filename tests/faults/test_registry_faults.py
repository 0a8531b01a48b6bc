"""The registry view across a NATS restart: never a 404 for a declared op, and it recovers."""

from __future__ import annotations

import asyncio

import pytest

from nexus_bus import Gateway, NoResponders, UnknownOperation, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import NexusError
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
            with pytest.raises(NoResponders):
                await gw.request(op, "hello", {}, timeout=5)
        with pytest.raises(UnknownOperation):  # and the view works again
            await gw.request(f"never{uid}", "x", {}, timeout=5)
    finally:
        await gw.close()
