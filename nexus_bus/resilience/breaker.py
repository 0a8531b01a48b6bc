"""A circuit breaker as a pure state machine: callers ask, then report; time is injected.

    if breaker.allow():
        try:
            result = await call()
        except SomeError:
            breaker.record_failure()
        else:
            breaker.record_success()
    else:
        ...  # fail fast or fail open

Closed: calls pass; `failure_threshold` consecutive failures open it. A failure of a call
that started before the latest success is not one of them, when the caller says when its
call started: the dependency has answered since (one of several workers died with requests
in flight, and their timeouts arrive together while the others serve). Open: calls are
refused until a reset delay passes; the delay grows with every failed probe (exponential
backoff), so a dead dependency is asked less and less often. Half-open: up to
`half_open_probes` calls pass as probes; one success closes the breaker, one failure opens
it again. A probe that ends without an outcome (refused before it was sent, its caller
cancelled) gives its slot back with `release_probe`; one that is lost and never reports
frees it after `probe_timeout_s`, so the breaker cannot stay half-open forever. Make that
longer than a call can last, or a second probe goes out while the first still waits.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from enum import StrEnum

from nexus_bus.resilience.backoff import ExponentialBackoff, Jitter

Clock = Callable[[], float]


class BreakerState(StrEnum):
    """Where the breaker is; `level` gives the number exported as a gauge."""

    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def level(self) -> int:
        """0 closed, 1 half-open, 2 open (the value of `nexus_circuit_state`)."""
        return _LEVELS[self]


_LEVELS = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
_DEFAULT_RESET = ExponentialBackoff(base_s=0.5, cap_s=10.0, jitter=Jitter.EQUAL)


class CircuitBreaker:
    """Stops calling a dependency that keeps failing, and probes it back to health.

    Args:
        failure_threshold: consecutive failures that open a closed breaker.
        reset: the delay before probing after the n-th consecutive opening.
        half_open_probes: calls let through at once while half-open.
        probe_timeout_s: a probe that has not reported after this long frees its slot.
        clock: monotonic seconds.
        rng: randomness for the reset jitter.
        on_change: called with the new state on every transition (e.g. to set a gauge).

    Attributes:
        closed: whether the state is closed, as a plain attribute (a caller's fast path
            reads it instead of `state` or `allow()`; closed always allows).
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        reset: ExponentialBackoff = _DEFAULT_RESET,
        half_open_probes: int = 1,
        probe_timeout_s: float = 5.0,
        clock: Clock = time.monotonic,
        rng: random.Random | None = None,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        if failure_threshold < 1 or half_open_probes < 1:
            raise ValueError("failure_threshold and half_open_probes must be at least 1")
        self._threshold = failure_threshold
        self._reset = reset
        self._probes_allowed = half_open_probes
        self._probe_timeout_s = probe_timeout_s
        self._clock = clock
        self._rng = rng or random.Random()
        self._on_change = on_change
        self._state = BreakerState.CLOSED
        # `state is CLOSED` as a plain attribute, for callers' fast paths: only `_move`
        # enters or leaves closed (open → half-open happens lazily, on reading `state`).
        self.closed = True
        self._failures = 0
        self._openings = 0  # consecutive openings without a success in between
        self._open_until = 0.0
        self._succeeded_at = float("-inf")  # the latest success, on `clock`
        self._probes: list[float] = []  # start times of probes that have not reported

    @property
    def state(self) -> BreakerState:
        """The current state (an open breaker whose delay passed reads as half-open)."""
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._move(BreakerState.HALF_OPEN)
        return self._state

    @property
    def retry_after_s(self) -> float:
        """Seconds until an open breaker lets a probe through (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._open_until - self._clock())

    def allow(self) -> bool:
        """Whether a call may go ahead now; a `True` while half-open takes a probe slot, which
        the call's outcome frees (or `release_probe`, when it has none)."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN:
            return False
        now = self._clock()
        self._probes = [t for t in self._probes if now - t < self._probe_timeout_s]
        if len(self._probes) >= self._probes_allowed:
            return False
        self._probes.append(now)
        return True

    def release_probe(self) -> None:
        """Give back the slot of a probe that ended without an outcome (refused before it
        reached the dependency, say): it proved nothing either way, so the breaker stays as
        it is and the next call probes instead of waiting out `probe_timeout_s`.

        The oldest outstanding slot is freed: with one probe at a time, the caller's own.
        Nothing happens when no probe is outstanding (an outcome or a transition since).
        """
        if self._probes:
            del self._probes[0]

    def record_success(self) -> None:
        """The call worked: a half-open (or open) breaker closes; failures are forgotten."""
        self._failures = 0
        self._succeeded_at = self._clock()
        if self._state is not BreakerState.CLOSED:
            self._openings = 0
            self._probes.clear()
            self._move(BreakerState.CLOSED)

    def record_failure(self, started_at: float | None = None) -> None:
        """The call failed: count it, and open the breaker when the threshold is reached.

        Args:
            started_at: when the call started, on the breaker's clock. A closed breaker does
                not count a call that started before its latest success.
        """
        state = self.state
        if state is BreakerState.HALF_OPEN:
            self._open()
        elif state is BreakerState.CLOSED:
            if started_at is not None and started_at < self._succeeded_at:
                return
            self._failures += 1
            if self._failures >= self._threshold:
                self._open()
        # Already open: late reports of calls started before it opened change nothing.

    def open_for(self, seconds: float) -> None:
        """Open now for `seconds`, as another replica decided (shared breaker state).

        Counts no opening of its own: the next failed probe here backs off as usual.
        """
        self._failures = 0
        self._probes.clear()
        self._open_until = self._clock() + max(0.0, seconds)
        self._move(BreakerState.OPEN)

    def _open(self) -> None:
        self._openings += 1
        self._failures = 0
        self._probes.clear()
        self._open_until = self._clock() + self._reset.compute(self._openings, self._rng)
        self._move(BreakerState.OPEN)

    def _move(self, state: BreakerState) -> None:
        if state is self._state:
            return
        self._state = state
        self.closed = state is BreakerState.CLOSED
        if self._on_change is not None:
            self._on_change(state)
