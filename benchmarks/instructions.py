"""Instructions the worker executes per request, counted by callgrind: repeatable figures.

    python -m benchmarks.instructions [--requests 4000] [--target echo|data]

CPU time per request on a shared machine varies by ±10% from run to run, which hides the
effect of most single changes to the request path. Instruction counts do not vary: this
runs the benchmark worker of `bench_nats_path` under `valgrind --tool=callgrind`, zeroes
its counters after a warm-up, sends `--requests` requests at concurrency 16 from this
process (not under valgrind), dumps, and prints instructions per request. Compare two
commits by running it on each. Needs valgrind; about a minute per run.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import uvloop

from benchmarks.bench_nats_path import _settings, _spawn, bench_servers
from benchmarks.harness import stop_all, warm_up
from nexus_bus import Gateway
from nexus_bus.auth import Keyring, TokenCodec
from nexus_bus.embedded import free_port
from nexus_bus.observability import configure_logging

CONCURRENCY = 16
IDLE_S = 10.0  # the idle count: the worker's background instructions per second


async def callgrind_control(command: str, pid: int) -> None:
    """Zero or dump the counters of the valgrind process `pid`."""
    proc = await asyncio.create_subprocess_exec(
        "callgrind_control", command, str(pid),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if await proc.wait() != 0:
        raise RuntimeError(f"callgrind_control {command} {pid} failed")


async def watched(worker: subprocess.Popen[bytes], *args: Any) -> float:
    """`load(...)`, given up at once when the worker under valgrind exits (a wrong command
    line, say): otherwise the warm-up would wait for it ten minutes, silently."""
    loading = asyncio.ensure_future(load(*args))
    while not loading.done():
        if worker.poll() is not None:
            loading.cancel()
            raise RuntimeError(f"the worker under valgrind exited ({worker.returncode})")
        await asyncio.wait([loading], timeout=0.5)
    return await loading


async def load(url: str, keys_dir: str, pid: int, requests: int, target: str) -> float:
    """Warm the worker up; count it idle for `IDLE_S` (dump 1), then under the requests
    (dump 2). The load's duration in seconds.

    The worker's background work (the reaper's ticks, registry heartbeats, Consul TTL
    updates, the cache's floors) runs per second of wall time, and under valgrind on a busy
    machine the same requests take longer: without the idle rate taken off, one commit
    counted 672,040 and 851,118 instructions per data.get in two runs.
    """
    configure_logging("bench", "WARNING")
    token = (
        TokenCodec(Keyring.from_dir(Path(keys_dir)))
        .issue("bench", frozenset({"*"}), 3600, now=int(time.time()), jti="bench")
        .token
    )
    gw = await Gateway.connect(_settings(url, keys_dir), token=token)
    echo = msgspec.json.encode({"msg": "hello"})

    async def call() -> object:
        if target == "echo":
            return await gw.request("echo", "say", echo, timeout=60)
        return await gw.request("data", "get", b'{"key":"bench.hot"}', timeout=60)

    # Under valgrind the worker's imports alone take a minute or more.
    await warm_up([lambda: gw.request("echo", "say", echo, timeout=60)], rounds=10, wait_s=600)
    await gw.request("data", "put", {"key": "bench.hot", "value": {"n": 1}}, timeout=60)
    for _ in range(200):
        await call()
    await callgrind_control("--zero", pid)
    await asyncio.sleep(IDLE_S)
    await callgrind_control("--dump", pid)  # dumping zeroes the counters too
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one() -> None:
        async with slots:
            await call()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(requests)))
    elapsed = time.monotonic() - started
    await callgrind_control("--dump", pid)
    await gw.close()
    return elapsed


def totals(path: Path) -> int:
    """The instruction total of a callgrind dump."""
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError(f"no totals in {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--target", choices=("echo", "data"), default="echo")
    args = parser.parse_args()
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        print("valgrind is not installed", file=sys.stderr)
        return 2
    with bench_servers() as (url, keys_dir), tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        consul_port = free_port()  # the bench worker registers with the Consul agent double
        consul = _spawn("consul", str(consul_port))
        worker = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}.%p", sys.executable,
             "-m", "benchmarks.bench_nats_path", "--serve-worker", url, keys_dir,
             f"http://127.0.0.1:{consul_port}"],
            stderr=subprocess.DEVNULL,
        )
        try:
            elapsed = uvloop.run(
                watched(worker, url, keys_dir, worker.pid, args.requests, args.target)
            )
        finally:
            worker.terminate()
            worker.wait(120)
            stop_all([consul])
        # The two --dumps above (the file without a suffix is the exit's).
        idle_per_s = totals(Path(f"{out}.{worker.pid}.1")) / IDLE_S
        loaded = totals(Path(f"{out}.{worker.pid}.2"))
        per_request = (loaded - idle_per_s * elapsed) / args.requests
        print(f"worker instructions per {args.target} request (c={CONCURRENCY}, "
              f"{args.requests} requests in {elapsed:.0f} s, less {idle_per_s:,.0f} a second "
              f"idle): {per_request:,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
