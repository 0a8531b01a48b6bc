"""Lanes (nexus_bus/lanes.py) at their edges, and in the worker, over real NATS.

Written in a review of the lanes: each of the first five failed before its fix (what broke
is in its docstring); the rest pin behaviour checked and found correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from nexus_bus import Operations, RequestContext, Worker, lanes
from tests.conftest import make_settings
from tests.helpers import eventually
from tests.integration.test_lanes import serve


def cancelled_future() -> asyncio.Future[None]:
    """What a single-flight follower awaits once its leader was cancelled (say, reaped)."""
    shared: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    shared.cancel()
    return shared


# --------------------------------------------------------------------------------------------
# A CancelledError raised by a request's first (inline) step used to kill the lane.


async def test_a_request_whose_first_step_raises_cancelled_error_does_not_kill_the_lane(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """Awaiting an already-cancelled future raises CancelledError without ever suspending.

    In a task per request that task just ends cancelled; run inline, that request alone must
    end so. (The CancelledError, not an `Exception`, used to escape `_consume`: the consumer
    ended silently, its slot was never given back and nobody read the queue any more.)
    """
    server_side, client = nats_pair

    async def handler(msg: Msg) -> bytes:
        if msg.data == b"poison":
            await cancelled_future()
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler, concurrency=2)
    try:
        with pytest.raises(nats.errors.TimeoutError):  # nobody answers the poisoned one
            await client.request(f"lane.{uid}", b"poison", timeout=0.3)
        # The lane must go on serving, with both of its slots.
        assert (await client.request(f"lane.{uid}", b"next", timeout=1)).data == b"ok"
        assert lane._free == 2
    finally:
        lane.stop()


class Empty(msgspec.Struct, frozen=True, kw_only=True):
    seconds: float = 0.0


class Done(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool = True


RUNS: dict[str, list[str]] = {}


def review_ops(op: str) -> Operations:
    ops = Operations(op)
    RUNS[op] = []

    @ops.action("count", public=True)
    async def count(req: Empty, ctx: RequestContext) -> Done:
        RUNS[op].append(ctx.request_id)
        return Done()

    @ops.action("poison", public=True)
    async def poison(req: Empty, ctx: RequestContext) -> Done:
        await cancelled_future()
        return Done()

    @ops.action("run", public=True)
    async def run(req: Empty, ctx: RequestContext) -> Done:
        if req.seconds:
            await asyncio.sleep(req.seconds)
        return Done()

    return ops


@pytest.fixture
async def start_worker(nats_url: str, redis_url: str, uid: str) -> AsyncIterator[Any]:
    started: list[Worker] = []

    async def start(**worker: object) -> tuple[Worker, str]:
        op = f"lr{uid}"
        settings = make_settings(nats_url, redis_url, worker=worker, jobs={"enabled": False})
        w = Worker(settings, [review_ops(op)])
        await w.start()
        started.append(w)
        return w, op

    yield start
    for w in started:
        # Bounded, so that a regression fails here instead of hanging for nats-py's 30 s
        # drain_timeout (nats-py's drain swallows the cancellation and closes).
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(w.drain(0.2), 2)


async def test_the_worker_keeps_serving_an_op_after_a_handler_raises_cancelled_error(
    start_worker: Any, nats_url: str
) -> None:
    """End to end: one such request used to take the whole op of this worker off the bus."""
    _, op = await start_worker(concurrency=4)
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"nexus.{op}.poison", b"{}", timeout=0.3)
        msg = await nc.request(f"nexus.{op}.run", b"{}", timeout=1)
        assert msg.headers is not None and msg.headers["Nexus-Status"] == "200"
    finally:
        await nc.close()


# --------------------------------------------------------------------------------------------
# lane.stop() used to leave delivered messages in the queue without task_done(); the
# connection's drain then waited on that queue's join() for nats-py's drain_timeout (30 s).


async def test_drain_with_a_short_grace_returns_promptly_when_requests_wait_for_a_slot(
    start_worker: Any, nats_url: str
) -> None:
    """Concurrency 1: a slow request holds the slot, two fast ones wait in the process.

    `worker.drain(0.3)`: the subscription's drain times out (its `join()` waits for the
    consumer, which waits for the slot), and `unsubscribe()` then fails (nats-py marked the
    subscription closed), so it stays in the connection's `_subs`. `lane.stop()` now hands
    back both waiting messages (the one the consumer held, the one still queued), taking
    them off the queue, and the worker answers them 503. (It used to leave the queued one
    there, and `broker.stop()` -> `nc.drain()` -> that subscription's `_drain()` waited on
    `join()` for nats-py's drain_timeout of 30 s.)
    """
    w, op = await start_worker(concurrency=1)
    nc = await nats.connect(nats_url)
    try:
        slow = asyncio.create_task(
            nc.request(f"nexus.{op}.run", b'{"seconds": 3}', timeout=5)
        )
        await eventually(lambda: w.inflight == 1, "the slow request to wait")
        fast = [
            asyncio.create_task(nc.request(f"nexus.{op}.run", b"{}", timeout=3))
            for _ in range(2)
        ]
        (lane,) = w._lanes
        await eventually(lambda: lane.sub.pending_msgs == 1, "one held, one queued")
        started = time.monotonic()
        await asyncio.wait_for(w.drain(0.3), 3.5)
        elapsed = time.monotonic() - started
        assert elapsed < 3, f"drain(0.3) took {elapsed:.1f} s"  # not nats-py's 30 s
        # Both requests waiting behind the busy slot (one taken off the queue, one still in
        # it) are refused at once, retryable, rather than left to wait out their timeouts.
        replies = await asyncio.wait_for(asyncio.gather(*fast), 2)
        assert [r.headers["Nexus-Status"] for r in replies] == ["503", "503"]
        assert all(r.headers["Retry-After"] == "1" for r in replies)
    finally:
        for task in (slow, *fast):
            task.cancel()
        await asyncio.gather(slow, *fast, return_exceptions=True)
        await nc.close()


# --------------------------------------------------------------------------------------------
# The deadline of a request that waited for a slot used to count from when it got one.


async def test_a_request_that_waits_for_a_slot_keeps_the_deadline_it_arrived_with(
    start_worker: Any, nats_url: str
) -> None:
    """A lone `Nexus-Timeout-Ms` counts from receipt (docs/runtime.md, "Deadlines").

    The deadline is computed when the message is taken, *before* waiting for a slot, so a
    request whose budget ran out while it waited in this process is dropped as expired.
    (The lane used to call `start(msg)`, which computes it, only after `_acquire()`: the
    wait was forgiven and the handler ran for a caller that had given up, just when the
    worker was saturated.)
    """
    w, op = await start_worker(concurrency=1, clock_skew_ms=0)
    nc = await nats.connect(nats_url)
    try:
        slow = asyncio.create_task(
            nc.request(f"nexus.{op}.run", b'{"seconds": 0.6}', timeout=5)
        )
        await eventually(lambda: w.inflight == 1, "the slow request to wait")
        late = asyncio.create_task(
            nc.request(f"nexus.{op}.count", b"{}", timeout=2, headers={"Nexus-Timeout-Ms": "100"})
        )
        (lane,) = w._lanes  # the late request must be here, waiting, before the slot frees
        await eventually(lambda: lane._held is not None or lane.sub.pending_msgs, "it to wait")
        await slow
        await asyncio.sleep(0.1)
        late.cancel()
        await asyncio.gather(late, return_exceptions=True)
        assert RUNS[op] == [], "ran a request 500 ms past its budget"
    finally:
        await nc.close()


# --------------------------------------------------------------------------------------------
# lane.stop() during a request's inline first step used to cancel that request.


async def test_stopping_the_lane_from_a_request_does_not_cancel_that_request(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """`stop()` promises "waiting requests go on", and checks `_stopped` before handing off.

    Called during an inline run, the consumer is the current task, which is about to become
    the request's driver: `stop()` must not cancel it. (It used to, and the pending
    cancellation landed on the request at its first wait.)
    """
    server_side, client = nats_pair
    holder: dict[str, lanes.Lane[str]] = {}

    async def handler(msg: Msg) -> bytes:
        if msg.data == b"shutdown":
            holder["lane"].stop()  # e.g. an admin action: stop taking requests, then clean up
            await asyncio.sleep(0.02)
            return b"stopped"
        return b"ok"

    holder["lane"] = lane = await serve(server_side, f"lane.{uid}", handler)
    try:
        assert (await client.request(f"lane.{uid}", b"shutdown", timeout=1)).data == b"stopped"
    finally:
        lane.stop()


# --------------------------------------------------------------------------------------------
# _drive used to throw into the coroutine from inside an `except` block, so the request saw
# that exception as the one "being handled" after it had dealt with it.


async def test_a_handled_cancellation_does_not_linger_in_the_requests_exception_state(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """In a task, once `except TimeoutError: pass` is done, `sys.exc_info()` is empty and a
    new exception has no `__context__`; driven by `_drive` too. (Both used to show the
    CancelledError the timeout delivered: spurious "During handling of the above exception"
    chains in logs.)
    """
    server_side, client = nats_pair

    async def handler(msg: Msg) -> bytes:
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(1)
        except TimeoutError:
            pass
        try:
            raise RuntimeError("unrelated")
        except RuntimeError as exc:
            context = exc.__context__
        return f"{sys.exc_info()[1]!r}|{context!r}".encode()

    lane = await serve(server_side, f"lane.{uid}", handler)
    try:
        reply = await client.request(f"lane.{uid}", b"x", timeout=2)
        assert reply.data == b"None|None"
    finally:
        lane.stop()


# --------------------------------------------------------------------------------------------
# Checked and found correct.


async def test_a_spawned_request_cancelled_before_it_starts_gives_its_slot_back(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    server_side, _ = nats_pair
    ran = []

    async def handler(msg: Msg) -> bytes:
        ran.append(msg)
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler, concurrency=1)
    try:

        async def never() -> None:
            ran.append("started")

        lane._free -= 1  # what _consume does before spawning
        lane._spawn(never(), "tag")
        (task,) = lane.waiting
        task.cancel()  # what the reaper or drain() may do before its first step
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert task.cancelled() and ran == []
        assert lane.waiting == {} and lane._free == 1
    finally:
        lane.stop()


async def test_task_groups_in_a_request_that_waited(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """A child failing cancels the task driving the request (not the lane's consumer); the
    group turns that into its ExceptionGroup, the request goes on waiting and answers, and
    the lane serves on. (Python 3.11's TaskGroup leaves `cancelling()` at 1 afterwards in a
    plain task too; each driving task ends with its request, so nothing carries over.)"""
    server_side, client = nats_pair

    async def handler(msg: Msg) -> bytes:
        async def fail() -> None:
            await asyncio.sleep(0.01)
            raise ValueError("child")

        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(fail())
                tg.create_task(asyncio.sleep(5))
        except* ValueError:
            pass
        await asyncio.sleep(0.01)  # not cancelled by the group's cancellation
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler)
    try:
        replies = await asyncio.gather(
            *(client.request(f"lane.{uid}", b"x", timeout=2) for _ in range(3))
        )
        assert {r.data for r in replies} == {b"ok"}
        assert lane.waiting == {} and lane._free == 8
    finally:
        lane.stop()


async def test_spawned_requests_run_in_contexts_of_their_own(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """Once a subject gets a task per request, context changes still do not leak."""
    from tests.integration.test_lanes import SEEN

    server_side, client = nats_pair

    async def handler(msg: Msg) -> bytes:
        leaked = SEEN.get()
        SEEN.set(msg.data.decode())
        await asyncio.sleep(0)
        return leaked.encode() or b"clean"

    lane = await serve(server_side, f"lane.{uid}", handler)
    try:
        for i in range(lanes._STREAK + 5):
            assert (await client.request(f"lane.{uid}", f"r{i}".encode(), timeout=2)).data == (
                b"clean"
            )
        assert lane._waits[f"lane.{uid}"] > lanes._STREAK  # requests now get a task each
    finally:
        lane.stop()


async def test_the_reaper_cancels_lane_requests_and_the_gauge_returns_to_zero(
    start_worker: Any, nats_url: str
) -> None:
    w, op = await start_worker(concurrency=2, clock_skew_ms=0)
    nc = await nats.connect(nats_url)
    try:
        calls = [
            asyncio.create_task(
                nc.request(
                    f"nexus.{op}.run",
                    b'{"seconds": 5}',
                    timeout=3,
                    headers={"Nexus-Timeout-Ms": "600"},
                )
            )
            for _ in range(2)
        ]
        await eventually(lambda: w.inflight == 2, "both requests to wait")
        await eventually(lambda: w.inflight == 0, "the reaper", timeout_s=3)
        (lane,) = w._lanes
        assert lane._free == 2
        msg = await nc.request(f"nexus.{op}.run", b"{}", timeout=1)
        assert msg.headers is not None and msg.headers["Nexus-Status"] == "200"
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    finally:
        await nc.close()
