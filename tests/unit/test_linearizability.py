"""The register checker itself: it accepts linearizable histories and flags the others."""

from __future__ import annotations

import random

import pytest

from tests.linearizability import (
    Action,
    Op,
    check,
    check_history,
    check_regular,
    linearizable,
    prune,
    stale_reads,
    visibility_inversions,
)

W, D, R = Action.WRITE, Action.DELETE, Action.READ


def op(action: Action, value: str | None, start: float, end: float | None, **kw: object) -> Op:
    return Op("k", action, value, start, end, client="c", **kw)  # type: ignore[arg-type]


def test_sequential_and_concurrent_histories_pass() -> None:
    history = [
        op(W, "a", 0, 1),
        op(R, "a", 2, 3),
        op(W, "b", 4, 8),
        op(R, "a", 5, 6),  # concurrent with the write of b: old value allowed
        op(R, "b", 6, 7),  # ... and the new one too
        op(D, None, 9, 10, deleted=True),
        op(R, None, 11, 12),
    ]
    assert check(history) == []


def test_a_stale_read_is_flagged() -> None:
    history = [op(W, "a", 0, 1), op(W, "b", 2, 3), op(R, "a", 4, 5)]
    problems = check(history)
    assert any("stale read" in p for p in problems)
    assert any("no linearization" in p for p in problems)


def test_a_deleted_value_coming_back_is_flagged() -> None:
    history = [op(W, "a", 0, 1), op(D, None, 2, 3), op(R, "a", 4, 5)]
    assert stale_reads(history) and not linearizable(history)


def test_an_absence_after_a_completed_write_is_flagged() -> None:
    assert stale_reads([op(W, "a", 0, 1), op(R, None, 2, 3)])


def test_a_read_from_the_future_and_an_unknown_value_are_flagged() -> None:
    assert stale_reads([op(R, "a", 0, 1), op(W, "a", 2, 3)])
    assert stale_reads([op(R, "zzz", 0, 1)])


def test_write_visibility_must_not_go_back() -> None:
    # Both writes still running; a read sees b, a later read sees a, which precedes b.
    history = [
        op(W, "a", 0, 2),
        op(W, "b", 3, 20),
        op(R, "b", 4, 5),
        op(R, "a", 6, 7),
    ]
    assert stale_reads(history) == []  # a regular register allows it (both overlap b)
    assert any("visibility" in p for p in visibility_inversions(history))
    assert not linearizable(history)
    assert check_regular(history).problems == [] and check_history(history).problems


def test_writes_with_unknown_outcome_may_or_may_not_have_happened() -> None:
    lost = [op(W, "a", 0, 1), op(W, "b", 2, None), op(R, "a", 3, 4)]
    landed = [op(W, "a", 0, 1), op(W, "b", 2, None), op(R, "b", 3, 4), op(R, "b", 5, 6)]
    assert check(lost) == [] and check(landed) == []
    flip = [*landed, op(R, "a", 7, 8)]  # once seen, b cannot be undone
    assert not linearizable(flip)


def test_a_delete_must_report_what_it_found() -> None:
    assert not linearizable([op(D, None, 0, 1, deleted=True)])
    assert linearizable([op(W, "a", 0, 1), op(D, None, 2, 3, deleted=True)])


@pytest.mark.parametrize("seed", range(20))
def test_histories_of_a_real_register_always_pass(seed: int) -> None:
    """Simulated clients on an atomic register: each op takes effect at a random point
    inside its interval, so every generated history is linearizable by construction."""
    rng = random.Random(seed)
    state: str | None = None
    events: list[tuple[float, int]] = []
    spans: list[tuple[Action, float, float]] = []
    for n in range(200):
        start = rng.uniform(0, 100)
        spans.append((rng.choice([W, W, D, R, R, R]), start, start + rng.uniform(0, 3)))
        events.append((rng.uniform(start, spans[-1][2]), n))
    ops: list[Op] = []
    for at, n in sorted(events):
        action, start, end = spans[n]
        del at
        if action is W:
            state = f"v{n}"
            ops.append(op(W, state, start, end))
        elif action is D:
            ops.append(op(D, None, start, end, deleted=state is not None))
            state = None
        else:
            ops.append(op(R, state, start, end))
    assert check(ops) == []


def test_unobserved_writes_of_unknown_outcome_are_pruned_and_budgets_are_inconclusive() -> None:
    lost = [op(W, f"lost{n}", n, None) for n in range(40)]  # 40 writes open to the end
    history = [op(W, "a", -2, -1), *lost, op(R, "a", 50, 51), op(R, "lost3", 52, 53)]
    kept = prune(history)
    assert len(kept) == 4 and check(history) == []  # lost3 was read: it stays
    report = check_history([op(W, "a", 0, 1), op(W, "b", 2, 3), op(R, "a", 4, 5)], max_steps=1)
    assert report.inconclusive == ["k"]
    assert report.problems  # the direct check still flags the stale read
