"""The operation registry over real NATS: unknown names are 404 at once, unserved ops 503."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import nats.errors
import pytest

from nexus_bus import (
    Gateway,
    NoResponders,
    Operations,
    RequestContext,
    Settings,
    UnknownOperation,
)
from nexus_bus.embedded import ServerProcess
from nexus_bus.jetstream import ensure_ops_bucket
from nexus_bus.operations import DeclarationError
from nexus_bus.registry import OpsRegistry, register
from nexus_bus.registry.core import declare, encode, entry_key
from nexus_bus.runtime.worker import Worker
from tests.conftest import make_settings
from tests.integration.registry_ops import group


@pytest.fixture
async def fresh_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """A gateway whose registry view starts empty and lazily, as a new client's does."""
    gw = await Gateway.connect(settings)
    yield gw
    await gw.close()


async def test_an_undeclared_op_is_404_at_once(fresh_gateway: Gateway, uid: str) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UnknownOperation) as info:
        await fresh_gateway.request(f"nosuch{uid}", "get", {}, timeout=10)
    assert info.value.http_status == 404
    assert loop.time() - started < 1  # no NATS request timed out


async def test_a_declared_op_without_workers_stays_503(
    settings: Settings, fresh_gateway: Gateway, uid: str
) -> None:
    op = f"gone{uid}"
    worker = Worker(settings, [group(op)])
    await worker.start()
    assert await fresh_gateway.request(op, "hello", {}) == {"hello": op}
    await worker.drain(1)
    with pytest.raises(NoResponders):
        await fresh_gateway.request(op, "hello", {}, timeout=10)
    with pytest.raises(UnknownOperation):  # not an action the op declares
        await fresh_gateway.request(op, "nosuchaction", {}, timeout=10)


async def test_an_op_declared_with_a_flag_that_is_not_a_bool_is_refused(
    settings: Settings, fresh_gateway: Gateway, uid: str
) -> None:
    """Before: `public=1` or `idempotent="no"` was served (truthy), but its registry entry
    did not decode for readers, so once its workers stopped the op was a 404, not a 503,
    and no listing showed it."""
    op = f"flag{uid}"
    for flags in ({"public": 1}, {"idempotent": "no"}, {"allow_unknown_fields": None}):
        with pytest.raises(DeclarationError, match=f"{op}.hello: {next(iter(flags))}="):
            Operations(op).action("hello", **flags)  # type: ignore[arg-type]
    worker = Worker(settings, [group(op)])  # the same op declared with bools
    await worker.start()
    await worker.drain(1)
    with pytest.raises(NoResponders):
        await fresh_gateway.request(op, "hello", {}, timeout=10)


async def test_an_op_registered_after_the_view_started_is_never_404(
    settings: Settings, fresh_gateway: Gateway, uid: str
) -> None:
    with pytest.raises(UnknownOperation):
        await fresh_gateway.request(f"warmup{uid}", "x", {})  # the view is running now
    for n in range(5):
        op = f"late{n}{uid}"
        # What a starting worker does between declaring and subscribing: a request now
        # finds no responders and must be told to retry, not that the op does not exist.
        registration = await register(fresh_gateway.nc, settings, [group(op)])
        assert registration is not None
        try:
            with pytest.raises(NoResponders):
                await fresh_gateway.request(op, "hello", {})
        finally:
            await registration.stop()


async def test_a_plain_nats_client_keeps_nats_no_responders(nats_url: str, uid: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(f"nexus.nosuch{uid}.get", b"{}", timeout=2)
    finally:
        await nc.close()


async def test_the_listing_says_who_serves_what(settings: Settings, uid: str) -> None:
    op = f"listed{uid}"
    worker = Worker(settings, [group(op)])
    await worker.start()
    nc = await nats.connect(settings.nats.url)
    registry = OpsRegistry(nc, settings)
    try:
        listed = {o.op: o for o in (await registry.listing()).operations}
        entry = listed[op]
        assert entry.served and entry.instances == 1 and entry.declared_by == "registry"
        (hello,) = entry.actions
        assert hello.scope == f"{op}:hello" and hello.public and hello.schema is not None
        await worker.drain(1)
        await asyncio.sleep(0)

        async def stopped() -> bool:
            return not {o.op: o for o in (await registry.listing()).operations}[op].served

        async with asyncio.timeout(5):
            while not await stopped():  # noqa: ASYNC110 - the watch delivers the update
                await asyncio.sleep(0.02)
    finally:
        await registry.close()
        await nc.close()


async def test_a_fresh_view_of_a_full_bucket_misses_no_declaration(
    local_nats: ServerProcess,
) -> None:
    """nats-py may mark a watch's snapshot as ended before its entries arrive (it counts
    what is pending only after subscribing): a view must not start empty from that, or a
    declared op would read as unknown (404) instead of unserved (503)."""
    settings = make_settings(local_nats.url)
    nc = await nats.connect(local_nats.url)
    try:
        kv = await ensure_ops_bucket(
            nc.jetstream(), settings.jetstream, forget_after_s=settings.registry.forget_after_s
        )
        entries = [
            declare(group(f"many{i}"), f"host-{i}-x", heartbeat_s=settings.registry.heartbeat_s)
            for i in range(600)
        ]
        for start in range(0, len(entries), 100):
            await asyncio.gather(*(
                kv.put(entry_key(e.op, e.instance), encode(e)) for e in entries[start:start + 100]
            ))
        for _ in range(20):  # the race lost before the fix in about one start in ten
            registry = OpsRegistry(nc, settings)
            try:
                await registry.start()
                # Straight after the start, from the view: no catch-up read has filled it.
                assert all(registry.view.declares(f"many{i}", "hello") for i in range(600))
            finally:
                await registry.close()
    finally:
        await nc.close()


async def test_during_a_rolling_upgrade_a_new_action_reaches_the_new_workers(
    settings: Settings, fresh_gateway: Gateway, uid: str
) -> None:
    """An old and a new worker of one op share its queue group; only the new one has the
    action `bye`. The old one answers it 404 (it lacks it); the gateway sees that another
    worker declares it and retries, without counting it against the op's breaker. Before:
    about half the calls were a permanent 404, and none was retried."""
    op = f"roll{uid}"
    old, new = group(op), group(op)

    @new.action("bye", public=True)
    async def bye(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return {"bye": op}

    workers = [Worker(settings, [old]), Worker(settings, [new])]
    for worker in workers:
        await worker.start()
    try:
        assert await fresh_gateway.request(op, "hello", {}) == {"hello": op}  # the op is real
        served = 0
        for _ in range(40):  # 3 attempts each: 1 call in 8 reaches the old worker 3 times
            with contextlib.suppress(NoResponders):  # retryable, and never a 404
                served += await fresh_gateway.request(op, "bye", {}) == {"bye": op}
        assert served >= 25
        # Those 404s were no outcome for the breaker: it is closed, and every call goes on.
        assert await fresh_gateway.request(op, "hello", {}) == {"hello": op}
        with pytest.raises(UnknownOperation):  # declared by nobody: still 404
            await fresh_gateway.request(op, "nosuchaction", {}, timeout=10)
    finally:
        for worker in workers:
            await worker.drain(1)
