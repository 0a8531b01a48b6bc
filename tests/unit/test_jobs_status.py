"""Job status records and dead-letter annotations: transitions and encodings, no servers."""

from __future__ import annotations

from typing import Any, cast

import msgspec
import pytest

from nexus_bus.errors import NotFound, Unavailable
from nexus_bus.jobs.dlq import dead_letter_headers, entry_of
from nexus_bus.jobs.status import TERMINAL, JobRecord, advance, decode_record, encode_record
from nexus_bus.schemas.jobs import Job, JobStatus

PENDING = JobRecord(
    id="a" * 32, op="orders", action="create", status=JobStatus.PENDING, created_at=1.0
)


def test_transitions_keep_identity_and_clear_what_no_longer_applies() -> None:
    running = advance(PENDING, JobStatus.RUNNING, now=2.0, attempts=1)
    failed = advance(running, JobStatus.PENDING, now=3.0, error={"code": "unavailable"})
    done = advance(failed, JobStatus.SUCCEEDED, now=4.0, attempts=2, result={"ok": 1})
    assert (running.attempts, running.updated_at, running.created_at) == (1, 2.0, 1.0)
    assert failed.error == {"code": "unavailable"} and failed.attempts == 1
    assert done.result == {"ok": 1} and done.error is None and done.attempts == 2
    dead = advance(running, JobStatus.DEAD, now=5.0, error={"code": "x"})
    assert dead.result is None and dead.finished and not running.finished
    assert {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.DEAD} == TERMINAL


def test_records_round_trip_and_show_only_the_public_fields() -> None:
    done = advance(PENDING, JobStatus.SUCCEEDED, now=2.0, attempts=1, result=[1, "x"])
    assert decode_record(encode_record(done)) == done
    assert done.to_job() == Job(
        id="a" * 32,
        op="orders",
        action="create",
        status=JobStatus.SUCCEEDED,
        attempts=1,
        result=[1, "x"],
    )
    with pytest.raises(NotFound):
        decode_record(b"not json")


def test_the_public_document_always_has_attempts() -> None:
    """0 before the first run: the contract's job document always carries `attempts`."""
    assert PENDING.attempts == 0 and b'"attempts"' not in encode_record(PENDING)  # stored lean
    public = msgspec.json.decode(msgspec.json.encode(PENDING.to_job()))
    assert public == {"id": "a" * 32, "op": "orders", "action": "create", "status": "pending",
                      "attempts": 0}


def test_dead_letter_headers_keep_the_job_and_annotate_the_failure() -> None:
    headers = dead_letter_headers(
        {
            "Authorization": "Bearer t",
            "Nats-Msg-Id": "j",
            "Nexus-Job-Id": "b" * 32,
            "Nexus-Dlq-Attempts": "9",
        },
        error=Unavailable("down\r\nInjected: yes"),
        attempts=3,
        subject="nexus.jobs.orders.create",
        stream_seq=42,
        enqueued_at=10.5,
        failed_at=12.25,
    )
    assert headers["Authorization"] == "Bearer t" and headers["Nexus-Job-Id"] == "b" * 32
    assert headers["Nats-Msg-Id"] == "dlq-42"  # one entry per delivered message
    assert headers["Nexus-Dlq-Attempts"] == "3"
    assert headers["Nexus-Dlq-Error"] == "down  Injected: yes"  # no CR/LF into the protocol
    entry = entry_of(7, "nexus.dlq.orders.create", b"{}", headers)
    assert (entry.seq, entry.op, entry.action, entry.job_id) == (7, "orders", "create", "b" * 32)
    assert (entry.error_code, entry.error_status, entry.attempts) == ("unavailable", 503, 3)
    assert (entry.enqueued_at, entry.failed_at) == (10.5, 12.25)
    assert entry.original_headers() == {
        "Authorization": "Bearer t",
        "Nexus-Job-Id": "b" * 32,
        "Nats-Msg-Id": "dlq-42",
    }


class FlakyStore:
    """Fails `failures` times with the given error, then writes."""

    def __init__(self, failures: int, error: Exception) -> None:
        self.failures, self.error, self.calls = failures, error, 0

    async def write_unless_finished(self, record: Any, revision: int | None) -> int | None:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return 7


async def test_a_known_outcome_is_written_through_a_short_outage() -> None:
    from nexus_bus.errors import Unavailable
    from nexus_bus.jobs.status import write_outcome

    store, slept, kept = FlakyStore(3, Unavailable("away")), [], []

    async def sleep(s: float) -> None:
        slept.append(s)

    async def keepalive() -> None:
        kept.append(1)

    record = cast(Any, object())
    await write_outcome(store, record, 3, keepalive=keepalive, sleep=sleep)
    assert store.calls == 4 and slept == [0.2, 0.4, 0.8] and len(kept) == 3


async def test_a_long_outage_or_a_permanent_error_still_raises() -> None:
    from nexus_bus.errors import Conflict, Unavailable
    from nexus_bus.jobs.status import write_outcome

    async def nothing(*_: Any) -> None:
        return None

    with pytest.raises(Unavailable):
        await write_outcome(
            FlakyStore(9, Unavailable("away")), cast(Any, None), 1, keepalive=nothing, sleep=nothing
        )
    permanent = FlakyStore(9, Conflict("no"))
    with pytest.raises(Conflict):
        await write_outcome(permanent, cast(Any, None), 1, keepalive=nothing, sleep=nothing)
    assert permanent.calls == 1
