"""What a job message carries: its id and the headers allowed to travel with it.

Pure functions. A submission's headers come from HTTP clients and NATS publishers, and they
end up on a JetStream publish where `Nats-*` headers are commands to the server
(`Nats-Rollup: all` would purge the whole jobs stream, `Nats-Expected-*` would make the
publish fail on purpose). So only an allowlist of request headers is forwarded, under their
canonical names, and the job's own `Nats-Msg-Id` is set here.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Final

from nexus_bus.bus.metadata import budget_headers
from nexus_bus.bus.subjects import check_token
from nexus_bus.constants import (
    DLQ_HEADER_PREFIX,
    H_AUTHORIZATION,
    H_CLIENT_IP,
    H_CONTENT_TYPE,
    H_IDEMPOTENCY_KEY,
    H_JOB_ID,
    H_NATS_MSG_ID,
    H_REQUEST_ID,
    H_TRACEPARENT,
    H_TRACESTATE,
    JOBS_STREAM,
    NATS_HEADER_PREFIX,
)
from nexus_bus.errors import InvalidRequest

JOB_ID_PATTERN: Final = r"^[0-9a-f]{32}$(?!\n)"  # exported too: see TOKEN_PATTERN
_JOB_ID: Final = re.compile(JOB_ID_PATTERN)
# The request headers a job keeps; deadlines are dropped on purpose: a job has no caller
# waiting, the runner gives each attempt the job timeout instead.
FORWARDED_HEADERS: Final = (
    H_AUTHORIZATION,
    H_REQUEST_ID,
    H_TRACEPARENT,
    H_TRACESTATE,
    H_CONTENT_TYPE,
    H_IDEMPOTENCY_KEY,
    H_CLIENT_IP,
)
_CANONICAL: Final = {name.lower(): name for name in FORWARDED_HEADERS}


def new_job_id() -> str:
    """A fresh random job id: 32 hex characters (128 bits, unguessable)."""
    return os.urandom(16).hex()


def job_id_for(
    op: str, action: str, idempotency_key: str | None, subject: str | None = None
) -> str:
    """The job id of a submission: derived from its idempotency key, else random.

    Deriving the id makes a resubmission with the same key address the same job, beyond the
    stream's dedup window too. The op and action are part of the hash so the same key sent to
    two operations names two jobs, and so is the submitter's token subject when it has one:
    a key is its caller's, as on the synchronous path (`resilience.idempotency`), so another
    subject sending the same key gets a job of its own, not the first one's status and result.
    """
    if not idempotency_key:
        return new_job_id()
    scope = f"{op}\x00{action}\x00{idempotency_key}"
    if subject is not None:
        scope = f"{subject}\x00{scope}"
    return hashlib.sha256(scope.encode()).hexdigest()[:32]


def job_id_of_message(op: str, action: str, headers: Mapping[str, str], stream_seq: int) -> str:
    """The job id of a delivered message, stable across its redeliveries.

    Messages published by our client carry `Nexus-Job-Id`. A message published straight onto
    `nexus.jobs.<op>.<action>` by another NATS client gets an id derived from its
    `Nats-Msg-Id` when it set one, else from its stream sequence.
    """
    given = headers.get(H_JOB_ID, "")
    if _JOB_ID.fullmatch(given):
        return given
    msg_id = headers.get(H_NATS_MSG_ID)
    return job_id_for(op, action, msg_id or f"{JOBS_STREAM}:{stream_seq}")


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it is shaped like one of ours.

    Raises:
        InvalidRequest: anything else (it would otherwise reach a KV key or subject).
    """
    if not isinstance(job_id, str) or _JOB_ID.fullmatch(job_id) is None:
        raise InvalidRequest("invalid job id: expected 32 lowercase hex characters")
    return job_id


def idempotency_key_of(headers: Mapping[str, str]) -> str | None:
    """The `Idempotency-Key` of a header set, whatever its case."""
    wanted = H_IDEMPOTENCY_KEY.lower()
    for name, value in headers.items():
        if name.lower() == wanted and value:
            return value
    return None


def job_headers(headers: Mapping[str, str], job_id: str) -> dict[str, str]:
    """The headers a job message is published with: the allowlist, the job id, the msg id."""
    kept = {
        _CANONICAL[name.lower()]: value
        for name, value in headers.items()
        if name.lower() in _CANONICAL
    }
    kept[H_JOB_ID] = job_id
    kept[H_NATS_MSG_ID] = job_id
    return kept


def run_headers(headers: Mapping[str, str], *, now_ms: int, timeout_s: float) -> dict[str, str]:
    """The headers one attempt is dispatched with: the job's, with a fresh job-long deadline.

    JetStream's own headers and dead-letter annotations are not the operation's business.
    """
    kept = {
        name: value
        for name, value in headers.items()
        if not name.startswith((NATS_HEADER_PREFIX, DLQ_HEADER_PREFIX))
    }
    kept.update(budget_headers(timeout_s, now_ms))
    return kept


def parse_job_subject(subject: str, prefix: str) -> tuple[str, str]:
    """Split `<prefix>.<op>.<action>` into op and action.

    Raises:
        InvalidRequest: not that shape, or tokens outside the subject allowlist.
    """
    head = prefix + "."
    if not subject.startswith(head):
        raise InvalidRequest(f"not a job subject: {subject[:80]!r}")
    parts = subject[len(head) :].split(".")
    if len(parts) != 2:
        raise InvalidRequest(f"not a job subject: {subject[:80]!r}")
    return check_token(parts[0], "op"), check_token(parts[1], "action")
