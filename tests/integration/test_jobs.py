"""Jobs over real NATS JetStream: submit, status, retries with backoff, dead-lettering, replay.

Each test serves its own op (`j<uid>`), so its consumer, DLQ entries and counters are its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import sys
import time
import weakref
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
from nats.aio.msg import Msg
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nexus_bus import (
    Conflict,
    Forbidden,
    Gateway,
    InternalError,
    InvalidRequest,
    NexusError,
    NotFound,
    Operations,
    PayloadTooLarge,
    RequestContext,
    Settings,
    Unavailable,
    UnknownOperation,
    Worker,
)
from nexus_bus.bus.metadata import JETSTREAM_HEADERS_ALLOWANCE, headers_size
from nexus_bus.config import JobsSettings, TracingSettings
from nexus_bus.constants import (
    DLQ_STREAM,
    H_AUTHORIZATION,
    H_DEADLINE,
    H_IDEMPOTENCY_KEY,
    H_REQUEST_ID,
    JOBS_STREAM,
)
from nexus_bus.embedded import ServerProcess
from nexus_bus.jobs.client import get_job, job_store, submit_job, wait_job, watch_job
from nexus_bus.jobs.dlq import DeadLetterQueue
from nexus_bus.jobs.envelope import job_headers, job_id_for, new_job_id
from nexus_bus.jobs.metrics import JOBS_COMPLETED, JOBS_DEAD_LETTERED
from nexus_bus.jobs.status import JobRecord, JobStore, advance, encode_record
from nexus_bus.observability.tracing import TRACING, configure_tracing
from nexus_bus.runtime.jobs import consumer_name
from nexus_bus.schemas.jobs import JobStatus
from tests.conftest import make_settings


def jobs_settings(settings: Settings, **jobs: Any) -> Settings:
    """`settings` with its jobs section changed (validated)."""
    merged = JobsSettings(**{**settings.jobs.model_dump(), **jobs})
    return settings.model_copy(update={"jobs": merged})


@contextlib.asynccontextmanager
async def serving(settings: Settings, *groups: Operations, **jobs: Any) -> AsyncIterator[Worker]:
    """A worker serving `groups`, with its job consumers, for one test."""
    worker = Worker(jobs_settings(settings, **jobs), list(groups))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain(1)


def dlq_of(gateway: Gateway, settings: Settings) -> Any:
    async def make() -> DeadLetterQueue:
        return DeadLetterQueue(gateway.nc.jetstream(), await job_store(gateway.nc, settings))

    return make()


async def test_builtin_operation_runs_as_a_job(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    # The session worker serves the built-in ops: the same data.put handler runs as a job.
    accepted = await gateway.submit("data", "put", {"key": f"job.{uid}", "value": {"n": 1}})
    assert accepted.status is JobStatus.PENDING and len(accepted.job_id) == 32
    job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 1
    assert job.op == "data" and job.action == "put"
    assert job.result["key"] == f"job.{uid}" and job.result["revision"] > 0
    got = await gateway.request("data", "get", {"key": f"job.{uid}"})
    assert got["value"] == {"n": 1} and got["revision"] == job.result["revision"]
    assert (await gateway.job(accepted.job_id)) == job


async def test_status_changes_can_be_watched(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")

    @ops.action("slow")
    async def slow(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        await asyncio.sleep(0.3)
        return {"done": True}

    async with serving(settings, ops):
        accepted = await gateway.submit(ops.op, "slow", {})
        seen = [job.status async for job in watch_job(gateway.nc, settings, accepted.job_id)]
    assert JobStatus.RUNNING in seen
    assert seen[-1] is JobStatus.SUCCEEDED
    assert seen.index(JobStatus.RUNNING) < len(seen) - 1


async def test_idempotency_key_returns_the_same_job_and_runs_it_once(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    calls: list[int] = []

    @ops.action("once", idempotent=False)
    async def once(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        calls.append(req["n"])
        return {"n": req["n"]}

    async with serving(settings, ops):
        first = await gateway.submit(ops.op, "once", {"n": 1}, idempotency_key=f"k-{uid}")
        again = await gateway.submit(ops.op, "once", {"n": 1}, idempotency_key=f"k-{uid}")
        assert again.job_id == first.job_id
        done = await wait_job(gateway.nc, settings, first.job_id, timeout_s=10)
        late = await gateway.submit(ops.op, "once", {"n": 1}, idempotency_key=f"k-{uid}")
        other = await gateway.submit(ops.op, "once", {"n": 2}, idempotency_key=f"k2-{uid}")
        await wait_job(gateway.nc, settings, other.job_id, timeout_s=10)
    assert done.status is JobStatus.SUCCEEDED
    assert late.job_id == first.job_id and late.status is JobStatus.SUCCEEDED
    assert other.job_id != first.job_id
    assert calls == [1, 2]


async def test_failing_twice_then_succeeding_takes_three_deliveries_on_the_schedule(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    deliveries: list[tuple[int, float]] = []

    @ops.action("flaky")
    async def flaky(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        deliveries.append((ctx.attempt, time.monotonic()))
        if ctx.attempt <= 2:
            raise Unavailable("not yet")
        return {"attempt": ctx.attempt}

    # Delays after attempts 1 and 2: ceilings 0.4 s and 0.8 s, "equal" jitter keeps >= half.
    async with serving(settings, ops, backoff_base_s=0.4, backoff_multiplier=2, max_deliver=5):
        accepted = await gateway.submit(ops.op, "flaky", {})
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=15)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 3
    assert job.result == {"attempt": 3} and job.error is None
    assert [a for a, _ in deliveries] == [1, 2, 3]
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(deliveries)]
    assert 0.2 <= gaps[0] <= 0.4 + 0.6, gaps
    assert 0.4 <= gaps[1] <= 0.8 + 0.6, gaps
    dlq = await dlq_of(gateway, settings)
    assert await dlq.entries(op=ops.op) == []


async def test_always_retryable_is_dead_lettered_after_max_deliver(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    attempts: list[int] = []

    @ops.action("down")
    async def down(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        raise Unavailable("dependency down")

    started = time.time()
    async with serving(settings, ops, backoff_base_s=0.05, max_deliver=4):
        accepted = await gateway.submit(ops.op, "down", {"payload": uid}, request_id=f"r{uid}")
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=15)
        await asyncio.sleep(0.3)  # nothing may arrive after the dead-lettering
    assert attempts == [1, 2, 3, 4]
    assert job.status is JobStatus.DEAD and job.attempts == 4
    assert job.error["code"] == "unavailable" and job.error["request_id"] == f"r{uid}"
    entries = await (await dlq_of(gateway, settings)).entries(op=ops.op)
    assert len(entries) == 1
    entry = entries[0]
    assert entry.job_id == accepted.job_id and (entry.op, entry.action) == (ops.op, "down")
    assert entry.attempts == 4 and entry.error_code == "unavailable" and entry.error_status == 503
    assert entry.error_detail == "dependency down"
    assert entry.data == f'{{"payload":"{uid}"}}'.encode()
    assert entry.original_headers()["Nexus-Request-Id"] == f"r{uid}"
    assert started <= entry.enqueued_at <= entry.failed_at <= time.time()


class Unprocessable(NexusError):
    """A client error this version has no class for: it travels as an unknown code (whose
    title, rebuilt on the runner's side, is the code)."""

    code, http_status, title = "unprocessable", 422, "unprocessable"


@pytest.mark.parametrize(
    "error", [InvalidRequest, Forbidden, NotFound, Conflict, PayloadTooLarge, Unprocessable]
)
async def test_a_client_error_fails_the_job_without_dead_lettering_it(
    gateway: Gateway, settings: Settings, uid: str, error: type[NexusError]
) -> None:
    """The operation answered the request, as it would a synchronous call: the job is
    `failed` with that problem, at once, and nothing reaches the DLQ or its alert."""
    ops = Operations(f"j{uid}")
    attempts: list[int] = []

    @ops.action("strict")
    async def strict(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        raise error("refused")

    dead_before = JOBS_DEAD_LETTERED.labels(ops.op, "failed")._value.get()
    async with serving(settings, ops, max_deliver=5):
        accepted = await gateway.submit(ops.op, "strict", {}, request_id=f"r{uid}")
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
        await asyncio.sleep(0.3)  # nothing may run or be dead-lettered after the outcome
    assert job.status is JobStatus.FAILED and job.attempts == 1 and attempts == [1]
    assert job.error == {
        "type": f"https://nexus-bus.dev/problems/{error.code}",
        "title": error.title,
        "status": error.http_status,
        "code": error.code,
        "detail": "refused",
        "request_id": f"r{uid}",
    }
    assert await (await dlq_of(gateway, settings)).entries(op=ops.op) == []
    assert JOBS_DEAD_LETTERED.labels(ops.op, "failed")._value.get() == dead_before
    assert JOBS_COMPLETED.labels(ops.op, "rejected")._value.get() == 1
    info = await gateway.nc.jetstream().consumer_info(JOBS_STREAM, consumer_name(ops.op))
    assert info.num_pending == 0 and info.num_ack_pending == 0  # acked: nothing left to run


async def test_a_body_the_operation_refuses_fails_the_job_without_dead_lettering_it(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    """Refused before the handler runs (a body that does not validate): the same."""
    accepted = await gateway.submit("data", "get", {"key": f"bad key {uid}"})
    job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert job.status is JobStatus.FAILED and job.error["code"] == "invalid_request"
    entries = await (await dlq_of(gateway, settings)).entries(op="data")
    assert accepted.job_id not in {e.job_id for e in entries}


async def test_a_msgpack_body_json_cannot_carry_fails_the_job_without_dead_lettering_it(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    """A map key that is nil: the value's JSON re-encoding failed in the handler (500
    `internal`), and the job was dead-lettered as a server fault."""
    body = b"\x82\xa3key\xa9nil" + uid[:6].encode() + b"\xa5value\x81\xc0\x01"
    accepted = await gateway.submit("data", "put", body, media="msgpack")
    job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert job.status is JobStatus.FAILED and job.error["code"] == "invalid_request"
    assert job.error["status"] == 400
    entries = await (await dlq_of(gateway, settings)).entries(op="data")
    assert accepted.job_id not in {e.job_id for e in entries}


async def test_a_permanent_server_error_is_dead_lettered_at_once_and_replay_runs_it_again(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    attempts: list[int] = []
    broken = True

    @ops.action("strict")
    async def strict(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        if broken:
            raise InternalError("broken")
        return {"ok": True}

    async with serving(settings, ops, max_deliver=5):
        accepted = await gateway.submit(ops.op, "strict", {})
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
        assert job.status is JobStatus.FAILED and job.attempts == 1
        assert job.error["code"] == "internal"
        assert attempts == [1]
        dlq = await dlq_of(gateway, settings)
        [entry] = await dlq.entries(op=ops.op)
        assert entry.attempts == 1 and entry.error_code == "internal"

        broken = False
        assert await dlq.replay(entry.seq) == accepted.job_id
        replayed = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert replayed.status is JobStatus.SUCCEEDED and replayed.result == {"ok": True}
    assert attempts == [1, 1]
    assert await dlq.entries(op=ops.op) == []
    with pytest.raises(NotFound):
        await dlq.get(entry.seq)


async def test_heartbeats_keep_a_long_job_from_being_redelivered(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    attempts: list[int] = []

    @ops.action("long")
    async def long(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        attempts.append(ctx.attempt)
        await asyncio.sleep(2.2)  # more than twice ack_wait
        return {}

    async with serving(settings, ops, ack_wait_s=1.0, heartbeat_s=0.25):
        accepted = await gateway.submit(ops.op, "long", {})
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 1
    assert attempts == [1]


async def test_a_write_before_a_retryable_failure_is_applied_once(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    seen: list[int] = []

    @ops.action("count")
    async def count(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        records = ctx.services.records
        try:
            record = await records.get(f"c.{uid}")
            n, revision = int(record.value), record.revision
        except NotFound:
            n, revision = 0, 0
        seen.append(n)
        written = await records.put(f"c.{uid}", str(n + 1).encode(), expected_revision=revision)
        if ctx.attempt == 1:
            raise Unavailable("after the write")
        return {"revision": written}

    async with serving(settings, ops, backoff_base_s=0.05):
        accepted = await gateway.submit(ops.op, "count", {})
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 2
    assert seen == [0, 1]  # the second attempt saw the first attempt's write...
    got = await gateway.request("data", "get", {"key": f"c.{uid}"})
    assert got["value"] == 1  # ...which was not applied again
    assert job.result == {"revision": got["revision"]}  # the rerun got the original outcome


async def test_a_rerun_writing_elsewhere_is_refused(
    gateway: Gateway, worker: Worker, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")

    @ops.action("drift")
    async def drift(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        await ctx.services.records.put(f"log.{uid}.{ctx.attempt}", b"1")
        if ctx.attempt == 1:
            raise Unavailable("after the write")
        return {}

    async with serving(settings, ops, backoff_base_s=0.05):
        accepted = await gateway.submit(ops.op, "drift", {})
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    # The rerun's first write names another key than the first attempt's: not guessed.
    assert job.status is JobStatus.FAILED and job.error["code"] == "internal"
    assert worker.services is not None
    assert await worker.services.records.keys(f"log.{uid}.") == [f"log.{uid}.1"]


async def test_submit_forwards_only_allowed_headers(
    gateway: Gateway, settings: Settings, uid: str, admin_token: str | None
) -> None:
    ops = Operations(f"j{uid}")

    @ops.action("echo")
    async def echo(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return {"headers": dict(ctx.headers)}

    hostile = {
        "authorization": f"Bearer {admin_token}" if admin_token else "Bearer x",
        "Nats-Rollup": "all",  # would purge the whole jobs stream if it reached the publish
        "Nats-Expected-Last-Sequence": "1",
        "Nexus-Deadline": "1",  # a caller deadline long past: jobs do not inherit it
        "X-Other": "dropped",
    }
    async with serving(settings, ops):
        accepted = await submit_job(gateway.nc, settings, ops.op, "echo", b"{}", hostile)
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert job.status is JobStatus.SUCCEEDED
    headers = job.result["headers"]
    assert H_AUTHORIZATION in headers and "authorization" not in headers
    assert not any(h.startswith("Nats-") or h == "X-Other" for h in headers)
    assert int(headers[H_DEADLINE]) > time.time() * 1000  # the job's own, fresh deadline


async def test_submit_and_status_refuse_bad_input(gateway: Gateway, settings: Settings) -> None:
    with pytest.raises(UnknownOperation):
        await gateway.submit("jobs", "run", {})
    with pytest.raises(InvalidRequest):
        await gateway.submit("data", "bad action", {})
    with pytest.raises(InvalidRequest):
        await get_job(gateway.nc, settings, "../etc/passwd")
    with pytest.raises(NotFound):
        await gateway.job("0" * 32)


async def test_unknown_action_of_a_served_op_fails_permanently(
    gateway: Gateway, settings: Settings
) -> None:
    accepted = await gateway.submit("data", "nosuchaction", {})
    job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert job.status is JobStatus.FAILED and job.error["code"] == "unknown_operation"
    entries = await (await dlq_of(gateway, settings)).entries(op="data")
    assert accepted.job_id not in {e.job_id for e in entries}


async def test_cli_lists_replays_and_purges_the_dlq(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    failing = {"on": True}

    @ops.action("fail")
    async def fail(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        if failing["on"]:
            raise InternalError("no")
        return {"n": req["n"]}

    async def cli(*args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "nexus_bus",
            *args,
            env={"NEXUS_NATS__URL": settings.nats.url, "NEXUS_LOG__LEVEL": "WARNING"},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()
        return out.decode()

    async with serving(settings, ops):
        jobs = [await gateway.submit(ops.op, "fail", {"n": n}) for n in range(3)]
        for accepted in jobs:
            await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
        listed = json.loads(await cli("dlq", "list", "--op", ops.op, "--json"))
        number = {j.job_id: n for n, j in enumerate(jobs)}
        assert sorted(e["job_id"] for e in listed) == sorted(number)
        assert all(e["error"]["code"] == "internal" for e in listed)

        failing["on"] = False
        first = listed[0]["job_id"]
        out = await cli("dlq", "replay", str(listed[0]["seq"]))
        assert first in out
        shown = json.loads(await cli("jobs", "show", first, "--wait", "10"))
        assert shown["status"] == "succeeded" and shown["result"] == {"n": number[first]}

        out = await cli("dlq", "purge", "--op", ops.op)
        assert "purged 2" in out
    assert await (await dlq_of(gateway, settings)).entries(op=ops.op) == []
    info = await gateway.nc.jetstream().stream_info(DLQ_STREAM)
    assert info.config.max_age == settings.jobs.dlq_max_age_s


async def test_a_job_whose_runs_all_died_is_dead_lettered_unrun(
    gateway: Gateway, settings: Settings, uid: str
) -> None:
    ops = Operations(f"j{uid}")
    calls: list[int] = []

    @ops.action("crashy")
    async def crashy(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        calls.append(ctx.attempt)
        return {}

    # As if three workers had each started the job and died: no worker serves the op yet.
    accepted = await gateway.submit(ops.op, "crashy", {})
    store = await job_store(gateway.nc, settings)
    record, _ = await store.get(accepted.job_id)
    await store.put(advance(record, JobStatus.RUNNING, now=time.time(), attempts=3))
    async with serving(settings, ops, max_deliver=3):
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
    assert calls == []
    assert job.status is JobStatus.DEAD and job.attempts == 3
    assert "no outcome after 3 attempts" in job.error["detail"]
    [entry] = await (await dlq_of(gateway, settings)).entries(op=ops.op)
    assert entry.job_id == accepted.job_id and entry.attempts == 3


async def test_the_first_terminal_status_wins_over_a_twin_delivery(
    gateway: Gateway, settings: Settings
) -> None:
    store = await job_store(gateway.nc, settings)
    pending = JobRecord(id=new_job_id(), op="data", action="put", status=JobStatus.PENDING)
    await store.create(pending)
    _, first = await store.get(pending.id)
    mine = advance(pending, JobStatus.RUNNING, now=1.0, attempts=1)
    twin = advance(pending, JobStatus.RUNNING, now=2.0, attempts=2)
    mine_revision = await store.write_unless_finished(mine, first)
    assert mine_revision is not None
    # The twin read an older revision: it re-reads and still writes (nothing finished yet).
    twin_revision = await store.write_unless_finished(twin, first)
    assert twin_revision is not None and twin_revision > mine_revision
    done = advance(twin, JobStatus.SUCCEEDED, now=3.0, result={"ok": True})
    assert await store.write_unless_finished(done, twin_revision) is not None
    # The slower delivery fails afterwards: its retry or dead-letter status is not written.
    late = advance(mine, JobStatus.DEAD, now=4.0, error={"code": "unavailable"})
    assert await store.write_unless_finished(late, mine_revision) is None
    stored, _ = await store.get(pending.id)
    assert stored.status is JobStatus.SUCCEEDED and stored.result == {"ok": True}


class Twins:
    """Two overlapping deliveries of one job, in an order the test chooses: the first
    delivery's heartbeats are lost (as when its event loop stalls), so JetStream redelivers it
    after `ack_wait_s` while it still runs; and its final status write waits until the
    redelivery's final status is written (each step signalled by an event)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, op: str) -> None:
        self.redelivered = asyncio.Event()  # the second delivery's handler started
        self.first_finishing = asyncio.Event()  # the first delivery's final write began
        self.second_finished = asyncio.Event()  # the second delivery's final status is stored
        in_progress, write = Msg.in_progress, JobStore.write_unless_finished
        subject = f"nexus.jobs.{op}."

        async def lost_heartbeat(msg: Msg) -> None:
            if not (msg.subject.startswith(subject) and msg.metadata.num_delivered == 1):
                await in_progress(msg)

        async def ordered(store: JobStore, record: JobRecord, revision: int | None) -> int | None:
            if record.op != op or not record.finished:
                return await write(store, record, revision)
            if record.attempts == 1:
                self.first_finishing.set()
                await self.second_finished.wait()
            written = await write(store, record, revision)
            if record.attempts == 2:
                self.second_finished.set()
            return written

        monkeypatch.setattr(Msg, "in_progress", lost_heartbeat)
        monkeypatch.setattr(JobStore, "write_unless_finished", ordered)


@pytest.mark.parametrize(
    ("first_to_dead_letter", "second_outcome", "entries_left"),
    [
        ("second", "internal", 1),  # its publish stores the entry, the first one's is a duplicate
        ("first", "internal", 1),  # the first one stores it, yet the second's status wins
        ("first", "success", 0),  # the entry is spurious: the job succeeded
    ],
)
async def test_twin_deliveries_leave_one_dlq_entry_when_both_dead_letter(
    gateway: Gateway,
    settings: Settings,
    uid: str,
    monkeypatch: pytest.MonkeyPatch,
    first_to_dead_letter: str,
    second_outcome: str,
    entries_left: int,
) -> None:
    """Both deliveries publish the entry with msg id `dlq-<seq>`, so there is one entry, and
    the first terminal status wins. The slower one (here always the first delivery) used to
    delete the entry whenever its status lost, also when the publish it made had been
    deduplicated onto the other's entry, or when the other had dead-lettered too: a dead job
    with no entry to replay."""
    ops = Operations(f"j{uid}")
    twins = Twins(monkeypatch, ops.op)

    @ops.action("broken")
    async def broken(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        if ctx.attempt == 1:
            await twins.redelivered.wait()
            if first_to_dead_letter == "second":
                await twins.second_finished.wait()
        else:
            twins.redelivered.set()
            if first_to_dead_letter == "first":
                await twins.first_finishing.wait()  # its entry is stored
            if second_outcome == "success":
                return {"ok": True}
        raise InternalError("broken")  # permanent: dead-lettered at once

    async with serving(settings, ops, ack_wait_s=0.3, heartbeat_s=0.1) as worker:
        accepted = await gateway.submit(ops.op, "broken", {})
        job = await wait_job(gateway.nc, settings, accepted.job_id, timeout_s=10)
        assert worker.jobs is not None
        for _ in range(100):  # the first delivery's bookkeeping ends after the job's status
            if worker.jobs.inflight == 0:
                break
            await asyncio.sleep(0.02)
    entries = await (await dlq_of(gateway, settings)).entries(op=ops.op)
    assert job.attempts == 2
    if second_outcome == "success":
        assert job.status is JobStatus.SUCCEEDED
    else:
        assert job.status is JobStatus.FAILED and job.error["code"] == "internal"
    assert len(entries) == entries_left, entries
    assert all(e.job_id == accepted.job_id for e in entries)


async def test_a_job_too_large_to_dead_letter_whole_is_buried_without_its_body(
    gateway: Gateway, settings: Settings, admin_token: str | None, uid: str
) -> None:
    """Body + original headers + dead-letter headers over max_payload once made the server
    close the worker's connection, and the job came back to kill the next worker too."""
    ops = Operations(f"big{uid}")

    @ops.action("strict")
    async def strict(req: Any, ctx: RequestContext) -> dict[str, Any]:
        raise InternalError("broken")  # a permanent server error: dead-lettered at once

    # Bodies up to the server's max_payload reach the handler.
    limits = settings.limits.model_copy(update={"max_body_bytes": 2 * gateway.nc.max_payload})
    settings = settings.model_copy(update={"limits": limits})
    async with serving(settings, ops, max_deliver=3, backoff_base_s=0.1, backoff_max_s=0.2) as w:
        headers = {
            "Nats-Msg-Id": f"m{uid}",
            "Content-Type": "application/json",
            H_AUTHORIZATION: f"Bearer {admin_token}",
            "Nats-Expected-Stream": JOBS_STREAM,  # what js.publish adds
        }
        header_bytes = headers_size(headers)
        # Fits with its own headers by 20 bytes; the dead-letter headers add hundreds more.
        body = b'"' + b"x" * (gateway.nc.max_payload - header_bytes - 22) + b'"'
        js = gateway.nc.jetstream()
        await js.publish(f"nexus.jobs.{ops.op}.strict", body, stream=JOBS_STREAM, headers=headers)
        dlq = await dlq_of(gateway, settings)
        entries: list[Any] = []
        for _ in range(100):
            entries = await dlq.entries(op=ops.op)
            if entries:
                break
            await asyncio.sleep(0.1)
        assert len(entries) == 1 and entries[0].data == b""
        assert entries[0].headers["Nexus-Dlq-Body-Dropped"] == str(len(body))
        assert entries[0].error_code == "internal"
        assert w.nc.is_connected


@pytest.mark.parametrize("traced", [False, True], ids=["expected-stream", "traceparent"])
async def test_a_submission_over_max_payload_with_the_headers_of_its_publish_is_413(
    small_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str, traced: bool
) -> None:
    """The size check of a submission left out the headers added on the way to the server:
    the stream `js.publish` expects, and the `traceparent` of the submission's span. The
    server closed the connection. Nothing is written for a job that can never be published."""
    settings = make_settings(small_nats.url, redis_url)
    key = f"k{uid}"
    headers = {
        H_AUTHORIZATION: f"Bearer {admin_token}",
        H_REQUEST_ID: "r" * 24,
        H_IDEMPOTENCY_KEY: key,
    }
    job_id = job_id_for("data", "put", key)
    own = headers_size(job_headers(headers, job_id))
    nc = await nats.connect(small_nats.url)
    if traced:
        assert configure_tracing(
            TracingSettings(), "nexus-test", instance="t", version="0",
            exporter=InMemorySpanExporter(),
        )
    try:
        if traced:  # within the first check; over once the span's traceparent is in
            room = nc.max_payload - own - JETSTREAM_HEADERS_ALLOWANCE
        else:  # fits with the job's own headers, not with `Nats-Expected-Stream`
            room = nc.max_payload - own
        body = b'"' + b"x" * (room - 2 - 10) + b'"'
        with pytest.raises(PayloadTooLarge):
            await submit_job(nc, settings, "data", "put", body, headers)
        assert nc.is_connected
        with pytest.raises(NotFound):
            await get_job(nc, settings, job_id)
    finally:
        if traced:
            TRACING.shutdown()
        await nc.close()


async def test_a_status_document_that_fits_max_payload_only_without_its_header_is_refused(
    small_nats: ServerProcess, redis_url: str
) -> None:
    """A compare-and-set status write carries the expected revision as a header: a document
    (a job's result) that fits max_payload alone made the server close the worker's
    connection."""
    settings = make_settings(small_nats.url, redis_url)
    nc = await nats.connect(small_nats.url)
    try:
        store = await job_store(nc, settings)
        pending = JobRecord(id=new_job_id(), op="data", action="put", status=JobStatus.PENDING)
        await store.create(pending)
        _, revision = await store.get(pending.id)
        shell = encode_record(advance(pending, JobStatus.SUCCEEDED, now=1.0, result=""))
        result = "x" * (nc.max_payload - len(shell) - 8)
        done = advance(pending, JobStatus.SUCCEEDED, now=1.0, result=result)
        assert len(encode_record(done)) == nc.max_payload - 8
        with pytest.raises(PayloadTooLarge):
            await store.write_unless_finished(done, revision)
        assert nc.is_connected
        stored, _ = await store.get(pending.id)
        assert stored.status is JobStatus.PENDING
    finally:
        await nc.close()



@pytest.mark.parametrize("size", ["over", "fits-without-its-header"])
async def test_a_result_too_large_for_the_status_document_fails_the_job_with_413(
    small_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str, size: str
) -> None:
    """A job's result is stored in its status document, a KV message held to max_payload with
    its header. It cannot be stored on any run: the handler ran again up to max_deliver and the
    job was dead-lettered as "no outcome". Now it fails at once, like a client error."""
    settings = make_settings(small_nats.url, redis_url)
    ops = Operations(f"j{uid}")
    runs: list[int] = []

    @ops.action("make")
    async def make(req: dict[str, Any], ctx: RequestContext) -> str:
        runs.append(ctx.attempt)
        return "x" * int(req["n"])

    async with (
        serving(settings, ops, max_deliver=3, backoff_base_s=0.1, backoff_max_s=0.2) as worker,
        await Gateway.connect(settings, token=admin_token) as gw,
    ):
        limit = worker.nc.max_payload
        n = limit
        if size != "over":  # the document is ~25 bytes short of the limit, its header ~50 over
            now = time.time()
            shell = JobRecord(
                id=new_job_id(), op=ops.op, action="make", status=JobStatus.SUCCEEDED,
                attempts=1, result="", created_at=now, updated_at=now, request_id=f"r{uid}",
            )
            n = limit - len(encode_record(shell)) - 25
        accepted = await gw.submit(ops.op, "make", {"n": n}, request_id=f"r{uid}")
        job = await wait_job(gw.nc, settings, accepted.job_id, timeout_s=10)
        await asyncio.sleep(0.3)  # nothing may run or be dead-lettered after the outcome
        dlq = DeadLetterQueue(gw.nc.jetstream(), await job_store(gw.nc, settings))
        entries = await dlq.entries(op=ops.op)
        info = await gw.nc.jetstream().consumer_info(JOBS_STREAM, consumer_name(ops.op))
        assert worker.nc.is_connected and not worker.lost.is_set()
    assert runs == [1]
    assert job.status is JobStatus.FAILED and job.attempts == 1 and job.result is None
    assert job.error["status"] == 413 and job.error["code"] == "payload_too_large"
    assert job.error["request_id"] == f"r{uid}"
    assert entries == []
    assert info.num_pending == 0 and info.num_ack_pending == 0  # acked: nothing left to run
    assert JOBS_COMPLETED.labels(ops.op, "rejected")._value.get() == 1
    assert JOBS_COMPLETED.labels(ops.op, "succeeded")._value.get() == 0


async def test_a_closed_connection_that_submitted_jobs_is_not_kept_alive(
    settings: Settings, admin_token: str | None
) -> None:
    """The job client keeps the status bucket's handle per connection, in a weak mapping.
    The handle referenced the connection, so no connection that had submitted a job was ever
    freed: a program opening a gateway per task kept every one of them, with its buffers."""
    gateway = await Gateway.connect(settings, token=admin_token)
    accepted = await gateway.submit("data", "put", {"key": "weak.job", "value": 1})
    assert (await gateway.job(accepted.job_id)).id == accepted.job_id
    connection = weakref.ref(gateway.nc)
    await gateway.close()
    del gateway
    gc.collect()
    assert connection() is None
