"""What to do with a job after an attempt: the verdict and, for a retry, its delay. Pure.

JetStream redelivers a bare `nak()` at once, and a consumer's `backoff` list only applies to
ack timeouts, so the runner takes each retry's delay from here and sends `nak(delay)`. The
schedule is the shared `resilience.backoff.ExponentialBackoff`, configured under `jobs.*`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

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


class Verdict(StrEnum):
    """The outcome of one attempt, as the runner acts on it."""

    SUCCEEDED = "succeeded"  # ack
    RETRY = "retry"  # nak(delay)
    FAILED = "failed"  # a permanent error: dead-letter at once, term
    DEAD = "dead"  # retryable, but out of attempts: dead-letter, term


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
        return Decision(Verdict.FAILED)
    if attempt >= max_deliver:
        return Decision(Verdict.DEAD)
    return Decision(Verdict.RETRY, backoff.compute(attempt, rng))
