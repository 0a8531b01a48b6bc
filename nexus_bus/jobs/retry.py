"""What to do with a job after an attempt: the verdict and, for a retry, its delay. Pure.

JetStream redelivers a bare `nak()` at once, and a consumer's `backoff` list only applies to
ack timeouts, so the runner takes each retry's delay from here and sends `nak(delay)`. The
schedule is the shared `resilience.backoff.ExponentialBackoff`, configured under `jobs.*`.

The dead-letter queue is for work that could not be done, to be replayed once the cause is
fixed, and every entry fires an alert. A permanent client error (400, 403, 404, 409, 413,
422...) is the operation's answer to the request, as it would be to a synchronous call:
replaying the same request gets the same answer, so the job just fails with that problem.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

from nexus_bus.config import JobsSettings
from nexus_bus.resilience.backoff import ExponentialBackoff, Jitter


def backoff_of(settings: JobsSettings) -> ExponentialBackoff:
    """The retry schedule configured under `jobs.backoff_*`."""
    return ExponentialBackoff(
        base_s=settings.backoff_base_s,
        cap_s=settings.backoff_max_s,
        factor=settings.backoff_multiplier,
        jitter=Jitter(settings.backoff_jitter),
    )


# 401 is a client status the queue keeps: a token that expired while the job waited for a
# retry (or a job published without one) is work a replay with `--token` can still do.
_DEAD_LETTERED_CLIENT_ERRORS: Final = frozenset({401})


class Verdict(StrEnum):
    """The outcome of one attempt, as the runner acts on it."""

    SUCCEEDED = "succeeded"  # ack
    RETRY = "retry"  # nak(delay)
    REJECTED = "rejected"  # a permanent client error: status `failed` with its problem, ack
    FAILED = "failed"  # any other permanent error: dead-letter at once, term
    DEAD = "dead"  # retryable, but out of attempts: dead-letter, term


def is_client_error(status: int) -> bool:
    """Whether a permanent error with this status is the request's own fault, not the work's.

    Every 4xx but 401 (see `_DEAD_LETTERED_CLIENT_ERRORS`).
    """
    return 400 <= status < 500 and status not in _DEAD_LETTERED_CLIENT_ERRORS


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict and, for a retry, its delay in seconds."""

    verdict: Verdict
    delay_s: float = 0.0


def decide(
    *,
    status: int,
    retryable: bool,
    attempt: int,
    max_deliver: int,
    backoff: ExponentialBackoff,
    rng: random.Random,
) -> Decision:
    """What to do after attempt `attempt` (1-based) ended with `status`.

    Args:
        status: the reply's `Nexus-Status`.
        retryable: whether the reply's error may succeed later (`NexusError.retryable`).
        attempt: the delivery count of this attempt.
        max_deliver: the attempts a job gets before it is dead-lettered.
        backoff: the retry schedule; the delay after attempt n is its n-th delay.
        rng: randomness for the jitter (injected for tests).
    """
    if status < 400:
        return Decision(Verdict.SUCCEEDED)
    if not retryable:
        return Decision(Verdict.REJECTED if is_client_error(status) else Verdict.FAILED)
    if attempt >= max_deliver:
        return Decision(Verdict.DEAD)
    return Decision(Verdict.RETRY, backoff.compute(attempt, rng))
