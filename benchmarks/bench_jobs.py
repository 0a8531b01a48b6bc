"""Jobs end to end (submit → applied), beside raw JetStream measured in the same run.

    python -m benchmarks.bench_jobs [--jobs 2000] [--seconds 8] [--concurrency 64]

Processes: nats-server (JetStream, file storage), redis-server, a worker process (our job
runner, or a raw nats-py pull consumer for the baseline) and this load generator.

Rows:
- raw `js.publish` to a work-queue stream: the ceiling for accepting work at all;
- raw pipeline: `js.publish` → nats-py pull consumer in another process → `ack`;
- raw atomic batch: the two-message batch (write + effect record) the effect journal commits
  for each exactly-once write; on R1 file storage the server syncs every batch to disk;
- nexus `submit` (status document + publish with `Nats-Msg-Id`);
- nexus jobs end to end at saturation: `noop` (runner overhead only) and `write` (one
  exactly-once write to the system of record through the effect journal);
- nexus `write` jobs at a steady offered load (half the saturation rate): achieved rate and
  submit → succeeded latency, from the status documents.

Completions are counted from the `nexus_jobs` bucket's change feed, as a client watching its
jobs would see them.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client
from nats.js.api import RetentionPolicy, StreamConfig

from benchmarks.harness import stop_all
from nexus_bus import Gateway, Operations, RequestContext, Settings, Worker, load_settings
from nexus_bus.constants import JOBS_BUCKET
from nexus_bus.embedded import nats_server, redis_server
from nexus_bus.jobs.status import decode_record
from nexus_bus.observability import configure_logging
from nexus_bus.schemas.jobs import JobStatus

RAW_STREAM = "BENCH_RAW"
RAW_BATCH_STREAM = "BENCH_RAW_BATCH"
RAW_SUBJECT = "bench.raw.jobs"
RAW_DONE = "bench.raw.done"
PAYLOAD = msgspec.json.encode({"key": "bench", "value": {"n": 1, "s": "x" * 64}})

bench_ops = Operations("bench", description="Benchmark jobs.")


class Write(msgspec.Struct, frozen=True, kw_only=True):
    """A write job: one record."""

    key: str
    value: Any = None


@bench_ops.action("noop")
async def noop(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
    """Nothing: measures the runner itself."""
    return {}


@bench_ops.action("write", idempotent=False)
async def write(req: Write, ctx: RequestContext) -> dict[str, Any]:
    """One exactly-once write to the system of record."""
    revision = await ctx.services.records.put(req.key, msgspec.json.encode(req.value))
    return {"revision": revision}


def bench_settings(nats_url: str, redis_url: str) -> Settings:
    """Auth off (measured elsewhere), 64 jobs in flight per worker."""
    return load_settings(
        nats={"url": nats_url},
        redis={"url": redis_url},
        log={"level": "WARNING"},
        auth={"enabled": False},
        jobs={"concurrency": 64},
    )


async def serve_worker(nats_url: str, redis_url: str) -> None:
    """Our worker with the bench ops' job consumers, until killed."""
    configure_logging("bench-worker", "WARNING")
    await Worker(bench_settings(nats_url, redis_url), [bench_ops]).run()


async def serve_raw(nats_url: str) -> None:
    """The baseline consumer: pull, ack, count; nothing else."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.pull_subscribe(RAW_SUBJECT, durable="bench_raw", stream=RAW_STREAM)
    while True:
        try:
            msgs = await sub.fetch(64, timeout=1)
        except TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
        await nc.publish(RAW_DONE, str(len(msgs)).encode())


@dataclass
class Row:
    """One measured line."""

    name: str
    count: int
    seconds: float
    note: str = ""

    @property
    def rate(self) -> float:
        """Per second."""
        return self.count / self.seconds if self.seconds else 0.0


class Completions:
    """Succeeded jobs seen on the status bucket's change feed, with their latencies."""

    def __init__(self) -> None:
        self.done: dict[str, float] = {}  # job id -> submit-to-succeeded seconds
        self.changed = asyncio.Event()

    async def follow(self, nc: Client) -> None:
        kv = await nc.jetstream().key_value(JOBS_BUCKET)
        watcher = await kv.watchall(ignore_deletes=True, include_history=False)
        async for entry in watcher:
            if entry is None or entry.value is None:
                continue
            record = decode_record(entry.value)
            if record.status is JobStatus.SUCCEEDED and record.id not in self.done:
                self.done[record.id] = record.updated_at - record.created_at
                self.changed.set()

    async def wait_for(self, ids: set[str], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not ids <= self.done.keys():
            self.changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = len(ids - self.done.keys())
                raise TimeoutError(f"{missing} jobs did not finish in time")
            try:
                await asyncio.wait_for(self.changed.wait(), remaining)
            except TimeoutError:
                continue


async def pooled(count: int, concurrency: int, make: Any) -> list[Any]:
    """Run `make(i)` for i in range(count) with at most `concurrency` in flight."""
    slots = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Any:
        async with slots:
            return await make(i)

    return list(await asyncio.gather(*(one(i) for i in range(count))))


async def raw_rows(nats_url: str, jobs: int, concurrency: int) -> list[Row]:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=RAW_STREAM, subjects=[f"{RAW_SUBJECT}"], retention=RetentionPolicy.WORK_QUEUE
        )
    )
    consumed = 0
    all_done = asyncio.Event()

    async def on_done(msg: Any) -> None:
        nonlocal consumed
        consumed += int(msg.data)
        if consumed >= jobs * 2:
            all_done.set()

    await nc.subscribe(RAW_DONE, cb=on_done)
    child = spawn("--serve-raw", nats_url)
    try:
        await asyncio.sleep(1.5)
        started = time.perf_counter()
        await pooled(jobs, concurrency, lambda i: js.publish(RAW_SUBJECT, PAYLOAD))
        publish = Row("raw js.publish (work queue)", jobs, time.perf_counter() - started)
        started = time.perf_counter()
        await pooled(jobs, concurrency, lambda i: js.publish(RAW_SUBJECT, PAYLOAD))
        await asyncio.wait_for(all_done.wait(), 120)
        pipeline = Row("raw publish -> pull -> ack", jobs, time.perf_counter() - started)
    finally:
        stop_all([child])
        await js.delete_stream(RAW_STREAM)
    batches = await raw_batches(nc, jobs, concurrency)
    await nc.close()
    return [publish, pipeline, batches]


async def raw_batches(nc: Client, count: int, concurrency: int) -> Row:
    """The floor of an exactly-once write: a two-message atomic batch, as the journal sends."""
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(
            name=RAW_BATCH_STREAM, subjects=["bench.batch.>"], allow_atomic=True, allow_msg_ttl=True
        )
    )

    async def batch(i: int) -> None:
        batch_id = os.urandom(16).hex()
        await nc.publish(
            f"bench.batch.kv.{i}",
            PAYLOAD,
            headers={"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": "1"},
        )
        await nc.request(
            f"bench.batch.record.{i}",
            b"{}",
            timeout=30,
            headers={
                "Nats-Batch-Id": batch_id,
                "Nats-Batch-Sequence": "2",
                "Nats-Batch-Commit": "1",
                "Nats-Expected-Last-Subject-Sequence": "0",
                "Nats-TTL": "3600s",
            },
        )

    started = time.perf_counter()
    await pooled(count, concurrency, batch)
    row = Row("raw atomic batch (write + record)", count, time.perf_counter() - started)
    await js.delete_stream(RAW_BATCH_STREAM)
    return row


async def nexus_rows(settings: Settings, jobs: int, concurrency: int, seconds: float) -> list[Row]:
    gw = await Gateway.connect(settings)
    completions = Completions()
    warm = await gw.submit("bench", "noop", {})  # creates streams and bucket
    follower = asyncio.create_task(completions.follow(gw.nc))
    # The worker process is up and running jobs (its imports alone can take seconds).
    await completions.wait_for({warm.job_id}, 60)
    run = os.urandom(4).hex()
    rows: list[Row] = []
    try:
        for action in ("noop", "write"):
            started = time.perf_counter()
            accepted = await pooled(
                jobs,
                concurrency,
                lambda i, a=action: gw.submit("bench", a, Write(key=f"b.{run}.{a}.{i}", value=i)),
            )
            submitted = time.perf_counter() - started
            await completions.wait_for({a.job_id for a in accepted}, 120)
            elapsed = time.perf_counter() - started
            if action == "noop":
                rows.append(Row("nexus submit (accepted)", jobs, submitted))
            rows.append(Row(f"nexus jobs e2e, saturated ({action})", jobs, elapsed))
        rows.append(await steady(gw, completions, run, rows[-1].rate * 0.5, seconds))
    finally:
        follower.cancel()
        await gw.close()
    return rows


async def steady(
    gw: Gateway, completions: Completions, run: str, rate: float, seconds: float
) -> Row:
    """Submit `write` jobs at a fixed rate for `seconds`; achieved rate and latency."""
    interval = 1.0 / rate
    ids: set[str] = set()
    pending: set[asyncio.Task[None]] = set()

    async def submit(i: int) -> None:
        accepted = await gw.submit("bench", "write", Write(key=f"s.{run}.{i}", value=i))
        ids.add(accepted.job_id)

    started = time.perf_counter()
    i = 0
    while (now := time.perf_counter()) - started < seconds:
        due = started + i * interval
        if now < due:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(submit(i))
        pending.add(task)
        task.add_done_callback(pending.discard)
        i += 1
    await asyncio.gather(*pending)
    await completions.wait_for(ids, 120)
    elapsed = time.perf_counter() - started
    latencies = sorted(completions.done[j] for j in ids)
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    note = f"offered {rate:.0f}/s; submit->done p50 {statistics.median(latencies) * 1000:.0f} ms"
    note += f", p99 {p99 * 1000:.0f} ms"
    return Row("nexus jobs e2e, steady (write)", len(ids), elapsed, note)


def spawn(*args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.bench_jobs", *args])


def print_rows(rows: list[Row], baseline: Row) -> None:
    print(f"\n{'target':<40}{'count':>7}{'per s':>9}{'vs raw':>9}  notes")
    for row in rows:
        ratio = f"{row.rate / baseline.rate:.2f}x" if baseline.rate else "-"
        print(f"{row.name:<40}{row.count:>7}{row.rate:>9.0f}{ratio:>9}  {row.note}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve-worker", nargs=2)
    parser.add_argument("--serve-raw")
    args = parser.parse_args()
    if args.serve_worker:
        asyncio.run(serve_worker(*args.serve_worker))
        return 0
    if args.serve_raw:
        asyncio.run(serve_raw(args.serve_raw))
        return 0
    configure_logging("bench", "WARNING")
    with tempfile.TemporaryDirectory() as tmp:
        nats_proc = nats_server(Path(tmp) / "nats").start()
        redis_proc = redis_server(Path(tmp) / "redis").start()
        redis_url = redis_proc.url + "/0"
        try:
            print(
                f"cpus: {os.cpu_count()}  python: {sys.version.split()[0]}  jobs/point: {args.jobs}"
                f"  submit concurrency: {args.concurrency}  storage: file, R1"
            )
            raw = asyncio.run(raw_rows(nats_proc.url, args.jobs, args.concurrency))
            worker = spawn("--serve-worker", nats_proc.url, redis_url)
            try:
                settings = bench_settings(nats_proc.url, redis_url)
                ours = asyncio.run(nexus_rows(settings, args.jobs, args.concurrency, args.seconds))
            finally:
                stop_all([worker])
            batch = raw[2]
            for row in ours:
                if "saturated (write)" in row.name and batch.rate:
                    share = f"{row.rate / batch.rate:.2f}x raw atomic batch"
                    row.note = f"{share}; {row.note}" if row.note else share
            print_rows(raw + ours, raw[0])
        finally:
            nats_proc.stop()
            redis_proc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
