"""The worker runtime over real NATS: errors, deadlines, reply subjects, concurrency, drain."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from nexus_bus import (
    Gateway,
    NoResponders,
    NotFound,
    Operations,
    RequestContext,
    UpstreamTimeout,
    Worker,
)
from nexus_bus.errors import InternalError, NexusError
from nexus_bus.observability import METRICS, configure_logging, logger
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]


class Probe(msgspec.Struct, frozen=True, kw_only=True):
    seconds: float = 0.0
    fail: str = ""


class Seen(msgspec.Struct, frozen=True, kw_only=True):
    trace_id: str
    request_id: str


class OddError(BaseException):
    """A handler's own BaseException subclass."""


class NotAnErrorStatus(NexusError):
    """A user's error class declaring a status that is not an error's."""

    code, http_status = "moved", 302


class BeyondHttp(NexusError):
    """A user's error class declaring a status HTTP does not have."""

    code, http_status = "odd", 999


class State:
    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.running = 0
        self.peak = 0


def probe_ops(op: str, state: State) -> Operations:
    ops = Operations(op)

    @ops.action("run", public=True)
    async def run(req: Probe, ctx: RequestContext) -> Seen:
        state.started += 1
        state.running += 1
        state.peak = max(state.peak, state.running)
        try:
            await asyncio.sleep(req.seconds)
            if req.fail == "runtime":
                raise RuntimeError("secret internal detail")
            if req.fail == "notfound":
                raise NotFound("no such thing")
            if req.fail == "notfound-number":
                raise NotFound(42)  # type: ignore[arg-type]
            if req.fail == "notfound-long":  # a detail quoting a large input, say
                raise NotFound("no such thing: " + "x" * 2_000_000)
            if req.fail == "cancelled":  # awaiting a task someone else cancelled
                other = asyncio.ensure_future(asyncio.sleep(10))
                other.cancel()
                await other
            if req.fail == "base":
                raise OddError("not an Exception")
            if req.fail == "302":
                raise NotAnErrorStatus("see elsewhere")
            if req.fail == "999":
                raise BeyondHttp("off the scale")
            state.finished += 1
            return Seen(trace_id=ctx.trace.trace_id, request_id=ctx.request_id)
        except asyncio.CancelledError:
            state.cancelled += 1
            raise
        finally:
            state.running -= 1

    @ops.action("log", public=True)
    async def log(req: Probe, ctx: RequestContext) -> Seen:
        logger.info("inside the handler")
        return Seen(trace_id=ctx.trace.trace_id, request_id=ctx.request_id)

    return ops


@pytest.fixture
async def probe(nats_url: str, redis_url: str, uid: str) -> AsyncIterator[Callable[..., object]]:
    started: list[Worker] = []

    async def start(**worker_settings: object) -> tuple[Worker, State, str]:
        state = State()
        op = f"rt{uid}"
        settings = (
            make_settings(nats_url, redis_url, worker=worker_settings)
            if worker_settings
            else make_settings(nats_url, redis_url)
        )
        w = Worker(settings, [probe_ops(op, state)])
        await w.start()
        started.append(w)
        return w, state, op

    yield start
    for w in started:
        await w.drain(1)


async def test_unexpected_exception_is_a_typed_500_and_the_worker_keeps_serving(
    probe: Callable[..., object], gateway: Gateway
) -> None:
    _, state, op = await probe()  # type: ignore[operator]
    with pytest.raises(InternalError) as info:
        await gateway.request(op, "run", {"fail": "runtime"})
    assert info.value.http_status == 500
    assert "secret internal detail" not in info.value.detail
    with pytest.raises(NotFound):
        await gateway.request(op, "run", {"fail": "notfound"})
    assert (await gateway.request(op, "run", {}))["request_id"]
    assert state.finished == 1


@pytest.mark.parametrize("fail", ["cancelled", "base"])
async def test_a_handler_letting_out_a_baseexception_is_a_500_not_a_silence(
    probe: Callable[..., object], gateway: Gateway, fail: str
) -> None:
    """A CancelledError that is not the request's own cancellation (the handler awaited a
    task someone else cancelled), or a BaseException subclass: the caller is answered at
    once instead of waiting out its timeout."""
    _, _, op = await probe()  # type: ignore[operator]
    started = time.monotonic()
    with pytest.raises(InternalError):
        await gateway.request(op, "run", {"fail": fail}, timeout=10)
    assert time.monotonic() - started < 2
    assert (await gateway.request(op, "run", {}))["request_id"]


async def test_an_error_with_a_huge_detail_keeps_its_code_and_status(
    probe: Callable[..., object], gateway: Gateway
) -> None:
    """Before: the problem body outgrew max_payload, and the 404 the handler raised was
    replaced by 413 payload_too_large, a status that tells the caller to send less."""
    _, _, op = await probe()  # type: ignore[operator]
    with pytest.raises(NotFound) as info:
        await gateway.request(op, "run", {"fail": "notfound-long"})
    assert info.value.detail.startswith("no such thing: xxx")
    assert info.value.detail.endswith("… (cut at 4096 characters)")
    assert len(info.value.detail) < 4200
    with pytest.raises(NotFound, match=r"^42$"):  # before: internal, no problem document
        await gateway.request(op, "run", {"fail": "notfound-number"})


@pytest.mark.parametrize("fail", ["302", "999"])
async def test_an_error_class_with_a_status_that_is_not_an_error_status_is_a_500(
    probe: Callable[..., object], nats_url: str, gateway: Gateway, fail: str
) -> None:
    """Before: `Nexus-Status: 302` with a problem body, which every client (the gateway, the
    shim: HTTP 302 without a Location) took for a success, or `Nexus-Status: 999`, which
    docs/contract.md has no place for."""
    _, _, op = await probe()  # type: ignore[operator]
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(f"nexus.{op}.run", f'{{"fail": "{fail}"}}'.encode(), timeout=5)
    finally:
        await nc.close()
    assert msg.headers is not None
    assert (msg.headers["Nexus-Status"], msg.headers["Nats-Service-Error-Code"]) == ("500", "500")
    problem = msgspec.json.decode(msg.data)
    assert (problem["status"], problem["code"]) == (500, "internal")
    with pytest.raises(InternalError):
        await gateway.request(op, "run", {"fail": fail})
    assert (await gateway.request(op, "run", {}))["request_id"]


async def test_error_reply_headers_follow_the_micro_convention(
    probe: Callable[..., object], nats_url: str
) -> None:
    _, _, op = await probe()  # type: ignore[operator]
    nc = await nats.connect(nats_url)
    try:
        msg = await nc.request(f"nexus.{op}.run", b'{"fail": "notfound"}', timeout=5)
        assert msg.headers is not None
        assert msg.headers["Nexus-Status"] == "404"
        assert msg.headers["Nats-Service-Error-Code"] == "404"
        assert msg.headers["Nats-Service-Error"].startswith("not_found")
        assert msg.headers["Content-Type"] == "application/problem+json"
        problem = msgspec.json.decode(msg.data)
        assert (
            problem["code"] == "not_found"
            and problem["request_id"] == msg.headers["Nexus-Request-Id"]
        )
    finally:
        await nc.close()


async def test_request_and_trace_ids_are_carried(
    probe: Callable[..., object], gateway: Gateway
) -> None:
    _, _, op = await probe()  # type: ignore[operator]
    parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    seen = await gateway.request(op, "run", {}, request_id="req-42", traceparent=parent)
    assert seen == {"trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "request_id": "req-42"}
    fresh = await gateway.request(op, "run", {}, request_id="bad id\r\n", traceparent="junk")
    assert fresh["request_id"] != "bad id\r\n" and len(fresh["trace_id"]) == 32


async def test_handler_log_lines_carry_the_request_context(
    probe: Callable[..., object], gateway: Gateway
) -> None:
    _, _, op = await probe()  # type: ignore[operator]
    sink = io.StringIO()
    configure_logging("worker", "INFO", sink=sink)
    try:
        seen = await gateway.request(op, "log", {}, request_id="req-log")
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    inside = next(doc for doc in lines if doc["message"] == "inside the handler")
    assert (inside["trace_id"], inside["correlation_id"]) == (seen["trace_id"], "req-log")
    assert (inside["op"], inside["action"]) == (op, "log")


async def test_expired_requests_are_dropped_before_they_start(
    probe: Callable[..., object], nats_url: str
) -> None:
    """What nats-py's reconnect buffer delivers late is never executed."""
    _, state, op = await probe()  # type: ignore[operator]
    before = METRICS.expired.labels(op)._value.get()
    nc = await nats.connect(nats_url)
    try:
        stale = {"Nexus-Deadline": str(int(time.time() * 1000) - 60_000), "Nexus-Timeout-Ms": "100"}
        with pytest.raises(nats.errors.TimeoutError):
            await nc.request(f"nexus.{op}.run", b"{}", timeout=0.5, headers=stale)
        fresh = {"Nexus-Deadline": str(int(time.time() * 1000) + 5_000)}
        await nc.request(f"nexus.{op}.run", b"{}", timeout=5, headers=fresh)
    finally:
        await nc.close()
    assert state.started == 1
    assert METRICS.expired.labels(op)._value.get() == before + 1


async def test_a_spent_budget_is_dropped_not_executed(
    probe: Callable[..., object], nats_url: str
) -> None:
    """`Nexus-Timeout-Ms: 0`: the caller had no time left when it sent the request."""
    _, state, op = await probe()  # type: ignore[operator]
    before = METRICS.expired.labels(op)._value.get()
    nc = await nats.connect(nats_url)
    try:
        future = str(int(time.time() * 1000) + 5_000)
        for spent in (
            {"Nexus-Timeout-Ms": "0"},
            {"Nexus-Timeout-Ms": "0", "Nexus-Deadline": future},
        ):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(f"nexus.{op}.run", b"{}", timeout=0.5, headers=spent)
        await nc.request(f"nexus.{op}.run", b"{}", timeout=5, headers={"Nexus-Timeout-Ms": "5000"})
    finally:
        await nc.close()
    assert state.started == 1
    assert METRICS.expired.labels(op)._value.get() == before + 2


async def test_handlers_past_their_deadline_are_cancelled(
    probe: Callable[..., object], gateway: Gateway
) -> None:
    _, state, op = await probe()  # type: ignore[operator]
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await gateway.request(op, "run", {"seconds": 30}, timeout=0.3)
    assert loop.time() - started < 2
    for _ in range(50):  # the reaper runs every 100 ms, plus the configured clock skew
        if state.cancelled:
            break
        await asyncio.sleep(0.05)
    assert state.cancelled == 1 and state.running == 0


async def test_replies_only_to_inbox_subjects(probe: Callable[..., object], nats_url: str) -> None:
    _, state, op = await probe()  # type: ignore[operator]
    nc = await nats.connect(nats_url)
    try:
        hijacked = await nc.subscribe(f"nexus.{op}.victim")
        await nc.publish(f"nexus.{op}.run", b"{}", reply=f"nexus.{op}.victim")
        await nc.flush()
        with pytest.raises(nats.errors.TimeoutError):
            await hijacked.next_msg(timeout=0.5)
        assert state.started == 0
    finally:
        await nc.close()


async def test_concurrency_is_bounded_per_op(
    probe: Callable[..., object], gateway: Gateway
) -> None:
    _, state, op = await probe(concurrency=3)  # type: ignore[operator]
    replies = await asyncio.gather(
        *(gateway.request(op, "run", {"seconds": 0.1}) for _ in range(12))
    )
    assert len(replies) == 12 and state.finished == 12
    assert state.peak == 3


async def test_drain_finishes_in_flight_and_takes_no_new_requests(
    probe: Callable[..., object], gateway: Gateway
) -> None:
    w, state, op = await probe()  # type: ignore[operator]
    inflight = [asyncio.create_task(gateway.request(op, "run", {"seconds": 0.4})) for _ in range(5)]
    for _ in range(500):
        if state.started == 5:
            break
        await asyncio.sleep(0.01)
    await w.drain(5)
    assert len(await asyncio.gather(*inflight)) == 5 and state.finished == 5
    with pytest.raises(NoResponders):
        await gateway.request(op, "run", {})


async def test_the_drain_grace_bounds_the_whole_drain(
    probe: Callable[..., object], nats_url: str
) -> None:
    """Every slot busy past the grace: the drain ends within one grace (each of its steps
    took a whole grace before), the request it cancels is answered 504 at once, and the ones
    still waiting for a slot 503."""
    w, state, op = await probe(concurrency=1)  # type: ignore[operator]
    nc = await nats.connect(nats_url)
    budget = {"Nexus-Timeout-Ms": "30000"}

    async def call(seconds: float) -> str:
        body = msgspec.json.encode({"seconds": seconds})
        reply = await nc.request(f"nexus.{op}.run", body, timeout=10, headers=budget)
        return (reply.headers or {}).get("Nexus-Status", "")

    try:
        inflight = asyncio.create_task(call(5))
        for _ in range(500):
            if state.started == 1:
                break
            await asyncio.sleep(0.01)
        waiting = [asyncio.create_task(call(0.1)) for _ in range(2)]
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await w.drain(1.0)
        assert time.monotonic() - started < 1.8
        assert await asyncio.wait_for(inflight, 2) == "504"
        assert await asyncio.wait_for(asyncio.gather(*waiting), 2) == ["503", "503"]
        assert state.cancelled == 1
    finally:
        await nc.close()


def slowpoke_worker(
    nats_url: str, redis_url: str, cwd: Path, **popen: Any
) -> subprocess.Popen[str]:
    """`nexus-bus worker --app tests.integration.runtime_ops:ops` as a process of its own;
    `NEXUS_*` in `popen["env"]` add to its environment."""
    settings = make_settings(nats_url, redis_url)
    env = {
        **os.environ,
        "NEXUS_NATS__URL": nats_url,
        "NEXUS_REDIS__URL": redis_url,
        "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir),
        "NEXUS_LOG__LEVEL": "WARNING",
        "PYTHONPATH": str(ROOT),
        **popen.pop("env", {}),
    }
    return subprocess.Popen(
        [sys.executable, "-m", "nexus_bus", "worker", "--app", "tests.integration.runtime_ops:ops"],
        env=env, cwd=cwd, text=True, **popen,
    )  # fmt: skip


async def slowpoke_subscribed(nc: Client) -> None:
    """Until the worker process answers (it subscribed)."""
    for _ in range(100):
        try:
            await nc.request("nexus.slowpoke.nap", b'{"seconds": 0}', timeout=0.5)
            return
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            await asyncio.sleep(0.1)


def test_sigterm_drains_a_worker_process(nats_url: str, redis_url: str, tmp_path: Path) -> None:
    """`nexus-bus worker` on SIGTERM: in-flight requests answered, then exit 0."""
    proc = slowpoke_worker(nats_url, redis_url, tmp_path)

    async def scenario() -> list[dict[str, object]]:
        nc = await nats.connect(nats_url)
        try:
            await slowpoke_subscribed(nc)
            calls = [
                asyncio.create_task(
                    nc.request(
                        "nexus.slowpoke.nap",
                        f'{{"seconds": 0.8, "tag": "t{i}"}}'.encode(),
                        timeout=10,
                    )
                )
                for i in range(4)
            ]
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            return [msgspec.json.decode((await c).data) for c in calls]
        finally:
            await nc.close()

    try:
        replies = asyncio.run(scenario())
        assert sorted(r["tag"] for r in replies) == ["t0", "t1", "t2", "t3"]
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_handler_ignoring_its_cancellation_does_not_hold_the_drain(
    nats_url: str, redis_url: str, tmp_path: Path
) -> None:
    """A handler that catches CancelledError and carries on: before, SIGTERM never ended
    the worker (the drain awaited the cancelled handler, then asyncio.run did, forever), so
    only a SIGKILL did. Now the drain goes on without it, the worker serves the others until
    then, and exits 1 after the grace plus a second, saying which op held it."""
    proc = slowpoke_worker(
        nats_url, redis_url, tmp_path,
        env={"NEXUS_WORKER__DRAIN_GRACE_S": "0.5"}, stderr=subprocess.PIPE,
    )  # fmt: skip

    async def scenario() -> None:
        nc = await nats.connect(nats_url)
        try:
            await slowpoke_subscribed(nc)
            await nc.publish("nexus.slowpoke.stubborn", b'{"seconds": 60}', reply=nc.new_inbox())
            await asyncio.sleep(0.3)
            canary = await nc.request("nexus.slowpoke.nap", b'{"tag": "canary", "seconds": 0}')
            assert msgspec.json.decode(canary.data)["tag"] == "canary"
        finally:
            await nc.close()

    try:
        asyncio.run(scenario())
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
        assert proc.returncode == 1
        assert time.monotonic() - sent < 5
        assert "handlers of ops slowpoke ignored their cancellation" in stderr, stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
