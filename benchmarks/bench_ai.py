"""`ai.embed` cache hits against `data.get` hits, and local embedding throughput.

    python -m benchmarks.bench_ai [--seconds 3] [--concurrency 1,16] [--rounds 3]

Starts its own nats-server and redis-server, one worker process serving `data` and `ai` (the
local MiniLM backend; the `ai-local` extra) and one HTTP shim, as deployed (`nexus-bus worker`,
`nexus-bus shim`, auth on). Three targets, all cache hits answered by the same processes:
`data.get` of a hot key, and `ai.embed` of a text whose embedding is cached, once in the float
form and once with `encoding_format: "base64"` (what OpenAI clients send). The cost of a
target is `data.get`'s req/s over its own, measured in the same run:

- over HTTP: wrk (CPU 0) posts to the shim; the shim, the worker, nats-server and Redis run
  on CPU 1;
- over NATS: a gateway in this process (the "client") calls the worker directly.

Each point is `rounds` slices of seconds/rounds per target, alternating between targets so
that other load on the machine falls on all alike. The CPU each process spent per request is
read from /proc around every slice: on this shared machine it varies less than req/s.

In process: the model's throughput in texts per second by batch size, and 64 concurrent
single-text callers through the batcher against the same texts embedded one call each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import msgspec
import uvloop

from benchmarks.bench_http import _pin, _post, cpu_seconds, run_wrk
from benchmarks.harness import Result, closed_loop, merge, stop_all
from nexus_bus import Gateway, Settings, load_settings
from nexus_bus.ai.batcher import EmbedBatcher
from nexus_bus.ai.local import LocalEmbeddingBackend
from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.embedded import ServerProcess, free_port, nats_server, redis_server
from nexus_bus.observability import configure_logging

MODEL = "all-MiniLM-L6-v2"
HOT_KEY = "bench.ai.hot"
HOT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."
HERE = Path(__file__).resolve().parent.parent


class Target(NamedTuple):
    """One measured call: an operation and its JSON body."""

    name: str
    op: str
    action: str
    body: bytes


TARGETS = [
    Target("data.get hit", "data", "get", msgspec.json.encode({"key": HOT_KEY})),
    Target("ai.embed hit, float", "ai", "embed",
           msgspec.json.encode({"input": HOT_TEXT, "model": MODEL})),
    Target("ai.embed hit, base64", "ai", "embed",
           msgspec.json.encode({"input": HOT_TEXT, "model": MODEL, "encoding_format": "base64"})),
]
PUT_BODY = msgspec.json.encode({"key": HOT_KEY, "value": {"text": HOT_TEXT}})


class Stack:
    """nats-server, Redis, a worker and a shim, with a token allowed to call every target."""

    def __init__(self, tmp: Path) -> None:
        self.servers: list[ServerProcess] = [nats_server(tmp / "nats"), redis_server(tmp / "redis")]
        for server in self.servers:
            server.argv = [*_pin(1), *server.argv]
            server.start()
        self.nats_url, self.redis_url = self.servers[0].url, self.servers[1].url + "/0"
        keys = tmp / "keys"
        generate_key(keys, kid="bench")
        self.keys_dir = str(keys)
        self.token = TokenCodec(Keyring.from_dir(keys)).issue(
            "bench", frozenset({"data:get", "data:put", "ai:embed"}), 3600,
            now=int(time.time()), jti="bench-ai",
        ).token
        self.port = free_port()
        env = {
            **os.environ, "NEXUS_NATS__URL": self.nats_url, "NEXUS_REDIS__URL": self.redis_url,
            "NEXUS_AUTH__KEYS_DIR": self.keys_dir, "NEXUS_LOG__LEVEL": "WARNING",
            "NEXUS_STATE_DIR": str(tmp / "state"), "PYTHONPATH": str(HERE),
            "NEXUS_AI__BACKENDS__LOCAL__KIND": "local",
            "NEXUS_AI__BACKENDS__LOCAL__MODELS": f'["{MODEL}"]',
        }
        nexus = [*_pin(1), sys.executable, "-m", "nexus_bus"]
        self.procs = {
            "worker": subprocess.Popen([*nexus, "worker", "--ops", "data,ai"], env=env),
            "shim": subprocess.Popen([*nexus, "shim", "--port", str(self.port)], env=env),
        }
        self.pids = {name: proc.pid for name, proc in self.procs.items()}
        self.pids.update({s.name: s.proc.pid for s in self.servers if s.proc})

    def client_settings(self) -> Settings:
        """Settings for a gateway in this process."""
        return load_settings(
            nats={"url": self.nats_url}, redis={"url": self.redis_url},
            auth={"keys_dir": self.keys_dir}, log={"level": "WARNING"},
        )

    def close(self) -> None:
        """Stop the worker, the shim and the servers."""
        stop_all(self.procs.values())
        for server in reversed(self.servers):
            server.stop()


async def _ready(gw: Gateway, deadline_s: float = 90) -> None:
    """Wait for the worker (it loads the model on the first embedding), then fill the hits."""
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            await gw.request("data", "put", PUT_BODY)
            for target in TARGETS:
                await gw.request(target.op, target.action, target.body, timeout=30)
            return
        except Exception:  # still starting (or loading the model)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _script(tmp: Path, target: Target, token: str) -> Path:
    """wrk's Lua script posting the target's body with the bench's headers."""
    path = tmp / f"{target.name.replace(' ', '_').replace(',', '')}.lua"
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{target.body.decode()}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {token}"\n'
    )
    return path


def _print_rows(title: str, rows: list[Result], cpu: dict[str, dict[str, float]] | None) -> None:
    """The rows with their cost against the first (req/s, and CPU per request when read)."""
    print(f"\n{title}")
    print(f"{'target':<24}{'conc':>5}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'errors':>7}"
          f"{'cost':>7}" + (f"{'cpu us':>8}{'cpu cost':>9}   by process" if cpu else ""))
    base_rps = rows[0].rps
    base_cpu = sum(cpu[rows[0].name].values()) if cpu else 0.0
    for r in rows:
        line = (f"{r.name:<24}{r.concurrency:>5}{r.rps:>9.0f}{r.p50_ms:>8.2f}{r.p99_ms:>8.2f}"
                f"{r.errors:>7}{(f'{base_rps / r.rps:.2f}x' if r.rps else '-'):>7}")
        if cpu:
            used = sum(cpu[r.name].values())
            split = "  ".join(f"{k} {v:.0f}" for k, v in cpu[r.name].items())
            line += f"{used:>8.0f}{(f'{used / base_cpu:.2f}x' if base_cpu else '-'):>9}   {split}"
        print(line, flush=True)


async def alternate(
    pids: dict[str, int], rounds: int, run_slice: Callable[[Target], Awaitable[Result]]
) -> tuple[list[Result], dict[str, dict[str, float]]]:
    """Every target in `rounds` slices, taken in turn; merged rows and CPU µs per request of
    each process in `pids` (read from /proc around each slice)."""
    parts: dict[str, list[Result]] = {t.name: [] for t in TARGETS}
    spent: dict[str, dict[str, float]] = {t.name: dict.fromkeys(pids, 0.0) for t in TARGETS}
    for _ in range(rounds):
        for t in TARGETS:
            before = {k: cpu_seconds(pid) for k, pid in pids.items()}
            parts[t.name].append(await run_slice(t))
            for k, pid in pids.items():
                spent[t.name][k] += cpu_seconds(pid) - before[k]
    rows = [merge(t.name, parts[t.name]) for t in TARGETS]
    cpu = {r.name: {k: s / max(1, r.requests) * 1e6 for k, s in spent[r.name].items()}
           for r in rows}
    return rows, cpu


async def over_http(
    stack: Stack, tmp: Path, seconds: float, levels: list[int], rounds: int
) -> None:
    """The targets posted to the shim by wrk, in alternating slices."""
    if shutil.which("wrk") is None:
        print("\nover HTTP: not measured (wrk is not installed; `make system-deps`)")
        return
    scripts = {t.name: _script(tmp, t, stack.token) for t in TARGETS}
    path = {t.name: f"/v1/{t.op}/{t.action}" for t in TARGETS}
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {stack.token}"}
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(
        _post, stack.port, path[TARGETS[0].name], TARGETS[0].body, headers
    ) != 200:
        if time.monotonic() > deadline:
            raise RuntimeError("the shim did not answer in time")
        await asyncio.sleep(0.2)
    for conc in levels:

        async def run_slice(t: Target, conc: int = conc, slice_s: float = seconds / rounds) -> (
            Result
        ):
            return await asyncio.to_thread(
                run_wrk, t.name, stack.port, conc, slice_s, scripts[t.name], path[t.name]
            )

        for t in TARGETS:  # warm-up at this concurrency
            await run_slice(t, conc, 1)
        rows, cpu = await alternate(stack.pids, rounds, run_slice)
        _print_rows(f"Over HTTP (wrk -> shim -> worker), c={conc}", rows, cpu)


async def over_nats(stack: Stack, seconds: float, levels: list[int], rounds: int) -> None:
    """The targets called by a gateway in this process (the client), in alternating slices."""
    gw = await Gateway.connect(stack.client_settings(), token=stack.token)
    pids = {k: pid for k, pid in stack.pids.items() if k != "shim"} | {"client": os.getpid()}
    try:
        await _ready(gw)
        for conc in levels:

            async def run_slice(t: Target, conc: int = conc) -> Result:
                async def call() -> None:
                    await gw.request(t.op, t.action, t.body)

                return await closed_loop(
                    t.name, call, concurrency=conc, seconds=seconds / rounds, warmup_s=0.0
                )

            await alternate(pids, 1, run_slice)  # warm-up at this concurrency
            rows, cpu = await alternate(pids, rounds, run_slice)
            _print_rows(f"Over NATS (gateway in this process -> worker), c={conc}", rows, cpu)
    finally:
        await gw.close()


async def throughput(seconds: float) -> None:
    """The local model's texts/s by batch size, and the batcher's effect."""
    backend = LocalEmbeddingBackend("local")
    started = time.perf_counter()
    await backend.warm_up()
    print(f"\nLocal model load: {time.perf_counter() - started:.2f} s (once per process)")
    texts = [f"sentence number {i} about the weather and the sea" for i in range(512)]
    print(f"{'batch':>6}{'texts/s':>10}{'ms/call':>10}")
    for batch in (1, 8, 32, 128):
        done, calls, begin = 0, 0, time.perf_counter()
        while time.perf_counter() - begin < seconds:
            await backend.embed(texts[done % 384 : done % 384 + batch], MODEL, 30)
            done, calls = done + batch, calls + 1
        spent = time.perf_counter() - begin
        print(f"{batch:>6}{done / spent:>10.0f}{spent / calls * 1000:>10.2f}")

    async def one_call(text: str) -> list[list[float]]:
        return await backend.embed([text], MODEL, 30)

    batcher = EmbedBatcher(lambda batch, _: backend.embed(batch, MODEL, 30), 64, max_running=1)
    sample = texts[:64]
    begin = time.perf_counter()
    await asyncio.gather(*(one_call(t) for t in sample))
    unbatched = time.perf_counter() - begin
    begin = time.perf_counter()
    await asyncio.gather(*(batcher.embed([t], 30) for t in sample))
    batched = time.perf_counter() - begin
    print(
        f"\n64 concurrent single-text requests: one call each {unbatched * 1000:.0f} ms, "
        f"batched {batched * 1000:.0f} ms in {batcher.calls} call(s) "
        f"({unbatched / batched:.1f}x)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per target and point")
    parser.add_argument("--concurrency", default="16")
    parser.add_argument("--rounds", type=int, default=3, help="slices per target and point")
    parser.add_argument("--no-model", action="store_true", help="skip the in-process model")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    configure_logging("bench", "WARNING")
    print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  "
          f"seconds per target and point: {args.seconds:g}, in alternating slices")
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(Path(tmp))
        try:
            uvloop.run(over_nats(stack, args.seconds, levels, args.rounds))  # waits for it
            uvloop.run(over_http(stack, Path(tmp), args.seconds, levels, args.rounds))
        finally:
            stack.close()
    if not args.no_model:
        uvloop.run(throughput(args.seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
