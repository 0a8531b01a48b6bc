"""The gateway's Inbox over real NATS: routing, timeouts, no responders, cancellation."""

from __future__ import annotations

import asyncio

import nats
import pytest
from nats.aio.msg import Msg

from nexus_bus.bus.connection import round_trip
from nexus_bus.client.inbox import Inbox
from tests.helpers import READERS, connection


@READERS
async def test_concurrent_requests_each_get_their_own_reply(
    nats_url: str, uid: str, fast: bool
) -> None:
    responder, client = await nats.connect(nats_url), await connection(nats_url, fast)

    async def respond(msg: Msg) -> None:
        await asyncio.sleep(0.001 * (int(msg.data) % 7))  # replies come back out of order
        await msg.respond(msg.data)

    async def spawn(msg: Msg) -> None:
        tasks.add(task := asyncio.create_task(respond(msg)))
        task.add_done_callback(tasks.discard)

    tasks: set[asyncio.Task[None]] = set()

    try:
        await responder.subscribe(f"inbox.{uid}", cb=spawn)
        await round_trip(responder)
        inbox = Inbox(client)
        replies = await asyncio.gather(
            *(inbox.request(f"inbox.{uid}", b"%d" % i, timeout_s=5, headers=None)
              for i in range(200))
        )
        assert [int(r.data) for r in replies] == list(range(200))
        assert not inbox._waiting
    finally:
        await responder.close()
        await client.close()


@READERS
async def test_no_responders_timeout_and_cancel_leave_nothing_behind(
    nats_url: str, uid: str, fast: bool
) -> None:
    responder, client = await nats.connect(nats_url), await connection(nats_url, fast)
    late: list[Msg] = []
    tasks: set[asyncio.Task[None]] = set()

    async def answer_late(msg: Msg) -> None:
        late.append(msg)
        await asyncio.sleep(0.3)
        await msg.respond(b"too late")

    async def spawn(msg: Msg) -> None:
        tasks.add(task := asyncio.create_task(answer_late(msg)))
        task.add_done_callback(tasks.discard)

    try:
        inbox = Inbox(client)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(nats.errors.NoRespondersError):
            await inbox.request(f"nobody.{uid}", b"", timeout_s=5, headers={"A": "b"})
        assert loop.time() - started < 1  # at once, not after the timeout

        await responder.subscribe(f"slow.{uid}", cb=spawn)
        await round_trip(responder)
        with pytest.raises(nats.errors.TimeoutError):
            await inbox.request(f"slow.{uid}", b"", timeout_s=0.1, headers=None)

        pending = asyncio.create_task(inbox.request(f"slow.{uid}", b"", timeout_s=5, headers=None))
        await asyncio.sleep(0.05)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await asyncio.sleep(0.5)  # both late replies arrive and are dropped
        assert len(late) == 2 and not inbox._waiting
    finally:
        await responder.close()
        await client.close()


async def test_reply_subjects_cannot_be_guessed_from_another(nats_url: str, uid: str) -> None:
    """A responder that saw one reply subject cannot answer other callers' requests."""
    responder, client = await nats.connect(nats_url), await nats.connect(nats_url)
    seen: list[Msg] = []
    try:
        sub = await responder.subscribe(f"guess.{uid}")
        await round_trip(responder)
        inbox = Inbox(client)
        first = asyncio.create_task(inbox.request(f"guess.{uid}", b"1", timeout_s=5, headers=None))
        seen.append(await sub.next_msg(timeout=5))
        victim = asyncio.create_task(inbox.request(f"guess.{uid}", b"2", timeout_s=5, headers=None))
        genuine = await sub.next_msg(timeout=5)
        prefix, _, token = seen[0].reply.rpartition(".")
        assert token != "1" and len(token) > 8
        for n in range(1, 64):  # counters, with the first token's random part or without
            for guess in (f"{n:x}", f"{n}", f"{n:x}{token[-8:]}"):
                await responder.publish(f"{prefix}.{guess}", b"forged")
        await responder.flush()
        await genuine.respond(b"genuine")
        assert (await victim).data == b"genuine"
        await seen[0].respond(b"first")
        assert (await first).data in (b"first", b"forged")  # its own subject was known
    finally:
        await responder.close()
        await client.close()


async def test_reply_subjects_stay_unique_across_entropy_refills(nats_url: str, uid: str) -> None:
    """The random part of reply tokens comes from a pool refilled every 1,024 requests."""
    responder, client = await nats.connect(nats_url), await nats.connect(nats_url)
    seen: list[str] = []

    async def respond(msg: Msg) -> None:
        seen.append(msg.reply)
        await msg.respond(msg.data)

    try:
        await responder.subscribe(f"inbox.{uid}", cb=respond)
        await round_trip(responder)
        inbox = Inbox(client)
        for i in range(2100):  # two refills
            reply = await inbox.request(f"inbox.{uid}", b"%d" % i, timeout_s=5, headers=None)
            assert reply.data == b"%d" % i
        assert len(set(seen)) == 2100
        tokens = [subject.rsplit(".", 1)[1] for subject in seen]
        counters = [int(t[:-8], 16) for t in tokens]
        assert counters == list(range(1, 2101))
        # Each block of 1,024 took its random parts from a fresh draw, in order.
        assert len({t[-8:] for t in tokens}) > 2000
    finally:
        await responder.close()
        await client.close()


async def time_to_timeout(inbox: Inbox, subject: str, timeout_s: float) -> float:
    """Seconds from sending a request nobody answers until its TimeoutError."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(nats.errors.TimeoutError):
        await inbox.request(subject, b"", timeout_s=timeout_s, headers=None)
    return loop.time() - started


async def test_each_request_times_out_at_its_own_deadline(nats_url: str, uid: str) -> None:
    """Timeouts share a timer per 10 ms of deadlines: a shorter timeout sent after a longer
    one still fires on time, and the longer one still fires after it."""
    responder, client = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        sub = await responder.subscribe(f"silent.{uid}")  # never answers
        await round_trip(responder)
        inbox = Inbox(client)
        long = asyncio.create_task(time_to_timeout(inbox, f"silent.{uid}", 1.0))
        await asyncio.sleep(0.01)
        short = asyncio.create_task(time_to_timeout(inbox, f"silent.{uid}", 0.2))
        answered = asyncio.create_task(
            inbox.request(f"silent.{uid}", b"", timeout_s=0.5, headers=None)
        )
        received = [await sub.next_msg(timeout=5) for _ in range(3)]
        await received[2].respond(b"ok")  # the first two stay unanswered
        assert 0.19 <= await short < 0.9
        assert 0.99 <= await long < 2.5
        assert not inbox._waiting and answered.done()
    finally:
        await responder.close()
        await client.close()


async def test_a_burst_of_timeouts_ends_each_request_on_time(nats_url: str, uid: str) -> None:
    """Hundreds of requests with spread deadlines, none answered (a stalled worker): each
    times out no earlier than its own deadline and within a slot (10 ms) or so after it."""
    responder, client = await nats.connect(nats_url), await nats.connect(nats_url)
    try:
        await responder.subscribe(f"stalled.{uid}")  # receives, never answers
        await round_trip(responder)
        inbox = Inbox(client)
        timeouts = [0.05 + i * 0.0005 for i in range(500)]
        took = await asyncio.gather(
            *(time_to_timeout(inbox, f"stalled.{uid}", t) for t in timeouts)
        )
        late = [elapsed - t for elapsed, t in zip(took, timeouts, strict=True)]
        assert min(late) > -0.002  # a timer may fire a fraction of a millisecond early
        assert sorted(late)[len(late) // 2] < 0.05  # typically within the slot
        assert not inbox._waiting and not inbox._slots
    finally:
        await responder.close()
        await client.close()
