"""The `ledger` operations job tests run, in-process or in a worker subprocess, and the ledger.

No tests here: a worker subprocess imports this module with
`python -m nexus_bus worker --app tests.integration.test_jobs_app:ops`.

`ledger.apply` increments the counter `ledger.<ledger>.<item>` in the system of record (a
read, then a compare-and-set write) and reports each attempt on the core subject
`test.ledger.<ledger>.attempt`. A counter above 1 is an effect applied twice; an acknowledged
submission without a counter is a lost job. With `hold_ms` the first attempt holds *after*
its write, so a test can kill the worker between the effect and the ack.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from nexus_bus import Gateway, NexusError, NotFound, Operations, RequestContext, Settings
from nexus_bus.auth.tokens import unverified_subject
from nexus_bus.constants import DATA_BUCKET
from nexus_bus.jobs.client import get_job
from nexus_bus.jobs.envelope import job_id_for
from nexus_bus.jobs.status import TERMINAL
from nexus_bus.schemas.jobs import JobStatus
from nexus_bus.store import KeyValueRecordStore, RecordStore

ops = Operations("ledger", description="Test ledger for job delivery guarantees.")


class Apply(msgspec.Struct, frozen=True, kw_only=True):
    """One ledger entry to apply."""

    ledger: str
    item: int
    hold_ms: int = 0


class Applied(msgspec.Struct, frozen=True, kw_only=True):
    """The counter as this attempt saw it after its write."""

    item: int
    count: int


def attempt_subject(ledger: str) -> str:
    """Where `ledger.apply` reports each attempt."""
    return f"test.ledger.{ledger}.attempt"


def counter_key(ledger: str, item: int) -> str:
    """The system-of-record key counting applications of one item."""
    return f"ledger.{ledger}.{item}"


@ops.action("apply", idempotent=False)
async def apply(req: Apply, ctx: RequestContext) -> Applied:
    """Increment the item's counter once (per job, thanks to the effect journal)."""
    await ctx.services.nc.publish(attempt_subject(req.ledger), f"{req.item}:{ctx.attempt}".encode())
    key = counter_key(req.ledger, req.item)
    try:
        record = await ctx.services.records.get(key)
        count, revision = int(record.value), record.revision
    except NotFound:
        count, revision = 0, 0
    await ctx.services.records.put(key, str(count + 1).encode(), expected_revision=revision)
    if req.hold_ms and ctx.attempt == 1:
        await asyncio.sleep(req.hold_ms / 1000)
    return Applied(item=req.item, count=count + 1)


@dataclass
class Ledger:
    """What a run attempted (handler entries), acknowledged (submits) and applied (counters)."""

    name: str
    attempted: list[tuple[int, int]] = field(default_factory=list)  # (item, attempt)
    acknowledged: set[int] = field(default_factory=set)
    applied: dict[int, int] = field(default_factory=dict)  # item -> counter value
    _milestones: list[tuple[int, asyncio.Event]] = field(default_factory=list)

    def acknowledge(self, item: int) -> None:
        """Count a confirmed submission."""
        self.acknowledged.add(item)
        for count, event in self._milestones:
            if len(self.acknowledged) >= count:
                event.set()

    async def reached(self, count: int) -> None:
        """Until `count` submissions are acknowledged."""
        event = asyncio.Event()
        self._milestones.append((count, event))
        if len(self.acknowledged) >= count:
            event.set()
        await event.wait()

    async def listen(self, nc: Client) -> None:
        """Record attempts reported on the core subject (best effort: core NATS)."""

        async def on_attempt(msg: Msg) -> None:
            item, attempt = msg.data.decode().split(":")
            self.attempted.append((int(item), int(attempt)))

        await nc.subscribe(attempt_subject(self.name), cb=on_attempt)

    async def read_applied(self, records: RecordStore, items: Iterable[int]) -> dict[int, int]:
        """Read the counters of `items` from the system of record, key by key.

        Key by key rather than by listing: a listing is a KV watch, and one started while a
        cluster fails over can come back empty.
        """
        slots = asyncio.Semaphore(100)

        async def count(item: int) -> tuple[int, int]:
            async with slots:
                try:
                    return item, int((await records.get(counter_key(self.name, item))).value)
                except NotFound:
                    return item, 0

        counts = await asyncio.gather(*(count(i) for i in items))
        self.applied = {item: n for item, n in counts if n}
        return self.applied

    def duplicates(self) -> dict[int, int]:
        """Items whose effect was applied more than once."""
        return {item: n for item, n in self.applied.items() if n != 1}

    def lost(self) -> set[int]:
        """Acknowledged items whose effect was never applied."""
        return self.acknowledged - set(self.applied)

    def report(self) -> str:
        """One line for the test log."""
        return (
            f"ledger {self.name}: attempted={len(self.attempted)} "
            f"acknowledged={len(self.acknowledged)} applied={len(self.applied)} "
            f"duplicates={len(self.duplicates())} lost={len(self.lost())}"
        )


async def submit_all(
    gateway: Gateway,
    ledger: Ledger,
    items: range,
    *,
    concurrency: int = 64,
    give_up_s: float = 60.0,
    retries: list[int] | None = None,
) -> None:
    """Submit one `ledger.apply` job per item, retrying failures with the same idempotency key.

    An item counts as acknowledged once JetStream confirmed its submission. A retry after an
    ambiguous failure (a timeout that hid a stored message) must not run the job twice.
    """
    slots = asyncio.Semaphore(concurrency)

    async def one(item: int) -> None:
        async with slots:
            deadline = time.monotonic() + give_up_s
            while True:
                try:
                    await gateway.submit(
                        ops.op,
                        "apply",
                        Apply(ledger=ledger.name, item=item),
                        idempotency_key=f"{ledger.name}-{item}",
                    )
                except NexusError:
                    if retries is not None:
                        retries.append(item)
                    if time.monotonic() > deadline:
                        return
                    await asyncio.sleep(0.2)
                    continue
                ledger.acknowledge(item)
                return

    await asyncio.gather(*(one(i) for i in items))


async def record_store(nc: Client, *, timeout_s: float = 30.0) -> RecordStore:
    """The system of record itself (no cache in front), for checking a ledger.

    Retried: right after a node died, a cluster may not answer for a few seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            js = nc.jetstream()
            return KeyValueRecordStore(await js.key_value(DATA_BUCKET), js)
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def wait_applied(ledger: Ledger, nc: Client, items: range, *, timeout_s: float) -> None:
    """Wait until every acknowledged item was applied, then a little longer for late repeats.

    Counters are read straight from the KV bucket on `nc`; reads failing while the servers
    recover are retried until `timeout_s`.
    """
    deadline = time.monotonic() + timeout_s
    records = await record_store(nc, timeout_s=timeout_s)

    async def read() -> None:
        while True:
            try:
                await ledger.read_applied(records, items)
                return
            except NexusError:  # the system of record is failing over or restarting
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.5)

    await read()
    while ledger.lost() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        await read()
    await asyncio.sleep(1.0)  # a redelivery applied twice would show up now
    await read()


async def final_statuses(
    gateway: Gateway, settings: Settings, ledger: Ledger, items: range, *, timeout_s: float = 60.0
) -> dict[str, int]:
    """How many of the items' jobs ended in each status, once each has finished (the jobs
    `submit_all` submitted through `gateway`, whose token's subject scopes their keys).

    A job can still wait for a retry after its effect was applied (its write committed but
    the confirmation was lost), so every job is polled until it finishes or `timeout_s`
    passes. Jobs that did not succeed are counted under `<status>: <code>: <detail>`, so a
    failed assertion says why.
    """
    deadline = time.monotonic() + timeout_s
    slots = asyncio.Semaphore(100)
    nc = gateway.nc
    token = gateway.token
    subject = unverified_subject(token, settings.auth.max_token_bytes) if token else None

    async def status(item: int) -> str:
        job_id = job_id_for(ops.op, "apply", f"{ledger.name}-{item}", subject)
        async with slots:
            while True:
                try:
                    job = await get_job(nc, settings, job_id)
                except (NexusError, nats.errors.Error, TimeoutError):
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
                    continue
                if job.status is JobStatus.SUCCEEDED:
                    return job.status.value
                if job.status in TERMINAL or time.monotonic() > deadline:
                    error = job.error or {}
                    return f"{job.status.value}: {error.get('code')}: {error.get('detail')}"
                await asyncio.sleep(0.5)

    found = await asyncio.gather(*(status(i) for i in items))
    return {s: found.count(s) for s in set(found)}
