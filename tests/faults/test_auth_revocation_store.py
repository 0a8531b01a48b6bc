"""The revocation store (Redis the read path, JetStream KV the record) under faults.

- Redis gone: unproven tokens get 503 (never a silent allow); they pass again once it is
  back (re-seeded from the KV), and revoking fails loudly.
- JetStream gone while Redis is up and seeded: token checks still answer (a revoked token is
  refused, others pass); only revoking, and a re-seed, need it (503).
- Redis restarted empty (it runs without persistence): the revocation is still refused, as
  it is by a fresh worker; the KV's records are copied back into Redis.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from nexus_bus import Operations, RequestContext, Settings, Worker
from nexus_bus.auth import Keyring, TokenCodec
from nexus_bus.auth.operator import revoke_token
from nexus_bus.auth.revocation import (
    SEED_TIMEOUT_S,
    SEEDED_FIELD,
    RevocationStoreWithCache,
    revocation_key,
)
from nexus_bus.auth.service import revocation_store
from nexus_bus.constants import AUTH_REVOKED_KEY
from nexus_bus.embedded import ServerProcess, redis_server
from nexus_bus.errors import Unavailable
from nexus_bus.redis_client import create_redis
from tests.conftest import make_settings, shared_keys_dir


def whoami_group(op: str) -> Operations:
    """`<op>.whoami`: touches neither Redis nor JetStream, so only auth can fail it."""
    ops = Operations(op)

    @ops.action("whoami")
    async def whoami(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        assert ctx.principal is not None
        return {"subject": ctx.principal.subject}

    return ops


def signed(subject: str) -> tuple[str, str]:
    """A token signed with the test key, and its `jti`."""
    jti = uuid.uuid4().hex
    codec = TokenCodec(Keyring.from_dir(shared_keys_dir()))
    return codec.issue(subject, frozenset({"*"}), 600, now=int(time.time()), jti=jti).token, jti


async def status_of(client: Client, op: str, bearer: str) -> tuple[int, str]:
    msg = await client.request(
        f"nexus.{op}.whoami", b"{}", timeout=5, headers={"Authorization": f"Bearer {bearer}"}
    )
    code = msgspec.json.decode(msg.data).get("code", "") if msg.data else ""
    return int((msg.headers or {})["Nexus-Status"]), code


async def answered(client: Client, op: str, bearer: str, seconds: float = 15) -> tuple[int, str]:
    """The first answer once a worker serves `op` again (after a broker restart)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return await status_of(client, op, bearer)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def fast_reconnect(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"nats": settings.nats.model_copy(update={"reconnect_wait_s": 0.2})}
    )


@asynccontextmanager
async def serving(settings: Settings, op: str) -> AsyncIterator[Client]:
    """A worker serving `op`, and a client connection to call it with."""
    worker = Worker(settings, [whoami_group(op)])
    await worker.start()
    client = await nats.connect(settings.nats.url, reconnect_time_wait=0.2)
    try:
        yield client
    finally:
        await client.close()
        await worker.drain(1)


async def test_jetstream_down_lookups_still_answer_from_redis(
    local_nats: ServerProcess, local_redis: ServerProcess, uid: str
) -> None:
    op = f"probe{uid}"
    # No verification cache: every request asks the store.
    settings = make_settings(local_nats.url, local_redis.url + "/0", auth={"cache_ttl_s": 0})
    settings = fast_reconnect(settings)
    fine, _ = signed("fine")
    revoked, revoked_jti = signed("revoked")
    # The same server, port and store, without JetStream: NATS answers, the KV cannot.
    without_jetstream = dataclasses.replace(
        local_nats, argv=[a for a in local_nats.argv if a != "-js"], proc=None
    )
    redis = create_redis(settings.redis)
    async with serving(settings, op) as client:
        try:
            await revoke_token(settings, revoked_jti)
            assert await status_of(client, op, revoked) == (401, "invalid_token")  # seeded
            await asyncio.to_thread(local_nats.kill)
            await asyncio.to_thread(without_jetstream.start)
            # Before this change every lookup read the KV: all of these were 503.
            assert await answered(client, op, fine) == (200, "")
            assert await status_of(client, op, revoked) == (401, "invalid_token")
            with pytest.raises(Unavailable):
                await revoke_token(settings, uuid.uuid4().hex)  # the record needs JetStream
            # Redis loses its data now: a re-seed needs the KV, so checks fail closed, fast.
            await redis.flushdb()
            started = time.monotonic()
            assert await status_of(client, op, fine) == (503, "unavailable")
            assert await status_of(client, op, revoked) == (503, "unavailable")
            assert time.monotonic() - started < SEED_TIMEOUT_S * 2 + 1
        finally:
            await redis.aclose()
            await asyncio.to_thread(without_jetstream.kill)
            await asyncio.to_thread(local_nats.start)
        deadline = time.monotonic() + 15
        while (result := await answered(client, op, fine))[0] == 503:
            assert time.monotonic() - deadline < 0, "JetStream is back but auth still fails"
            await asyncio.sleep(0.1)
        assert result == (200, "")
        assert await status_of(client, op, revoked) == (401, "invalid_token")  # re-seeded


async def test_redis_down_is_503_for_unproven_tokens_and_recovers(
    nats_url: str, local_redis: ServerProcess, uid: str
) -> None:
    op = f"probe{uid}"
    # A long cache TTL makes the documented trade-off visible: a token proven less than
    # cache_ttl_s ago still passes while the store is down; nothing unproven does.
    settings = make_settings(nats_url, local_redis.url + "/0", auth={"cache_ttl_s": 60})
    proven, _ = signed("proven")
    unproven, _ = signed("unproven")
    async with serving(settings, op) as client:
        assert await status_of(client, op, proven) == (200, "")
        await asyncio.to_thread(local_redis.kill)
        started = time.monotonic()
        assert await status_of(client, op, unproven) == (503, "unavailable")
        assert time.monotonic() - started < 3  # short Redis timeouts: fails fast, not in 10 s
        assert (await status_of(client, op, proven))[0] == 200  # cached within its bound
        await asyncio.to_thread(local_redis.start)
        deadline = time.monotonic() + 10
        while (result := await status_of(client, op, unproven))[0] == 503:
            assert time.monotonic() < deadline, "Redis is back but auth still fails"
        assert result == (200, "")


async def test_revoking_without_redis_fails_loudly(
    nats_url: str, local_redis: ServerProcess
) -> None:
    settings = make_settings(nats_url, local_redis.url + "/0")
    redis = create_redis(settings.redis)
    nc = await nats.connect(nats_url)
    store = revocation_store(settings, redis, nc)
    try:
        await store.revoke("j1")
        assert await store.is_revoked("j1")
        await asyncio.to_thread(local_redis.kill)
        with pytest.raises(Unavailable):
            await store.revoke("j2")  # recorded in the KV, not on the read path: a 503
        with pytest.raises(Unavailable):
            await store.is_revoked("j1")
    finally:
        await redis.aclose()
        await nc.close()


async def test_a_reseed_copies_the_records_once_redis_lost_them(
    local_nats: ServerProcess, local_redis: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(local_nats.url, local_redis.url + "/0", auth={"max_ttl_s": 600})
    redis = create_redis(settings.redis)
    nc = await nats.connect(local_nats.url)
    store = revocation_store(settings, redis, nc)
    reseeds = 0
    reseed = RevocationStoreWithCache._reseed

    async def counted(self: RevocationStoreWithCache) -> None:
        nonlocal reseeds
        reseeds += 1
        await reseed(self)

    monkeypatch.setattr(RevocationStoreWithCache, "_reseed", counted)
    try:
        assert not await store.is_revoked("j0")  # first use ever: an empty bucket
        assert reseeds == 1 and await redis.hexists(AUTH_REVOKED_KEY, SEEDED_FIELD)
        ids = ["j1", "j2", "odd id *"]
        for jti in ids:
            await store.revoke(jti)
        await redis.flushdb()  # what a restart without persistence leaves
        # Concurrent lookups share one re-seed, and every record is back.
        answers = await asyncio.gather(*(store.is_revoked(j) for j in [*ids, "j0"] * 5))
        assert answers == [True, True, True, False] * 5
        assert reseeds == 2
        now_ms = time.time() * 1000
        for jti in ids:
            expiry = int(await redis.hget(AUTH_REVOKED_KEY, revocation_key(jti)))
            assert 600_000 < expiry - now_ms <= (600 + settings.auth.leeway_s) * 1000
        assert await redis.ttl(AUTH_REVOKED_KEY) == -1  # neither the hash nor its marker expire
        assert await store.is_revoked("j1") and reseeds == 2  # seeded: Redis alone answers
    finally:
        await redis.aclose()
        await nc.close()


@pytest.mark.parametrize("policy", ["volatile-lru", "allkeys-lru"])
async def test_a_revocation_outlives_evictions_under_memory_pressure(
    local_nats: ServerProcess, tmp_path: Path, policy: str
) -> None:
    """A Redis with `maxmemory` and an evicting policy (ElastiCache's default is volatile-lru),
    filled by the cache's own keys (each with an expiry): a revoked token stays revoked.

    One key per revocation, each with an expiry beside a marker without one, let
    `volatile-lru` evict exactly the revocations and keep the marker."""
    redis_proc = redis_server(
        tmp_path / "redis", extra_args=["--maxmemory", "4mb", "--maxmemory-policy", policy]
    ).start()
    settings = make_settings(local_nats.url, redis_proc.url + "/0")
    redis = create_redis(settings.redis)
    nc = await nats.connect(local_nats.url)
    store = revocation_store(settings, redis, nc)
    try:
        revoked = [uuid.uuid4().hex for _ in range(20)]
        for jti in revoked:
            await store.revoke(jti)
        assert all([await store.is_revoked(jti) for jti in revoked])  # seeded
        filler = b"x" * 1024
        for start in range(0, 20_000, 500):  # about 20 MB of cache entries into 4 MB
            pipe = redis.pipeline(transaction=False)
            for i in range(start, start + 500):
                pipe.set(f"nexus:cache:filler:{i}", filler, ex=3600)
            await pipe.execute()
        assert int((await redis.info("stats"))["evicted_keys"]) > 0
        assert [await store.is_revoked(jti) for jti in revoked] == [True] * len(revoked)
        assert not await store.is_revoked(uuid.uuid4().hex)
    finally:
        await redis.aclose()
        await nc.close()
        redis_proc.kill()


async def test_records_past_their_expiry_are_pruned_from_redis(
    local_nats: ServerProcess, local_redis: ServerProcess
) -> None:
    """The hash has no expiry of its own: each `revoke` prunes a page of expired fields (a
    dead re-seed's nonce too), and the marker stays."""
    settings = make_settings(local_nats.url, local_redis.url + "/0")
    redis = create_redis(settings.redis)
    nc = await nats.connect(local_nats.url)
    key = f"nexus:test:{uuid.uuid4().hex}"
    store = RevocationStoreWithCache(
        redis, nc.jetstream(), settings.jetstream, retention_s=1, key=key
    )
    try:
        for jti in ("old1", "old2", "old3"):
            await store.revoke(jti)
        await redis.hset(key, mapping={SEEDED_FIELD: "never", ".seeding.dead": 1})
        await asyncio.sleep(1.1)
        await store.revoke("new")
        assert sorted(await redis.hkeys(key)) == [SEEDED_FIELD.encode(), b"new"]
    finally:
        await redis.aclose()
        await nc.close()


async def test_a_revocation_outlives_a_redis_restart_and_a_worker_restart(
    nats_url: str, local_redis: ServerProcess, uid: str
) -> None:
    op = f"probe{uid}"
    settings = make_settings(nats_url, local_redis.url + "/0")
    token, jti = signed("to-be-revoked")
    other, _ = signed("never-revoked")
    async with serving(settings, op) as client:
        assert await status_of(client, op, token) == (200, "")
        await revoke_token(settings, jti)  # what `nexus-bus token revoke <jti>` runs
        assert await status_of(client, op, token) == (401, "invalid_token")
        # Redis restarts empty (no persistence, as in `nexus-bus up` and compose).
        await asyncio.to_thread(local_redis.restart)
        assert await status_of(client, op, token) == (401, "invalid_token")
        assert await status_of(client, op, other) == (200, "")
    # A fresh worker: nothing cached, no notice heard; only the store can refuse the token.
    async with serving(settings, op) as client:
        assert await status_of(client, op, token) == (401, "invalid_token")
        assert await status_of(client, op, other) == (200, "")
