"""Lanes over real NATS: inline requests, hand-off on the first wait, tasks, contexts, bounds."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from nexus_bus import lanes
from nexus_bus.connection import flush_subscriptions

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


async def serve(
    nc: Client,
    subject: str,
    handler: Callable[[Msg], Coroutine[Any, Any, bytes]],
    *,
    concurrency: int = 8,
) -> lanes.Lane[str]:
    """A lane answering each request with what `handler` returns."""
    sub = await nc.subscribe(subject, queue="q")
    assert lanes.supported(sub)

    async def answer(msg: Msg) -> None:
        await nc.publish(msg.reply, await handler(msg))

    def start(msg: Msg) -> tuple[Coroutine[Any, Any, None], str]:
        if msg.data == b"boom-start":
            raise RuntimeError("cannot start")
        return answer(msg), msg.data.decode()

    lane = lanes.Lane(sub, start, concurrency=concurrency)
    lane.start()
    await flush_subscriptions(nc)
    return lane


async def test_requests_that_never_wait_run_inline_in_contexts_of_their_own(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    server_side, client = nats_pair
    tasks: set[asyncio.Task[Any] | None] = set()

    async def handler(msg: Msg) -> bytes:
        leaked = SEEN.get()
        SEEN.set(msg.data.decode())  # must not reach the next request
        tasks.add(asyncio.current_task())
        return leaked.encode() or b"clean"

    lane = await serve(server_side, f"lane.{uid}", handler)
    replies = [await client.request(f"lane.{uid}", f"r{i}".encode(), timeout=5) for i in range(20)]
    assert {r.data for r in replies} == {b"clean"}
    assert len(tasks) == 1  # all ran in the lane's consumer: no task per request
    assert lane.waiting == {}
    lane.stop()


async def test_a_request_that_waits_keeps_its_task_and_frees_the_lane(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    server_side, client = nats_pair
    release = asyncio.Event()

    async def handler(msg: Msg) -> bytes:
        if msg.data == b"slow":
            before = asyncio.current_task()
            await release.wait()
            assert asyncio.current_task() is before  # the same task from start to end
            return b"slow done"
        return b"fast"

    lane = await serve(server_side, f"lane.{uid}", handler)
    slow = asyncio.create_task(client.request(f"lane.{uid}", b"slow", timeout=5))
    for _ in range(500):
        if lane.waiting:
            break
        await asyncio.sleep(0.01)
    assert list(lane.waiting.values()) == ["slow"]
    # The lane keeps serving while the slow request waits.
    assert (await client.request(f"lane.{uid}", b"fast", timeout=5)).data == b"fast"
    release.set()
    assert (await slow).data == b"slow done"
    assert lane.waiting == {}
    lane.stop()


async def test_timeouts_entered_before_the_first_wait_cancel_the_right_task(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """asyncio.timeout binds to the current task when entered, before the request waits."""
    server_side, client = nats_pair

    async def handler(msg: Msg) -> bytes:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(5)
        except TimeoutError:
            return b"timed out"
        return b"slept"

    lane = await serve(server_side, f"lane.{uid}", handler)
    replies = await asyncio.gather(
        *(client.request(f"lane.{uid}", b"x", timeout=5) for _ in range(5))
    )
    assert {r.data for r in replies} == {b"timed out"}
    assert (await client.request(f"lane.{uid}", b"again", timeout=5)).data == b"timed out"
    lane.stop()


async def test_cancelling_a_waiting_request_frees_its_slot(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    server_side, client = nats_pair
    cancelled = []

    async def handler(msg: Msg) -> bytes:
        if msg.data == b"hang":
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(msg.data)
                raise
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler, concurrency=1)
    hung = asyncio.create_task(client.request(f"lane.{uid}", b"hang", timeout=1))
    for _ in range(500):
        if lane.waiting:
            break
        await asyncio.sleep(0.01)
    for task in list(lane.waiting):  # what the worker's deadline reaper does
        task.cancel()
    # The only slot is free again: the next request is served.
    assert (await client.request(f"lane.{uid}", b"next", timeout=5)).data == b"ok"
    assert cancelled == [b"hang"] and lane.waiting == {}
    with pytest.raises(nats.errors.TimeoutError):  # cancelled requests are not answered
        await hung
    lane.stop()


async def test_concurrency_is_bounded_and_the_rest_queue(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    server_side, client = nats_pair
    running = peak = 0

    async def handler(msg: Msg) -> bytes:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.05)
        running -= 1
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler, concurrency=3)
    replies = await asyncio.gather(
        *(client.request(f"lane.{uid}", b"x", timeout=5) for _ in range(12))
    )
    assert len(replies) == 12 and peak == 3
    lane.stop()


async def test_a_request_that_cannot_start_does_not_stop_the_lane(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    server_side, client = nats_pair

    async def handler(msg: Msg) -> bytes:
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler, concurrency=1)
    with pytest.raises(nats.errors.TimeoutError):  # logged, never answered
        await client.request(f"lane.{uid}", b"boom-start", timeout=0.3)
    # Its slot was given back and the consumer lives on.
    assert (await client.request(f"lane.{uid}", b"fine", timeout=5)).data == b"ok"
    lane.stop()


async def test_drain_waits_for_admitted_messages(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """nats-py's drain() waits on the queue's task_done(), which the lane keeps."""
    server_side, client = nats_pair

    async def handler(msg: Msg) -> bytes:
        await asyncio.sleep(0.01)
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler, concurrency=2)
    calls = [
        asyncio.create_task(client.request(f"lane.{uid}", b"x", timeout=5)) for _ in range(10)
    ]
    await asyncio.sleep(0.02)
    await asyncio.wait_for(lane.sub.drain(), 5)  # type: ignore[no-untyped-call]
    lane.stop()
    assert all(r.data == b"ok" for r in await asyncio.gather(*calls))


async def test_subjects_whose_requests_wait_get_a_task_each_until_they_stop_waiting(
    nats_pair: tuple[Client, Client], uid: str
) -> None:
    """A burst of I/O-bound requests starts together; a subject that stops waiting goes
    back inline within `_PROBE_EVERY` requests."""
    server_side, client = nats_pair
    gate = asyncio.Event()
    mode = {"wait": True}

    async def handler(msg: Msg) -> bytes:
        if mode["wait"]:
            await gate.wait()
        return b"ok"

    lane = await serve(server_side, f"lane.{uid}", handler, concurrency=16)
    burst = [
        asyncio.create_task(client.request(f"lane.{uid}", b"b", timeout=5)) for _ in range(8)
    ]
    for _ in range(500):
        if len(lane.waiting) == 8:
            break
        await asyncio.sleep(0.01)
    assert len(lane.waiting) == 8  # all started before any finished
    gate.set()
    assert all(r.data == b"ok" for r in await asyncio.gather(*burst))
    mode["wait"] = False
    for _ in range(lanes._PROBE_EVERY + 1):
        assert (await client.request(f"lane.{uid}", b"s", timeout=5)).data == b"ok"
    assert lane._waits == {}  # inline again
    lane.stop()
