"""The NATS-native path: gateway client → worker → `echo` / `data.get`, beside raw nats-py.

    python -m benchmarks.bench_nats_path [--seconds 1] [--rounds 5] [--concurrency 1,16,128]

Processes share the machine: nats-server, the responder (our worker, or a raw nats-py
responder doing nothing but `msg.respond(msg.data)`), this load generator, and the Consul
agent double of the tests that the `echo` worker registers with (`echooff` runs the same
no-op with discovery off: no `$SRV`, no Consul, no endpoint counters; docs/discovery.md).
Each target is measured at each concurrency in the same run.

The FastStream anchor (issue 14) is a bare FastStream app answering the same echo (a
subscriber in a queue group, `async def echo(body: dict) -> dict`, FastStream's defaults),
called by the same raw nats-py client with the same contract headers as "nexus echo, raw
client": the ratio of those two rows is what nexus-bus's runtime costs over FastStream's own.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import msgspec
import nats
import uvloop

from benchmarks.harness import Result, interleaved, print_table, stop_all, warm_up
from nexus_bus import (
    Gateway,
    Operations,
    RequestContext,
    Settings,
    Worker,
    load_settings,
)
from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.embedded import free_port, nats_server, redis_server
from nexus_bus.handlers import builtin_groups
from nexus_bus.observability import configure_logging

RAW_SUBJECT = "bench.raw.echo"
RAW_HEADERS_SUBJECT = "bench.raw.headers"
FASTSTREAM_SUBJECT = "bench.faststream.echo"
REPLY_HEADERS = {"Nexus-Status": "200", "Nexus-Request-Id": "0" * 24}


class Echo(msgspec.Struct, frozen=True, kw_only=True):
    """The echo request and reply."""

    msg: str


echo_ops = Operations("echo", description="Benchmark no-op.")


@echo_ops.action("say", public=True)
async def say(req: Echo, ctx: RequestContext) -> Echo:
    """Return the request."""
    return req


# The same no-op on a worker with discovery off: no $SRV, no Consul, no endpoint counters.
echo_off_ops = Operations("echooff", description="The same no-op, discovery off.")
echo_off_ops.action("say", public=True)(say)


def _settings(url: str, keys_dir: str, **extra: object) -> Settings:
    """Production defaults (auth on, with a key made for this run), quiet logs.

    The Redis URL comes from NEXUS_REDIS__URL, which main() points at its own redis-server.
    """
    return load_settings(
        nats={"url": url}, log={"level": "WARNING"}, auth={"keys_dir": keys_dir}, **extra
    )


async def serve_worker(url: str, keys_dir: str, consul_address: str) -> None:
    """Run our workers until killed: echo + data with discovery on ($SRV and Consul
    registration with the agent double), echooff with discovery off."""
    configure_logging("bench-worker", "WARNING")
    discovery_on = {"enabled": True, "address": consul_address}
    fast = Worker(
        _settings(url, keys_dir, consul=discovery_on), [echo_ops, *builtin_groups(["data"])]
    )
    discovery_off = Worker(
        _settings(url, keys_dir, worker={"micro": False}, consul={"enabled": False}),
        [echo_off_ops],
    )
    await discovery_off.start()
    await fast.run()


def serve_consul(port: str) -> None:
    """The Consul agent double of the tests (no Consul binary here), in its own process."""
    from tests.consul_double import ConsulAgentDouble

    with ConsulAgentDouble(int(port)):
        threading.Event().wait()


async def serve_raw(url: str, keys_dir: str) -> None:
    """Raw nats-py responders: the floor any runtime is measured against.

    `bench.raw.echo` answers with the body only; `bench.raw.headers` answers with the two
    headers every nexus reply carries, which is the floor for our wire contract.
    """
    nc = await nats.connect(url)

    async def respond(msg):  # type: ignore[no-untyped-def]
        await nc.publish(msg.reply, msg.data)

    async def respond_with_headers(msg):  # type: ignore[no-untyped-def]
        await nc.publish(msg.reply, msg.data, headers=REPLY_HEADERS)

    await nc.subscribe(RAW_SUBJECT, queue="bench", cb=respond)
    await nc.subscribe(RAW_HEADERS_SUBJECT, queue="bench", cb=respond_with_headers)
    await asyncio.Event().wait()


async def serve_faststream(url: str) -> None:
    """The FastStream anchor: a bare FastStream app doing the same echo, FastStream's way."""
    from faststream import FastStream
    from faststream.nats import NatsBroker

    broker = NatsBroker(url, logger=None)

    @broker.subscriber(FASTSTREAM_SUBJECT, queue="bench")
    async def echo(body: dict) -> dict:  # type: ignore[type-arg]
        return body

    await FastStream(broker, logger=None).run()


@contextmanager
def bench_servers() -> Iterator[tuple[str, str]]:
    """A nats-server and a redis-server of this run's own (NEXUS_REDIS__URL points at it),
    and a keys directory with a signing key: the NATS URL and the keys directory."""
    with tempfile.TemporaryDirectory() as tmp:
        server = nats_server(Path(tmp)).start()
        redis = redis_server(Path(tmp) / "redis").start()
        try:
            os.environ["NEXUS_REDIS__URL"] = redis.url + "/0"
            keys_dir = Path(tmp) / "keys"
            generate_key(keys_dir, kid="bench")
            yield server.url, str(keys_dir)
        finally:
            server.stop()
            redis.stop()


def _spawn(role: str, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_nats_path", f"--serve-{role}", *args]
    )


async def measure(
    url: str, keys_dir: str, seconds: float, levels: list[int], rounds: int
) -> None:
    """Run every target at every concurrency and print the table."""
    configure_logging("bench", "WARNING")
    settings = _settings(url, keys_dir)
    raw_nc = await nats.connect(url)
    token = (
        TokenCodec(Keyring.from_dir(Path(keys_dir)))
        .issue("bench", frozenset({"*"}), 3600, now=int(time.time()), jti="bench")
        .token
    )
    gw = await Gateway.connect(settings, token=token)
    payload = msgspec.json.encode({"msg": "hello"})
    await warm_up(
        [
            lambda: raw_nc.request(RAW_SUBJECT, payload, timeout=5),
            lambda: gw.request("echo", "say", payload),
            lambda: raw_nc.request(FASTSTREAM_SUBJECT, payload, timeout=5),
            lambda: gw.request("echooff", "say", payload),
        ]
    )
    await gw.request("data", "put", {"key": "bench.hot", "value": {"n": 1, "s": "x" * 64}})

    async def raw() -> None:
        await raw_nc.request(RAW_SUBJECT, payload, timeout=5)

    contract_headers = gw.build_headers(timeout_s=5)

    async def raw_headers() -> None:
        await raw_nc.request(RAW_HEADERS_SUBJECT, payload, timeout=5, headers=contract_headers)

    # The same headers without the absolute deadline (built once, it would expire mid-run):
    # the worker counts the budget from receipt.
    steady_headers = {k: v for k, v in contract_headers.items() if k != "Nexus-Deadline"}

    async def faststream_anchor() -> None:
        await raw_nc.request(FASTSTREAM_SUBJECT, payload, timeout=5, headers=steady_headers)

    async def echo_raw_client() -> None:
        await raw_nc.request("nexus.echo.say", payload, timeout=5, headers=steady_headers)

    async def echo() -> None:
        await gw.request("echo", "say", payload)

    async def echo_discovery_off() -> None:
        await gw.request("echooff", "say", payload)

    async def data_get() -> None:
        await gw.request("data", "get", b'{"key":"bench.hot"}')

    baseline: dict[int, Result] = {}
    rows: list[Result] = []
    targets = [
        ("raw nats-py request/reply", raw),
        ("raw, contract headers", raw_headers),
        ("nexus echo (full runtime)", echo),
        ("nexus echo, discovery off", echo_discovery_off),
        ("bare FastStream echo (anchor)", faststream_anchor),
        ("nexus echo, raw client", echo_raw_client),
        ("nexus data.get (hot key)", data_get),
    ]
    for c in levels:
        results = await interleaved(targets, concurrency=c, seconds=seconds, rounds=rounds)
        baseline[c] = results[0]
        rows.extend(results)
    print_table("NATS path: gateway client -> worker, vs raw nats-py responder", rows, baseline)
    await gw.close()
    await raw_nc.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=1.0, help="per slice")
    parser.add_argument("--rounds", type=int, default=5, help="slices per point, interleaved")
    parser.add_argument("--concurrency", default="1,16,128")
    parser.add_argument("--serve-worker", nargs=3)
    parser.add_argument("--serve-consul")
    parser.add_argument("--serve-raw", nargs=2)
    parser.add_argument("--serve-faststream")
    args = parser.parse_args()
    if args.serve_worker:
        uvloop.run(serve_worker(*args.serve_worker))
        return 0
    if args.serve_consul:
        serve_consul(args.serve_consul)
        return 0
    if args.serve_raw:
        uvloop.run(serve_raw(*args.serve_raw))
        return 0
    if args.serve_faststream:
        uvloop.run(serve_faststream(args.serve_faststream))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    with bench_servers() as (url, keys_dir):
        consul_port = free_port()
        children = [
            _spawn("consul", str(consul_port)),
            _spawn("worker", url, keys_dir, f"http://127.0.0.1:{consul_port}"),
            _spawn("raw", url, keys_dir),
            _spawn("faststream", url),
        ]
        try:
            print(
                f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  "
                f"per point: {args.rounds} slices of {args.seconds:g} s, alternating targets"
            )
            uvloop.run(measure(url, keys_dir, args.seconds, levels, args.rounds))
        finally:
            stop_all(children[1:])
            stop_all(children[:1])  # the agent last: the workers deregister on their way out
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
