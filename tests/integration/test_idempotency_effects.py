"""Keyed requests journal their writes: a rerun after a lost idempotency record writes nothing.

A worker that dies after the handler's write and before the reply is recorded leaves no
record behind once its claim expires (the process kill itself is in
`tests/faults/test_idempotency_worker_crash.py`). Here the record is deleted from Redis
instead, which is the state the retry finds: the rerun must skip the writes, answer the first
outcome, and store nothing new in the KV. Real NATS, JetStream, Redis and workers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from nats.aio.client import Client

from nexus_bus import Operations, RequestContext, Settings, Worker
from nexus_bus.bus.connection import connect_nats
from nexus_bus.constants import H_IDEMPOTENT_REPLAYED, H_STATUS, IDEMPOTENCY_KEY_PREFIX
from nexus_bus.effects import data_stream_name
from nexus_bus.redis_client import create_redis
from nexus_bus.resilience.idempotency import scope_digest

SUBJECT = "test-admin"  # the subject of `admin_token`
probe = Operations("effectprobe", description="Writes two keys (effect journal tests).")


class Pair(msgspec.Struct, frozen=True, kw_only=True):
    """Write `1` to `a`, then `2` to `b`."""

    a: str
    b: str


@probe.action("pair")
async def pair(req: Pair, ctx: RequestContext) -> dict[str, Any]:
    """Two writes through `ctx.services.records`, and which store made them."""
    first = await ctx.services.records.put(req.a, b"1")
    second = await ctx.services.records.put(req.b, b"2")
    return {"a": first, "b": second, "store": type(ctx.services.records).__name__}


@pytest.fixture(scope="module")
async def probe_worker(settings: Settings) -> AsyncIterator[Worker]:
    running = Worker(settings, [probe])
    await running.start()
    yield running
    await running.drain(1)


@pytest.fixture
async def nc(settings: Settings, worker: Worker) -> AsyncIterator[Client]:
    conn = await connect_nats(settings.nats)
    yield conn
    await conn.drain()


async def call(
    nc: Client, token: str | None, op: str, action: str, body: dict[str, Any], key: str | None
) -> tuple[int, dict[str, Any], bool]:
    """Status, body and whether the reply was a replay."""
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    msg = await nc.request(f"nexus.{op}.{action}", msgspec.json.encode(body), 5, headers=headers)
    got = msg.headers or {}
    return int(got[H_STATUS]), msgspec.json.decode(msg.data), H_IDEMPOTENT_REPLAYED in got


async def forget_record(settings: Settings, op: str, action: str, key: str) -> None:
    """What a worker killed before recording its reply leaves once its claim expired."""
    redis = create_redis(settings.redis)
    try:
        name = IDEMPOTENCY_KEY_PREFIX + scope_digest(SUBJECT, op, action, key)
        assert await redis.delete(name) == 1
    finally:
        await redis.aclose()


async def last_seq(nc: Client, key: str) -> int:
    """The stream sequence of the key's last entry (with history 1, a new write moves it)."""
    msg = await nc.jetstream().get_last_msg(data_stream_name(), f"$KV.nexus_data.{key}")
    assert msg.seq is not None
    return msg.seq


async def test_a_rerun_of_a_keyed_put_answers_the_first_revision_and_writes_nothing(
    settings: Settings, nc: Client, admin_token: str | None, uid: str
) -> None:
    key, body = f"ik-{uid}", {"key": f"ie.{uid}", "value": {"n": 1}}
    status, first, _ = await call(nc, admin_token, "data", "put", body, key)
    assert status == 200
    await forget_record(settings, "data", "put", key)
    status, again, replayed = await call(nc, admin_token, "data", "put", body, key)
    assert status == 200 and not replayed  # the handler ran again...
    assert again == first  # ...and found its write done: the same revision
    assert await last_seq(nc, f"ie.{uid}") == first["revision"]  # no second write
    # The rerun's reply is the key's record now: a later repeat is a plain replay.
    assert await call(nc, admin_token, "data", "put", body, key) == (200, first, True)


async def test_a_rerun_of_a_keyed_delete_answers_the_first_outcome(
    settings: Settings, nc: Client, admin_token: str | None, uid: str
) -> None:
    target = f"id.{uid}"
    await call(nc, admin_token, "data", "put", {"key": target, "value": 1}, None)
    key = f"del-{uid}"
    status, first, _ = await call(nc, admin_token, "data", "delete", {"key": target}, key)
    assert (status, first) == (200, {"key": target, "deleted": True})
    marker = await last_seq(nc, target)
    await forget_record(settings, "data", "delete", key)
    status, again, replayed = await call(nc, admin_token, "data", "delete", {"key": target}, key)
    # A plain rerun would find the key gone and say `deleted: false`.
    assert (status, again, replayed) == (200, first, False)
    assert await last_seq(nc, target) == marker  # no second delete marker


async def test_another_body_under_a_lost_record_is_a_mismatch_not_a_replay(
    settings: Settings, nc: Client, admin_token: str | None, uid: str
) -> None:
    key, target = f"mm-{uid}", f"im.{uid}"
    status, first, _ = await call(nc, admin_token, "data", "put", {"key": target, "value": 1}, key)
    assert status == 200
    await forget_record(settings, "data", "put", key)
    status, problem, _ = await call(
        nc, admin_token, "data", "put", {"key": target, "value": 2}, key
    )
    assert status == 422 and problem["code"] == "idempotency_mismatch"
    # The mismatch was not recorded as the key's reply: the original request still gets its own.
    status, again, _ = await call(nc, admin_token, "data", "put", {"key": target, "value": 1}, key)
    assert (status, again) == (200, first)
    got = await call(nc, admin_token, "data", "get", {"key": target}, None)
    assert got[1]["value"] == 1 and got[1]["revision"] == first["revision"]


async def test_user_handlers_get_the_journal_only_with_a_key(
    settings: Settings,
    probe_worker: Worker,
    nc: Client,
    admin_token: str | None,
    uid: str,
) -> None:
    body = {"a": f"pa.{uid}", "b": f"pb.{uid}"}
    status, plain, _ = await call(nc, admin_token, probe.op, "pair", body, None)
    assert status == 200 and plain["store"] != "JournaledRecordStore"  # the hot path as before
    key = f"pair-{uid}"
    status, first, _ = await call(nc, admin_token, probe.op, "pair", body, key)
    assert status == 200 and first["store"] == "JournaledRecordStore"
    await forget_record(settings, probe.op, "pair", key)
    status, again, replayed = await call(nc, admin_token, probe.op, "pair", body, key)
    assert (status, again, replayed) == (200, first, False)  # both writes skipped, in order
    assert await last_seq(nc, f"pa.{uid}") == first["a"]
    assert await last_seq(nc, f"pb.{uid}") == first["b"]
