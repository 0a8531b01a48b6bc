"""The effect journal on real JetStream: each write of a job is applied once per job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from typing import Any, TypeVar

import nats.errors
import pytest
from nats.aio.client import Client

from nexus_bus import Conflict, InternalError, NotFound, Settings, Worker
from nexus_bus.bus.connection import connect_nats
from nexus_bus.constants import EFFECTS_PREFIX
from nexus_bus.effects import (
    JournaledRecordStore,
    data_stream_name,
    effect_scope,
    effect_subject,
    ensure_effect_records,
    journaled_services,
)
from nexus_bus.errors import NexusError
from nexus_bus.jetstream import ensure_data_bucket
from nexus_bus.jobs.envelope import new_job_id
from nexus_bus.store import KeyValueRecordStore, RecordStore
from tests.conftest import open_services

T = TypeVar("T")


class Recorder:
    """A `WriteThrough` that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bytes | None, int]] = []
        self.fences: list[tuple[str, int]] = []
        self.seals: list[str] = []  # keys sealed, and not yet unsealed by a write or unseal

    async def seal(self, key: str) -> bool:
        self.seals.append(key)
        return True

    async def unseal(self, key: str) -> None:
        self.seals.remove(key)

    async def written(
        self, key: str, value: bytes | None, revision: int, *, sealed: bool = False
    ) -> None:
        self.calls.append((key, value, revision))
        if sealed:
            self.seals.remove(key)

    async def fenced(self, key: str, revision: int, *, sealed: bool = False) -> None:
        self.fences.append((key, revision))
        if sealed:
            self.seals.remove(key)

    async def finish(self, work: Coroutine[Any, Any, T]) -> T:
        return await work


@pytest.fixture
async def nc(settings: Settings) -> AsyncIterator[Client]:
    conn = await connect_nats(settings.nats)
    yield conn
    await conn.drain()


async def journal(
    nc: Client, settings: Settings, recorder: Recorder | None = None
) -> JournaledRecordStore:
    js = nc.jetstream()
    kv = await ensure_data_bucket(js, settings.jetstream)
    stream = await ensure_effect_records(js)
    return JournaledRecordStore(
        KeyValueRecordStore(kv, js), nc, stream=stream, record_ttl_s=3600, write_through=recorder
    )


async def test_writes_replayed_in_the_same_job_are_not_applied_again(
    nc: Client, settings: Settings, uid: str
) -> None:
    recorder = Recorder()
    store = await journal(nc, settings, recorder)
    job = new_job_id()
    with effect_scope(job):
        first = await store.put(f"e.{uid}.a", b"1", expected_revision=0)
        assert await store.delete(f"e.{uid}.b") is False
        second = await store.put(f"e.{uid}.a", b"2", expected_revision=first)
    with effect_scope(job):  # the same job, run again: every write finds its record
        assert await store.put(f"e.{uid}.a", b"1", expected_revision=0) == first
        assert await store.delete(f"e.{uid}.b") is False
        assert await store.put(f"e.{uid}.a", b"999", expected_revision=first) == second
    record = await store.get(f"e.{uid}.a")
    assert (record.value, record.revision) == (b"2", second)
    # The rerun wrote the stored heads through to the cache, never its own values.
    assert recorder.calls[:3] == [
        (f"e.{uid}.a", b"1", first),
        (f"e.{uid}.b", None, recorder.calls[1][2]),
        (f"e.{uid}.a", b"2", second),
    ]
    assert recorder.calls[3:] == [
        (f"e.{uid}.a", b"2", second),
        (f"e.{uid}.b", None, recorder.calls[1][2]),
        (f"e.{uid}.a", b"2", second),
    ]
    assert recorder.seals == []  # every write's seal ended with its write-through
    # The records are outside the KV's key space: listing the bucket never shows them.
    assert await store.keys(f"e.{uid}.") == [f"e.{uid}.a"]
    msg = await nc.jetstream().get_last_msg(data_stream_name(), effect_subject(job, 1))
    assert msg.seq == first + 1


async def test_compare_and_set_keeps_kv_semantics_inside_a_job(
    nc: Client, settings: Settings, uid: str
) -> None:
    recorder = Recorder()
    store = await journal(nc, settings, recorder)
    key = f"cas.{uid}"
    with effect_scope(new_job_id()):
        revision = await store.put(key, b"1", expected_revision=0)
        with pytest.raises(Conflict):
            await store.put(key, b"2", expected_revision=0)  # exists
        with pytest.raises(Conflict):
            await store.put(key, b"2", expected_revision=revision + 100)
        assert await store.delete(key) is True
        again = await store.put(key, b"3", expected_revision=0)  # created over a delete marker
    assert (await store.get(key)).revision == again
    assert recorder.seals == []  # a refused write ends its seal too


async def test_twin_attempts_racing_commit_once(nc: Client, settings: Settings, uid: str) -> None:
    store = await journal(nc, settings)
    job, key = new_job_id(), f"twin.{uid}"

    async def attempt(value: bytes) -> int:
        with effect_scope(job):
            return await store.put(key, value)

    revisions = await asyncio.gather(*(attempt(str(i).encode()) for i in range(8)))
    assert len(set(revisions)) == 1
    record = await store.get(key)
    assert record.revision == revisions[0]
    # One write in the bucket's history: the key's first revision is the committed one.
    assert (
        record.revision
        == (await nc.jetstream().get_last_msg(data_stream_name(), f"$KV.nexus_data.{key}")).seq
    )


async def test_outside_a_job_writes_pass_straight_through(
    nc: Client, settings: Settings, uid: str
) -> None:
    store = await journal(nc, settings)
    first = await store.put(f"plain.{uid}", b"1")
    second = await store.put(f"plain.{uid}", b"1")
    assert second > first  # no journal: every call writes
    assert await store.delete(f"plain.{uid}") is True
    with pytest.raises(NotFound):
        await store.get(f"plain.{uid}")


async def test_a_rerun_that_writes_another_key_is_refused(
    nc: Client, settings: Settings, uid: str
) -> None:
    store = await journal(nc, settings)
    job = new_job_id()
    with effect_scope(job):
        await store.put(f"d.{uid}.1", b"x")
    with effect_scope(job), pytest.raises(InternalError):
        await store.put(f"d.{uid}.2", b"x")
    assert await store.keys(f"d.{uid}.") == [f"d.{uid}.1"]


async def test_worker_start_enables_effect_records_on_the_data_bucket(worker: Worker) -> None:
    info = await worker.nc.jetstream().stream_info(data_stream_name())
    assert info.config.allow_atomic and info.config.allow_msg_ttl
    assert "nexus.sys.effects.>" in (info.config.subjects or [])


@pytest.mark.parametrize("op", ["put", "delete"])
async def test_a_write_that_may_have_landed_on_a_key_nobody_can_read_is_fenced(
    nc: Client, settings: Settings, uid: str, op: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The batch's confirmation is lost (it may have landed) and the key's head cannot be
    read back: the cache must neither keep the entry the write replaced nor take a fill of
    it, so the key is fenced at an unknown revision (0), not left as it was."""
    recorder = Recorder()
    store = await journal(nc, settings, recorder)
    key = f"lost.{uid}"
    await store.put(key, b"old")
    real_request = nc.request
    lost = False

    async def request(subject: str, *args: Any, **kwargs: Any) -> Any:
        nonlocal lost
        lost = lost or subject.startswith(f"{EFFECTS_PREFIX}.")  # the batch's commit
        if lost:
            raise nats.errors.TimeoutError
        return await real_request(subject, *args, **kwargs)

    monkeypatch.setattr(nc, "request", request)
    with effect_scope(new_job_id()), pytest.raises(NexusError):
        if op == "put":
            await store.put(key, b"new")
        else:
            await store.delete(key)
    assert recorder.fences == [(key, 0)] and recorder.seals == []


@pytest.mark.parametrize("stage", ["commit", "rerun"])
@pytest.mark.parametrize("op", ["put", "delete"])
async def test_a_journaled_write_cancelled_before_its_write_through_still_writes_through(
    settings: Settings, uid: str, op: str, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The worker's deadline reaper (again and again) or a drain cancels a handler whose
    write is in the KV but not yet in Redis: after its batch was stored, before the handler
    took the confirmation (`commit`); or a rerun that found the write done by a run that died
    before its write-through, while it read the head to repair the cache (`rerun`). Another
    worker reading through Redis must not get the replaced value for ttl_s."""
    key, job = f"cancelled.{uid}", new_job_id()
    async with open_services(settings) as a, open_services(settings) as b:
        writer = await journaled_services(a, record_ttl_s=3600)
        await writer.records.put(key, b"old")  # outside a scope: the cached store writes it
        assert (await b.records.get(key)).value == b"old"  # in Redis

        async def handler(records: RecordStore) -> None:
            with effect_scope(job):
                if op == "put":
                    await records.put(key, b"new")
                else:
                    await records.delete(key)

        if stage == "rerun":  # the first run commits, and dies before its write-through
            await handler(await journal(a.nc, settings))
            assert (await b.records.get(key)).value == b"old"
        real_request = a.nc.request
        held, answer = asyncio.Event(), asyncio.Event()

        async def request(subject: str, payload: bytes = b"", **kwargs: Any) -> Any:
            reply = await real_request(subject, payload, **kwargs)
            committing = subject.startswith(f"{EFFECTS_PREFIX}.")
            if committing if stage == "commit" else key.encode() in payload:
                held.set()  # the batch is stored, or the head read
                await answer.wait()  # the answer is slow to reach the handler
            return reply

        monkeypatch.setattr(a.nc, "request", request)
        writing = asyncio.create_task(handler(writer.records))
        await asyncio.wait_for(held.wait(), 10)
        while not writing.done():  # the reaper cancels until the handler is gone
            writing.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await writing
        answer.set()
        assert a.cache is not None
        await a.cache.close()  # waits for the write still running
        if op == "put":
            assert (await b.records.get(key)).value == b"new"
        else:
            with pytest.raises(NotFound):
                await b.records.get(key)
