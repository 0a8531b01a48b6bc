"""The verdict after an attempt and the retry schedule it follows."""

from __future__ import annotations

import random

import pytest
from pydantic import ValidationError

from nexus_bus.config import JobsSettings
from nexus_bus.jobs.retry import Decision, Verdict, backoff_of, decide
from nexus_bus.resilience import ExponentialBackoff, Jitter

EXACT = ExponentialBackoff(base_s=1.0, cap_s=10.0, factor=2.0, jitter=Jitter.NONE)


def verdict(status: int, retryable: bool, attempt: int, max_deliver: int = 3) -> Decision:
    return decide(
        status=status,
        retryable=retryable,
        attempt=attempt,
        max_deliver=max_deliver,
        backoff=EXACT,
        rng=random.Random(1),
    )


def test_success_acks_whatever_the_attempt() -> None:
    assert verdict(200, False, 1) == Decision(Verdict.SUCCEEDED)
    assert verdict(201, True, 9) == Decision(Verdict.SUCCEEDED)


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 415, 422])
def test_permanent_client_errors_are_rejected_not_dead_lettered(status: int) -> None:
    """The operation's answer to the request: replaying it would get the same answer."""
    assert verdict(status, False, 1) == Decision(Verdict.REJECTED)
    assert verdict(status, False, 3) == Decision(Verdict.REJECTED)


@pytest.mark.parametrize("status", [401, 500, 501])
def test_other_permanent_errors_are_dead_lettered_at_once(status: int) -> None:
    """A server fault, or a token that expired while the job waited: replayable work."""
    assert verdict(status, False, 1) == Decision(Verdict.FAILED)


def test_retryable_client_errors_are_retried_then_dead_lettered() -> None:
    assert verdict(429, True, 1) == Decision(Verdict.RETRY, 1.0)
    assert verdict(429, True, 3) == Decision(Verdict.DEAD)


def test_retryable_errors_follow_the_schedule_until_the_last_attempt() -> None:
    assert [verdict(503, True, n) for n in (1, 2, 3)] == [
        Decision(Verdict.RETRY, 1.0),
        Decision(Verdict.RETRY, 2.0),
        Decision(Verdict.DEAD),
    ]
    assert verdict(503, True, 7, max_deliver=20) == Decision(Verdict.RETRY, 10.0)  # capped
    assert verdict(503, True, 1, max_deliver=1) == Decision(Verdict.DEAD)


def test_settings_map_onto_the_shared_backoff() -> None:
    backoff = backoff_of(
        JobsSettings(
            backoff_base_s=0.5, backoff_max_s=4, backoff_multiplier=3, backoff_jitter="equal"
        )
    )
    assert backoff == ExponentialBackoff(base_s=0.5, cap_s=4, factor=3, jitter=Jitter.EQUAL)
    rng = random.Random(3)
    delays = [backoff.compute(2, rng) for _ in range(200)]
    assert all(0.75 <= d <= 1.5 for d in delays)  # equal jitter: at least half the ceiling


@pytest.mark.parametrize(
    "bad",
    [
        {"heartbeat_s": 30, "ack_wait_s": 30},  # heartbeats must come before the ack wait ends
        {"effect_ttl_s": 10, "dlq_max_age_s": 20},  # replays need the effect records
        {"backoff_base_s": 10, "backoff_max_s": 1},
        {"max_deliver": 0},
        {"backoff_jitter": "some"},
    ],
)
def test_inconsistent_job_settings_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        JobsSettings(**bad)  # type: ignore[arg-type]
