"""Event streams (`GET /v1/events/{topic}`) across a nats-server restart and slow clients."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from nexus_bus import Settings, Worker
from nexus_bus.embedded import NATS_READY, ServerProcess, find_nats_server
from nexus_bus.handlers import builtin_groups
from nexus_bus.observability import logger
from tests.conftest import make_settings
from tests.integration.http_shim import RunningShim, bearer, poll_until, running_shim
from tests.integration.test_http_sse import EventReader, publish, publish_when_back

HEARTBEAT_S = 0.3


@contextlib.asynccontextmanager
async def _served(
    nats_url: str, redis_url: str, heartbeat_s: float
) -> AsyncIterator[tuple[Settings, RunningShim]]:
    """A worker and a shim that reconnect to NATS within 0.2 s, streams beating every
    `heartbeat_s`."""
    settings = make_settings(nats_url, redis_url)
    settings = settings.model_copy(
        update={"nats": settings.nats.model_copy(update={"reconnect_wait_s": 0.2})}
    )
    worker = Worker(settings, builtin_groups())
    await worker.start()
    try:
        async with running_shim(settings, sse_heartbeat_s=heartbeat_s) as shim:
            yield settings, shim
    finally:
        await worker.drain(1)


@pytest.fixture
async def restartable(
    local_nats: ServerProcess, redis_url: str
) -> AsyncIterator[tuple[Settings, RunningShim]]:
    async with _served(local_nats.url, redis_url, HEARTBEAT_S) as served:
        yield served


@pytest.mark.parametrize("resume", [False, True])
async def test_a_stream_replays_no_event_it_was_past_after_a_broker_restart(
    resume: bool,
    restartable: tuple[Settings, RunningShim],
    local_nats: ServerProcess,
    admin_token: str | None,
    uid: str,
) -> None:
    _, shim = restartable
    topic = f"t{uid}"
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token), timeout=20) as c:
        old = [await publish(c, topic, {"old": i}) for i in range(3)]
        # Before: nats-py restarted the lost ordered consumer after the last event it had
        # delivered, none here, so at the stream's first: every old event came again.
        headers = {"Last-Event-ID": str(old[-1])} if resume else {}
        async with c.stream("GET", f"/v1/events/{topic}", headers=headers) as resp:
            reader = EventReader(resp)
            await reader.wait_comment()
            await asyncio.to_thread(local_nats.kill)
            await asyncio.sleep(0.5)
            await asyncio.to_thread(local_nats.restart)
            new = await publish_when_back(c, topic, "new")
            seq, event = await reader.next_event(timeout_s=15)
            assert (seq, event) == (new, "new"), f"old events {old} replayed"


@pytest.fixture
async def default_heartbeat(
    local_nats: ServerProcess, redis_url: str
) -> AsyncIterator[RunningShim]:
    """A worker and a shim whose streams beat every 15 s, the default."""
    async with _served(local_nats.url, redis_url, 15) as (_, shim):
        yield shim


async def test_a_stream_reads_on_at_once_after_a_broker_restart(
    default_heartbeat: RunningShim, local_nats: ServerProcess, admin_token: str | None, uid: str
) -> None:
    # Before: the restarted server had lost the stream's consumer, and only nats-py's check
    # for two missed consumer heartbeats (2 x sse_heartbeat_s) made a new one: the stream
    # stayed silent for 30 to 60 s while its topic was written (seen in a chaos soak: 41 s).
    topic = f"t{uid}"
    async with httpx.AsyncClient(
        base_url=default_heartbeat.url, headers=bearer(admin_token), timeout=20
    ) as c, c.stream("GET", f"/v1/events/{topic}") as resp:
        assert resp.status_code == 200  # the consumer exists once the answer starts
        reader = EventReader(resp)
        before = await publish(c, topic, "before")
        assert await reader.next_event() == (before, "before")
        await asyncio.to_thread(local_nats.stop)  # SIGTERM: the server shuts down cleanly
        await asyncio.to_thread(local_nats.start)
        after = await publish_when_back(c, topic, "after")
        assert await reader.next_event(timeout_s=8) == (after, "after")



@pytest.fixture
def bare_nats(local_nats: ServerProcess, tmp_path: Path) -> Iterator[ServerProcess]:
    """A nats-server for `local_nats`'s port whose config (`bare.conf`) has no JetStream yet;
    started by the test, killed after the shim and worker stopped (listed before them)."""
    config = tmp_path / "bare.conf"
    config.write_text(f"host: 127.0.0.1\nport: {local_nats.port}\n")
    bare = ServerProcess(
        "nats-server", [find_nats_server(), "-c", str(config)], local_nats.port,
        tmp_path / "bare", tmp_path / "bare" / "nats.log", NATS_READY, "nats",
    )
    yield bare
    bare.kill()


async def test_a_stream_waits_for_jetstream_after_a_reconnect(
    bare_nats: ServerProcess,
    default_heartbeat: RunningShim,
    local_nats: ServerProcess,
    admin_token: str | None,
    uid: str,
    tmp_path: Path,
) -> None:
    # The server the shim reconnects to has no JetStream yet (as while a restarted server
    # recovers its streams): the stream tries again until JetStream answers, then reads on.
    tries: list[str] = []
    sink = logger.add(
        lambda m: tries.append(m.record["message"]),
        level="INFO",
        filter=lambda r: "no new consumer yet" in r["message"],
    )

    async def tried() -> bool:
        return bool(tries)

    topic = f"t{uid}"
    try:
        async with httpx.AsyncClient(
            base_url=default_heartbeat.url, headers=bearer(admin_token), timeout=20
        ) as c, c.stream("GET", f"/v1/events/{topic}") as resp:
            reader = EventReader(resp)
            before = await publish(c, topic, "before")
            assert await reader.next_event() == (before, "before")
            await asyncio.to_thread(local_nats.stop)
            await asyncio.to_thread(bare_nats.start)  # same port, no JetStream
            await poll_until(tried, 10)  # reconnected; the new consumer was refused
            config = tmp_path / "bare.conf"
            store = local_nats.data_dir / "jetstream"  # its streams, NEXUS_EVENTS among them
            config.write_text(f"{config.read_text()}jetstream {{\n  store_dir: {store}\n}}\n")
            assert bare_nats.proc is not None
            bare_nats.proc.send_signal(signal.SIGHUP)  # reload: JetStream on, no reconnect
            for _ in range(100):
                try:
                    after = await publish(c, topic, "after")
                    break
                except AssertionError:
                    await asyncio.sleep(0.2)
            assert await reader.next_event(timeout_s=8) == (after, "after")
    finally:
        logger.remove(sink)
