"""Jobs published straight onto `nexus.jobs.<op>.<action>` by any NATS client (docs/contract.md),
with subjects our own client never builds: each is refused by JetStream or ends with a status
its publisher can read, never acknowledged and then left in the stream or dropped unseen."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from nexus_bus import Gateway, NotFound, Settings
from nexus_bus.constants import H_AUTHORIZATION, JOBS_STREAM
from nexus_bus.jobs.client import get_job, wait_job
from nexus_bus.jobs.envelope import job_id_of_message
from nexus_bus.schemas.jobs import Job, JobStatus


async def finished(gateway: Gateway, settings: Settings, job_id: str, timeout_s: float) -> Job:
    """The final status of a job published without our client: its status document appears
    only once a worker takes it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            await get_job(gateway.nc, settings, job_id)
        except NotFound:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)
            continue
        return await wait_job(gateway.nc, settings, job_id, timeout_s=timeout_s)


@pytest.mark.parametrize("extra", ["put.more", "put.more.tokens"])
async def test_a_job_subject_with_more_tokens_than_op_and_action_is_not_acknowledged(
    gateway: Gateway, admin_token: str, extra: str
) -> None:
    # No consumer's filter (`nexus.jobs.<op>.*`) takes it: acknowledged, it would stay in the
    # work queue for good, a job that neither runs nor fails.
    js = gateway.nc.jetstream()
    with pytest.raises(nats.errors.Error):
        await js.publish(
            f"nexus.jobs.data.{extra}", b'{"key": "k", "value": 1}',
            headers={H_AUTHORIZATION: f"Bearer {admin_token}"}, stream=JOBS_STREAM,
        )  # fmt: skip


@pytest.mark.parametrize("action", ["PUT", "put$", "pút"])
async def test_a_job_whose_action_is_no_valid_token_fails_with_a_status(
    gateway: Gateway, settings: Settings, admin_token: str, action: str
) -> None:
    # A served op's consumer takes it; the job ends `failed` under the id its publisher
    # derives (docs/jobs.md), not terminated with no status and no DLQ entry.
    js = gateway.nc.jetstream()
    ack = await js.publish(
        f"nexus.jobs.data.{action}", b'{"key": "k", "value": 1}',
        headers={H_AUTHORIZATION: f"Bearer {admin_token}"},
    )  # fmt: skip
    job_id = job_id_of_message("data", action, {}, ack.seq)
    job = await finished(gateway, settings, job_id, timeout_s=10)
    assert job.status is JobStatus.FAILED and job.attempts == 0
    assert job.error is not None and job.error["code"] == "invalid_request"
    assert job.op == "data" and job.action == action


@pytest.mark.parametrize("subject", ["auth.issue", "sys.effects", "jobs.run", "dlq.x", "events.x"])
async def test_a_job_of_a_reserved_op_fails_unrun(
    gateway: Gateway, settings: Settings, admin_token: str, subject: str
) -> None:
    # No worker serves a reserved op as jobs (our client refuses to submit one), so no op's
    # consumer takes it: acknowledged, it stayed in the work queue for good.
    js = gateway.nc.jetstream()
    ack = await js.publish(
        f"nexus.jobs.{subject}", b'{"subject": "s", "scopes": ["*"]}',
        headers={H_AUTHORIZATION: f"Bearer {admin_token}"},
    )  # fmt: skip
    op, action = subject.split(".")
    job = await finished(gateway, settings, job_id_of_message(op, action, {}, ack.seq), 10)
    assert job.status is JobStatus.FAILED and job.result is None
    assert job.error is not None and job.error["code"] == "unknown_operation"
    assert (job.op, job.action) == (op, action)
