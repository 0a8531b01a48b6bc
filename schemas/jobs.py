"""Asynchronous jobs: the 202 answer and the job status document."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

import msgspec


class JobStatus(StrEnum):
    """Where a job is in its life."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    DEAD = "dead"


class JobAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """The body of a 202 answer to `Prefer: respond-async`."""

    job_id: str
    status: JobStatus


class Job(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A job's status document, `GET /v1/jobs/{id}`.

    `result` and `error` appear only when set; `attempts`, the handler runs so far, always
    (0 before the first).
    """

    id: str
    op: str
    action: str
    status: JobStatus
    attempts: int  # no default, so omit_defaults never leaves it out
    result: Any = None
    error: Any = None
