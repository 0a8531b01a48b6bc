"""The cache: read-through with one loader per key, revision-ordered write-through, fail-open.

Read (`fetch`): the L1 when the policy keeps one (entries held under read leases, see
`local.py`), then one Redis script that returns the entry (recording this worker's read
lease when the policy keeps an L1) or, on a miss, hands out the key's lease. The lease
holder loads from the system of record and fills; every other reader polls briefly for that
fill (one loader per key across all workers) and loads by itself only after `wait_s`. A
stale entry (inside its stale-while-revalidate window) is served at once while its lease
holder reloads it in the background.

Write (`write`, `invalidate`): after the system of record accepted a write, its revision is
written through with the compare-and-set of `entries.accepts`, so a slower fill of an older
revision can never overwrite it. When Redis cannot be updated the write must still not leave
an old entry to be served: a peer that reaches Redis is asked to fence the key before the
write returns, and if none can, every worker keeps a revision floor for it (`floors.py`)
until a repair lands. The write script also collects the key's live read leases: the write
returns only once each holder acknowledged dropping the key (`nexus.sys.cache.revoke.<id>`)
or its lease ran out, so no L1 anywhere serves a value older than a completed write. Every
write is also announced on `nexus.sys.cache.invalidate`.

Failure: every store call passes the breaker and fails open: an error or a timeout is
counted and the request goes on to the system of record. No request fails because of the
cache.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

import msgspec

from nexus_bus.cache.aside import CacheAside, Loader
from nexus_bus.cache.entries import (
    UNVERSIONED,
    CacheUnavailable,
    Entry,
    EntryStore,
    Holder,
    Kind,
    Lookup,
    Written,
)
from nexus_bus.cache.floors import Floor, Floors, repair_floors
from nexus_bus.cache.keys import CacheKey, KeyNames, is_under
from nexus_bus.cache.local import LocalCache
from nexus_bus.cache.notice import Notice, Peers
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.cache.stats import CacheResult, CacheStats
from nexus_bus.constants import CACHE_KEY_PREFIX
from nexus_bus.observability import logger
from nexus_bus.resilience import CircuitBreaker, ExponentialBackoff, Jitter

P = ParamSpec("P")
T = TypeVar("T")

# Waiting for another worker's load: start fast (a KV read takes about a millisecond on a
# LAN), then back off so hundreds of waiters do not hammer Redis.
_FIRST_POLL_S = 0.002
_MAX_POLL_S = 0.025
_REPAIR_BACKOFF = ExponentialBackoff(base_s=0.2, cap_s=5.0, jitter=Jitter.EQUAL)
# Waiting out a read lease that no holder acknowledged: Redis measured the lease on its own
# clock; allow for clocks that run at slightly different rates, and for timer slack.
_DRIFT = 0.01
_SLACK_S = 0.002
# Closing waits this long at most for writes still running (`finish`); each step of one is
# bounded by its own timeout, and a worker that drains has cancelled their callers already.
_CLOSE_WAIT_S = 10.0


class Cache(CacheAside):
    """Read-through, write-through and cache-aside on an `EntryStore`.

    Args:
        store: where entries live (Redis in production).
        prefix: the key prefix of every entry.
        breaker: guards the store; a default one when omitted.
        peers: the other workers, for fences and invalidation notices.
        local: an L1 cache, used by policies with `local_ttl_s`.
        floors: revision floors (a default bounded set when omitted).
        max_fill_age_s: a versioned load that took longer than this is not filled, nor a
            versioned fill that reaches the store later than this after the read that missed
            (on the store's clock): a delete's tombstone it raced with may have expired
            meanwhile (an unversioned fill needs its lease instead).
        repair_backoff: the delays between attempts to repair floors.
        clock: monotonic seconds.
        rng: randomness for TTL jitter and backoff.
        origin: this cache's id in notices (random when omitted).
        stats: where read results are counted.
    """

    def __init__(
        self,
        store: EntryStore,
        *,
        prefix: str = CACHE_KEY_PREFIX,
        breaker: CircuitBreaker | None = None,
        peers: Peers | None = None,
        local: LocalCache | None = None,
        floors: Floors | None = None,
        max_fill_age_s: float = 5.0,
        repair_backoff: ExponentialBackoff = _REPAIR_BACKOFF,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        origin: str | None = None,
        stats: CacheStats | None = None,
    ) -> None:
        self._store = store
        self.prefix = prefix
        self.breaker = breaker or CircuitBreaker(clock=clock)
        self._peers = peers
        self._peer_breaker = CircuitBreaker(failure_threshold=3, clock=clock)
        self._local = local
        self.floors = floors or Floors(clock=clock)
        self._max_fill_age_s = max_fill_age_s
        self._repair_backoff = repair_backoff
        self._clock = clock
        self._rng = rng or random.Random()
        self.origin = origin or uuid.uuid4().hex
        self.stats = stats or CacheStats()
        self._tokens = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[Any]] = set()
        self._repair_task: asyncio.Task[None] | None = None
        self._distrusts: dict[str, float] = {}  # namespace: until when nothing is served
        # Names of recently used keys: building one validates and formats on every read,
        # and a hot key is read thousands of times a second. Bounded; cleared when full.
        self._names = KeyNames(prefix)

    def attach(self, peers: Peers | None) -> None:
        """Connect the cache to its peers (once the bus is subscribed)."""
        self._peers = peers

    def key(self, namespace: str, key: str) -> CacheKey:
        """The Redis names of `key` in `namespace`.

        Raises:
            ValueError: an invalid namespace or key.
        """
        return self._names.of(namespace, key)

    async def distrust(self, namespace: str, seconds: float, *, announce: bool = True) -> None:
        """Serve nothing cached from `namespace` for `seconds`, here and (`announce`) in
        every peer: its system of record was replaced (the data bucket created again), and
        every entry cached from the old one must have expired first (docs/cache.md)."""
        self._distrust(namespace, seconds)
        if announce:
            millis = max(1, round(seconds * 1000))
            key = f"{self.prefix}:{namespace}"
            await self._announce(
                Notice(key=key, revision=UNVERSIONED, origin=self.origin, distrust_ms=millis)
            )

    def _distrust(self, namespace: str, seconds: float) -> None:
        until = self._clock() + seconds
        self._distrusts[namespace] = max(until, self._distrusts.get(namespace, until))
        if self._local is not None:
            self._local.clear()  # reads under way are refused their answers too

    def _trusted(self, namespace: str) -> bool:
        """Whether entries of `namespace` may be served now (floors or a replaced system of
        record may forbid it)."""
        if self.floors.distrusted:
            return False
        if self._distrusts and (until := self._distrusts.get(namespace)) is not None:
            if self._clock() < until:
                return False
            del self._distrusts[namespace]
        return True

    # -- reads ---------------------------------------------------------------------------

    async def fetch(self, namespace: str, key: str, loader: Loader, policy: CachePolicy) -> Entry:
        """The entry of `key`: from the cache, or from `loader` (filling the cache).

        Args:
            namespace: the cache namespace (also the `cache` metric label).
            key: the key in the namespace.
            loader: reads the system of record; returns a value or an `ABSENT` entry.
            policy: TTLs, lease and waiting.

        Raises:
            ValueError: an invalid namespace or key.
            Whatever `loader` raises; never a cache failure.
        """
        ck = self.key(namespace, key)
        if not self._trusted(namespace):
            self.stats.count(namespace, CacheResult.BYPASS)
            return await loader()
        held = self._local is not None and policy.local_ttl_s > 0
        if held and (local := self._local_entry(ck)) is not None:
            self.stats.count(namespace, CacheResult.HIT)
            return local
        token = f"{self.origin}.{next(self._tokens)}"  # unique across workers, and cheap
        deadline = self._clock() + policy.wait_s
        pause, waited = _FIRST_POLL_S, False
        while True:
            lookup = await self._read(ck, policy, held, token, policy.lease_ms)
            if lookup is None:
                self.stats.count(namespace, CacheResult.BYPASS)
                return await loader()
            if lookup.entry is not None:
                if lookup.stale and lookup.lease:
                    self.spawn(self._refresh(namespace, ck, loader, policy, token, lookup.now_ms))
                result = CacheResult.STALE if lookup.stale else CacheResult.HIT
                self.stats.count(namespace, CacheResult.COALESCED if waited else result)
                return lookup.entry
            remaining = deadline - self._clock()
            if lookup.lease or remaining <= 0:
                self.stats.count(namespace, CacheResult.MISS)
                return await self._load(
                    ck, loader, policy, token if lookup.lease else "", lookup.now_ms
                )
            waited = True
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, _MAX_POLL_S)

    async def peek(self, namespace: str, key: str, policy: CachePolicy) -> Entry | None:
        """The entry of `key` when the cache holds it, else None; never loads.

        From the L1, or one store read that records this process's read lease (a writer
        revokes it as it revokes a worker's) and takes no load lease: a caller told None
        asks a worker, which loads and fills. None as well for a stale entry read from the
        store (the worker that serves it refreshes it; it still enters the L1, as in
        `fetch`, where it is the latest write all the same), a fence, an entry below a
        floor, and a store that fails or whose breaker is open.

        Raises:
            ValueError: an invalid namespace or key.
        """
        ck = self.key(namespace, key)
        if not self._trusted(namespace):
            return None
        held = self._local is not None and policy.local_ttl_s > 0
        if held and (local := self._local_entry(ck)) is not None:
            self.stats.count(namespace, CacheResult.HIT)
            return local
        lookup = await self._read(ck, policy, held, "", 0)
        if lookup is None or lookup.entry is None or lookup.stale:
            return None
        self.stats.count(namespace, CacheResult.HIT)
        return lookup.entry

    async def _read(
        self, ck: CacheKey, policy: CachePolicy, held: bool, token: str, lease_ms: int
    ) -> Lookup | None:
        """One store read (None: it failed, or the breaker is open). With `held`, it asks
        for a read lease, and an entry handed out under one enters the L1."""
        local = self._local if held else None
        if local is not None:
            local.expect(policy.local_ttl_s)
        read_at = self._clock()  # before the read: the lease ends before Redis's record
        lookup = await self._attempt(
            self._store.read, ck, token=token, lease_ms=lease_ms,
            min_revision=self.floors.minimum(ck.entry), holder=self.origin if held else "",
            hold_ms=policy.local_ms if held else 0,
        )
        if local is not None and lookup is not None and lookup.held and lookup.entry is not None:
            local.put(
                ck.entry, lookup.entry, read_at=read_at, expires_at=read_at + policy.local_ttl_s
            )
        return lookup

    async def _load(
        self, ck: CacheKey, loader: Loader, policy: CachePolicy, token: str, read_ms: int
    ) -> Entry:
        """Load and fill; `read_ms`: the store's clock at the read that missed (0: unknown).

        A versioned fill of a load older than `policy.fill_age_s(max_fill_age_s)` is refused:
        a tombstone (or newer value) it raced with may have expired meanwhile. Measured here,
        the age would miss a pause between this check and the fill's arrival, so the store
        refuses too, on its own clock, a fill that comes later than that after `read_ms`: the
        read came before the load, and whatever the fill raced with was written after it, on
        that clock, and outlives it by more (settings validation; `fill_age_s`).
        """
        started = self._clock()
        try:
            entry = await loader()
        except Exception:
            if token:
                await self._attempt(self._store.release, ck, token)
            raise
        # A versioned fill is ordered by revision alone, so it must not outlive a tombstone it
        # may race with. An unversioned one (cache-aside) is stored only while its lease
        # holds, which a write or a delete revokes, however long the load took: a completion
        # slower than max_fill_age_s was never cached, and its waiters each ran it again.
        max_age_s = policy.fill_age_s(self._max_fill_age_s)
        too_old = entry.versioned and self._clock() - started > max_age_s
        if too_old or (entry.kind is Kind.ABSENT and not policy.caches_absence):
            if token:
                await self._attempt(self._store.release, ck, token)
            return entry
        expiry = policy.expiry(entry.kind, self._rng)
        versioned_read = read_ms if entry.versioned else 0  # an unversioned fill: its lease
        not_after_ms = versioned_read + round(max_age_s * 1000) if versioned_read else 0
        filled = await self._attempt(
            self._store.fill, ck, entry, ttl_ms=expiry.ttl_ms, stale_ms=expiry.stale_ms,
            token=token, need_lease=not entry.versioned, not_after_ms=not_after_ms,
        )
        if filled is not None and filled.stored:
            self.floors.met(ck.entry, entry.revision)
        return entry

    async def _refresh(
        self,
        namespace: str,
        ck: CacheKey,
        loader: Loader,
        policy: CachePolicy,
        token: str,
        read_ms: int,
    ) -> None:
        try:
            await self._load(ck, loader, policy, token, read_ms)
        except Exception as exc:
            # Nobody awaits a background refresh: log it. The stale entry is served until
            # its TTL ends, and the next stale read tries again.
            logger.warning("cache refresh in {} failed: {}", namespace, exc)

    # -- writes --------------------------------------------------------------------------

    async def finish(self, work: Coroutine[Any, Any, T]) -> T:
        """Run `work`, a write of the system of record and its write-through, to its end even
        when the caller is cancelled: cancelling only stops the caller waiting for it.

        Handlers are cancelled (the worker's deadline reaper, a dispatch timeout, a drain),
        and a write cancelled after the system of record stored it, but before its
        write-through, left Redis serving the value it replaced for a whole TTL. The task is
        kept referenced until it ends (the event loop keeps tasks only weakly), and `close`
        waits for it.

        Raises:
            Whatever `work` raises.
        """
        task = asyncio.get_running_loop().create_task(work)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return await asyncio.shield(task)

    async def seal(self, namespace: str, key: str, policy: CachePolicy) -> bool:
        """Before a write of `key` reaches the system of record: take back every L1 copy of
        it and grant no new one for a lease (never raises).

        Without it a running write's value is visible (in the KV, then in Redis) while an
        L1 that has not handled its revocation yet still serves the old one: a read could see
        the new value and a later read the old. After `seal` returns, no L1 holds the key,
        and none takes it until the write has replaced the entry (`write` or `invalidate`
        with `sealed=True`, which this returns) or about one lease has passed since (the
        store keeps the seal one lease past the longest lease it collects, which waiting for
        a holder that does not answer may take). When the store cannot be reached the write
        goes on without it (`write` then covers the completed write as before:
        docs/cache.md); when it did not answer, only after one lease, as the seal may have
        run all the same.
        """
        if self._local is None or policy.local_ms <= 0:
            return False  # no L1 for this namespace: nothing to take back
        ck = self.key(namespace, key)
        if not self.breaker.allow():
            self._local.drop(ck.entry)
            return False  # never sent, so it cleared no holder: `write` covers the write
        sealed = await self._call(self._store.seal, ck, hold_ms=policy.local_ms)
        self._local.drop(ck.entry)
        if sealed is None:
            # The script may have run, and collected and cleared the holders, before its
            # answer was lost (a timeout): nobody can name them any more, and the write's
            # own script will not find them. Every L1 copy of the value this write replaces
            # was handed out before now, so it is gone one lease from now: the write goes
            # on to the system of record only then.
            await self._outwait_leases(policy)
            return False
        # A young Redis's unknown holders are waited for by `write`, as before.
        await self._revoke(ck, UNVERSIONED, Written(sealed.stored, sealed.holders))
        return True

    async def write(
        self, namespace: str, key: str, entry: Entry, policy: CachePolicy, *, sealed: bool = False
    ) -> None:
        """Write `entry` through after the system of record accepted it (never raises).

        A versioned entry is stored unless the cache already holds a newer revision. An
        unversioned value replaces the entry and revokes the lease, so that a load started
        before this write cannot fill afterwards. An unversioned absence is an `invalidate`.
        `sealed`: this write sealed the key first (`seal`), and ends that seal.
        """
        if not entry.versioned and entry.kind is not Kind.VALUE:
            await self.invalidate(namespace, key, policy, sealed=sealed)
            return
        if entry.kind is Kind.ABSENT and not policy.caches_absence:
            entry = Entry.fence(entry.revision)  # still outranks late fills of the old value
        ck = self.key(namespace, key)
        expiry = policy.expiry(entry.kind, self._rng)
        written = await self._attempt(
            self._store.fill, ck, entry, ttl_ms=expiry.ttl_ms, stale_ms=expiry.stale_ms,
            drop_lease=not entry.versioned, collect=True, hold_ms=policy.local_ms,
            unseal=sealed,
        )
        if self._local is not None:
            self._local.drop(ck.entry)  # after the script: reads sent before it are refused
        if written is None:
            await self._fence_elsewhere(ck, entry.revision, policy)
        else:
            if written.stored:
                self.floors.met(ck.entry, entry.revision)
            await self._revoke(ck, entry.revision, written)
        await self._announce(Notice(key=ck.entry, revision=entry.revision, origin=self.origin))

    async def invalidate(
        self, namespace: str, key: str, policy: CachePolicy, *, sealed: bool = False
    ) -> None:
        """Drop `key` and revoke its lease: the invalidation of unversioned entries
        (`sealed`: as for `write`)."""
        ck = self.key(namespace, key)
        evicted = await self._attempt(
            self._store.evict, ck, hold_ms=policy.local_ms, unseal=sealed
        )
        if self._local is not None:
            self._local.drop(ck.entry)
        if evicted is None:
            await self._fence_elsewhere(ck, UNVERSIONED, policy)
        else:
            await self._revoke(ck, UNVERSIONED, evicted)
        await self._announce(Notice(key=ck.entry, revision=UNVERSIONED, origin=self.origin))

    async def _revoke(self, ck: CacheKey, revision: int, written: Written) -> None:
        """Return once every L1 holder of `ck` dropped it or its read lease ran out.

        A holder that does not answer (paused, partitioned, dead) costs the writer at most
        the rest of its lease, and never a stale read: its own lease ends first.
        """
        waits = [
            self._revoke_holder(holder, Notice(key=ck.entry, revision=revision, origin=self.origin))
            for holder in written.holders
            if holder.origin != self.origin  # this worker's own L1 was dropped already
        ]
        if written.wait_ms > 0:  # a young Redis: holders of its previous life are unknown
            waits.append(asyncio.sleep(written.wait_ms / 1000 * (1 + _DRIFT) + _SLACK_S))
        if waits:
            await asyncio.gather(*waits)

    async def _revoke_holder(self, holder: Holder, notice: Notice) -> None:
        limit_s = holder.remaining_ms / 1000 * (1 + _DRIFT) + _SLACK_S
        started = self._clock()
        if self._peers is not None and await self._peers.revoke(holder.origin, notice, limit_s):
            return
        rest = limit_s - (self._clock() - started)
        if rest > 0:
            await asyncio.sleep(rest)

    async def _fence_elsewhere(self, ck: CacheKey, revision: int, policy: CachePolicy) -> None:
        notice = Notice(
            key=ck.entry,
            revision=revision,
            origin=self.origin,
            fence_ttl_ms=round(policy.fence_ttl_s * 1000),
            lifetime_ms=round(policy.lifetime_s * 1000),
            hold_ms=policy.local_ms,
        )
        if self._peers is not None and self._peer_breaker.allow():
            fenced = await self._peers.fence(notice)  # the peer revokes the leases it finds
            if fenced:
                self._peer_breaker.record_success()
            else:
                self._peer_breaker.record_failure()
        else:
            fenced = False
        if not fenced:
            # Debug only: during an outage every write comes here; the breaker logs it.
            logger.debug("cache write-through failed and no peer could fence; keeping a floor")
            self._raise_floor(notice)
            await self._announce(msgspec.structs.replace(notice, floor=True))
        if policy.local_ms:
            # This writer's own script may have run, and cleared the holders, before its
            # answer was lost (a timeout): nobody can name them any more. Every L1 copy of
            # an older value was handed out before now, so it is gone one lease from now.
            await self._outwait_leases(policy)

    @staticmethod
    async def _outwait_leases(policy: CachePolicy) -> None:
        """Wait until every read lease of `policy` handed out before now has run out."""
        await asyncio.sleep(policy.local_ttl_s * (1 + _DRIFT) + _SLACK_S)

    async def _announce(self, notice: Notice) -> None:
        if self._peers is not None:
            await self._peers.announce(notice)

    # -- peers ---------------------------------------------------------------------------

    async def apply_fence(self, notice: Notice) -> bool:
        """Fence `notice.key` in Redis for another worker; whether Redis took it."""
        if not is_under(self.prefix, notice.key):
            return False
        ck = CacheKey.of_entry(notice.key)
        if notice.revision == UNVERSIONED:
            written = await self._attempt(self._store.evict, ck, hold_ms=notice.hold_ms)
        else:
            written = await self._attempt(
                self._store.fill, ck, Entry.fence(notice.revision), ttl_ms=notice.fence_ttl_ms,
                collect=True, hold_ms=notice.hold_ms,
            )
        if self._local is not None:
            self._local.drop(ck.entry)
        if written is None:
            return False
        await self._revoke(ck, notice.revision, written)
        return True

    def on_revoke(self, notice: Notice) -> None:
        """A writer revokes this worker's read lease on `notice.key`: drop it from the L1."""
        if self._local is not None and is_under(self.prefix, notice.key):
            self._local.drop(notice.key)

    def on_notice(self, notice: Notice) -> None:
        """Another worker wrote `notice.key`: drop it from the L1, keep its floor if unfenced."""
        if notice.origin == self.origin or not is_under(self.prefix, notice.key):
            return
        if notice.distrust_ms:
            self._distrust(notice.key[len(self.prefix) + 1 :], notice.distrust_ms / 1000)
            return
        if self._local is not None:
            self._local.drop(notice.key)
        if notice.floor:
            self._raise_floor(notice)

    def _raise_floor(self, notice: Notice) -> None:
        self.floors.raise_floor(
            notice.key,
            notice.revision,
            lifetime_s=notice.lifetime_ms / 1000,
            fence_ttl_ms=notice.fence_ttl_ms,
        )
        if self._local is not None:
            self._local.drop(notice.key)
        if self._repair_task is None or self._repair_task.done():
            self._repair_task = asyncio.get_running_loop().create_task(self._repair())

    async def _repair(self) -> None:
        """Fence every floored key in Redis, retrying with backoff, until no floor is left."""

        async def fence(key: str, floor: Floor) -> bool:
            notice = Notice(key=key, revision=floor.revision, fence_ttl_ms=floor.fence_ttl_ms)
            return await self.apply_fence(notice)

        backoff, rng = self._repair_backoff, self._rng
        await repair_floors(self.floors, fence, lambda failures: backoff.compute(failures, rng))

    # -- plumbing ------------------------------------------------------------------------

    async def _attempt(
        self, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T | None:
        """Run a store call through the breaker; None when it is open or the call failed."""
        if not self.breaker.allow():
            return None
        return await self._call(call, *args, **kwargs)

    async def _call(
        self, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T | None:
        """Run a store call the breaker allowed; None when it failed (which does not say it
        did not run: a timeout may come after the script did its work)."""
        try:
            result = await call(*args, **kwargs)
        except CacheUnavailable as exc:
            self.breaker.record_failure()
            logger.debug("cache store call failed: {}", exc)
            return None
        self.breaker.record_success()
        return result

    def _local_entry(self, ck: CacheKey) -> Entry | None:
        assert self._local is not None
        entry = self._local.get(ck.entry)
        if entry is None or entry.revision < self.floors.minimum(ck.entry):
            return None
        return entry

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` in the background, kept referenced until it ends; `close` cancels it."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Let writes still running end (for `_CLOSE_WAIT_S` at most), then detach from the
        peers and cancel background refreshes and repairs."""
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=_CLOSE_WAIT_S)
        if self._peers is not None:
            await self._peers.close()
            self._peers = None
        tasks = [*self._tasks, *([self._repair_task] if self._repair_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
