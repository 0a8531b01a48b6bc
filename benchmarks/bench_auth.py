"""The per-request cost of authentication on the NATS path, beside the unauthenticated path.

    python -m benchmarks.bench_auth [--seconds 1.5] [--repeat 5] [--concurrency 1,16]
    python -m benchmarks.bench_auth --lookups [--rounds 5000]

One run starts nats-server, redis-server and four responders, and measures each the same way
(gateway client → NATS request → responder → reply):

- raw nats-py responder (the floor);
- our worker with auth off (`auth.enabled=false`);
- our worker with auth on and the verification cache (the default, `cache_ttl_s=5`);
- our worker with auth on and no cache (`cache_ttl_s=0`): every request checks the Ed25519
  signature and asks the revocation store (Redis, whose records JetStream KV keeps)
  whether the token is revoked.

It also times the authenticator alone, in this process, for the same three cases.

`--lookups` starts only nats-server and redis-server and times one revocation lookup, one
after another: the store's `is_revoked` (an id not revoked, and one revoked: one Redis
pipeline of two EXISTS) beside a bare Redis `EXISTS` and a bare KV get (what a lookup cost
while it read JetStream KV), and one re-seed of Redis from the KV (docs/auth.md).
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
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors

from benchmarks.harness import Result, closed_loop, print_table, stop_all, warm_up
from nexus_bus import (
    Gateway,
    Operations,
    RequestContext,
    Settings,
    Worker,
    load_settings,
)
from nexus_bus.auth import (
    FailureLimiter,
    NoAuthentication,
    TokenAuthenticator,
    create_token_service,
    generate_key,
)
from nexus_bus.auth.authenticator import bearer_token
from nexus_bus.auth.operator import issue_token
from nexus_bus.auth.revocation import SEEDED_FIELD
from nexus_bus.auth.service import new_jti, revocation_store
from nexus_bus.constants import AUTH_REVOKED_BUCKET, AUTH_REVOKED_KEY
from nexus_bus.embedded import nats_server, redis_server
from nexus_bus.observability import configure_logging
from nexus_bus.redis_client import create_redis

RAW_SUBJECT = "bench.raw.auth"
MODES = {"plain": None, "cached": 5.0, "nocache": 0.0}  # mode -> auth.cache_ttl_s (None: off)


class Echo(msgspec.Struct, frozen=True, kw_only=True):
    """The echo request and reply."""

    msg: str


def echo_group(mode: str) -> Operations:
    """`bench-<mode>.echo`: returns its request; needs scope `bench-<mode>:echo`."""
    ops = Operations(f"bench-{mode}", description="Benchmark no-op.")

    @ops.action("echo")
    async def echo(req: Echo, ctx: RequestContext) -> Echo:
        return req

    return ops


def bench_settings(nats_url: str, redis_url: str, keys: str, mode: str) -> Settings:
    """Settings for one responder mode."""
    ttl = MODES[mode]
    auth: dict[str, Any] = {"keys_dir": keys, "enabled": ttl is not None}
    if ttl is not None:
        auth["cache_ttl_s"] = ttl
    return load_settings(
        nats={"url": nats_url}, redis={"url": redis_url}, log={"level": "WARNING"}, auth=auth
    )


async def serve_worker(mode: str, nats_url: str, redis_url: str, keys: str) -> None:
    """Run one worker for `mode` until killed."""
    configure_logging("bench-worker", "ERROR")
    await Worker(bench_settings(nats_url, redis_url, keys, mode), [echo_group(mode)]).run()


async def serve_raw(nats_url: str) -> None:
    """A raw nats-py responder: the floor any runtime is measured against."""
    nc = await nats.connect(nats_url)

    async def respond(msg: Any) -> None:
        await msg.respond(msg.data)

    await nc.subscribe(RAW_SUBJECT, queue="bench", cb=respond)
    await asyncio.Event().wait()


async def micro(settings: Settings, token: str, rounds: int = 20_000) -> dict[str, float]:
    """Microseconds per `authenticate()` call, in this process, per mode."""
    nc = await nats.connect(settings.nats.url)
    redis = create_redis(settings.redis)
    results: dict[str, float] = {}
    headers = {"Authorization": f"Bearer {token}"}
    operation = next(iter(echo_group("cached")))
    try:
        for mode, ttl in MODES.items():
            auth: Any
            if ttl is None:
                auth = NoAuthentication()
            else:
                tuned = settings.model_copy(
                    update={"auth": settings.auth.model_copy(update={"cache_ttl_s": ttl})}
                )
                service = create_token_service(tuned, redis, nc)
                limiter = FailureLimiter.from_settings(tuned.auth)
                auth = TokenAuthenticator(service.verifier, limiter)
            n = rounds if ttl != 0 else rounds // 10  # each uncached call waits for Redis
            for _ in range(100):
                await auth.authenticate(headers, operation)
            samples = []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(n // 5):
                    await auth.authenticate(headers, operation)
                samples.append((time.perf_counter() - started) / (n // 5) * 1e6)
            results[mode] = statistics.median(samples)
        codec = create_token_service(settings, redis, nc).codec
        n = rounds // 10
        started = time.perf_counter()
        for _ in range(n):
            codec.verify(token, time.time())
        results["signature + claims only (no store)"] = (time.perf_counter() - started) / n * 1e6
        started = time.perf_counter()
        for _ in range(rounds):
            bearer_token(headers)
        results["Authorization header parse"] = (time.perf_counter() - started) / rounds * 1e6
    finally:
        await redis.aclose()
        await nc.close()
    return results


async def lookups(nats_url: str, redis_url: str, rounds: int) -> None:
    """Microseconds per revocation lookup, one at a time: the store against bare Redis EXISTS
    and a bare KV get; then one re-seed."""
    configure_logging("bench", "ERROR")
    settings = load_settings(nats={"url": nats_url}, redis={"url": redis_url})
    nc = await nats.connect(nats_url)
    redis = create_redis(settings.redis)
    store = revocation_store(settings, redis, nc)
    revoked = new_jti()
    await store.revoke(revoked)
    await store.is_revoked(revoked)  # seeds Redis: the marker is set
    kv = await nc.jetstream().key_value(AUTH_REVOKED_BUCKET)
    cases: dict[str, Any] = {
        "store is_revoked, not revoked": lambda: store.is_revoked(new_jti()),
        "store is_revoked, revoked": lambda: store.is_revoked(revoked),
        "Redis HEXISTS alone, revoked": lambda: redis.hexists(AUTH_REVOKED_KEY, revoked),
        "KV get alone (nats-py), revoked": lambda: kv.get(revoked),
    }
    print(f"revocation lookup, sequential, median of 5 x {rounds // 5} (us per lookup; p99):")
    try:
        for name, call in cases.items():
            for _ in range(200):
                await call()
            means, every = [], []
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(rounds // 5):
                    before = time.perf_counter()
                    await call()
                    every.append(time.perf_counter() - before)
                means.append((time.perf_counter() - started) / (rounds // 5) * 1e6)
            p99 = statistics.quantiles(every, n=100)[98] * 1e6
            print(f"  {name:<44}{statistics.median(means):8.1f}  {p99:8.1f}")
        for _ in range(999):  # 1,000 records in the bucket
            await store.revoke(new_jti())
        seeds = []
        for _ in range(5):
            await redis.hdel(AUTH_REVOKED_KEY, SEEDED_FIELD)  # as if Redis lost its data
            started = time.perf_counter()
            await store.is_revoked(revoked)
            seeds.append((time.perf_counter() - started) * 1e3)
        print(f"  re-seed of 1,000 records, then the lookup (ms, median of 5){'':<6}"
              f"{statistics.median(seeds):8.1f}")
    finally:
        await redis.aclose()
        await nc.close()


async def measure(
    nats_url: str, redis_url: str, keys: str, seconds: float, levels: list[int], repeat: int
) -> None:
    """Every target at every concurrency, then the in-process figures."""
    configure_logging("bench", "ERROR")
    settings = bench_settings(nats_url, redis_url, keys, "cached")
    token = issue_token(settings, "bench", frozenset({"bench-cached:echo", "bench-nocache:echo"}),
                        3600).token
    raw_nc = await nats.connect(nats_url)
    gw = await Gateway.connect(settings, token=token)
    payload = msgspec.json.encode({"msg": "hello"})
    await warm_up(
        [
            lambda: raw_nc.request(RAW_SUBJECT, payload, timeout=5),
            *(lambda m=mode: gw.request(f"bench-{m}", "echo", payload) for mode in MODES),
        ]
    )

    async def raw() -> None:
        await raw_nc.request(RAW_SUBJECT, payload, timeout=5)

    def ours(mode: str) -> Any:
        async def call() -> None:
            await gw.request(f"bench-{mode}", "echo", payload)

        return call

    labels = {"plain": "worker, auth off", "cached": "worker, auth + cache",
              "nocache": "worker, auth, no cache"}
    baseline: dict[int, Result] = {}
    rows: list[Result] = []
    by_mode: dict[tuple[str, int], Result] = {}
    for c in levels:
        # Rounds interleave the targets and each keeps its best (highest-throughput) round, so
        # a burst of other load on this small machine does not land on one target alone.
        best: dict[str, Result] = {}
        for _ in range(repeat):
            for name, call in (("raw", raw), *((m, ours(m)) for m in MODES)):
                label = labels.get(name, "raw nats-py request/reply")
                r = await closed_loop(label, call, concurrency=c, seconds=seconds)
                if name not in best or r.rps > best[name].rps:
                    best[name] = r
        baseline[c] = best["raw"]
        rows.extend(best[name] for name in ("raw", *MODES))
        by_mode.update({(mode, c): best[mode] for mode in MODES})
    print_table(
        f"NATS path: gateway client -> worker (echo), auth off / cached / uncached "
        f"(best of {repeat} interleaved rounds)", rows, baseline,
    )
    print("\nPer-request cost of authentication (p50 latency minus the auth-off worker's):")
    for c in levels:
        plain = by_mode[("plain", c)]
        for mode in ("cached", "nocache"):
            r = by_mode[(mode, c)]
            print(f"  conc {c:>3}  {labels[mode]:<24} +{(r.p50_ms - plain.p50_ms) * 1000:7.0f} us"
                  f"  ({r.rps / plain.rps:.2f}x the auth-off throughput)")
    await gw.close()
    await raw_nc.close()
    figures = await micro(settings, token)
    names = {"plain": "auth off (NoAuthentication)", "cached": "auth + cache (hit)",
             "nocache": "auth, no cache (verify + KV get)"}
    print("\nauthenticate() alone, in this process (us per call):")
    for name, us in figures.items():
        print(f"  {names.get(name, name):<40}{us:8.1f}")


def main() -> int:
    """Start the servers and responders, measure, stop everything."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--lookups", action="store_true", help="revocation lookups only")
    parser.add_argument("--rounds", type=int, default=5000)
    parser.add_argument("--serve", nargs=4, metavar=("MODE", "NATS", "REDIS", "KEYS"))
    parser.add_argument("--serve-raw")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve_worker(*args.serve))
        return 0
    if args.serve_raw:
        asyncio.run(serve_raw(args.serve_raw))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.lookups:
        with tempfile.TemporaryDirectory() as tmp:
            nats_proc = nats_server(Path(tmp) / "nats").start()
            redis_proc = redis_server(Path(tmp) / "redis").start()
            try:
                print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}")
                asyncio.run(lookups(nats_proc.url, redis_proc.url + "/0", args.rounds))
            finally:
                redis_proc.stop()
                nats_proc.stop()
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys"
        generate_key(keys)
        nats_proc = nats_server(Path(tmp) / "nats").start()
        redis_proc = redis_server(Path(tmp) / "redis").start()
        redis_url = redis_proc.url + "/0"
        me = [sys.executable, "-m", "benchmarks.bench_auth"]
        children = [
            subprocess.Popen([*me, "--serve", mode, nats_proc.url, redis_url, str(keys)])
            for mode in MODES
        ]
        children.append(subprocess.Popen([*me, "--serve-raw", nats_proc.url]))
        try:
            print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  "
                  f"seconds/point: {args.seconds}  token alg: EdDSA (Ed25519)")
            asyncio.run(
                measure(nats_proc.url, redis_url, str(keys), args.seconds, levels, args.repeat)
            )
        finally:
            stop_all(children)
            redis_proc.stop()
            nats_proc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
