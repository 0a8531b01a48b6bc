"""The gateway's policy layer with an in-memory `send`, a fake clock and a seeded rng."""

from __future__ import annotations

import asyncio
import random

import pytest
from prometheus_client import REGISTRY

from nexus_bus.bus.replies import Reply, error_reply, success_reply
from nexus_bus.client.gateway import Gateway
from nexus_bus.errors import (
    CircuitOpen,
    Conflict,
    HeadersTooLarge,
    InvalidRequest,
    NexusError,
    NoResponders,
    PayloadTooLarge,
    Unavailable,
    UnknownOperation,
    UpstreamTimeout,
)
from nexus_bus.policies import guard as guard_module
from nexus_bus.policies.guard import Guard
from nexus_bus.resilience import BreakerState
from nexus_bus.resilience.policy import PolicyTable, ResilienceSettings
from tests.conftest import make_settings


class FakeTime:
    def __init__(self) -> None:
        self.now = 50.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class Script:
    """Answers attempts from a list: an exception to raise or a reply to return."""

    def __init__(self, *outcomes: Exception | Reply) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[float] = []

    async def __call__(self, timeout_s: float) -> Reply:
        self.calls.append(timeout_s)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome


OK = success_reply(b"{}", "application/json", "rid")


class Publisher:
    """Records what the guard tells the other replicas."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def opened(self, op: str, seconds: float) -> None:
        self.events.append(("opened", op))

    def closed(self, op: str) -> None:
        self.events.append(("closed", op))


def unsent(error: NexusError) -> NexusError:
    """`error` as the gateway raises it when it refuses a request before publishing it."""
    error.unsent = True
    return error


def make(**defaults: object) -> tuple[Guard, FakeTime]:
    clock = FakeTime()
    base: dict[str, object] = {"retry_budget_min_per_s": 100.0, **defaults}
    table = PolicyTable(ResilienceSettings(defaults=base))  # type: ignore[arg-type]
    return Guard(table, clock=clock, rng=random.Random(1), sleep=clock.sleep), clock


async def test_retries_no_responders_with_backoff_then_succeeds() -> None:
    guard, clock = make()
    send = Script(NoResponders(), NoResponders(), OK)
    headers: dict[str, str] = {}
    reply = await guard.call("orders", "create", b"{}", headers, 5.0, send)
    assert reply is OK and len(send.calls) == 3 and len(clock.slept) == 2
    assert all(0 <= s <= 1.0 for s in clock.slept)
    assert "Nexus-Timeout-Ms" in headers  # retries carry the remaining budget


async def test_timeouts_are_retried_only_when_safe() -> None:
    guard, _ = make()
    send = Script(UpstreamTimeout(), OK)
    with pytest.raises(UpstreamTimeout):
        await guard.call("orders", "create", b"{}", {}, 5.0, send)
    assert len(send.calls) == 1  # not idempotent, no key: never twice
    send = Script(UpstreamTimeout(), OK)
    keyed = {"Idempotency-Key": "k1"}
    assert await guard.call("orders", "create", b"{}", keyed, 5.0, send) is OK
    send = Script(UpstreamTimeout(), OK)
    assert await guard.call("data", "get", b"{}", {}, 5.0, send) is OK  # idempotent op


async def test_other_errors_and_replies_are_not_retried() -> None:
    guard, _ = make()
    send = Script(error_reply(Conflict("x"), "rid"), OK)
    reply = await guard.call("orders", "create", b"{}", {}, 5.0, send)
    assert reply.status == 409 and len(send.calls) == 1


async def test_retries_never_pass_the_deadline() -> None:
    guard, clock = make(backoff_base_ms=400, backoff_max_ms=400, attempts=10, breaker_failures=99)
    send = Script(NoResponders())
    with pytest.raises(NoResponders):
        await guard.call("orders", "create", b"{}", {}, 1.0, send)
    assert clock.now - 50.0 <= 1.0
    assert 2 <= len(send.calls) < 10


async def test_the_budget_caps_retries_at_a_share_of_requests() -> None:
    guard, _ = make(retry_budget_min_per_s=0.0, retry_budget_ratio=0.2, breaker_failures=1000)
    sends = []
    for _ in range(50):
        send = Script(NoResponders())
        sends.append(send)
        with pytest.raises(NoResponders):
            await guard.call("orders", "create", b"{}", {}, 5.0, send)
    retries = sum(len(s.calls) - 1 for s in sends)
    assert 5 <= retries <= 10  # 20% of 50 requests, not 2 x 50


async def test_breaker_opens_refuses_without_sending_then_one_probe_closes_it() -> None:
    guard, clock = make(attempts=1, breaker_failures=3, breaker_reset_ms=1000)
    dead = Script(NoResponders())
    for _ in range(3):
        with pytest.raises(NoResponders):
            await guard.call("orders", "create", b"{}", {}, 5.0, dead)
    assert guard.state("orders") is BreakerState.OPEN
    with pytest.raises(CircuitOpen) as info:
        await guard.call("orders", "list", b"{}", {}, 5.0, dead)  # the op's breaker
    assert len(dead.calls) == 3 and info.value.retry_after is not None
    clock.now += 1.0  # the reset delay (equal jitter: 0.5 to 1 s) has passed
    back = Script(OK)
    assert await guard.call("orders", "create", b"{}", {}, 5.0, back) is OK
    assert len(back.calls) == 1 and guard.state("orders") is BreakerState.CLOSED


async def test_remote_decisions_open_and_close_the_local_breaker() -> None:
    guard, _clock = make()
    guard.apply_remote("orders", 2.0)
    assert guard.state("orders") is BreakerState.OPEN
    with pytest.raises(CircuitOpen):
        await guard.call("orders", "create", b"{}", {}, 5.0, Script(OK))
    guard.apply_remote("orders", None)  # another replica's probe succeeded
    assert guard.state("orders") is BreakerState.CLOSED
    guard.apply_remote("unknown", None)  # never creates state for a close
    assert "unknown" not in guard.known_ops()


async def test_a_lost_connection_does_not_count_against_the_op_but_a_probe_always_reports(
) -> None:
    guard, clock = make(attempts=1, breaker_failures=2, breaker_reset_ms=1000)
    connected = [False]
    guard.transport_up = lambda: connected[0]
    for _ in range(5):
        with pytest.raises(UpstreamTimeout):
            await guard.call("orders", "create", b"{}", {}, 5.0, Script(UpstreamTimeout()))
    assert guard.state("orders") is BreakerState.CLOSED  # NATS was down, not the workers
    connected[0] = True
    for _ in range(2):
        with pytest.raises(NoResponders):
            await guard.call("orders", "create", b"{}", {}, 5.0, Script(NoResponders()))
    assert guard.state("orders") is BreakerState.OPEN
    clock.now += 1.0
    connected[0] = False
    with pytest.raises(Unavailable):  # the probe fails on the connection: still reported
        await guard.call("orders", "create", b"{}", {}, 5.0, Script(Unavailable()))
    assert guard.state("orders") is BreakerState.OPEN


async def half_open(guard: Guard, clock: FakeTime, op: str = "orders") -> None:
    """Open `op`'s breaker with failed attempts (a 3-failure policy), then wait for the probe."""
    for _ in range(3):
        with pytest.raises(NoResponders):
            await guard.call(op, "create", b"{}", {}, 5.0, Script(NoResponders()))
    clock.now += 1.0  # past the reset delay (equal jitter: 0.5 to 1 s)
    assert guard.state(op) is BreakerState.HALF_OPEN


@pytest.mark.parametrize(
    "refused", [HeadersTooLarge("big"), PayloadTooLarge("big"), InvalidRequest("bad header")]
)
async def test_a_probe_refused_before_sending_is_no_outcome_and_gives_its_slot_back(
    refused: NexusError,
) -> None:
    guard, clock = make(attempts=1, breaker_failures=3, breaker_reset_ms=1000)
    publisher = Publisher()
    guard.publisher = publisher
    await half_open(guard, clock)
    local = Script(unsent(refused))
    with pytest.raises(type(refused)):
        await guard.call("orders", "create", b"{}", {}, 5.0, local)
    # Nothing reached a worker: the breaker neither closed (here or, through the shared
    # entry, on every replica) nor opened again...
    assert guard.state("orders") is BreakerState.HALF_OPEN
    assert publisher.events == [("opened", "orders")]
    # ...and the next call is the probe, without waiting for the slot to time out.
    back = Script(OK)
    assert await guard.call("orders", "create", b"{}", {}, 5.0, back) is OK
    assert len(back.calls) == 1 and guard.state("orders") is BreakerState.CLOSED


async def test_timeouts_of_budgets_shorter_than_the_default_are_no_outcome() -> None:
    """A caller's own short budget says nothing about the op: not a failure, and a probe so
    hurried gives its slot back; timeouts of attempts given the default budget count."""
    clock = FakeTime()
    table = PolicyTable(ResilienceSettings(defaults={  # type: ignore[arg-type]
        "attempts": 1, "breaker_failures": 2, "breaker_reset_ms": 1000}))
    guard = Guard(table, clock=clock, rng=random.Random(1), sleep=clock.sleep,
                  default_budget_s=5.0)
    for _ in range(5):
        with pytest.raises(UpstreamTimeout):
            await guard.call("orders", "create", b"{}", {}, 0.001, Script(UpstreamTimeout()))
    assert guard.state("orders") is BreakerState.CLOSED
    for _ in range(2):
        with pytest.raises(UpstreamTimeout):
            await guard.call("orders", "create", b"{}", {}, 5.0, Script(UpstreamTimeout()))
    assert guard.state("orders") is BreakerState.OPEN
    clock.now += 1.0  # the reset delay has passed: the next call is the probe
    with pytest.raises(UpstreamTimeout):
        await guard.call("orders", "create", b"{}", {}, 0.001, Script(UpstreamTimeout()))
    assert guard.state("orders") is BreakerState.HALF_OPEN
    assert await guard.call("orders", "create", b"{}", {}, 5.0, Script(OK)) is OK  # probes
    assert guard.state("orders") is BreakerState.CLOSED


async def test_a_request_refused_before_sending_does_not_reset_the_failure_count() -> None:
    guard, _ = make(attempts=1, breaker_failures=3)
    for send in (NoResponders(), NoResponders(), unsent(HeadersTooLarge()), NoResponders()):
        with pytest.raises(NexusError):
            await guard.call("orders", "create", b"{}", {}, 5.0, Script(send))
    assert guard.state("orders") is BreakerState.OPEN  # three failures in a row


async def test_an_undeclared_action_of_a_half_open_op_does_not_close_its_breaker() -> None:
    """No worker answered `orders.made_up` and nobody declared it: that says nothing good
    about `orders`' workers (an anonymous caller could otherwise close the breaker)."""
    guard, clock = make(attempts=1, breaker_failures=3, breaker_reset_ms=1000)
    await half_open(guard, clock)
    with pytest.raises(UnknownOperation):
        await guard.call("orders", "made_up", b"{}", {}, 5.0, Script(UnknownOperation()))
    assert guard.state("orders") is BreakerState.HALF_OPEN
    back = Script(OK)  # its slot was given back: the next call probes
    assert await guard.call("orders", "create", b"{}", {}, 5.0, back) is OK
    assert guard.state("orders") is BreakerState.CLOSED


class RefusingConnection:
    """Enough of a NATS client for a `Gateway` that must not publish anything."""

    max_payload = 1024 * 1024
    is_connected = True

    def new_inbox(self) -> str:
        return "_INBOX.test"

    async def publish(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("published a request the gateway should have refused")


@pytest.mark.parametrize(
    ("extra", "body", "error"),
    [
        ({"Authorization": "Bearer " + "x" * 5000}, b"{}", HeadersTooLarge),
        ({}, b"x" * (600 * 1024), PayloadTooLarge),
        ({"X-Bad": "a\x00b"}, b"{}", InvalidRequest),
    ],
)
async def test_the_gateway_refuses_oversized_requests_as_unsent_leaving_the_breaker_alone(
    extra: dict[str, str], body: bytes, error: type[NexusError]
) -> None:
    settings = make_settings("nats://127.0.0.1:1")
    gw = Gateway(RefusingConnection(), settings)  # type: ignore[arg-type]
    assert gw.policies is not None
    guard = gw.policies.guard
    guard.apply_remote("data", 0.0)  # opened elsewhere; its probe is due now
    assert guard.state("data") is BreakerState.HALF_OPEN
    headers = gw.build_headers(timeout_s=1.0, extra=extra)
    with pytest.raises(error) as info:
        await gw.request_raw("data", "put", body, headers, timeout_s=1.0)
    assert info.value.unsent
    assert guard.state("data") is BreakerState.HALF_OPEN


class Hanging:
    """A worker that answers only when told to: counts the attempts sent to it."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.calls = 0

    async def __call__(self, timeout_s: float) -> Reply:
        self.calls += 1
        await self.answer.wait()
        return OK


def make_slow_action() -> tuple[Guard, FakeTime]:
    table = PolicyTable(
        ResilienceSettings(  # type: ignore[arg-type]
            defaults={"attempts": 1, "breaker_failures": 3, "breaker_reset_ms": 1000},
            ops={"orders.export": {"timeout_ms": 60_000}},
        )
    )
    clock = FakeTime()
    return Guard(table, clock=clock, rng=random.Random(1), sleep=clock.sleep), clock


async def test_one_probe_at_a_time_for_as_long_as_a_call_of_the_op_can_last() -> None:
    guard, clock = make_slow_action()
    await half_open(guard, clock)
    worker = Hanging()
    probe = asyncio.create_task(guard.call("orders", "export", b"{}", {}, 60.0, worker))
    await asyncio.sleep(0)
    try:
        assert worker.calls == 1
        clock.now += 59.0  # still within the probe's 60 s budget: no second probe
        second = Script(OK)
        with pytest.raises(CircuitOpen):
            await guard.call("orders", "create", b"{}", {}, 30.0, second)
        assert second.calls == []
    finally:
        worker.answer.set()
    assert await probe is OK
    assert guard.state("orders") is BreakerState.CLOSED


async def test_a_cancelled_probe_gives_its_slot_back() -> None:
    guard, clock = make(attempts=1, breaker_failures=3, breaker_reset_ms=1000)
    await half_open(guard, clock)
    worker = Hanging()
    probe = asyncio.create_task(guard.call("orders", "create", b"{}", {}, 30.0, worker))
    await asyncio.sleep(0)
    assert worker.calls == 1
    probe.cancel()  # the caller went away (an HTTP client disconnected, say)
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert guard.state("orders") is BreakerState.HALF_OPEN
    back = Script(OK)  # the next call is the probe, at once
    assert await guard.call("orders", "create", b"{}", {}, 5.0, back) is OK
    assert len(back.calls) == 1 and guard.state("orders") is BreakerState.CLOSED


async def test_a_lost_probe_frees_its_slot_once_no_attempt_could_still_be_running() -> None:
    guard, clock = make(attempts=1, breaker_failures=3, breaker_reset_ms=1000)
    await half_open(guard, clock)
    lost = Hanging()  # never answers, ignoring its timeout, and nobody cancels it
    probe = asyncio.create_task(guard.call("orders", "create", b"{}", {}, 30.0, lost))
    await asyncio.sleep(0)
    try:
        clock.now += 60.0  # twice the 30 s budget: the registry lookup after no responders
        with pytest.raises(CircuitOpen):
            await guard.call("orders", "create", b"{}", {}, 5.0, Script(OK))
        clock.now += 1.5  # past 2 x 30 + 1 s: the safety timeout frees the slot
        assert await guard.call("orders", "create", b"{}", {}, 5.0, Script(OK)) is OK
    finally:
        lost.answer.set()
        await probe


def series(metric: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, labels)


async def test_made_up_names_keep_nothing_so_real_ops_keep_their_breakers_and_retries(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(guard_module, "MAX_GUARDED_OPS", 8)
    guard, _ = make(breaker_failures=3)
    for i in range(20):  # more made-up names than there is room for, three ways
        with pytest.raises(UnknownOperation):  # nobody answered, nobody declared it
            await guard.call(f"madeup{i}", "x", b"{}", {}, 5.0, Script(UnknownOperation()))
        lacking = Script(error_reply(UnknownOperation(), "rid"))  # the op's worker: no such
        assert (await guard.call("orders", f"x{i}", b"{}", {}, 5.0, lacking)).status == 404
        with pytest.raises(HeadersTooLarge):  # refused before it was sent
            await guard.call(f"big{i}", "x", b"{}", {}, 5.0, Script(unsent(HeadersTooLarge())))
    assert guard.known_ops() == []
    assert series("nexus_circuit_state", name="op:madeup0") is None  # no series either

    dead = Script(NoResponders())
    with pytest.raises(NoResponders):
        await guard.call("orders", "create", b"{}", {}, 5.0, dead)
    assert len(dead.calls) == 3  # retried: it has a budget
    assert guard.state("orders") is BreakerState.OPEN  # and a breaker


async def test_past_the_bound_the_least_recently_called_closed_breaker_makes_room(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Names the registry could not vouch against (no responders) are kept: past
    `MAX_GUARDED_OPS` ops the least recently called one whose breaker is closed goes, with
    its metric series; an open breaker stays, so no new name is ever refused a breaker for
    long, and memory stays bounded."""
    monkeypatch.setattr(guard_module, "MAX_GUARDED_OPS", 4)
    guard, clock = make(attempts=1, breaker_failures=3, breaker_reset_ms=30_000)
    for _ in range(3):
        with pytest.raises(NoResponders):
            await guard.call("lru_open", "x", b"{}", {}, 5.0, Script(NoResponders()))
    assert guard.state("lru_open") is BreakerState.OPEN  # and the least recently called
    for op in ("lru_older", "lru_old", "lru_recent"):
        clock.now += 1
        with pytest.raises(NoResponders):
            await guard.call(op, "x", b"{}", {}, 5.0, Script(NoResponders()))
    clock.now += 1
    await guard.call("lru_old", "x", b"{}", {}, 5.0, Script(OK))  # called again: recent
    assert series("nexus_circuit_state", name="op:lru_older") == 0

    assert await guard.call("lru_new", "x", b"{}", {}, 5.0, Script(OK)) is OK
    assert sorted(guard.known_ops()) == ["lru_new", "lru_old", "lru_open", "lru_recent"]
    assert series("nexus_circuit_state", name="op:lru_older") is None
    assert guard.state("lru_open") is BreakerState.OPEN

    for op in ("lru_old", "lru_recent", "lru_new"):  # every breaker open now
        for _ in range(3):
            with pytest.raises(NexusError):
                await guard.call(op, "x", b"{}", {}, 5.0, Script(NoResponders()))
    back = Script(OK)  # no room for one more breaker: the call still goes through
    assert await guard.call("lru_later", "x", b"{}", {}, 5.0, back) is OK
    assert len(back.calls) == 1 and len(guard.known_ops()) == 4


async def test_routes_and_their_retry_series_stay_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(guard_module, "MAX_GUARDED_OPS", 4)
    guard, clock = make(attempts=2)
    for i in range(6):
        clock.now += 1
        flaky = Script(NoResponders(), OK)
        assert await guard.call("routes", f"a{i}", b"{}", {}, 5.0, flaky) is OK
        assert len(flaky.calls) == 2  # retried: each action has its budget
    kept = [series("nexus_retries_total", op="routes", action=f"a{i}", reason="no_responders")
            for i in range(6)]
    assert kept == [None, None, 1, 1, 1, 1]  # the two least recently called pairs dropped


async def test_failures_of_attempts_begun_before_the_latest_success_leave_the_breaker_closed(
) -> None:
    """One of two workers dies with requests in flight: their timeouts arrive together, after
    the other worker has answered calls begun since. Counted as consecutive failures, five of
    them opened the op's breaker for every caller while it was being served (a chaos soak:
    503 circuit_open a few seconds after a worker was killed)."""
    guard, clock = make(attempts=1, breaker_failures=5)
    entered: list[float] = []
    all_sent, released = asyncio.Event(), asyncio.Event()

    async def dead_worker(timeout_s: float) -> Reply:
        entered.append(clock.now)
        if len(entered) == 5:
            all_sent.set()
        await released.wait()
        raise UpstreamTimeout()

    calls = [
        asyncio.create_task(guard.call("orders", "get", b"{}", {}, 5.0, dead_worker))
        for _ in range(5)
    ]
    await all_sent.wait()
    clock.now += 1.0
    assert await guard.call("orders", "get", b"{}", {}, 5.0, Script(OK)) is OK  # the live one
    clock.now += 4.0
    released.set()
    for call in calls:
        with pytest.raises(UpstreamTimeout):
            await call
    assert guard.state("orders") is BreakerState.CLOSED
    for _ in range(5):  # begun after the latest success: these count
        with pytest.raises(UpstreamTimeout):
            await guard.call("orders", "get", b"{}", {}, 5.0, Script(UpstreamTimeout()))
    assert guard.state("orders") is BreakerState.OPEN
