"""`data.get` on a hot key with the Redis cache vs. straight from JetStream KV, in one run.

    python -m benchmarks.bench_cache [--seconds 3] [--concurrency 16]

Starts its own servers: two nats-servers and one redis-server. End to end: a gateway client
calls a worker process serving `data` on each NATS server, one with the cache off (every get
reads the KV) and one with it on (every get after the first is a Redis hit). In process:
`RecordStore.get` of the KV store vs. the cached store, without the request path around it.
Both sides of a table are measured in alternating slices, so that other load on the machine
falls on both alike; the ratio is the cached figure over the KV one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import uvloop

from benchmarks.harness import Result, print_table, stop_all
from nexus_bus import Gateway, Settings, Worker, load_settings
from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.bus.connection import connect_nats
from nexus_bus.embedded import nats_server, redis_server
from nexus_bus.handlers import builtin_groups
from nexus_bus.jetstream import ensure_data_bucket
from nexus_bus.observability import configure_logging
from nexus_bus.services import close_services, create_services
from nexus_bus.store import KeyValueRecordStore

HOT_KEY = "bench.cache.hot"
HOT_VALUE = {"n": 1, "s": "x" * 256}
Call = Callable[[], Awaitable[object]]


def _settings(nats_url: str, redis_url: str, keys_dir: str, cache: bool) -> Settings:
    """Production defaults (auth on, with a key made for this run), quiet logs."""
    return load_settings(
        nats={"url": nats_url},
        redis={"url": redis_url},
        cache={"enabled": cache},
        auth={"keys_dir": keys_dir},
        log={"level": "WARNING"},
    )


async def serve_worker(nats_url: str, redis_url: str, keys_dir: str, cache: str) -> None:
    """Run a worker serving `data` until SIGTERM."""
    configure_logging("bench-worker", "WARNING")
    settings = _settings(nats_url, redis_url, keys_dir, cache == "on")
    await Worker(settings, builtin_groups(["data"])).run()


def _spawn_worker(
    nats_url: str, redis_url: str, keys_dir: str, cache: bool
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "benchmarks.bench_cache", "--serve-worker",
            nats_url, redis_url, keys_dir, "on" if cache else "off",
        ]
    )


async def _ready(gw: Gateway) -> None:
    """Wait for the worker, writing the hot key (through the cache, when it is on)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            await gw.request("data", "put", {"key": HOT_KEY, "value": HOT_VALUE}, timeout=1)
            return
        except Exception:  # not serving yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def interleaved(
    targets: Sequence[tuple[str, Call]], concurrency: int, seconds: float, slices: int = 6
) -> list[Result]:
    """Measure the targets in alternating slices, so that load from anything else running
    on the machine falls on both alike; one merged result per target."""
    latencies: dict[str, list[float]] = {name: [] for name, _ in targets}
    spent: dict[str, float] = dict.fromkeys(latencies, 0.0)
    errors: dict[str, int] = dict.fromkeys(latencies, 0)
    for _ in range(slices):
        for name, call in targets:
            stop_at = time.perf_counter() + seconds / slices

            async def caller(name: str = name, call: Call = call, stop_at: float = stop_at) -> None:
                while (started := time.perf_counter()) < stop_at:
                    try:
                        await call()
                    except Exception:  # counted in the table; the load goes on
                        errors[name] += 1
                        continue
                    latencies[name].append(time.perf_counter() - started)

            begin = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(concurrency)))
            spent[name] += time.perf_counter() - begin
    results = []
    for name, _ in targets:
        ordered = sorted(latencies[name]) or [0.0]
        p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        results.append(
            Result(
                name, concurrency, len(latencies[name]), errors[name], spent[name],
                statistics.median(ordered) * 1000, p99 * 1000,
            )
        )
    return results


async def end_to_end(
    kv_nats: str, cached_nats: str, redis_url: str, keys_dir: str, seconds: float, levels: list[int]
) -> None:
    """`data.get` through a gateway and a worker process, one worker per NATS server: the
    cache off on one, on on the other, measured in alternating slices."""
    token = TokenCodec(Keyring.from_dir(Path(keys_dir))).issue(
        "bench", frozenset({"*"}), 3600, now=int(time.time()), jti="bench-cache"
    ).token
    body = b'{"key":"%s"}' % HOT_KEY.encode()
    workers = [
        _spawn_worker(kv_nats, redis_url, keys_dir, cache=False),
        _spawn_worker(cached_nats, redis_url, keys_dir, cache=True),
    ]
    gateways = [
        await Gateway.connect(_settings(url, redis_url, keys_dir, cache=False), token=token)
        for url in (kv_nats, cached_nats)
    ]
    try:
        for gw in gateways:
            await _ready(gw)

        async def from_kv() -> None:
            await gateways[0].request("data", "get", body)

        async def from_cache() -> None:
            await gateways[1].request("data", "get", body)

        targets = [("data.get, straight from KV", from_kv), ("data.get, Redis cache", from_cache)]
        for c in levels:
            kv, cached = await interleaved(targets, c, seconds)
            title = f"End to end: gateway -> worker data.get (hot key), c={c}; ratio = cache / KV"
            print_table(title, [kv, cached], {c: kv})
    finally:
        for gw in gateways:
            await gw.close()
        stop_all(workers)


async def in_process(
    nats_url: str, redis_url: str, keys_dir: str, seconds: float, levels: list[int]
) -> None:
    """`RecordStore.get` of the KV store vs. the cached store, in this process."""
    settings = _settings(nats_url, redis_url, keys_dir, cache=True)
    nc = await connect_nats(settings.nats)
    services = await create_services(nc, settings)
    kv = await ensure_data_bucket(services.js, settings.jetstream)
    kv_store = KeyValueRecordStore(kv, services.js, nc=nc)
    await services.records.get(HOT_KEY)  # cached

    async def from_kv() -> None:
        await kv_store.get(HOT_KEY)

    async def from_cache() -> None:
        await services.records.get(HOT_KEY)

    targets = [("RecordStore.get, KV", from_kv), ("RecordStore.get, cached", from_cache)]
    for c in levels:
        kv, cached = await interleaved(targets, c, seconds)
        assert services.cache is not None
        hits = services.cache.stats.hit_ratio("data")
        title = f"In process: the store alone, c={c} (cache hit ratio {hits:.3f})"
        print_table(title, [kv, cached], {c: kv})
    await close_services(services)
    await nc.drain()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", default="16")
    parser.add_argument("--serve-worker", nargs=4)
    args = parser.parse_args()
    if args.serve_worker:
        uvloop.run(serve_worker(*args.serve_worker))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    configure_logging("bench", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        kv_nats = nats_server(Path(tmp) / "nats-kv").start()
        cached_nats = nats_server(Path(tmp) / "nats-cached").start()
        redis = redis_server(Path(tmp) / "redis").start()
        keys_dir = str(Path(tmp) / "keys")
        generate_key(Path(keys_dir), kid="bench")
        redis_url = redis.url + "/0"
        try:
            print(
                f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}"
                f"  seconds/target: {args.seconds}, in alternating slices"
            )
            uvloop.run(
                end_to_end(
                    kv_nats.url, cached_nats.url, redis_url, keys_dir, args.seconds, levels
                )
            )
            uvloop.run(in_process(cached_nats.url, redis_url, keys_dir, args.seconds, levels))
        finally:
            redis.stop()
            cached_nats.stop()
            kv_nats.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
