"""`Prefer: respond-async` → 202 with `Location`, and `GET /v1/jobs/{id}`, on the jobs client.

The shim only submits and reads status documents; job workers run the operation (and enforce
its token) later, on JetStream.
"""

from __future__ import annotations

from typing import Final

import msgspec
from nats.aio.client import Client

from nexus_bus.config import Settings
from nexus_bus.constants import CT_JSON, H_LOCATION, HTTP_API_PREFIX, JOBS_PREFIX
from nexus_bus.http.problems import Answer
from nexus_bus.jobs.client import get_job, submit_job

_encoder: Final = msgspec.json.Encoder()
_CT_JSON: Final = CT_JSON.encode()
_LOCATION: Final = H_LOCATION.lower().encode()
_JOBS_ROUTE: Final = f"{HTTP_API_PREFIX}/{JOBS_PREFIX.rsplit('.', 1)[-1]}/"


def job_location(job_id: str) -> str:
    """The URL path of a job's status document."""
    return _JOBS_ROUTE + job_id


class JobRoutes:
    """Submits operations as jobs and serves their status documents."""

    def __init__(self, nc: Client, settings: Settings) -> None:
        self._nc = nc
        self._settings = settings

    async def submit(self, op: str, action: str, body: bytes, headers: dict[str, str]) -> Answer:
        """Submit `op.action` as a job: 202, `{"job_id", "status"}`, `Location`.

        Raises:
            NexusError: the submission was refused or JetStream did not acknowledge it.
        """
        accepted = await submit_job(self._nc, self._settings, op, action, body, headers)
        location = job_location(accepted.job_id).encode()
        return Answer(202, _CT_JSON, [(_LOCATION, location)], _encoder.encode(accepted))

    async def status(self, job_id: str) -> Answer:
        """The job's status document.

        Raises:
            InvalidRequest: not a job id.
            NotFound: no such job.
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        job = await get_job(self._nc, self._settings, job_id)
        return Answer(200, _CT_JSON, [], _encoder.encode(job))
