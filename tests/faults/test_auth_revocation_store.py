"""The revocation store dies: unproven tokens get 503 (never a silent allow), then recover."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import nats
import pytest

from nexus_bus import Operations, RequestContext, Worker
from nexus_bus.auth import RedisRevocationStore
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import Unavailable
from nexus_bus.redis_client import create_redis
from tests.conftest import issue_test_token, make_settings


async def test_store_down_is_503_for_unproven_tokens_and_recovers(
    nats_url: str, local_redis: ServerProcess, uid: str
) -> None:
    op = f"probe{uid}"
    ops = Operations(op)

    @ops.action("whoami")
    async def whoami(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        assert ctx.principal is not None
        return {"subject": ctx.principal.subject}

    # A long cache TTL makes the documented trade-off visible: a token proven less than
    # cache_ttl_s ago still passes while the store is down; nothing unproven does.
    settings = make_settings(nats_url, local_redis.url + "/0", auth={"cache_ttl_s": 60})
    worker = Worker(settings, [ops])
    await worker.start()
    client = await nats.connect(nats_url)

    async def status_of(bearer: str) -> tuple[int, str]:
        msg = await client.request(
            f"nexus.{op}.whoami", b"{}", timeout=5, headers={"Authorization": f"Bearer {bearer}"}
        )
        code = msgspec.json.decode(msg.data).get("code", "") if msg.data else ""
        return int((msg.headers or {})["Nexus-Status"]), code

    proven = issue_test_token(("*",), subject="proven")
    unproven = issue_test_token(("*",), subject="unproven")
    try:
        assert await status_of(proven) == (200, "")
        local_redis.kill()
        started = time.monotonic()
        assert await status_of(unproven) == (503, "unavailable")
        assert time.monotonic() - started < 3  # short Redis timeouts: fails fast, not in 10 s
        assert (await status_of(proven))[0] == 200  # cached within its stated bound
        local_redis.start()
        deadline = time.monotonic() + 10
        while (result := await status_of(unproven))[0] == 503 and time.monotonic() < deadline:
            pass
        assert result == (200, "")
    finally:
        await client.close()
        await worker.drain(1)


async def test_revoking_without_a_store_fails_loudly(local_redis: ServerProcess) -> None:
    redis = create_redis(make_settings("nats://unused", local_redis.url + "/0").redis)
    store = RedisRevocationStore(redis)
    try:
        await store.revoke("j1", 60)
        assert await store.is_revoked("j1")
        local_redis.kill()
        with pytest.raises(Unavailable):
            await store.revoke("j2", 60)
        with pytest.raises(Unavailable):
            await store.is_revoked("j1")
    finally:
        await redis.aclose()
