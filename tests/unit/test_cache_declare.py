"""Per-operation declarations: read-through, write-through and invalidation around handlers."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from nexus_bus import NotFound, Operations, RequestContext, Worker
from nexus_bus.bus.metadata import new_trace
from nexus_bus.cache import Cache, CachePolicy, invalidates, read_through, write_through
from nexus_bus.cache.memory import MemoryEntryStore
from nexus_bus.config import ConfigError, load_settings


class GetUser(msgspec.Struct, frozen=True, kw_only=True):
    id: str


class User(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str
    version: int


class Rename(msgspec.Struct, frozen=True, kw_only=True):
    id: str
    name: str


class Renamed(msgspec.Struct, frozen=True, kw_only=True):
    user: User


POLICY = CachePolicy(ttl_s=60, negative_ttl_s=5)


def context(cache: Cache | None) -> RequestContext:
    services: Any = SimpleNamespace(cache=cache)
    return RequestContext(
        op="users", action="get", request_id="r", trace=new_trace(), deadline_ms=0,
        services=services,
    )


def build() -> tuple[Operations, dict[str, User], list[str]]:
    db = {"1": User(id="1", name="ada", version=1)}
    reads: list[str] = []
    ops = Operations("users")

    @ops.action("get")
    @read_through("users", key=lambda req: req.id, policy=POLICY, revision=lambda u: u.version)
    async def get(req: GetUser, ctx: RequestContext) -> User:
        reads.append(req.id)
        if req.id not in db:
            raise NotFound(f"user {req.id}")
        return db[req.id]

    @ops.action("rename")
    @write_through(
        "users",
        key=lambda req: req.id,
        value=lambda req, reply: reply.user,
        revision=lambda reply: reply.user.version,
        policy=POLICY,
    )
    async def rename(req: Rename, ctx: RequestContext) -> Renamed:
        old = db[req.id]
        db[req.id] = User(id=req.id, name=req.name, version=old.version + 1)
        return Renamed(user=db[req.id])

    @ops.action("forget")
    @invalidates("users", key=lambda req: req.id, policy=POLICY)
    async def forget(req: GetUser, ctx: RequestContext) -> None:
        db.pop(req.id, None)

    return ops, db, reads


def test_declared_handlers_keep_their_types() -> None:
    ops, _, _ = build()
    get = ops.get("get")
    assert get is not None and get.reply_type is User
    # GetUser, refusing unknown fields (operations.with_unknown_fields)
    assert issubclass(get.request_type, GetUser)


async def test_read_through_write_through_and_invalidation() -> None:
    ops, _, reads = build()
    cache = Cache(MemoryEntryStore())
    ctx = context(cache)
    get, rename, forget = (ops.get(a).handler for a in ("get", "rename", "forget"))  # type: ignore[union-attr]
    assert await get(GetUser(id="1"), ctx) == User(id="1", name="ada", version=1)
    assert await get(GetUser(id="1"), ctx) == User(id="1", name="ada", version=1)
    assert reads == ["1"]
    await rename(Rename(id="1", name="grace"), ctx)
    assert (await get(GetUser(id="1"), ctx)).name == "grace"  # written through, no read
    assert reads == ["1"]
    await forget(GetUser(id="1"), ctx)
    for _ in range(2):
        with pytest.raises(NotFound):
            await get(GetUser(id="1"), ctx)
    assert reads == ["1", "1"]  # the absence was cached


async def test_an_unversioned_invalidation_cannot_stop_a_versioned_fill_so_workers_refuse_it(
) -> None:
    """`build()`'s `forget` has no `revision=` while `get` has: a read that loaded the user
    before `forget` fills after it, and the forgotten user is served for `ttl_s`. A worker
    refuses the mix; with `revision=` on `forget` the fill is refused instead."""
    ops, db, _ = build()
    ctx = context(Cache(MemoryEntryStore()))
    get, forget = (ops.get(a).handler for a in ("get", "forget"))  # type: ignore[union-attr]
    user, loaded = db["1"], asyncio.Event()

    async def slow_read(req: GetUser, _: RequestContext) -> User:
        loaded.set()
        await asyncio.sleep(0.05)  # the read loaded the user, and its fill is on its way
        return user

    slow_get = read_through(
        "users", key=lambda req: req.id, policy=POLICY, revision=lambda u: u.version
    )(slow_read)
    reading = asyncio.create_task(slow_get(GetUser(id="1"), ctx))
    await loaded.wait()
    await forget(GetUser(id="1"), ctx)  # removed, and the cached reply dropped
    await reading
    assert await get(GetUser(id="1"), ctx) == user  # served after it was forgotten
    settings = load_settings(discover=False, nats={"url": "nats://127.0.0.1:4222"})
    with pytest.raises(ConfigError) as caught:
        Worker(settings, [ops])
    assert "users.forget: cache 'users': invalidates needs revision=" in str(caught.value)


async def test_without_a_cache_the_handler_runs_every_time() -> None:
    ops, _, reads = build()
    handler = ops.get("get").handler  # type: ignore[union-attr]
    for _ in range(3):
        await handler(GetUser(id="1"), context(None))
    assert reads == ["1", "1", "1"]


def test_short_lived_versioned_declarations_bound_their_own_fills() -> None:
    """A versioned fill must not outlive what it raced with: a policy whose entries live
    shorter than `cache.max_fill_age_s` bounds its own fills by 90% of its shortest life
    (jittered), and a worker accepts it."""
    assert CachePolicy(ttl_s=60, fence_ttl_s=60, negative_ttl_s=0).fill_age_s(5) == 5
    assert CachePolicy(ttl_s=5.2, jitter=0.1).fill_age_s(5) == pytest.approx(0.9 * 4.68)
    assert CachePolicy(ttl_s=60, fence_ttl_s=4).fill_age_s(5) == pytest.approx(3.6)
    assert CachePolicy(ttl_s=60, negative_ttl_s=2, jitter=0).fill_age_s(5) == pytest.approx(1.8)
    settings = load_settings(
        discover=False, nats={"url": "nats://127.0.0.1:4222"}, cache={"max_fill_age_s": 5}
    )
    ops = Operations("users")
    by_version = {"revision": lambda u: u.version}

    @ops.action("get")
    @read_through("users", key=lambda req: req.id, policy=CachePolicy(ttl_s=5.2), **by_version)
    async def get(req: GetUser, ctx: RequestContext) -> User: ...

    @ops.action("forget")
    @invalidates("users", key=lambda req: req.id, policy=CachePolicy(fence_ttl_s=5), **by_version)
    async def forget(req: GetUser, ctx: RequestContext) -> User: ...

    Worker(settings, [ops])
