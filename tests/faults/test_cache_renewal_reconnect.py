"""A shim cut off from NATS while the data bucket came back hears of it once reconnected.

The shim reaches nats-server through a TCP relay this test can cut: the worker creates the
bucket again while the shim is away, so the shim misses the announcement (`Cache.distrust`).
Before, its cached reads answered the old bucket's value until the entry expired.
"""

from __future__ import annotations

import asyncio

import httpx

from nexus_bus import Gateway, NotFound, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import builtin_groups
from tests.conftest import make_settings
from tests.helpers import delete_streams, eventually
from tests.integration.http_shim import bearer, running_shim
from tests.relay import relay_to


async def test_a_shim_away_while_the_bucket_came_back_stops_serving_its_entries(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    direct = make_settings(local_nats.url, redis_url, cache={"enabled": True})
    worker = Worker(direct, builtin_groups(["data"]))
    await worker.start()
    gw = await Gateway.connect(direct, token=admin_token)
    kept = f"kept.{uid}"
    try:
        await gw.request("data", "put", {"key": kept, "value": "old"})
        async with (
            relay_to(local_nats) as relay,
            running_shim(relay.settings(redis_url)) as shim,
            httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token)) as http,
        ):
            read = await http.post("/v1/data/get", json={"key": kept})
            assert read.json()["value"] == "old"  # from the shim's cache
            shim_nc = shim.app.nc
            assert shim_nc is not None
            await relay.cut()
            await eventually(lambda: not shim_nc.is_connected, "the shim cut off", 10)
            # The bucket is lost, and created again by the next write.
            await delete_streams(local_nats.url, "KV_nexus_data")
            await gw.request("data", "put", {"key": f"other.{uid}", "value": 1}, timeout=5)
            await relay.open()
            await eventually(lambda: shim_nc.is_connected, "the shim reconnected", 15)
            for _ in range(50):
                read = await http.post("/v1/data/get", json={"key": kept})
                if read.status_code == 404:
                    break
                await asyncio.sleep(0.1)
            assert read.status_code == 404, read.text
    finally:
        await gw.close()
        await worker.drain(1)


async def test_a_worker_away_while_the_bucket_came_back_stops_serving_its_entries(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    """The same for a worker: the one that creates the bucket again announces it; the one
    cut off at that moment looks for itself once it is back."""
    direct = make_settings(local_nats.url, redis_url, cache={"enabled": True})
    first = Worker(direct, builtin_groups(["data"]))
    await first.start()
    gw = await Gateway.connect(direct, token=admin_token)
    kept = f"kept.{uid}"
    away: Worker | None = None
    try:
        async with relay_to(local_nats) as relay:
            away = Worker(relay.settings(redis_url), builtin_groups(["data"]))
            await away.start()
            await gw.request("data", "put", {"key": kept, "value": "old"})
            for _ in range(4):  # both workers have read it: cached in Redis
                assert (await gw.request("data", "get", {"key": kept}))["value"] == "old"
            await relay.cut()
            await eventually(lambda: not away.nc.is_connected, "the worker cut off", 10)
            await delete_streams(local_nats.url, "KV_nexus_data")
            await gw.request("data", "put", {"key": f"other.{uid}", "value": 1}, timeout=5)
            await relay.open()
            await eventually(lambda: away.nc.is_connected, "the worker reconnected", 15)
            await first.drain(1)  # only the worker that was away answers from now on
            for _ in range(50):
                try:
                    got = await gw.request("data", "get", {"key": kept}, timeout=2)
                except NotFound:
                    break
                assert got["value"] == "old"
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the worker that was away still serves the old entry")
    finally:
        await gw.close()
        await first.drain(1)
        if away is not None:
            await away.drain(1)
