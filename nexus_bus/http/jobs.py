"""`Prefer: respond-async` → 202 with `Location`, and `GET /v1/jobs/{id}`, on the jobs client.

The shim only submits and reads status documents; job workers run the operation later, on
JetStream. Neither route reaches a worker's request path, so the shim authorizes both itself
(`authz.py`): a submission as a synchronous call would be, before anything is published (the
job worker checks the token again when it runs the job); a status read needs a token with
the job's scope.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import msgspec
from nats.aio.client import Client

from nexus_bus.config import Settings
from nexus_bus.constants import CT_JSON, H_LOCATION, HTTP_API_PREFIX, JOBS_PREFIX
from nexus_bus.errors import NotFound
from nexus_bus.http.authz import ShimAuthorizer
from nexus_bus.http.problems import Answer
from nexus_bus.jobs.client import get_job, submit_job
from nexus_bus.policies.admission import Admission

_encoder: Final = msgspec.json.Encoder()
_CT_JSON: Final = CT_JSON.encode()
_LOCATION: Final = H_LOCATION.lower().encode()
_JOBS_ROUTE: Final = f"{HTTP_API_PREFIX}/{JOBS_PREFIX.rsplit('.', 1)[-1]}/"


def job_location(job_id: str) -> str:
    """The URL path of a job's status document."""
    return _JOBS_ROUTE + job_id


class JobRoutes:
    """Submits operations as jobs and serves their status documents."""

    def __init__(
        self,
        nc: Client,
        settings: Settings,
        authorizer: ShimAuthorizer,
        admission: Admission | None = None,
    ) -> None:
        """Args: admission: the workers' rate limits, which a job spends from when it is
        accepted (the job runner does not); None: no limits (`resilience.enabled` false)."""
        self._nc = nc
        self._settings = settings
        self._authz = authorizer
        self._admission = admission

    async def submit(self, op: str, action: str, body: bytes, headers: dict[str, str]) -> Answer:
        """Submit `op.action` as a job: 202, `{"job_id", "status"}`, `Location`.

        Raises:
            InvalidToken / Forbidden / RateLimited / Unavailable: refused as a synchronous
                call to `op.action` would be (its rate limit included); nothing was published.
            NexusError: the submission was refused or JetStream did not acknowledge it.
        """
        principal = await self._authz.authorize(headers, op, action)
        if self._admission is not None:
            # The job runner runs jobs without the workers' admission: the job is this call.
            await self._admission.spend(op, action, principal)
        accepted = await submit_job(self._nc, self._settings, op, action, body, headers)
        location = job_location(accepted.job_id).encode()
        return Answer(202, _CT_JSON, [(_LOCATION, location)], _encoder.encode(accepted))

    async def status(self, job_id: str, credentials: Mapping[str, str]) -> Answer:
        """The job's status document, for a caller whose token has the job's scope.

        Args:
            job_id: the job.
            credentials: the caller's `Authorization` and client address (`authz.credentials`).

        Raises:
            InvalidToken: missing or invalid token (401), before the job is looked up.
            RateLimited / Unavailable: too many failures (429); no revocation store (503).
            InvalidRequest: not a job id.
            NotFound: no such job, or one the token's scopes do not cover (the same answer).
            Unavailable / UpstreamTimeout: JetStream cannot be reached.
        """
        principal = await self._authz.authenticate(credentials)
        hidden = NotFound(f"no job {job_id}")
        try:
            job = await get_job(self._nc, self._settings, job_id)
        except NotFound:
            raise hidden from None
        if not self._authz.permits(principal, job.op, job.action):
            raise hidden
        return Answer(200, _CT_JSON, [], _encoder.encode(job))
