"""Job ids and the headers a job carries: pure rules, no servers."""

from __future__ import annotations

import pytest

from nexus_bus.errors import InvalidRequest
from nexus_bus.jobs.envelope import (
    check_job_id,
    idempotency_key_of,
    job_headers,
    job_id_for,
    job_id_of_message,
    new_job_id,
    parse_job_subject,
    run_headers,
)


def test_job_ids_from_keys_are_stable_and_scoped_to_the_operation() -> None:
    a = job_id_for("orders", "create", "key-1")
    assert a == job_id_for("orders", "create", "key-1")
    assert a != job_id_for("orders", "cancel", "key-1")
    assert a != job_id_for("orders", "create", "key-2")
    assert check_job_id(a) == a
    alice = job_id_for("orders", "create", "key-1", "alice")  # a key is its subject's
    assert alice == job_id_for("orders", "create", "key-1", "alice")
    assert len({a, alice, job_id_for("orders", "create", "key-1", "bob")}) == 3


def test_job_ids_without_keys_are_random() -> None:
    ids = {job_id_for("orders", "create", None) for _ in range(100)} | {new_job_id()}
    assert len(ids) == 101
    assert all(check_job_id(i) for i in ids)


@pytest.mark.parametrize("bad", ["", "x" * 32, "A" * 32, "0" * 31, "0" * 33, "../" + "0" * 29, 5])
def test_malformed_job_ids_are_refused(bad: object) -> None:
    with pytest.raises(InvalidRequest):
        check_job_id(bad)  # type: ignore[arg-type]


def test_only_allowlisted_headers_travel_under_canonical_names() -> None:
    headers = job_headers(
        {
            "authorization": "Bearer t",
            "IDEMPOTENCY-KEY": "k",
            "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
            "Nats-Rollup": "all",
            "Nats-Msg-Id": "forged",
            "Nats-Expected-Last-Sequence": "3",
            "Nexus-Deadline": "1",
            "Nexus-Timeout-Ms": "5",
            "X-Anything": "v",
        },
        "f" * 32,
    )
    assert headers == {
        "Authorization": "Bearer t",
        "Idempotency-Key": "k",
        "traceparent": "00-" + "a" * 32 + "-" + "b" * 16 + "-01",
        "Nexus-Job-Id": "f" * 32,
        "Nats-Msg-Id": "f" * 32,
    }
    assert idempotency_key_of({"idempotency-key": "k"}) == "k"
    assert idempotency_key_of({"Idempotency-Key": ""}) is None


def test_an_attempt_gets_a_fresh_job_long_deadline_and_no_jetstream_headers() -> None:
    hdrs = run_headers(
        {
            "Authorization": "Bearer t",
            "Nats-Msg-Id": "x",
            "Nexus-Dlq-Attempts": "3",
            "Nexus-Deadline": "1",
        },
        now_ms=1_000_000,
        timeout_s=30,
    )
    assert hdrs == {
        "Authorization": "Bearer t",
        "Nexus-Deadline": "1030000",
        "Nexus-Timeout-Ms": "30000",
    }


def test_delivered_messages_keep_one_job_id_across_redeliveries() -> None:
    ours = job_id_for("a", "b", "k")
    assert job_id_of_message("a", "b", {"Nexus-Job-Id": ours}, 7) == ours
    # A foreign publisher's message: its Nats-Msg-Id, else its stream sequence, names the job.
    assert job_id_of_message("a", "b", {"Nats-Msg-Id": "m1"}, 7) == job_id_for("a", "b", "m1")
    by_seq = job_id_of_message("a", "b", {"Nexus-Job-Id": "not-an-id"}, 7)
    assert by_seq == job_id_of_message("a", "b", {}, 7) != job_id_of_message("a", "b", {}, 8)


def test_job_subjects_parse_into_checked_tokens() -> None:
    assert parse_job_subject("nexus.jobs.orders.create", "nexus.jobs") == ("orders", "create")
    for bad in (
        "nexus.jobs.orders",
        "nexus.jobs.orders.a.b",
        "nexus.dlq.orders.a",
        "nexus.jobs.Or.a",
    ):
        with pytest.raises(InvalidRequest):
            parse_job_subject(bad, "nexus.jobs")
