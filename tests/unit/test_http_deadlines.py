"""`ReadDeadlines`: the shim's body read timeout, one timer for every read in flight."""

from __future__ import annotations

import asyncio
import time

import pytest

from nexus_bus.http.deadlines import ReadDeadlines
from nexus_bus.http.problems import RequestTimeout

TIMEOUT_S = 0.2


async def test_a_read_done_in_time_returns_its_result_and_leaves_no_timer() -> None:
    deadlines = ReadDeadlines(TIMEOUT_S)

    async def quick() -> bytes:
        await asyncio.sleep(0)
        return b"body"

    assert await deadlines.run(quick()) == b"body"
    await asyncio.sleep(TIMEOUT_S / 4)  # the one sweep due: nothing pending, not re-armed
    assert deadlines._timer is None
    assert not deadlines._pending


async def test_a_read_past_its_deadline_is_a_request_timeout_within_an_eighth_more() -> None:
    deadlines = ReadDeadlines(TIMEOUT_S)
    started = time.monotonic()
    with pytest.raises(RequestTimeout, match=r"within 0\.2s"):
        await deadlines.run(asyncio.sleep(10))
    elapsed = time.monotonic() - started
    assert TIMEOUT_S <= elapsed < TIMEOUT_S * 9 / 8 + 0.1
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0  # the cancel was taken back


async def test_each_read_has_its_own_deadline() -> None:
    deadlines = ReadDeadlines(TIMEOUT_S)

    async def late() -> str:
        await asyncio.sleep(TIMEOUT_S / 2)  # the first read's clock has run half out
        return await deadlines.run(asyncio.sleep(TIMEOUT_S * 0.7, "second"))

    first = asyncio.create_task(deadlines.run(asyncio.sleep(10)))
    second = asyncio.create_task(late())
    with pytest.raises(RequestTimeout):
        await first
    assert await second == "second"  # began later: 0.7 of its timeout is within it


async def test_a_cancel_from_elsewhere_stays_a_cancel() -> None:
    deadlines = ReadDeadlines(TIMEOUT_S)
    reading = asyncio.create_task(deadlines.run(asyncio.sleep(10)))
    await asyncio.sleep(0.01)
    reading.cancel()  # a shutdown, say: not the client's fault, so no 408
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert not deadlines._pending


async def test_a_cancel_from_elsewhere_during_the_timeout_is_not_swallowed() -> None:
    deadlines = ReadDeadlines(TIMEOUT_S)

    async def read_then_cancelled() -> None:
        task = asyncio.current_task()
        assert task is not None

        async def stuck() -> None:
            try:
                await asyncio.sleep(10)
            finally:
                task.cancel()  # someone else cancels too, as the sweep does

        await deadlines.run(stuck())

    reading = asyncio.create_task(read_then_cancelled())
    with pytest.raises(asyncio.CancelledError):
        await reading  # a CancelledError, not the 408: the other cancel is not swallowed
    assert reading.cancelled()


async def test_close_stops_the_timer() -> None:
    deadlines = ReadDeadlines(TIMEOUT_S)
    reading = asyncio.create_task(deadlines.run(asyncio.sleep(0.05)))
    await asyncio.sleep(0)
    assert deadlines._timer is not None
    deadlines.close()
    assert deadlines._timer is None
    await reading


def test_a_second_event_loop_gets_a_timer_of_its_own() -> None:
    """An app object outliving its loop (tests run one loop per test) keeps timing reads."""
    deadlines = ReadDeadlines(TIMEOUT_S)

    async def one_read_left_pending() -> None:
        asyncio.get_running_loop().create_task(deadlines.run(asyncio.sleep(10)))
        await asyncio.sleep(0)  # it began, and armed this loop's timer

    asyncio.run(one_read_left_pending())  # the loop closes with the read and timer pending

    async def timed_out() -> None:
        with pytest.raises(RequestTimeout):
            await deadlines.run(asyncio.sleep(10))

    asyncio.run(timed_out())
