"""A worker (or a shim) holding a key in its L1 is paused (SIGSTOP): a write waits out its read
lease, at most the lease time, and it never serves the old value once resumed."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import httpx

from nexus_bus import Gateway
from nexus_bus.embedded import ServerProcess, free_port
from tests.conftest import issue_test_token, make_settings, open_services
from tests.faults.test_cache_linearizable import (
    LEASE_S,
    Processes,
    _env,
    _serving_data,
    _shim_ready,
)


async def test_a_paused_lease_holder_delays_a_write_by_at_most_its_lease(
    local_nats: ServerProcess, local_redis: ServerProcess, tmp_path: Path, uid: str
) -> None:
    redis = local_redis.url + "/0"
    procs = Processes(_env(local_nats.url, redis), tmp_path)
    settings = make_settings(
        local_nats.url, redis, cache={"local_ttl_s": LEASE_S}, jobs={"enabled": False}
    )
    key = f"held.{uid}"
    try:
        procs.start("holder", "worker", "--ops", "data")  # the only worker serving `data`
        await _serving_data(local_nats.url, 1)
        gateway = await Gateway.connect(settings, token=issue_test_token(("data:*",)))
        async with open_services(settings) as writer:  # a writer beside it, in this process
            try:
                await writer.records.put(key, b'"v1"')
                for _ in range(2):  # a Redis hit (the read lease), then an L1 hit
                    assert (await gateway.request("data", "get", {"key": key}))["value"] == "v1"
                # A Redis younger than one lease makes every write wait (its lost holders):
                # let this fresh one age first, so that only the holder's lease is measured.
                await asyncio.sleep(LEASE_S)

                started = time.monotonic()
                await writer.records.put(key, b'"v2"')  # the holder acknowledges at once
                assert time.monotonic() - started < LEASE_S / 2
                assert (await gateway.request("data", "get", {"key": key}))["value"] == "v2"

                procs.signal("holder", signal.SIGSTOP)
                started = time.monotonic()
                await writer.records.put(key, b'"v3"')  # waits out the holder's lease
                waited = time.monotonic() - started
                procs.signal("holder", signal.SIGCONT)
                assert waited <= LEASE_S + 0.25, f"the write waited {waited:.3f} s"
                assert waited >= LEASE_S * 0.5, f"the write did not wait ({waited:.3f} s)"
                got = await gateway.request("data", "get", {"key": key}, timeout=5)
                assert got["value"] == "v3"
            finally:
                await gateway.close()
    finally:
        procs.close()



async def test_a_paused_shim_holding_a_key_delays_a_write_by_at_most_its_lease(
    local_nats: ServerProcess, local_redis: ServerProcess, tmp_path: Path, uid: str
) -> None:
    """The shim's cached reads (docs/cache.md): a shim process is a lease holder like a
    worker, so pausing it costs writes its lease at most, and it serves no old value after."""
    redis = local_redis.url + "/0"
    procs = Processes(_env(local_nats.url, redis), tmp_path)
    settings = make_settings(
        local_nats.url, redis, cache={"local_ttl_s": LEASE_S}, jobs={"enabled": False}
    )
    key, port = f"shim.{uid}", free_port()
    auth = {"Authorization": f"Bearer {issue_test_token(('data:*',))}"}
    try:
        procs.start("worker", "worker", "--ops", "data")
        procs.start("shim", "shim", "--port", str(port))
        await asyncio.gather(_serving_data(local_nats.url, 1), _shim_ready(port))
        async with open_services(settings) as writer, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=auth, timeout=5
        ) as http:

            async def read() -> object:
                got = await http.post("/v1/data/get", json={"key": key})
                assert got.status_code == 200, got.text
                return got.json()["value"]

            await writer.records.put(key, b'"v1"')
            assert await read() == "v1" and await read() == "v1"  # the shim now holds it
            await asyncio.sleep(LEASE_S)  # a Redis younger than one lease: see above

            started = time.monotonic()
            await writer.records.put(key, b'"v2"')  # the shim acknowledges at once
            assert time.monotonic() - started < LEASE_S / 2
            assert await read() == "v2" and await read() == "v2"

            procs.signal("shim", signal.SIGSTOP)
            started = time.monotonic()
            await writer.records.put(key, b'"v3"')  # waits out the shim's lease
            waited = time.monotonic() - started
            procs.signal("shim", signal.SIGCONT)
            assert waited <= LEASE_S + 0.25, f"the write waited {waited:.3f} s"
            assert waited >= LEASE_S * 0.5, f"the write did not wait ({waited:.3f} s)"
            assert await read() == "v3"
    finally:
        procs.close()
