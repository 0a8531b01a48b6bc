"""Policies per operation, the retry budget and the retry schedule: pure, with fake clocks."""

from __future__ import annotations

import random

import pytest

from nexus_bus.config import ConfigError, load_settings
from nexus_bus.errors import NoResponders, Unavailable, UpstreamTimeout
from nexus_bus.resilience import BreakerState, CircuitBreaker
from nexus_bus.resilience.budget import RetryBudget
from nexus_bus.resilience.policy import PolicyTable, ResilienceSettings
from nexus_bus.resilience.retry import RetrySchedule, is_retryable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_seed_defaults_match_the_brief() -> None:
    table = PolicyTable(ResilienceSettings())
    default = table.get("orders", "create")
    assert default.timeout_s == 30.0 and default.attempts == 3
    assert default.retry_budget_ratio == 0.2 and not default.idempotent
    get = table.get("data", "get")
    assert get.idempotent and get.cacheable and get.attempts == 3
    assert not table.get("data", "put").cacheable and not table.get("data", "put").idempotent


def test_action_over_op_over_defaults_and_seed_entries_kept() -> None:
    config = ResilienceSettings(
        defaults={"attempts": 2},  # type: ignore[arg-type]
        ops={"orders": {"attempts": 4, "idempotent": True}, "orders.create": {"attempts": 1},
             "data.get": {"stale_if_error_s": 5}},  # type: ignore[dict-item]
    )
    table = PolicyTable(config)
    assert table.get("orders", "create").attempts == 1
    assert table.get("orders", "create").idempotent  # from the op entry
    assert table.get("orders", "list").attempts == 4
    assert table.get("other", "x").attempts == 2
    assert table.get("other", "x").timeout_s == 30.0  # unset in `defaults`: the seed value
    merged = table.get("data", "get")
    assert merged.stale_if_error_s == 5 and merged.cacheable  # seed entry kept, one field set
    assert set(table.named()) >= {"*", "orders", "orders.create", "data.get"}


def test_the_longest_timeout_of_an_op_covers_every_action() -> None:
    config = ResilienceSettings(
        ops={"orders": {"timeout_ms": 20_000}, "orders.export": {"timeout_ms": 90_000},
             "orderly.x": {"timeout_ms": 120_000}},  # type: ignore[dict-item]
    )
    table = PolicyTable(config)
    assert table.longest_timeout_s("orders") == 90.0  # not `orderly`'s
    assert table.longest_timeout_s("other") == 30.0  # the defaults
    short = ResilienceSettings(ops={"data": {"timeout_ms": 5_000}})  # type: ignore[dict-item]
    assert PolicyTable(short).longest_timeout_s("data") == 5.0


def test_a_bad_policy_fails_start_up_with_one_error_listing_every_problem() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(resilience={
            "defaults": {"attempts": 0, "backoff_base_ms": 5000, "backoff_max_ms": 10},
            "ops": {"Bad Name": {}, "data.put": {"retry_budget_ratio": 3.0}},
            "sync_interval_ms": 1,
            "scope_limits": {"tier:free": {"rate_limit_per_s": 0}},
        })
    message = str(info.value)
    for problem in (
        "defaults.attempts: 0 is outside",
        "backoff_max_ms (10) must not be below backoff_base_ms (5000)",
        "ops['Bad Name']: name must be",
        "ops['data.put'].retry_budget_ratio: 3.0 is outside 0 to 1",
        "sync_interval_ms",
        "scope_limits['tier:free']: rate must be above 0",
    ):
        assert problem in message
    assert "data.get" not in message  # an inherited problem is reported once, not per op


def test_budget_allows_a_share_of_requests_and_a_floor_per_second() -> None:
    clock = FakeClock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, clock=clock)
    assert not budget.withdraw()  # nothing earned yet
    for _ in range(10):
        budget.deposit()
    assert budget.withdraw() and budget.withdraw()
    assert not budget.withdraw()  # 10 requests x 20% = 2 retries
    floor = RetryBudget(ratio=0.0, min_per_s=2.0, clock=clock)
    assert floor.withdraw() and floor.withdraw()  # one second of the floor to start with
    assert not floor.withdraw()
    clock.now += 1.0
    assert floor.withdraw() and floor.withdraw() and not floor.withdraw()
    clock.now += 3600  # a quiet hour banks no more than the cap
    capped = sum(floor.withdraw() for _ in range(100))
    assert capped == 10


def test_retryable_outcomes() -> None:
    for code in (NoResponders.code, Unavailable.code):
        assert is_retryable(code, idempotent=False, has_key=False)
    timeout = UpstreamTimeout.code
    assert not is_retryable(timeout, idempotent=False, has_key=False)
    assert is_retryable(timeout, idempotent=True, has_key=False)
    assert is_retryable(timeout, idempotent=False, has_key=True)
    assert not is_retryable("internal", idempotent=True, has_key=True)
    assert not is_retryable("conflict", idempotent=True, has_key=True)


def test_schedule_uses_full_jitter_and_never_passes_the_deadline() -> None:
    schedule = RetrySchedule.create(attempts=3, base_s=0.1, cap_s=1.0, factor=2.0)
    rng = random.Random(7)
    delays = [schedule.delay(1, 0.0, 100.0, rng) for _ in range(200)]
    assert all(d is not None and 0 <= d <= 0.1 for d in delays)
    assert len({round(d or 0, 6) for d in delays}) > 150  # jittered, not constant
    second = [schedule.delay(2, 0.0, 100.0, rng) or 0 for _ in range(200)]
    assert max(second) > 0.1 and max(second) <= 0.2
    assert schedule.delay(3, 0.0, 100.0, rng) is None  # attempts used up
    assert schedule.delay(1, 0.0, 0.004, rng) is None  # no time left for another attempt


def test_breaker_open_for_adopts_another_replicas_decision() -> None:
    clock = FakeClock()
    changes: list[BreakerState] = []
    breaker = CircuitBreaker(failure_threshold=3, clock=clock, on_change=changes.append)
    breaker.open_for(2.0)
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    assert breaker.retry_after_s == pytest.approx(2.0)
    clock.now += 2.0
    assert breaker.allow()  # the single probe
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    assert changes == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
