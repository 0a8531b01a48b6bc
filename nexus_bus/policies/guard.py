"""The policy layer of the gateway client: breaker, retries with a budget, stale fallback.

`Gateway.request_raw` hands every call to `Guard.call` with a function that sends one
attempt. With the breaker closed and no failure, the added work is one dict lookup (the
`Route` of the op.action), a budget deposit, a clock read (kept as the route's last use) and
the breaker's failure count cleared (about 1 µs): nothing here touches Redis on the success
path. Shared breaker state is read and written in the background (`shared.BreakerSync`),
stale answers are looked up only after a failure (`fallback.StaleAnswers`). Anyone can name
an op, so a name gets a route, budget and breaker only once an answer shows it is real, and
the tables are bounded (`MAX_GUARDED_OPS`).

    closed  ──(breaker_failures consecutive failures)──> open ──(reset delay)──> half-open
      ^                                                   ^                         │
      └──────────────(the single probe succeeds)──────────┴─────(the probe fails)───┘
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from nexus_bus.bus.replies import Reply
from nexus_bus.constants import H_DEADLINE, H_IDEMPOTENCY_KEY, H_SERVICE_ERROR, H_TIMEOUT_MS
from nexus_bus.errors import (
    CircuitOpen,
    NexusError,
    Unavailable,
    UnknownOperation,
    UpstreamTimeout,
)
from nexus_bus.observability import METRICS
from nexus_bus.resilience.backoff import ExponentialBackoff, Jitter
from nexus_bus.resilience.breaker import BreakerState, CircuitBreaker
from nexus_bus.resilience.budget import RetryBudget
from nexus_bus.resilience.policy import OperationPolicy, PolicyTable
from nexus_bus.resilience.retry import BREAKER_FAILURES, RetrySchedule, is_retryable

Send = Callable[[float], Awaitable[Reply]]
Clock = Callable[[], float]

# Op names come from clients, even anonymous ones. A name is kept (a breaker for its op, a
# route and retry budget for the pair) only once an answer showed it is real, and at most this
# many ops and as many pairs are: past that, the least recently used ones are dropped.
MAX_GUARDED_OPS: Final = 1024
_UNAVAILABLE: Final = Unavailable.code
_UNKNOWN_OPERATION: Final = UnknownOperation.code
_TIMEOUT: Final = UpstreamTimeout.code
_BUDGET_SLACK_S: Final = 0.001  # budgets are whole milliseconds on the wire


class Fallback(Protocol):
    """Answers a failed cacheable call from the cache (see `fallback.StaleAnswers`)."""

    async def answer(
        self, op: str, action: str, body: bytes, headers: Mapping[str, str], max_age_s: float
    ) -> Reply | None:
        """A stale reply no older than `max_age_s`, or None."""
        ...


class BreakerPublisher(Protocol):
    """Tells the other replicas that a breaker opened or closed (see `shared.BreakerSync`)."""

    def opened(self, op: str, seconds: float) -> None:
        """The breaker of `op` opened here for `seconds`."""
        ...

    def closed(self, op: str) -> None:
        """The breaker of `op` closed here after a successful probe."""
        ...


@dataclass(slots=True)
class OpGuard:
    """The breaker of one op (shared by its actions: one queue group serves them all)."""

    op: str
    breaker: CircuitBreaker
    remote_open: bool = False  # opened because another replica said so
    used: float = 0.0  # when it was kept (its routes' `used` say when it was last called)


@dataclass(slots=True)
class Route:
    """What a call of one op.action needs, looked up once: policy, breaker, retry budget."""

    policy: OperationPolicy
    guard: OpGuard | None  # None: no breaker kept for the op (yet)
    budget: RetryBudget | None  # None: the pair is not kept (yet): no retries
    used: float = 0.0  # the start of its last call, for dropping the least recently used


# reply, failure, failure code, whether the caller's budget was too short for the outcome to
# say anything about the op (`Guard._outcome`), and when the attempt started (the guard's clock)
Outcome = tuple[Reply | None, NexusError | None, str, bool, float]


def error_code_of(reply: Reply) -> str:
    """The stable code of an error reply (`Nats-Service-Error: <code>: <detail>`)."""
    return reply.headers.get(H_SERVICE_ERROR, "").split(":", 1)[0]


def shows_real(outcome: Outcome) -> bool:
    """Whether an attempt's outcome shows its op.action is a real operation, worth a breaker
    and a retry budget: a worker answered, and not `unknown_operation` (an action its op
    lacks); or the op's workers failed it (no responders for a name the registry declares
    or cannot vouch against, a timeout, a 503). A made-up name gets `unknown_operation`
    from the gateway; a request refused before it was sent shows nothing."""
    reply, failure, _, _, _ = outcome
    if failure is not None:
        return failure.code in BREAKER_FAILURES and not failure.unsent
    return reply is not None and error_code_of(reply) != _UNKNOWN_OPERATION


class Guard:
    """Breakers per op, retry budgets per op.action, and the retry loop.

    Args:
        policies: the resolved policy table.
        clock: monotonic seconds (breakers, budgets, deadlines).
        rng: the randomness of backoff jitter.
        sleep: how to wait between attempts.
        default_budget_s: the budget a call gets when its caller names none. An attempt
            given less (and less than the op's `timeout_ms` and `attempt_timeout_ms`) that
            times out was hurried by its caller: no outcome for the breaker (`_outcome`).
            0: every timeout counts.
    """

    def __init__(
        self,
        policies: PolicyTable,
        *,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        default_budget_s: float = 0.0,
    ) -> None:
        self.policies = policies
        self._default_budget_s = default_budget_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        # Kept names, each table at most MAX_GUARDED_OPS long; a kept route's guard is kept.
        self._ops: dict[str, OpGuard] = {}
        self._routes: dict[tuple[str, str], Route] = {}
        self.fallback: Fallback | None = None
        self.publisher: BreakerPublisher | None = None
        self.transport_up: Callable[[], bool] = lambda: True  # the gateway's NATS connection

    # -- state ---------------------------------------------------------------------------

    def op_guard(self, op: str) -> OpGuard | None:
        """The breaker of `op`, kept from now on; None when every one of the
        `MAX_GUARDED_OPS` kept breakers is open or half-open (see `_drop_an_op`)."""
        found = self._ops.get(op)
        if found is not None:
            return found
        if len(self._ops) >= MAX_GUARDED_OPS and not self._drop_an_op():
            return None
        # The breaker is the op's: its settings come from the op's entry (or the defaults).
        policy = self.policies.get(op, "")
        reset = ExponentialBackoff(
            base_s=policy.breaker_reset_s, cap_s=policy.breaker_reset_max_s, jitter=Jitter.EQUAL
        )
        label = f"op:{op}"

        def report(state: BreakerState) -> None:
            METRICS.circuit_state.labels(label).set(state.level)

        breaker = CircuitBreaker(
            failure_threshold=policy.breaker_failures,
            reset=reset,
            half_open_probes=1,
            probe_timeout_s=self._probe_timeout_s(op),
            clock=self._clock,
            rng=self._rng,
            on_change=report,
        )
        report(BreakerState.CLOSED)
        found = self._ops[op] = OpGuard(op, breaker, used=self._clock())
        return found

    def _probe_timeout_s(self, op: str) -> float:
        """How long a probe's slot is held at most: longer than any attempt of `op` lasts.

        A probe reports its outcome, or gives its slot back when it has none or its caller
        is cancelled (`_attempts`), so this is only a safety net for a probe that is lost
        (a `send` that never returns): shorter than an attempt, it would let a second
        probe through while the first still waits for its reply. An attempt lasts at most
        the call's budget, which `call` caps at the op's longest `timeout_s`; the gateway's
        `send` may then ask the registry, within the same budget, after no responders. So
        twice that, and a second for timers and scheduling.
        """
        return 2 * self.policies.longest_timeout_s(op) + 1.0

    def state(self, op: str) -> BreakerState:
        """The state of `op`'s breaker (closed when it has none)."""
        found = self._ops.get(op)
        return found.breaker.state if found is not None else BreakerState.CLOSED

    def known_ops(self) -> list[str]:
        """Ops that have a breaker in this process."""
        return list(self._ops)

    def apply_remote(self, op: str, open_for_s: float | None) -> None:
        """Adopt another replica's decision: open for `open_for_s`, or closed (None)."""
        guard = self._ops.get(op) if open_for_s is None else self.op_guard(op)
        if guard is None:
            return
        breaker = guard.breaker
        if open_for_s is None:
            # Called when the shared entry went away: another replica's probe succeeded.
            if breaker.state is not BreakerState.CLOSED:
                guard.remote_open = False
                breaker.record_success()
            return
        state = breaker.state
        if state is BreakerState.CLOSED or (
            state is BreakerState.OPEN and open_for_s > breaker.retry_after_s + 0.05
        ):
            guard.remote_open = True
            breaker.open_for(open_for_s)

    def _route(self, op: str, action: str) -> Route:
        """A route for `op.action` not kept (yet): its op's breaker if that is kept, no
        budget. Nothing is kept for a name before an answer shows it is real (`_keep`):
        anyone can make names up, and each would hold a slot for the process's life."""
        return Route(self.policies.get(op, action), self._ops.get(op), None)

    def _keep(self, op: str, action: str, route: Route) -> Route:
        """Keep the route of `op.action`, now shown real, with its op's breaker and a retry
        budget; `route` itself when there is no room for the op (see `op_guard`)."""
        key = (op, action)
        kept = self._routes.get(key)  # by a call that was out at the same time
        if kept is not None:
            return kept
        guard = self.op_guard(op)
        if guard is None:
            return route
        if len(self._routes) >= MAX_GUARDED_OPS:
            self._drop_route(min(self._routes, key=lambda k: self._routes[k].used))
        policy = route.policy
        budget = RetryBudget(
            ratio=policy.retry_budget_ratio,
            min_per_s=policy.retry_budget_min_per_s,
            clock=self._clock,
        )
        kept = self._routes[key] = Route(policy, guard, budget, route.used)
        return kept

    def _drop_an_op(self) -> bool:
        """Make room for one op: drop the least recently called op whose breaker is closed,
        with its routes. False when there is none.

        An open or half-open breaker is kept: it is what protects its op, and only its
        probe's success deletes its entry in the shared hash, which therefore holds at most
        `MAX_GUARDED_OPS` ops per replica. Dropping a closed one loses its count of failures
        and its budgets' balance, nothing more: the op gets new ones on its next answer.
        """
        last: dict[str, float] = {op: g.used for op, g in self._ops.items() if g.breaker.closed}
        for (op, _), route in self._routes.items():
            if route.used > last.get(op, math.inf):
                last[op] = route.used
        if not last:
            return False
        op = min(last, key=last.__getitem__)
        del self._ops[op]
        for key in [key for key in self._routes if key[0] == op]:
            self._drop_route(key)
        METRICS.forget(METRICS.circuit_state, f"op:{op}")
        METRICS.forget(METRICS.circuit_rejected, op)
        return True

    def _drop_route(self, key: tuple[str, str]) -> None:
        """Forget a kept route, and the metric series of its pair (so they stay bounded)."""
        del self._routes[key]
        for reason in BREAKER_FAILURES:  # every failure that is retried
            METRICS.forget(METRICS.retries, *key, reason)
        METRICS.forget(METRICS.retry_budget_exhausted, *key)
        METRICS.forget(METRICS.stale_answers, *key)

    # -- the call ------------------------------------------------------------------------

    async def call(
        self,
        op: str,
        action: str,
        body: bytes,
        headers: dict[str, str],
        timeout_s: float,
        send: Send,
    ) -> Reply:
        """Send one request under its policy; return the reply (any status).

        Args:
            headers: the request headers; `Nexus-Timeout-Ms` is rewritten per attempt.
            timeout_s: the caller's budget (capped at the policy's `timeout_s`).
            send: sends one attempt with the given timeout.

        Raises:
            CircuitOpen: the op's breaker is open and no stale answer can stand in.
            NexusError: the last attempt's transport failure (see `Gateway.request_raw`).
        """
        route = self._routes.get((op, action)) or self._route(op, action)
        policy, budget = route.policy, route.budget
        if budget is not None:
            budget.deposit()
        if timeout_s > policy.timeout_s:
            timeout_s = policy.timeout_s
            _set_deadline(headers, timeout_s)
        route.used = now = self._clock()
        deadline = now + timeout_s
        guard = route.guard
        if guard is not None and not guard.breaker.closed:
            return await self._attempts(route, op, action, body, headers, deadline, send, None)
        # The common case, inline: a closed breaker lets the first attempt through (what
        # `allow()` would say), and a success only clears its failure count.
        per_try = policy.attempt_timeout_s
        if not 0 < per_try < timeout_s:
            per_try = timeout_s
        try:
            reply = await send(per_try)
        except NexusError as exc:
            first = self._outcome(None, exc, policy, per_try, now)
        else:
            if reply.status < 500 and guard is not None and budget is not None:  # kept
                if guard.breaker.closed:
                    guard.breaker.record_success()
                else:  # opened while this attempt was out: it closes, as `_report` says
                    self._report(guard, "")
                return reply
            first = self._outcome(reply, None, policy, per_try, now)
        return await self._attempts(route, op, action, body, headers, deadline, send, first)

    async def _attempts(
        self,
        route: Route,
        op: str,
        action: str,
        body: bytes,
        headers: dict[str, str],
        deadline: float,
        send: Send,
        first: Outcome | None,
    ) -> Reply:
        """The retry loop; `first`: the outcome of a first attempt already sent."""
        policy = route.policy
        schedule: RetrySchedule | None = None
        attempt = 1
        outcome = first
        while True:
            probe: CircuitBreaker | None = None  # the breaker whose probe slot this holds
            if outcome is None:
                breaker = route.guard.breaker if route.guard is not None else None
                if breaker is not None:
                    if not breaker.allow():
                        return await self._refuse(op, action, body, headers, policy, breaker)
                    probe = None if breaker.closed else breaker  # let through while half-open
                try:
                    outcome = await self._attempt(headers, deadline, attempt, policy, send)
                except BaseException:
                    if probe is not None:  # cancelled (the caller went away): no outcome
                        probe.release_probe()
                    raise
            route = self._settle(route, op, action, outcome, probe)
            reply, failure, code, _, _ = outcome
            outcome = None
            if code not in BREAKER_FAILURES:
                if failure is not None:
                    raise failure
                assert reply is not None
                return reply
            schedule = schedule or RetrySchedule.create(
                policy.attempts, policy.backoff_base_s, policy.backoff_max_s, policy.backoff_factor
            )
            # A misrouted attempt ran nothing and cost its worker little: it takes nothing
            # from the retry budget, which guards the op's workers against retry storms.
            free = failure is not None and failure.misrouted
            delay = self._retry_delay(op, action, code, headers, policy, route.budget, schedule,
                                      attempt, deadline, free=free)
            if delay is None:
                return await self._give_up(op, action, body, headers, policy, failure, reply)
            METRICS.retries.labels(op, action, code).inc()
            await self._sleep(delay)
            attempt += 1

    async def _attempt(
        self,
        headers: dict[str, str],
        deadline: float,
        attempt: int,
        policy: OperationPolicy,
        send: Send,
    ) -> Outcome:
        """Send one attempt: its reply or failure, and the failure's code ("" on success)."""
        started = self._clock()
        remaining = deadline - started
        per_try = remaining
        if policy.attempt_timeout_s and policy.attempt_timeout_s < remaining:
            per_try = policy.attempt_timeout_s
        if attempt > 1:
            headers[H_TIMEOUT_MS] = str(max(1, int(remaining * 1000)))
        try:
            reply = await send(per_try)
        except NexusError as exc:
            return self._outcome(None, exc, policy, per_try, started)
        return self._outcome(reply, None, policy, per_try, started)

    def _outcome(
        self,
        reply: Reply | None,
        failure: NexusError | None,
        policy: OperationPolicy,
        given_s: float,
        started: float,
    ) -> Outcome:
        """An attempt's outcome, `hurried` when it timed out (the gateway gave up, or the
        worker answered `upstream_timeout`: a handler bounded by the request's deadline)
        having been given less time than a call gets by default.

        The caller chose that budget (an HTTP client's `Nexus-Timeout-Ms: 1`, say), and the
        op's workers could not have answered within it however healthy: counted, any one
        caller could open the op's breaker for every caller on every replica.
        """
        if failure is not None:
            code = failure.code
        else:
            assert reply is not None
            code = error_code_of(reply) if reply.status >= 500 else ""
        hurried = False
        if code == _TIMEOUT:
            expected = min(self._default_budget_s, policy.timeout_s)
            if policy.attempt_timeout_s:
                expected = min(expected, policy.attempt_timeout_s)
            hurried = given_s < expected - _BUDGET_SLACK_S
        return reply, failure, code, hurried, started

    def _retry_delay(
        self,
        op: str,
        action: str,
        code: str,
        headers: Mapping[str, str],
        policy: OperationPolicy,
        budget: RetryBudget | None,
        schedule: RetrySchedule,
        attempt: int,
        deadline: float,
        *,
        free: bool = False,
    ) -> float | None:
        """How long to wait before retrying a failed attempt; None: do not retry (`free`: a
        retry the budget does not pay for)."""
        if budget is None:
            return None  # a pair not kept: no retries (and no metric series for its name)
        has_key = H_IDEMPOTENCY_KEY in headers
        if not is_retryable(code, idempotent=policy.idempotent, has_key=has_key):
            return None
        delay = schedule.delay(attempt, self._clock(), deadline, self._rng)
        if delay is None:
            return None
        if not free and not budget.withdraw():
            METRICS.retry_budget_exhausted.labels(op, action).inc()
            return None
        return delay

    def _settle(
        self, route: Route, op: str, action: str, outcome: Outcome, probe: CircuitBreaker | None
    ) -> Route:
        """Report an attempt's outcome to the op's breaker, keeping the route first when the
        outcome shows the name is real; the route to go on with.

        An outcome the breaker does not count gives back the probe slot the attempt held
        (`probe`), so the next call probes instead of waiting for the slot to time out.
        """
        if route.budget is None and shows_real(outcome):
            route = self._keep(op, action, route)
        _, failure, code, hurried, started = outcome
        guard = route.guard
        counted = None
        if guard is not None and not hurried:
            counted = self._breaker_code(failure, code, guard.breaker)
        if guard is not None and counted is not None:
            self._report(guard, counted, started)
        elif probe is not None:
            probe.release_probe()
        return route

    def _breaker_code(
        self, failure: NexusError | None, code: str, breaker: CircuitBreaker
    ) -> str | None:
        """The outcome as the breaker should count it ("" a success, None not at all).

        Some failures are no outcome at all: a request the gateway refused before
        publishing it (`unsent`: over a size limit, say), `unknown_operation` from the
        gateway (nobody answered and nobody declared the name), and a request that reached a
        worker lacking an action another worker declares (`misrouted`: a rolling upgrade),
        and (decided by `_settle` before this) a timeout of an attempt its caller gave less
        time than a call gets by default (`hurried`: a probe so hurried gives its slot back,
        the next call probes). None says the op's workers are up, so none may close a
        half-open breaker (and delete the shared entry for every replica), and none says
        they are down.

        A lost NATS connection says nothing about the op's workers either: only their
        silence (no responders, timeouts while connected) or their own 503 replies count
        against them. A probe that was sent must always report, though, or the breaker stays
        half-open until the probe times out: a failed probe is a failure whatever the cause.
        """
        if failure is None or not code:
            return code
        if failure.unsent or failure.misrouted or code == _UNKNOWN_OPERATION:
            return None
        if code == _UNAVAILABLE or not self.transport_up():
            return None if breaker.state is BreakerState.CLOSED else code
        return code

    def _report(self, guard: OpGuard, code: str, started: float | None = None) -> None:
        """Count an outcome (`code`, "" a success) of an attempt that began at `started`: a
        failure of one begun before the breaker's latest success is not counted (a worker
        that died with requests in flight, whose timeouts arrive together while the op's
        other workers answer, would open the op's breaker for every caller)."""
        breaker = guard.breaker
        before = breaker.state
        if code in BREAKER_FAILURES:
            breaker.record_failure(started)
            if breaker.state is BreakerState.OPEN and before is not BreakerState.OPEN:
                guard.remote_open = False
                if self.publisher is not None:
                    self.publisher.opened(guard.op, breaker.retry_after_s)
        else:
            breaker.record_success()
            if before is not BreakerState.CLOSED and self.publisher is not None:
                self.publisher.closed(guard.op)

    async def _refuse(
        self,
        op: str,
        action: str,
        body: bytes,
        headers: Mapping[str, str],
        policy: OperationPolicy,
        breaker: CircuitBreaker,
    ) -> Reply:
        stale = await self._stale(op, action, body, headers, policy)
        if stale is not None:
            return stale
        METRICS.circuit_rejected.labels(op).inc()
        wait = breaker.retry_after_s
        raise CircuitOpen(
            f"the circuit of {op} is open; retry in {wait:.1f}s",
            retry_after=max(1, math.ceil(wait)),
        )

    async def _give_up(
        self,
        op: str,
        action: str,
        body: bytes,
        headers: Mapping[str, str],
        policy: OperationPolicy,
        failure: NexusError | None,
        reply: Reply | None,
    ) -> Reply:
        stale = await self._stale(op, action, body, headers, policy)
        if stale is not None:
            return stale
        if failure is not None:
            raise failure
        assert reply is not None
        return reply

    async def _stale(
        self,
        op: str,
        action: str,
        body: bytes,
        headers: Mapping[str, str],
        policy: OperationPolicy,
    ) -> Reply | None:
        if not policy.cacheable or self.fallback is None or policy.stale_if_error_s <= 0:
            return None
        found = await self.fallback.answer(op, action, body, headers, policy.stale_if_error_s)
        if found is not None:
            METRICS.stale_answers.labels(op, action).inc()
        return found


def _set_deadline(headers: dict[str, str], timeout_s: float) -> None:
    budget_ms = max(1, int(timeout_s * 1000))
    headers[H_TIMEOUT_MS] = str(budget_ms)
    headers[H_DEADLINE] = str(int(time.time() * 1000) + budget_ms)
