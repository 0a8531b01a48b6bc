"""Exponential backoff: growth, cap, jitter bounds, determinism with an injected rng."""

from __future__ import annotations

import random

import pytest

from nexus_bus.resilience import ExponentialBackoff, Jitter


def test_ceiling_grows_by_factor_and_stops_at_cap() -> None:
    b = ExponentialBackoff(base_s=0.1, cap_s=1.0, factor=2.0, jitter=Jitter.NONE)
    assert [b.compute(n) for n in range(1, 7)] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0, 1.0])


def test_attempts_below_one_count_as_the_first_and_huge_attempts_do_not_overflow() -> None:
    b = ExponentialBackoff(base_s=0.5, cap_s=3.0, jitter=Jitter.NONE)
    assert b.compute(0) == b.compute(-5) == 0.5
    assert b.compute(10_000) == 3.0


def test_full_jitter_stays_under_the_ceiling_and_spreads() -> None:
    b = ExponentialBackoff(base_s=1.0, cap_s=8.0, jitter=Jitter.FULL)
    rng = random.Random(7)
    delays = [b.compute(4, rng) for _ in range(500)]
    assert all(0 <= d <= 8.0 for d in delays)
    assert min(delays) < 1.0 and max(delays) > 7.0  # spread over the whole range


def test_equal_jitter_keeps_at_least_half() -> None:
    b = ExponentialBackoff(base_s=1.0, cap_s=8.0, jitter=Jitter.EQUAL)
    rng = random.Random(3)
    delays = [b.compute(3, rng) for _ in range(500)]
    assert all(2.0 <= d <= 4.0 for d in delays)


def test_same_seed_same_delays() -> None:
    b = ExponentialBackoff()
    assert [b.compute(n, random.Random(1)) for n in range(1, 6)] == [
        b.compute(n, random.Random(1)) for n in range(1, 6)
    ]


@pytest.mark.parametrize("kwargs", [{"base_s": -1}, {"cap_s": -1}, {"factor": 0.5}])
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ExponentialBackoff(**kwargs)  # type: ignore[arg-type]
