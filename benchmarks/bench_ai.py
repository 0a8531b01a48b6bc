"""`ai.embed` cache hits against `data.get` hits, and local embedding throughput.

    python -m benchmarks.bench_ai [--seconds 2] [--concurrency 16]

Starts its own nats-server and redis-server and one worker process serving `data` and `ai`
(the local MiniLM backend; the `ai-local` extra). End to end: a gateway calls `data.get` on
a hot key and `ai.embed` on a text whose embedding is cached, in alternating slices, so other
load on the machine falls on both alike; the ratio is embed / get. In process: the model's
throughput in texts per second by batch size, and 64 concurrent single-text callers through
the batcher against the same texts embedded one call each.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import uvloop

from benchmarks.bench_cache import interleaved
from benchmarks.harness import print_table, stop_all
from nexus_bus import Gateway, Settings, Worker, load_settings
from nexus_bus.ai.batcher import EmbedBatcher
from nexus_bus.ai.local import LocalEmbeddingBackend
from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.embedded import nats_server, redis_server
from nexus_bus.handlers import builtin_groups
from nexus_bus.observability import configure_logging

MODEL = "all-MiniLM-L6-v2"
HOT_KEY = "bench.ai.hot"
HOT_TEXT = "The quick brown fox jumps over the lazy dog near the river bank."


def _settings(nats_url: str, redis_url: str, keys_dir: str) -> Settings:
    local = {"kind": "local", "models": [MODEL]}
    return load_settings(
        nats={"url": nats_url}, redis={"url": redis_url}, auth={"keys_dir": keys_dir},
        log={"level": "WARNING"}, ai={"backends": {"local": local}},
    )


async def serve_worker(nats_url: str, redis_url: str, keys_dir: str) -> None:
    """Run a worker serving `data` and `ai` until SIGTERM."""
    configure_logging("bench-worker", "WARNING")
    await Worker(_settings(nats_url, redis_url, keys_dir), builtin_groups(["data", "ai"])).run()


def _spawn_worker(nats_url: str, redis_url: str, keys_dir: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "benchmarks.bench_ai", "--serve-worker", nats_url, redis_url,
         keys_dir]
    )


async def _ready(gw: Gateway) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            await gw.request("data", "put", {"key": HOT_KEY, "value": {"text": HOT_TEXT}})
            await gw.request("ai", "embed", {"input": HOT_TEXT, "model": MODEL}, timeout=30)
            return
        except Exception:  # the worker is still starting (or loading the model)
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def end_to_end(
    nats_url: str, redis_url: str, keys_dir: str, seconds: float, levels: list[int]
) -> None:
    """`data.get` hit vs `ai.embed` hit through a gateway and a worker process."""
    token = TokenCodec(Keyring.from_dir(Path(keys_dir))).issue(
        "bench", frozenset({"*"}), 3600, now=int(time.time()), jti="bench-ai"
    ).token
    worker = _spawn_worker(nats_url, redis_url, keys_dir)
    gw = await Gateway.connect(_settings(nats_url, redis_url, keys_dir), token=token)
    get_body = b'{"key":"%s"}' % HOT_KEY.encode()
    embed_body = b'{"input":"%s","model":"%s"}' % (HOT_TEXT.encode(), MODEL.encode())
    try:
        await _ready(gw)

        async def get() -> None:
            await gw.request("data", "get", get_body)

        async def embed() -> None:
            await gw.request("ai", "embed", embed_body)

        targets = [("data.get, cache hit", get), ("ai.embed, cache hit", embed)]
        for c in levels:
            rows = await interleaved(targets, c, seconds)
            print_table(f"End to end, c={c}; ratio = ai.embed / data.get", rows, {c: rows[0]})
    finally:
        await gw.close()
        stop_all([worker])


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

    batcher = EmbedBatcher(lambda batch: backend.embed(batch, MODEL, 30), 64, max_running=1)
    sample = texts[:64]
    begin = time.perf_counter()
    await asyncio.gather(*(one_call(t) for t in sample))
    unbatched = time.perf_counter() - begin
    begin = time.perf_counter()
    await asyncio.gather(*(batcher.embed([t]) for t in sample))
    batched = time.perf_counter() - begin
    print(
        f"\n64 concurrent single-text requests: one call each {unbatched * 1000:.0f} ms, "
        f"batched {batched * 1000:.0f} ms in {batcher.calls} call(s) "
        f"({unbatched / batched:.1f}x)"
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", default="16")
    parser.add_argument("--serve-worker", nargs=3)
    args = parser.parse_args()
    if args.serve_worker:
        uvloop.run(serve_worker(*args.serve_worker))
        return 0
    levels = [int(c) for c in args.concurrency.split(",")]
    configure_logging("bench", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        nats = nats_server(Path(tmp) / "nats").start()
        redis = redis_server(Path(tmp) / "redis").start()
        keys_dir = str(Path(tmp) / "keys")
        generate_key(Path(keys_dir), kid="bench")
        try:
            print(f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}"
                  f"  seconds/target: {args.seconds}, in alternating slices")
            uvloop.run(end_to_end(nats.url, redis.url + "/0", keys_dir, args.seconds, levels))
            uvloop.run(throughput(args.seconds))
        finally:
            redis.stop()
            nats.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
