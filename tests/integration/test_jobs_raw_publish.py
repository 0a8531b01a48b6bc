"""Jobs published straight onto `nexus.jobs.<op>.<action>` by any NATS client (docs/contract.md),
with subjects our own client never builds: each is refused by JetStream or ends with a status
its publisher can read, never acknowledged and then left in the stream or dropped unseen."""

from __future__ import annotations

import nats.errors
import pytest

from nexus_bus import Gateway
from nexus_bus.constants import H_AUTHORIZATION, JOBS_STREAM


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
