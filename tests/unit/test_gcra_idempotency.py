"""GCRA decisions and idempotency-key rules: pure, with explicit times."""

from __future__ import annotations

import pytest

from nexus_bus.errors import InvalidRequest
from nexus_bus.resilience.gcra import RateLimit, decide
from nexus_bus.resilience.idempotency import check_key, fingerprint, record_name


def test_gcra_allows_the_burst_then_one_request_per_interval() -> None:
    limit = RateLimit.of(4.0, 0)  # 4/s, burst defaults to one second's worth
    assert limit.burst == 4 and limit.interval_ms == 250
    tat: float | None = None
    now = 10_000.0
    decisions = []
    for _ in range(5):
        d = decide(limit, tat, now)
        decisions.append(d)
        tat = d.tat_ms
    assert [d.allowed for d in decisions] == [True, True, True, True, False]
    assert [d.remaining for d in decisions[:4]] == [3, 2, 1, 0]
    refused = decisions[-1]
    assert refused.retry_after_ms == pytest.approx(250)
    assert refused.tat_ms == tat  # a refusal does not move the TAT
    assert not decide(limit, tat, now + 249).allowed
    assert decide(limit, tat, now + 250).allowed  # one interval later, one more
    assert decide(limit, tat, now + 10_000).remaining == 3  # fully refilled


def test_gcra_headers_follow_the_draft() -> None:
    limit = RateLimit.of(2.0, 10)
    assert limit.policy_header("data.get") == '"data.get";q=10;w=5'
    d = decide(limit, None, 0.0)
    assert d.header("data.get") == '"data.get";r=9;t=1'


def test_idempotency_keys_are_bounded_printable_ascii() -> None:
    assert check_key("k" * 255) == "k" * 255
    for bad in ("", "k" * 256, "tab\there", "nul\0", "é", "line\n"):
        with pytest.raises(InvalidRequest):
            check_key(bad)


def test_records_are_scoped_and_fingerprints_tell_bodies_apart() -> None:
    a = record_name("p:", "alice", "data", "put", "k1")
    assert a.startswith("p:") and len(a) == 2 + 64
    assert a != record_name("p:", "bob", "data", "put", "k1")
    assert a != record_name("p:", "alice", "data", "delete", "k1")
    assert a != record_name("p:", None, "data", "put", "k1")
    assert fingerprint(None, b"{}") == fingerprint("", b"{}")
    assert fingerprint(None, b"{}") != fingerprint("application/msgpack", b"{}")
    assert fingerprint(None, b'{"a":1}') != fingerprint(None, b'{"a":2}')


def test_gcra_grants_as_many_as_fit_like_requests_at_the_same_instant() -> None:
    limit = RateLimit.of(4.0, 0)
    batch = decide(limit, None, 10_000.0, want=3)
    assert batch.allowed and batch.granted == 3 and batch.remaining == 1
    assert batch.tat_ms == 10_000.0 + 3 * 250
    one_by_one: float | None = None
    for _ in range(3):
        one_by_one = decide(limit, one_by_one, 10_000.0).tat_ms
    assert one_by_one == batch.tat_ms  # the same state as three single requests
    partial = decide(limit, batch.tat_ms, 10_000.0, want=5)
    assert partial.allowed and partial.granted == 1 and partial.remaining == 0
    refused = decide(limit, partial.tat_ms, 10_000.0, want=5)
    assert not refused.allowed and refused.granted == 0
    assert refused.retry_after_ms == pytest.approx(250)
    assert decide(RateLimit.of(3.0, 0), None, 0.0, want=9).granted == 3  # inexact interval
