"""Streams and buckets that disappear under running processes come back without a restart.

A nats-server with `jetstream.storage = "memory"` restarted loses every stream; an operator
may delete one. Before `bus/assets.py`, every call on a missing stream failed until each
worker was restarted (data.put 503, data.list 404, job consumers fetching in vain).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import uuid
import weakref
from collections.abc import AsyncIterator
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from nexus_bus import Gateway, NoResponders, Operations, RequestContext, Settings, Worker
from nexus_bus.bus.assets import assets_of
from nexus_bus.constants import H_STATUS
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import NexusError, NotFound
from nexus_bus.handlers import builtin_groups
from nexus_bus.jetstream import ensure_stream
from nexus_bus.jobs.client import wait_job
from nexus_bus.observability import logger
from nexus_bus.registry import register
from nexus_bus.schemas.jobs import JobStatus
from tests.conftest import make_settings, open_services
from tests.helpers import delete_streams, eventually
from tests.integration.http_shim import bearer, running_shim
from tests.integration.registry_ops import group
from tests.integration.test_http_sse import EventReader, publish, publish_when_back


def _memory_settings(url: str, redis_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {"jetstream": {"storage": "memory"}, "cache": {"enabled": False}}
    values.update(overrides)
    return make_settings(url, redis_url, **values)


async def _reachable(gw: Gateway, uid: str) -> None:
    """Until a worker answers again after a restart (a missing key: 404)."""
    for _ in range(100):
        try:
            await gw.request("data", "get", {"key": f"absent.{uid}"}, timeout=1)
        except NotFound:
            return
        except NexusError:
            await asyncio.sleep(0.1)
    pytest.fail("the worker did not answer after the restart")


@pytest.fixture
async def served(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None
) -> AsyncIterator[tuple[Worker, Gateway]]:
    settings = _memory_settings(local_nats.url, redis_url)
    worker = Worker(settings, builtin_groups(["data", "stream"]))
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    try:
        yield worker, gw
    finally:
        await gw.close()
        await worker.drain(1)


async def test_data_writes_work_again_after_a_memory_storage_restart(
    local_nats: ServerProcess, served: tuple[Worker, Gateway], uid: str
) -> None:
    worker, gw = served
    await gw.request("data", "put", {"key": f"k.{uid}", "value": 1})
    local_nats.restart()  # memory storage: every stream and bucket is gone
    await eventually(lambda: worker.nc.is_connected and gw.nc.is_connected, "reconnects", 15)
    await _reachable(gw, uid)
    # The first write recreates the bucket (before: 503 unavailable, for good).
    put = await gw.request("data", "put", {"key": f"k.{uid}", "value": 2}, timeout=5)
    assert (await gw.request("data", "get", {"key": f"k.{uid}"}))["value"] == 2
    # The journal's atomic batch: the effect-record settings are back.
    keyed = await gw.request(
        "data", "put", {"key": f"i.{uid}", "value": 3}, idempotency_key=uid, timeout=5
    )
    assert keyed["revision"] == put["revision"] + 1


async def test_a_deleted_data_bucket_is_recreated_by_the_next_call(
    local_nats: ServerProcess, served: tuple[Worker, Gateway], uid: str
) -> None:
    _, gw = served
    await gw.request("data", "put", {"key": f"k.{uid}", "value": 1})
    await delete_streams(local_nats.url, "KV_nexus_data")
    warnings: list[str] = []
    sink = logger.add(lambda m: warnings.append(m.record["message"]), level="WARNING")
    try:
        # Before: 404 not_found (the listing's consumer named no stream).
        assert (await gw.request("data", "list", {"prefix": ""}, timeout=5))["keys"] == []
    finally:
        logger.remove(sink)
    recovered = [w for w in warnings if "recreated" in w]
    assert len(recovered) == 1 and "KV_nexus_data" in recovered[0], warnings
    await delete_streams(local_nats.url, "KV_nexus_data")
    # A keyed write first (the journal's batch; before: 503 "JetStream unavailable").
    keyed = await gw.request(
        "data", "put", {"key": f"i.{uid}", "value": 3}, idempotency_key=uid, timeout=5
    )
    put = await gw.request("data", "put", {"key": f"k.{uid}", "value": 2})
    assert put["revision"] == keyed["revision"] + 2  # the write, its record, this one


@pytest.mark.parametrize("lost", ["deleted", "restarted"])
async def test_a_key_written_after_the_data_bucket_came_back_is_not_read_from_the_old_cache(
    lost: str, local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url, cache={"enabled": True})
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    key = f"k.{uid}"
    try:
        for i in range(5):  # revision 5, cached
            await gw.request("data", "put", {"key": key, "value": i})
        assert (await gw.request("data", "get", {"key": key}))["value"] == 4
        if lost == "deleted":
            await delete_streams(local_nats.url, "KV_nexus_data")
        else:
            local_nats.restart()
            await eventually(lambda: worker.nc.is_connected and gw.nc.is_connected, "rc", 15)
            await _reachable(gw, uid)
        put = await gw.request("data", "put", {"key": key, "value": "new"}, timeout=5)
        assert put["revision"] > 5
        # Before: the bucket came back counting from 1, the cache kept its entry at revision
        # 5 above the write's 1, and every read answered 4 until the entry expired.
        got = await gw.request("data", "get", {"key": key})
        assert (got["value"], got["revision"]) == ("new", put["revision"])
    finally:
        await gw.close()
        await worker.drain(1)


async def test_a_key_not_written_since_the_data_bucket_came_back_is_not_read_from_the_cache(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    """Entries of a lost bucket are served by nobody: not the worker that created it again,
    not a shim's cached reads, not a worker started afterwards. Before, every one of them
    answered the old value until its entry expired (an hour by default)."""
    settings = _memory_settings(local_nats.url, redis_url, cache={"enabled": True})
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    kept = f"kept.{uid}"
    later: Worker | None = None
    try:
        await gw.request("data", "put", {"key": kept, "value": "old"})
        assert (await gw.request("data", "get", {"key": kept}))["value"] == "old"
        async with (
            running_shim(settings) as shim,
            httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token)) as http,
        ):
            read = await http.post("/v1/data/get", json={"key": kept})
            assert read.json()["value"] == "old"  # cached in Redis, and in the shim's L1
            await delete_streams(local_nats.url, "KV_nexus_data")
            await gw.request("data", "put", {"key": f"other.{uid}", "value": 1}, timeout=5)
            with pytest.raises(NotFound):  # the bucket came back without it
                await gw.request("data", "get", {"key": kept})
            for _ in range(50):  # the shim hears of it over NATS
                read = await http.post("/v1/data/get", json={"key": kept})
                if read.status_code == 404:
                    break
                await asyncio.sleep(0.1)
            assert read.status_code == 404, read.text
        later = Worker(settings, builtin_groups(["data"]))
        await later.start()  # it reads when the bucket came back
        await worker.drain(1)
        with pytest.raises(NotFound):
            await gw.request("data", "get", {"key": kept})
    finally:
        await gw.close()
        await worker.drain(1)
        if later is not None:
            await later.drain(1)


async def _succeeds(gw: Gateway, key: str, value: int) -> None:
    """A job submitted now is accepted and run to `succeeded`."""
    accepted = await gw.submit("data", "put", {"key": key, "value": value})
    job = await wait_job(gw.nc, gw.settings, accepted.job_id, timeout_s=10)
    assert job.status == JobStatus.SUCCEEDED, job
    assert (await gw.request("data", "get", {"key": key}))["value"] == value


async def test_jobs_run_again_after_a_memory_storage_restart(
    local_nats: ServerProcess, served: tuple[Worker, Gateway], uid: str
) -> None:
    worker, gw = served
    await _succeeds(gw, f"j1.{uid}", 1)
    local_nats.restart()  # NEXUS_JOBS, its consumers, NEXUS_DLQ and nexus_jobs are gone
    await eventually(lambda: worker.nc.is_connected and gw.nc.is_connected, "reconnects", 15)
    await _reachable(gw, uid)
    # Before: the submission answered 503 (no stream), and the worker's consumers fetched in
    # vain for good.
    await _succeeds(gw, f"j2.{uid}", 2)


async def test_a_deleted_jobs_stream_or_consumer_is_recreated(
    local_nats: ServerProcess, served: tuple[Worker, Gateway], uid: str
) -> None:
    _, gw = served
    await _succeeds(gw, f"j1.{uid}", 1)
    await delete_streams(local_nats.url, "NEXUS_JOBS")  # the status bucket stays
    await _succeeds(gw, f"j2.{uid}", 2)  # before: 503 unavailable on submit
    nc = await nats.connect(local_nats.url)
    try:
        await nc.jetstream().delete_consumer("NEXUS_JOBS", "nexus_jobs_data")
    finally:
        await nc.close()
    await _succeeds(gw, f"j3.{uid}", 3)  # before: accepted, and never run
    await delete_streams(local_nats.url, "KV_nexus_jobs")  # the stream stays
    await _succeeds(gw, f"j4.{uid}", 4)  # before: 503 unavailable on submit


async def test_a_deleted_events_stream_is_recreated_by_the_next_publish_or_read(
    local_nats: ServerProcess, served: tuple[Worker, Gateway], uid: str
) -> None:
    worker, gw = served
    topic = f"t{uid}"
    for i in range(3):
        await gw.request("stream", "publish", {"topic": topic, "event": i})
    await delete_streams(local_nats.url, "NEXUS_EVENTS")
    # Before: 503 unavailable (NoStreamResponseError), for good.
    published = await gw.request("stream", "publish", {"topic": topic, "event": "new"}, timeout=5)
    assert published["seq"] == 1  # a new stream: its sequences start again
    read = await gw.request("stream", "read", {"topic": topic})
    assert [e["event"] for e in read["events"]] == ["new"]
    await delete_streams(local_nats.url, "NEXUS_EVENTS")
    # Before: an empty read, and the stream stayed missing (an SSE client got 404).
    assert (await gw.request("stream", "read", {"topic": topic}, timeout=5))["events"] == []
    info = await worker.nc.jetstream().stream_info("NEXUS_EVENTS")
    assert info.state.last_seq == 0


@contextlib.asynccontextmanager
async def _stream_shim(
    settings: Settings, admin_token: str | None
) -> AsyncIterator[httpx.AsyncClient]:
    """A worker serving `stream`, a shim with a 0.3 s SSE heartbeat, and a client of it."""
    worker = Worker(settings, builtin_groups(["stream"]))
    await worker.start()
    try:
        async with (
            running_shim(settings, sse_heartbeat_s=0.3) as shim,
            httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token), timeout=20) as c,
        ):
            yield c
    finally:
        await worker.drain(1)


async def test_sse_resuming_past_a_recreated_events_stream_starts_at_its_first_event(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url)
    topic = f"t{uid}"
    async with _stream_shim(settings, admin_token) as c:
        old = [await publish(c, topic, {"old": i}) for i in range(3)]
        await delete_streams(local_nats.url, "NEXUS_EVENTS")
        new = await publish(c, topic, "new")  # the stream is created again: seq 1
        assert new == 1
        headers = {"Last-Event-ID": str(old[-1])}  # what the client saw last: 3
        async with c.stream("GET", f"/v1/events/{topic}", headers=headers) as resp:
            assert resp.status_code == 200
            # Before: nothing, until the new stream would pass sequence 3.
            assert await EventReader(resp).next_event(timeout_s=5) == (1, "new")


@pytest.mark.parametrize("lost", ["deleted", "restarted"])
async def test_an_open_sse_stream_follows_the_events_stream_created_again(
    lost: str, local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url)
    settings = settings.model_copy(
        update={"nats": settings.nats.model_copy(update={"reconnect_wait_s": 0.2})}
    )
    topic = f"t{uid}"
    async with (
        _stream_shim(settings, admin_token) as c,
        c.stream("GET", f"/v1/events/{topic}") as resp,
    ):
        reader = EventReader(resp)
        await reader.wait_comment()
        for i in range(3):
            seq = await publish(c, topic, {"old": i})
            assert await reader.next_event() == (seq, {"old": i})
        if lost == "deleted":
            await delete_streams(local_nats.url, "NEXUS_EVENTS")
            assert await publish(c, topic, "new") == 1  # the stream is created again
        else:
            await asyncio.to_thread(local_nats.restart)  # memory storage: all gone
            # once shim and worker are back; the stream is created again
            assert await publish_when_back(c, topic, "new", pause_s=0.1) == 1
        # Before: nothing (sequence 1 is not after 3, the last event the stream sent).
        assert await reader.next_event(timeout_s=5) == (1, "new")
        assert await publish(c, topic, "next") == 2
        assert await reader.next_event() == (2, "next")


async def test_a_deleted_ops_bucket_is_recreated_by_the_next_registry_heartbeat(
    local_nats: ServerProcess, redis_url: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url, registry={"heartbeat_s": 0.2})
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    nc = await nats.connect(local_nats.url)
    try:
        js = nc.jetstream()
        await js.delete_stream("KV_nexus_ops")

        async def declared() -> list[str]:
            try:
                return await (await js.key_value("nexus_ops")).keys()
            except (nats.js.errors.BucketNotFoundError, nats.js.errors.NoKeysError):
                return []

        # Before: every heartbeat failed with 503 (no stream), and the worker's ops stayed
        # undeclared until it was restarted.
        for _ in range(50):
            if any(key.startswith("data.") for key in await declared()):
                break
            await asyncio.sleep(0.1)
        else:
            pytest.fail("the worker's ops were not declared again")
    finally:
        await nc.close()
        await worker.drain(1)


async def test_a_revocation_goes_into_a_bucket_deleted_under_the_worker(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url)
    worker = Worker(settings, builtin_groups(["auth"]))
    await worker.start()
    nc = await nats.connect(local_nats.url)
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}

    async def revoke(jti: str) -> str | None:
        body = msgspec.json.encode({"jti": jti})
        reply = await nc.request("nexus.auth.revoke", body, timeout=5, headers=headers)
        return (reply.headers or {}).get(H_STATUS)

    try:
        assert await revoke(f"a{uid}") == "200"
        await nc.jetstream().delete_stream("KV_nexus_auth_revoked")
        # Before: 503 once (the store forgot the bucket, and only the next call created it
        # again); a NATS client that does not retry saw the revocation fail.
        assert await revoke(f"b{uid}") == "200"
        kv = await nc.jetstream().key_value("nexus_auth_revoked")
        assert (await kv.get(f"b{uid}")).value == f"b{uid}".encode()
    finally:
        await nc.close()
        await worker.drain(1)


async def test_a_registry_view_reads_an_ops_bucket_created_again(
    local_nats: ServerProcess, redis_url: str, uid: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url)
    gw = await Gateway.connect(settings)
    registrations = []
    try:
        for n in range(3):  # the old bucket reaches sequence 3
            registration = await register(gw.nc, settings, [group(f"early{n}{uid}")])
            assert registration is not None
            registrations.append(registration)
        with pytest.raises(NoResponders):  # the view is running, and has read them
            await gw.request(f"early0{uid}", "hello", {})
        await delete_streams(local_nats.url, "KV_nexus_ops")
        # Declared in the new bucket only, at sequence 1.
        registration = await register(gw.nc, settings, [group(f"late{uid}")])
        assert registration is not None
        registrations.append(registration)
        # Before: 404 unknown_operation: the view took itself for up to date (its sequence,
        # 3, was past the new bucket's last), and its watch of the old bucket saw nothing.
        with pytest.raises(NoResponders):
            await gw.request(f"late{uid}", "hello", {})
    finally:
        for registration in registrations:
            await registration.stop()
        await gw.close()


async def test_a_job_is_dead_lettered_into_a_dlq_stream_deleted_under_the_worker(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    boom = Operations("boom")

    @boom.action("fail")
    async def fail(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        raise RuntimeError("a server fault: dead-lettered at once")

    settings = _memory_settings(local_nats.url, redis_url)
    worker = Worker(settings, [boom])
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    try:
        first = await gw.submit("boom", "fail", {})  # the streams are there (both processes)
        assert (await wait_job(gw.nc, settings, first.job_id, timeout_s=10)).status == "failed"
        await delete_streams(local_nats.url, "NEXUS_DLQ")
        accepted = await gw.submit("boom", "fail", {})
        # Before: the DLQ publish found no stream, the delivery was handed back, and the job
        # went round for good, never `failed`.
        job = await wait_job(gw.nc, settings, accepted.job_id, timeout_s=10)
        assert job.status == JobStatus.FAILED
        info = await gw.nc.jetstream().stream_info("NEXUS_DLQ")
        assert info.state.messages == 1
    finally:
        await gw.close()
        await worker.drain(1)


async def test_restores_are_shared_and_held_off_after_finding_nothing_missing(
    local_nats: ServerProcess,
) -> None:
    nc = await nats.connect(local_nats.url)
    try:
        js = nc.jetstream()
        config = StreamConfig(name=f"S{uuid.uuid4().hex[:8]}", subjects=["recovery.>"])
        await ensure_stream(js, config)
        runs: list[int] = []

        async def step(context: JetStreamContext) -> None:
            runs.append(1)
            await ensure_stream(context, config)

        assets = assets_of(nc)
        assets.track(config.name or "", "stream", step)
        # Ten failing calls at once: one restore, shared.
        assert await asyncio.gather(*(assets.restore() for _ in range(10))) == [[]] * 10
        assert len(runs) == 1
        # It found nothing missing: the next call within a second does not ask again.
        await js.delete_stream(config.name or "")
        assert await assets.restore() == []
        assert len(runs) == 1
        recreated: list[str] = []

        async def restored() -> bool:
            recreated.extend(await assets.restore())
            return bool(recreated)

        for _ in range(40):  # held off for a second, then restored
            if await restored():
                break
            await asyncio.sleep(0.05)
        assert recreated == [config.name]
        assert len(runs) == 2
        # A restore that recreated something does not hold the next one off.
        await js.delete_stream(config.name or "")
        assert await assets.restore() == [config.name]
    finally:
        await nc.close()


async def test_an_sse_client_opens_on_an_events_stream_deleted_under_the_worker(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url)
    topic = f"t{uid}"
    async with _stream_shim(settings, admin_token) as c:
        await delete_streams(local_nats.url, "NEXUS_EVENTS")
        # The shim's gate (a stream.read through a worker) brings the stream back. Before:
        # the read answered [] and left it missing, and the shim answered 404 not_found.
        async with c.stream("GET", f"/v1/events/{topic}") as resp:
            assert resp.status_code == 200
            reader = EventReader(resp)
            await reader.wait_comment()
            seq = await publish(c, topic, "x")
            assert await reader.next_event() == (seq, "x")


async def test_a_worker_serving_jobs_restores_every_stream_after_a_restart_unasked(
    local_nats: ServerProcess, served: tuple[Worker, Gateway]
) -> None:
    worker, _ = served
    local_nats.restart()  # memory storage: nothing is left
    await eventually(lambda: worker.nc.is_connected, "the worker reconnects", 15)
    nc = await nats.connect(local_nats.url)
    try:
        js = nc.jetstream()
        wanted = {"NEXUS_EVENTS", "KV_nexus_data", "NEXUS_JOBS", "NEXUS_DLQ", "KV_nexus_jobs"}
        streams: set[str] = set()
        consumers: set[str | None] = set()
        # No call at all: the job runner's next fetch finds its consumer gone (every 2 s).
        # Before: nothing came back until a worker restarted.
        for _ in range(100):
            streams = {info.config.name or "" for info in await js.streams_info()}
            if "NEXUS_JOBS" in streams:
                consumers = {c.name for c in await js.consumers_info("NEXUS_JOBS")}
            if wanted <= streams and {"nexus_jobs_data", "nexus_jobs_stream"} <= consumers:
                break
            await asyncio.sleep(0.1)
        assert wanted <= streams
        assert {"nexus_jobs_data", "nexus_jobs_stream"} <= consumers
    finally:
        await nc.close()


async def test_what_a_connection_tracks_does_not_keep_it_alive(
    local_nats: ServerProcess, redis_url: str
) -> None:
    settings = _memory_settings(local_nats.url, redis_url)
    async with open_services(settings) as services:
        connection = weakref.ref(services.nc)
        assert assets_of(services.nc).streams == ["NEXUS_EVENTS", "KV_nexus_data"]
    del services
    gc.collect()
    # Steps holding the connection's JetStream context would keep it, and all it references,
    # alive for as long as the process runs.
    assert connection() is None
