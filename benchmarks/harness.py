"""Shared pieces of the benchmarks: a closed-loop load generator and a result table."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import nats.errors

from nexus_bus import NoResponders
from nexus_bus.errors import UnknownOperation


@dataclass(frozen=True)
class Result:
    """One measured configuration."""

    name: str
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        """Completed requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0


def stop_all(procs: Iterable[subprocess.Popen[bytes]], timeout_s: float = 15) -> None:
    """SIGTERM every process (so they drain in parallel), then reap each; kill a straggler."""
    procs = list(procs)
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def warm_up(
    calls: Sequence[Callable[[], Awaitable[object]]], *, rounds: int = 50, wait_s: float = 30
) -> None:
    """Wait until every call is answered (responder processes may still be starting: their
    imports alone can take seconds), then make `rounds` rounds of all of them."""
    deadline = time.monotonic() + wait_s
    done = 0
    while done < rounds:
        try:
            for call in calls:
                await call()
            done += 1
        except (nats.errors.NoRespondersError, NoResponders, UnknownOperation):  # not up yet
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


async def closed_loop(
    name: str,
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int,
    seconds: float,
    warmup_s: float = 0.5,
) -> Result:
    """Run `concurrency` callers back to back for `seconds` (after a warm-up); time each call."""
    latencies: list[float] = []
    errors = 0
    recording = False
    stop_at = 0.0

    async def caller() -> None:
        nonlocal errors
        while True:
            started = time.perf_counter()
            if recording and started >= stop_at:
                return
            try:
                await call()
            except Exception:
                if recording:
                    errors += 1
                continue
            if recording:
                latencies.append(time.perf_counter() - started)

    tasks = [asyncio.create_task(caller()) for _ in range(concurrency)]
    await asyncio.sleep(warmup_s)
    recording = True
    begin = time.perf_counter()
    stop_at = begin + seconds
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - begin
    ordered = sorted(latencies) or [0.0]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return Result(
        name,
        concurrency,
        len(latencies),
        errors,
        elapsed,
        statistics.median(ordered) * 1000,
        p99 * 1000,
    )


def merge(name: str, parts: Sequence[Result]) -> Result:
    """One point from its slices: totals for throughput, medians for latency."""
    return Result(
        name,
        parts[0].concurrency,
        sum(r.requests for r in parts),
        sum(r.errors for r in parts),
        sum(r.seconds for r in parts),
        statistics.median(r.p50_ms for r in parts),
        statistics.median(r.p99_ms for r in parts),
    )


async def interleaved(
    targets: Sequence[tuple[str, Callable[[], Awaitable[object]]]],
    *,
    concurrency: int,
    seconds: float,
    rounds: int,
) -> list[Result]:
    """Measure every target in `rounds` slices of `seconds`, taken in turn.

    A machine that drifts (other tenants, frequency changes) then weighs on every target
    alike, instead of on whichever ran during a slow stretch; the ratios are what we compare.
    """
    slices: dict[str, list[Result]] = {name: [] for name, _ in targets}
    for _ in range(rounds):
        for name, call in targets:
            slices[name].append(
                await closed_loop(name, call, concurrency=concurrency, seconds=seconds)
            )
    return [merge(name, slices[name]) for name, _ in targets]


def print_table(title: str, rows: list[Result], baseline: dict[int, Result]) -> None:
    """Print results with the ratio to the baseline at the same concurrency."""
    print(f"\n{title}")
    print(
        f"{'target':<28}{'conc':>5}{'req/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'errors':>8}{'ours/raw':>10}"
    )
    for r in rows:
        base = baseline.get(r.concurrency)
        ratio = f"{r.rps / base.rps:.2f}x" if base and base.rps else "-"
        print(
            f"{r.name:<28}{r.concurrency:>5}{r.rps:>10.0f}{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}"
            f"{r.errors:>8}{ratio:>10}"
        )
