"""Circuit breaker state machine with a fake clock: open, back off, probe, close."""

from __future__ import annotations

import pytest

from nexus_bus.resilience import BreakerState, CircuitBreaker, ExponentialBackoff, Jitter


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(clock: FakeClock, **kwargs: object) -> tuple[CircuitBreaker, list[BreakerState]]:
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(
        failure_threshold=3,
        reset=ExponentialBackoff(base_s=1.0, cap_s=4.0, jitter=Jitter.NONE),
        clock=clock,
        on_change=changes.append,
        **kwargs,  # type: ignore[arg-type]
    )
    return breaker, changes


def test_opens_after_consecutive_failures_only() -> None:
    clock = FakeClock()
    b, changes = make(clock)
    b.record_failure()
    b.record_failure()
    b.record_success()  # resets the count
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    assert changes == [BreakerState.OPEN]
    assert b.retry_after_s == pytest.approx(1.0)


def test_half_open_lets_one_probe_and_success_closes() -> None:
    clock = FakeClock()
    b, changes = make(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 0.99
    assert not b.allow()
    clock.now += 0.02
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()
    assert not b.allow()  # only one probe at a time
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_failed_probes_back_off_exponentially_up_to_the_cap() -> None:
    clock = FakeClock()
    b, _ = make(clock)
    for _ in range(3):
        b.record_failure()
    waits = []
    for _ in range(4):
        waits.append(b.retry_after_s)
        clock.now += b.retry_after_s
        assert b.allow()
        b.record_failure()  # the probe failed
    assert waits == pytest.approx([1.0, 2.0, 4.0, 4.0])
    clock.now += b.retry_after_s
    assert b.allow()
    b.record_success()
    for _ in range(3):  # after a recovery the delay starts small again
        b.record_failure()
    assert b.retry_after_s == pytest.approx(1.0)


def test_a_probe_that_never_reports_frees_its_slot() -> None:
    clock = FakeClock()
    b, _ = make(clock, probe_timeout_s=2.0)
    for _ in range(3):
        b.record_failure()
    clock.now += 1.0
    assert b.allow()
    clock.now += 1.0
    assert not b.allow()
    clock.now += 1.5
    assert b.allow()


def test_a_probe_without_an_outcome_gives_its_slot_back() -> None:
    clock = FakeClock()
    b, changes = make(clock, probe_timeout_s=60.0)
    for _ in range(3):
        b.record_failure()
    clock.now += 1.0
    assert b.allow()
    assert not b.allow()  # the probe is out
    b.release_probe()  # it ended without an outcome: the breaker stays half-open
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow()  # the next call probes at once
    b.record_success()
    b.release_probe()  # nothing outstanding: nothing happens
    assert b.state is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]


def test_late_failures_while_open_do_not_extend_the_delay() -> None:
    clock = FakeClock()
    b, _ = make(clock)
    for _ in range(3):
        b.record_failure()
    clock.now += 0.5
    b.record_failure()
    assert b.retry_after_s == pytest.approx(0.5)


def test_levels_and_invalid_parameters() -> None:
    assert [s.level for s in BreakerState] == [0, 1, 2]
    with pytest.raises(ValueError):
        CircuitBreaker(failure_threshold=0)


def test_a_failure_of_a_call_begun_before_the_latest_success_is_not_counted() -> None:
    clock = FakeClock()
    b, _ = make(clock)
    begun = clock.now
    clock.now += 1.0
    b.record_success()
    for _ in range(5):
        b.record_failure(started_at=begun)  # in flight across the success: says nothing new
    assert b.state is BreakerState.CLOSED
    for _ in range(3):
        b.record_failure(started_at=clock.now)
    assert b.state is BreakerState.OPEN
