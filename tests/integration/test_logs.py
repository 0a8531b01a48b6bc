"""What a failure leaves in the JSON log: the handler's traceback, and a dead job's ids.

Each test serves its own op (`l<uid>`) and reads the lines of that op only.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from nexus_bus import Gateway, InternalError, Operations, RequestContext, Settings, Unavailable
from nexus_bus.config import JobsSettings
from nexus_bus.jobs.client import wait_job
from nexus_bus.observability import configure_logging
from nexus_bus.runtime.worker import Worker
from nexus_bus.schemas.jobs import JobStatus


@contextmanager
def json_log() -> Iterator[io.StringIO]:
    """Log JSON lines at INFO into a buffer for the block, then back to the test setup."""
    sink = io.StringIO()
    configure_logging("nexus-test", "INFO", sink=sink)
    try:
        yield sink
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)


def lines_of(sink: io.StringIO, op: str) -> list[dict[str, Any]]:
    return [d for d in map(json.loads, sink.getvalue().splitlines()) if d.get("op") == op]


async def logged_boom(
    gateway: Gateway, settings: Settings, ops: Operations, uid: str, **request: Any
) -> io.StringIO:
    """The JSON lines of one call of `ops`'s `boom` action, which raises (a 500), served by
    a worker of its own; the request id is `r<uid>`."""
    worker = Worker(settings, [ops])
    await worker.start()
    try:
        with json_log() as sink, pytest.raises(InternalError):
            await gateway.request(ops.op, "boom", {}, request_id=f"r{uid}", **request)
    finally:
        await worker.drain(1)
    return sink


async def test_a_handler_exception_is_logged_with_its_traceback_and_ids(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"l{uid}")

    @ops.action("boom")
    async def boom(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise RuntimeError(f"broken {uid}")

    trace_id = uid.ljust(32, "a")
    traceparent = f"00-{trace_id}-{'b' * 16}-01"
    sink = await logged_boom(gateway, settings, ops, uid, traceparent=traceparent)
    [line] = [d for d in lines_of(sink, ops.op) if d["level"] == "ERROR"]
    assert line["trace_id"] == trace_id and line["correlation_id"] == f"r{uid}"
    assert line["exception"] == f"RuntimeError: broken {uid}"
    assert "Traceback (most recent call last)" in line["traceback"]
    assert "in boom" in line["traceback"]  # the handler's own frame


class Unprintable(Exception):
    """An exception whose message cannot be built: its `__str__` raises."""

    def __str__(self) -> str:
        raise RuntimeError("no message")


async def test_an_exception_whose_str_raises_is_still_one_json_line(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    """Before: the JSON sink raised building the line's `exception` field, loguru printed a
    multi-line "Logging error in Loguru Handler" dump to stderr instead, and the ERROR line
    (with the request and trace ids) was lost."""
    ops = Operations(f"l{uid}")

    @ops.action("boom")
    async def boom(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise Unprintable

    @ops.action("canary")
    async def canary(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return {"ok": True}

    worker = Worker(settings, [ops])
    await worker.start()
    try:
        with json_log() as sink:
            with pytest.raises(InternalError):
                await gateway.request(ops.op, "boom", {}, request_id=f"r{uid}")
            assert await gateway.request(ops.op, "canary", {}) == {"ok": True}
    finally:
        await worker.drain(1)
    [line] = [d for d in lines_of(sink, ops.op) if d["level"] == "ERROR"]
    assert line["correlation_id"] == f"r{uid}"
    assert line["exception"] == "Unprintable: <exception str() failed>"
    assert "in boom" in line["traceback"]


LOKI_MAX_LINE = 256 * 1024  # Loki's default limits_config.max_line_size


async def test_a_handler_exception_with_a_huge_message_is_logged_in_one_bounded_line(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    """Before: a 3 MB exception message went into the ERROR line twice, as `exception` and
    at the end of `traceback`: a 6 MB line, which a log pipeline such as Loki (256 KB per
    line by default) rejects whole, ids and all."""
    ops = Operations(f"l{uid}")

    @ops.action("boom")
    async def boom(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise RuntimeError(f"broken {uid} " + "x" * 3_000_000 + " end")

    sink = await logged_boom(gateway, settings, ops, uid)
    assert max(map(len, sink.getvalue().splitlines())) < LOKI_MAX_LINE
    [line] = [d for d in lines_of(sink, ops.op) if d["level"] == "ERROR"]
    assert line["correlation_id"] == f"r{uid}"
    assert line["exception"].startswith(f"RuntimeError: broken {uid} xxx")
    assert line["exception"].endswith("xxx end")
    assert "characters cut" in line["exception"]
    assert "in boom" in line["traceback"]  # the handler's own frame is kept
    assert line["traceback"].endswith("xxx end\n")


async def test_chained_exceptions_of_escaped_characters_still_fit_one_line(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    """A control character is six bytes in a JSON line (`\\u0001`): with 16,384 characters
    of message and 65,536 of traceback kept, a handler raising one long message from another
    still wrote a line of 296 KB."""
    ops = Operations(f"l{uid}")
    text = "\x01" * 1_000_000

    @ops.action("boom")
    async def boom(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        try:
            raise ValueError(text)
        except ValueError as exc:
            raise RuntimeError(text) from exc

    sink = await logged_boom(gateway, settings, ops, uid)
    assert max(len(line.encode()) for line in sink.getvalue().splitlines()) < LOKI_MAX_LINE
    [line] = [d for d in lines_of(sink, ops.op) if d["level"] == "ERROR"]
    assert line["correlation_id"] == f"r{uid}" and "in boom" in line["traceback"]


async def test_human_readable_lines_show_no_values_from_the_failed_request(
    gateway: Gateway, settings: Settings, admin_token: str, uid: str
) -> None:
    """With `log.json_lines` false, the traceback of a handler's exception was loguru's
    "diagnose" one: every frame's local variables, so the request's body (a password here)
    and its headers (cut at 100 characters, which here ended before the token) went to the
    log."""
    ops = Operations(f"l{uid}")

    @ops.action("login")
    async def login(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise RuntimeError("login failed")

    worker = Worker(settings, [ops])
    await worker.start()
    sink = io.StringIO()
    configure_logging("nexus-test", "INFO", json_lines=False, sink=sink)
    try:
        with pytest.raises(InternalError):
            await gateway.request(ops.op, "login", {"password": f"hunter2-{uid}"})
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)
        await worker.drain(1)
    text = sink.getvalue()
    assert "RuntimeError: login failed" in text and "in login" in text
    assert admin_token[:40] not in text
    assert f"hunter2-{uid}" not in text


async def test_a_handler_blocking_the_event_loop_is_named_in_a_warning(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    """Synchronous code in an async handler stops every request of its worker, other ops'
    included, and nothing can cancel it. Before, nothing said so: the worker just went
    silent. Now a WARNING says how long the loop was blocked and which ops ran."""
    ops = Operations(f"l{uid}")

    @ops.action("crunch")
    async def crunch(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        time.sleep(1.0)  # noqa: ASYNC251 - the mistake under test
        return {"done": True}

    worker = Worker(settings, [ops])
    await worker.start()
    try:
        with json_log() as sink:
            assert await gateway.request(ops.op, "crunch", {}) == {"done": True}
            await asyncio.sleep(0.3)  # the reaper's next tick
    finally:
        await worker.drain(1)
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    # Every worker in this process says so (the tests' session worker too); ours names its op.
    blocked = [d for d in lines if "event loop was blocked" in d["message"]]
    assert blocked and all(d["level"] == "WARNING" for d in blocked)
    assert any(d["message"].endswith(f"ops running meanwhile: {ops.op}") for d in blocked), blocked


async def test_a_dead_letter_line_carries_the_jobs_trace_and_request_ids(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"l{uid}")

    @ops.action("down")
    async def down(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise Unavailable("dependency down")

    jobs = JobsSettings(**{**settings.jobs.model_dump(), "max_deliver": 1})
    trace_id = uid.ljust(32, "c")
    worker = Worker(settings.model_copy(update={"jobs": jobs}), [ops])
    await worker.start()
    try:
        with json_log() as sink:
            accepted = await gateway.submit(
                ops.op, "down", {}, request_id=f"r{uid}",
                traceparent=f"00-{trace_id}-{'d' * 16}-01",
            )
            job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=15)
    finally:
        await worker.drain(1)
    assert job.status is JobStatus.DEAD
    [line] = [d for d in lines_of(sink, ops.op) if "dead-lettered" in d["message"]]
    assert line["trace_id"] == trace_id and line["correlation_id"] == f"r{uid}"
    assert line["job_id"] == accepted.job_id
