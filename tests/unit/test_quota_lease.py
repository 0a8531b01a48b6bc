"""Quota leasing: plans, batch sizes, and the bound on what leases add to a shared limit.

Replicas are simulated against the reference GCRA (`gcra.decide`) with explicit times and a
seeded rng: no servers, no sleeps.
"""

from __future__ import annotations

import random

import pytest

from nexus_bus.resilience.gcra import RateLimit, decide
from nexus_bus.resilience.lease import LeasePlan, QuotaLease


@pytest.mark.parametrize(
    ("rate", "burst", "batch_max", "hold_s"),
    [
        (4, 4, 1, 0.1),  # small limits are not leased: every request asks the shared store
        (1, 3, 1, 0.1),
        (19, 0, 1, 0.1),
        (20, 0, 2, 0.1),
        (1000, 0, 100, 0.1),
        (1000, 50, 5, 0.005),  # a small burst shortens the hold
        (1_000_000, 0, 100_000, 0.1),
    ],
)
def test_plans_keep_leases_within_a_tenth_of_the_burst(
    rate: float, burst: int, batch_max: int, hold_s: float
) -> None:
    limit = RateLimit.of(rate, burst)
    plan = LeasePlan.of(limit)
    assert plan == LeasePlan(batch_max, pytest.approx(hold_s))
    assert limit.rate * plan.hold_s <= limit.burst / 10 + 1e-9


def test_a_lease_hands_out_its_tokens_until_they_run_out_or_expire() -> None:
    lease = QuotaLease(RateLimit.of(1000, 0), "k")
    assert not lease.take(0.0)  # nothing reserved yet
    lease.granted(3, 0.0)  # the reserving request spent one
    assert lease.take(0.01) and lease.take(0.02)
    assert not lease.take(0.03)
    lease.granted(5, 1.0)
    assert lease.take(1.0)
    assert not lease.take(1.1)  # hold_s (0.1 s) passed: the rest is dropped
    assert lease.tokens == 3


def test_the_batch_follows_demand_within_its_bounds() -> None:
    lease = QuotaLease(RateLimit.of(1000, 0), "k")  # batch_max 100, hold 0.1 s
    assert lease.want(0.0) == 1  # demand unknown
    lease.granted(1, 0.0)
    assert lease.want(0.0001) == 4  # spent at once: grows, at most fourfold
    lease.granted(4, 0.0)
    for _ in range(3):
        assert lease.take(0.02)
    # 4 spent in 20 ms: 200/s, so half a hold's worth is 10.
    assert lease.want(0.02) == 10
    lease.granted(20, 1.0)
    assert lease.want(1.15) == 1  # expired after one spent: half of what the lease used
    lease.granted(100, 2.0)
    for _ in range(99):
        assert lease.take(2.001)
    assert lease.want(2.002) == 100  # capped at batch_max
    assert lease.want(2.5) == 1  # idle for two holds: start small again
    assert lease.idle(2.2) and not lease.idle(2.19)


def test_a_batch_running_low_is_followed_by_one_reserved_ahead_with_its_own_expiry() -> None:
    lease = QuotaLease(RateLimit.of(1000, 0), "k")
    lease.granted(8, 0.0)  # 7 left; low at half the batch
    for _ in range(2):
        assert lease.take(0.01) and not lease.low
    assert lease.take(0.01) and lease.low and lease.tokens == 4
    lease.refilling()  # the next batch is on its way: not low again for this batch
    assert not lease.low
    lease.granted(20, 0.05, spend=False)
    for _ in range(4):
        assert lease.take(0.06) and not lease.low
    assert lease.tokens == 0
    assert lease.take(0.07) and lease.tokens == 19  # the spare batch, taken up
    assert lease.take(0.149)
    assert not lease.take(0.151)  # 0.1 s after *its* reservation began: dropped
    lease.granted(4, 1.0, spend=False)  # ahead, while nothing is left: taken up when needed
    assert lease.take(1.01) and lease.tokens == 3


def test_unleased_limits_always_ask_for_one() -> None:
    lease = QuotaLease(RateLimit.of(4, 4), "k")
    lease.granted(1, 0.0)
    assert lease.want(0.0001) == 1 and not lease.take(0.0001)


class Shared:
    """The shared GCRA (what the Lua script keeps in Redis), and how a replica uses it."""

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        self.tat: float | None = None
        self.reservations = 0

    def admit(self, lease: QuotaLease, now_s: float) -> bool:
        if lease.take(now_s):
            if lease.low:  # the next batch, reserved ahead (at once, here)
                lease.refilling()
                self.reservations += 1
                ahead = decide(self.limit, self.tat, now_s * 1000, lease.want(now_s))
                if ahead.allowed:
                    self.tat = ahead.tat_ms
                    lease.granted(ahead.granted, now_s, spend=False)
            return True
        self.reservations += 1
        decision = decide(self.limit, self.tat, now_s * 1000, lease.want(now_s))
        if decision.allowed:
            self.tat = decision.tat_ms
            lease.granted(decision.granted, now_s)
        return decision.allowed


def simulate(limit: RateLimit, replicas: int, gap_ms: float, n: int, seed: int) -> list[float]:
    """Requests every ~`gap_ms` at random replicas; the times (ms) of those admitted."""
    rng = random.Random(seed)
    shared = Shared(limit)
    leases = [QuotaLease(limit, "k") for _ in range(replicas)]
    now_ms = 1_000.0
    admitted: list[float] = []
    for _ in range(n):
        now_ms += rng.expovariate(1 / gap_ms)
        if shared.admit(leases[rng.randrange(replicas)], now_ms / 1000):
            admitted.append(now_ms)
    return admitted


def most_in_window(times: list[float], window_ms: float) -> int:
    most, start = 0, 0
    for end, t in enumerate(times):
        while t - times[start] > window_ms:
            start += 1
        most = max(most, end - start + 1)
    return most


@pytest.mark.parametrize("replicas", [1, 3, 10])
@pytest.mark.parametrize("load", [0.5, 1.2, 5.0])  # offered load as a multiple of the rate
def test_leases_add_at_most_a_tenth_of_the_burst_in_any_window(
    replicas: int, load: float
) -> None:
    limit = RateLimit.of(2000, 0)  # burst 2000, batch_max 200, hold 0.1 s
    hold_ms = LeasePlan.of(limit).hold_s * 1000
    admitted = simulate(limit, replicas, gap_ms=1000 / (limit.rate * load), n=30_000, seed=7)
    for window_ms in (1.0, 50.0, 500.0, 2000.0, 10_000.0):
        bound = limit.burst + limit.rate * (window_ms + hold_ms) / 1000
        assert most_in_window(admitted, window_ms) <= bound
    # Over the whole run, never above the rate (plus the first burst).
    span_s = (admitted[-1] - admitted[0]) / 1000
    assert len(admitted) <= limit.burst + limit.rate * span_s + 1
    if load < 1:
        assert len(admitted) == 30_000  # under the limit: nobody refused


def test_under_load_leases_cost_few_reservations() -> None:
    limit = RateLimit.of(1_000_000, 0)
    lease = QuotaLease(limit, "k")
    reservations = 0
    now = 0.0
    for _ in range(50_000):  # 5000/s for 10 s
        now += 0.0002
        if not lease.take(now):
            reservations += 1
            lease.granted(lease.want(now), now)
    assert reservations < 500  # 1%; without leasing, 50,000


def test_tokens_left_in_leases_expire_and_add_nothing_to_a_later_burst() -> None:
    limit = RateLimit.of(20_000, 0)  # burst 20,000, batch_max 2,000, hold 0.1 s
    shared = Shared(limit)
    leases = [QuotaLease(limit, "k") for _ in range(5)]
    now = 1.0
    for lease in leases:  # each spends fast until it holds a full batch, then goes quiet
        for _ in range(10_000):
            now += 0.00001
            assert shared.admit(lease, now)
            if lease.tokens == limit.burst // 10 - 1:
                break
        assert lease.tokens == limit.burst // 10 - 1
    now += 2.0  # the shared limit refills; the leases' leftovers must not count on top
    admitted = 0
    for i in range(30_000):  # a burst far over the limit, within 30 ms, at every replica
        admitted += shared.admit(leases[i % 5], now + i * 1e-6)
    assert admitted <= limit.burst + limit.rate * (0.03 + 0.1)
