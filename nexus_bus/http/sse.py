"""`GET /v1/events/{topic}`: Server-Sent Events from the `NEXUS_EVENTS` stream.

Each client gets an ordered JetStream consumer (ephemeral, in memory, flow-controlled) that
starts after its `Last-Event-ID` — the stream sequence, which every frame carries as `id:` —
or at new events when it sends none. A client slower than its topic costs a bounded backlog:
past it the consumer is dropped, and a new one reads on once the backlog is sent. The shim
holds no event state beyond that, so a client may resume on any replica. A comment line
every `sse_heartbeat_s` keeps proxies from timing the stream out and detects dead clients;
when the client leaves (or the shim drains) the consumer is deleted at once. A client that
takes none of a frame for `sse_send_timeout_s` is closed: heartbeats cannot reach it. Should
`NEXUS_EVENTS` be deleted and created again under open streams (its sequences start again at
1), one check per heartbeat notices, and they read the new stream from its first event.

Before streaming, the shim authorizes the client as `stream.read` on the topic itself and
asks the workers the same (a `stream.read` call with the client's credentials): a 401 or 403
from either is the answer. A stream then outlives that moment, so it holds a `StreamLease`
(`authz.py`) and re-checks its token every `auth.cache_ttl_s`, at each heartbeat, at once on
a revocation notice for it, and at its `exp`. When the token is gone the stream ends with an
`end` event carrying the problem document, then closes; EventSource reconnects and is
refused.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any, Final
from urllib.parse import parse_qs

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from nexus_bus.bus.assets import stream_missing
from nexus_bus.bus.metadata import is_ascii_digits
from nexus_bus.bus.replies import problem_of
from nexus_bus.bus.subjects import events_subject
from nexus_bus.config import HttpSettings
from nexus_bus.constants import (
    CT_EVENT_STREAM,
    EVENTS_STREAM,
    H_HTTP_REQUEST_ID,
    SSE_END_EVENT,
)
from nexus_bus.errors import InvalidRequest, NexusError, RateLimited, Unavailable
from nexus_bus.http.authz import StreamLease
from nexus_bus.observability import logger
from nexus_bus.store import translate_nats_errors

HEARTBEAT: Final = b": keepalive\n\n"
_QUERY_LAST_ID: Final = "last_event_id"
_MAX_SEQ_DIGITS: Final = 19
# What one stream holds for a client that reads slower than its topic is written: past either
# bound the rest is left in JetStream and read once the client has taken what is held.
_BACKLOG_EVENTS: Final = 256
_BACKLOG_BYTES: Final = 1024 * 1024
# Safety net for a consumer whose delete never arrived (shim killed): the server drops it.
_INACTIVE_S: Final = 30.0
# Retrying a new consumer after a reconnect while JetStream is not back yet (a restarted
# server recovers its streams before it answers): first delay, doubled up to the cap.
_RESUME_RETRY_S: Final = 0.1
_RESUME_RETRY_MAX_S: Final = 2.0
_STOP: Final = object()  # wakes a stream that must end now
_BEHIND: Final = object()  # the client fell more than the backlog behind
_RECHECK: Final = object()  # wakes an idle stream whose token must be checked now
_RESET: Final = object()  # the events stream was created again: read the new one from its start
_RESUME: Final = object()  # NATS reconnected: the server may have lost the stream's consumer
_TICK: Final = object()  # nothing arrived: a heartbeat or a check is due
_END_EVENT: Final = SSE_END_EVENT.encode()
_encoder: Final = msgspec.json.Encoder()
_STREAM_HEADERS: Final = [
    (b"content-type", CT_EVENT_STREAM.encode()),
    (b"cache-control", b"no-cache"),
    # NGINX buffers proxied responses by default; events must go out as they happen.
    (b"x-accel-buffering", b"no"),
]
_REQUEST_ID: Final = H_HTTP_REQUEST_ID.lower().encode()


def event_frame(seq: int, data: bytes) -> bytes:
    """One SSE event: `id:` the stream sequence, `data:` the event (one line per line)."""
    if b"\n" not in data and b"\r" not in data:
        return b"id: %d\ndata: %s\n\n" % (seq, data)
    lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
    return b"id: %d\n" % seq + b"".join(b"data: " + line + b"\n" for line in lines) + b"\n"


def end_frame(error: NexusError, request_id: str) -> bytes:
    """The last event of a stream the shim ends: `event: end`, the problem document as data.

    It carries no `id:`, so a reconnecting client resumes after the last real event.
    """
    return b"event: %s\ndata: %s\n\n" % (_END_EVENT, _encoder.encode(problem_of(error, request_id)))


def retry_frame(retry_ms: int) -> bytes:
    """The `retry:` field telling EventSource how long to wait before reconnecting."""
    return b"retry: %d\n\n" % retry_ms


def last_event_id(header: str | None, query_string: bytes) -> int | None:
    """The stream sequence to resume after: `Last-Event-ID`, else `?last_event_id=`.

    Raises:
        InvalidRequest: a value that is not a sequence number.
    """
    raw = header
    if raw is None and query_string:
        values = parse_qs(query_string.decode("latin-1")).get(_QUERY_LAST_ID)
        raw = values[0] if values else None
    if raw is None or raw == "":
        return None
    raw = raw.strip()
    if not is_ascii_digits(raw) or len(raw) > _MAX_SEQ_DIGITS:
        raise InvalidRequest("Last-Event-ID must be a stream sequence number")
    return int(raw)


class _Stalled(Exception):
    """The client took none of a frame for the send timeout."""


class _Feed:
    """One stream's events on their way from its consumer to its client, bounded."""

    def __init__(self, subject: str, after: int, lease: StreamLease | None) -> None:
        self.subject = subject
        self.lease = lease  # the token to re-check (None: nothing to re-check)
        self.sent = after  # the last event queued for the client
        self.queue: asyncio.Queue[Any] = asyncio.Queue()  # bounded by offer()
        self.sub: Any = None  # the consumer's subscription (None: removed, none yet)
        self.stopped = False
        self._bytes = 0
        self.behind = False  # the backlog is full: further events are left in the stream
        self.created: datetime | None = None  # when the stream its consumer reads was created
        self.resume_delay = _RESUME_RETRY_S  # before the next try of a failed resume

    async def offer(self, msg: Msg) -> None:
        """Queue an event (the subscription's callback); never blocks.

        A blocked callback let the server go on pushing into nats-py's pending queue (up to
        256 MiB a subscription, past which it drops events unseen). Past the backlog the
        events are left in JetStream instead, and the pump reads them again from `sent`.
        After a restart of the ordered consumer (the server lost it, or it missed
        heartbeats) nats-py starts it after the last event it delivered — or at the
        stream's first when it delivered none — so events up to `sent` are skipped here,
        never sent twice or out of order.
        """
        seq = msg.metadata.sequence.stream
        if self.behind or seq <= self.sent:
            return
        size = len(msg.data or b"")
        full = self.queue.qsize() >= _BACKLOG_EVENTS or self._bytes + size > _BACKLOG_BYTES
        if full and self._bytes:  # an event larger than the backlog still goes alone
            self.behind = True
            self.queue.put_nowait(_BEHIND)
            return
        self.sent = seq
        self._bytes += size
        self.queue.put_nowait(msg)

    def taken(self, msg: Msg) -> None:
        """An event left the queue for the client."""
        self._bytes -= len(msg.data or b"")

    def stop(self) -> None:
        """End the stream before its next frame; what it sent has no gap."""
        self.stopped = True
        self.queue.put_nowait(_STOP)

    def wake(self) -> None:
        """Wake an idle stream: its token must be checked now."""
        self.queue.put_nowait(_RECHECK)

    def reset(self, created: datetime | None) -> None:
        """The events stream was created again (at `created`): read the new one from its first
        event (its sequences started again at 1, which `offer` would take for events sent)."""
        self.created = created
        self.queue.put_nowait(_RESET)

    def rewind(self) -> None:
        """Before following the new stream from its start: forget the events queued since the
        reset (the old consumer delivered them from the new stream; they come again, in
        order), keeping the wake-ups."""
        kept = []
        while not self.queue.empty():
            item = self.queue.get_nowait()
            if item is _STOP or item is _RECHECK:
                kept.append(item)
        for item in kept:
            self.queue.put_nowait(item)
        self._bytes = 0
        self.sent = 0

    def resume(self) -> None:
        """Read on from `sent` on a new consumer, before the stream's next frame."""
        self.queue.put_nowait(_RESUME)


class EventStreams:
    """Opens, feeds and tears down the SSE streams of one shim process."""

    def __init__(self, js: Any, settings: HttpSettings) -> None:
        self._js = js
        self._heartbeat_s = settings.sse_heartbeat_s
        self._retry = retry_frame(settings.sse_retry_ms)
        self._send_timeout_s = settings.sse_send_timeout_s
        self._max = settings.sse_max_streams
        self._max_per_caller = settings.sse_max_streams_per_caller
        self._by_caller: dict[str, int] = {}  # places held, by caller (`reserve_for`)
        self._feeds: set[_Feed] = set()  # the open streams
        self._watch: asyncio.Task[None] | None = None  # notices the stream created again
        self._reserved = 0  # places held by streams being opened or served

    @property
    def open_count(self) -> int:
        """Streams open now."""
        return len(self._feeds)

    @contextlib.contextmanager
    def reserve(self) -> Iterator[None]:
        """Hold one of the `sse_max_streams` places for as long as a stream is being opened
        or served. Taken synchronously, so concurrent opens cannot all pass a check.

        Raises:
            Unavailable: every place is taken.
        """
        if self._reserved >= self._max:
            raise Unavailable("too many open event streams on this replica; retry later")
        self._reserved += 1
        try:
            yield
        finally:
            self._reserved -= 1

    @contextlib.contextmanager
    def reserve_for(self, caller: str) -> Iterator[None]:
        """Hold one of `caller`'s `sse_max_streams_per_caller` places, as `reserve` holds one
        of the process's: one client cannot take every place, and every other client's
        streams with them.

        Args:
            caller: who opens the stream (the token's subject, or the client address).

        Raises:
            RateLimited: the caller has that many streams open already.
        """
        held = self._by_caller.get(caller, 0)
        if held >= self._max_per_caller:
            raise RateLimited(f"too many open event streams for this caller ({held}); close one")
        self._by_caller[caller] = held + 1
        try:
            yield
        finally:
            left = self._by_caller[caller] - 1
            if left:
                self._by_caller[caller] = left
            else:
                del self._by_caller[caller]

    def close_all(self) -> None:
        """End every stream (on drain); clients reconnect elsewhere with Last-Event-ID."""
        for feed in list(self._feeds):
            feed.stop()

    def resume_all(self) -> None:
        """NATS reconnected: every stream reads on from its last event on a new consumer.

        A restarted server has lost the ephemeral consumers (they live in memory), and
        nats-py makes a new one only after two of its heartbeats were missed: each stream
        would stay silent for 2 to 4 `sse_heartbeat_s` (30 to 60 s by default) while its topic
        is written. After a mere network break the old consumer is replaced needlessly, which
        costs one consumer create per stream and skips nothing (`_Feed.offer`).
        """
        for feed in list(self._feeds):
            feed.resume()

    def recheck(self, jti: str) -> None:
        """A revocation notice for `jti`: the streams holding that token check it now."""
        for feed in list(self._feeds):
            if feed.lease is not None and feed.lease.jti == jti:
                feed.lease.mark_stale()
                feed.wake()

    async def stream(
        self,
        topic: str,
        after: int | None,
        request_id: str,
        receive: Any,
        send: Any,
        lease: StreamLease | None = None,
    ) -> None:
        """Stream `topic` to the client until it leaves, the shim drains or `lease` ends.

        Raises:
            InvalidRequest: a malformed topic.
            Unavailable: JetStream cannot be reached (before the response started).
        """
        subject = events_subject(topic)
        feed = _Feed(subject, after or 0, lease)
        # Registered before subscribing: a drain that begins meanwhile ends this stream too.
        self._feeds.add(feed)
        try:
            async with translate_nats_errors(f"subscribe to {topic}"):
                info = await self._js.stream_info(EVENTS_STREAM)
            feed.created, last_seq = info.created, info.state.last_seq
            if after is None:  # new events: those after the stream's last one now
                feed.sent = last_seq
            elif after > last_seq:
                # An id this stream never reached: it came from a stream of the same name
                # that was deleted (a memory-storage restart, an operator), and this one's
                # sequences started again at 1. After that id, its events would be skipped
                # until it caught up: resume at its first event instead (docs/http.md).
                logger.info(
                    "event stream {} for {}: Last-Event-ID {} is past the stream's last"
                    " event {}: the stream was reset; resuming at its first event",
                    topic, request_id, after, last_seq,
                )  # fmt: skip
                feed.sent = 0
            await self._follow(feed)
        except BaseException:
            self._forget(feed)
            raise
        if self._watch is None or self._watch.done():
            self._watch = asyncio.create_task(self._watch_stream())
        watcher = asyncio.create_task(_watch_disconnect(receive, feed))
        try:
            headers = [*_STREAM_HEADERS, (_REQUEST_ID, request_id.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await self._write(send, self._retry)
            ended = await self._pump(feed, send)
            if ended is not None:
                logger.info("event stream {} for {} ended: {}", topic, request_id, ended.detail)
                await self._write(send, end_frame(ended, request_id))
        except _Stalled:
            # Closing is all that is left: the last chunk could not be written either.
            logger.info("event stream {} for {}: the client takes nothing", topic, request_id)
            return
        except Exception:
            logger.opt(exception=True).warning("event stream {} for {} failed", topic, request_id)
        finally:
            self._forget(feed)
            watcher.cancel()
            await _remove_consumer(self._js, feed.sub)
        with contextlib.suppress(OSError):
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _forget(self, feed: _Feed) -> None:
        self._feeds.discard(feed)
        if not self._feeds and self._watch is not None:
            self._watch.cancel()
            self._watch = None

    async def _watch_stream(self) -> None:
        """While streams are open, notice `NEXUS_EVENTS` deleted and created again under them
        (a memory-storage nats-server restarted, an operator; docs/http.md): the new stream's
        sequences start again at 1, so the open streams would skip its events up to the last
        one they sent. One stream info per heartbeat for the whole process."""
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                created = (await self._js.stream_info(EVENTS_STREAM)).created
            except (nats.errors.Error, OSError, TimeoutError):
                continue  # missing (nothing to read yet) or unreachable
            stale = [f for f in self._feeds if f.created is not None and f.created != created]
            for feed in stale:
                feed.reset(created)
            if stale:
                logger.warning(
                    "{} was created again: {} open event streams read it from its first event",
                    EVENTS_STREAM, len(stale),
                )  # fmt: skip

    async def _write(self, send: Any, frame: bytes) -> None:
        """Send a frame of the stream.

        Raises:
            _Stalled: the client took none of it within the send timeout.
        """
        try:
            async with asyncio.timeout(self._send_timeout_s):
                await send({"type": "http.response.body", "body": frame, "more_body": True})
        except TimeoutError:
            raise _Stalled from None

    async def _follow(self, feed: _Feed) -> None:
        """Subscribe `feed` to its topic, after the last event it queued.

        Raises:
            Unavailable: JetStream cannot be reached.
        """
        config = ConsumerConfig(inactive_threshold=_INACTIVE_S, opt_start_seq=feed.sent + 1)
        feed.behind = False  # before subscribing: events may arrive before it returns
        async with translate_nats_errors(f"subscribe to {feed.subject}"):
            feed.sub = await self._js.subscribe(
                feed.subject,
                stream=EVENTS_STREAM,
                cb=feed.offer,
                ordered_consumer=True,
                deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                config=config,
                idle_heartbeat=self._heartbeat_s,
            )

    async def _pump(self, feed: _Feed, send: Any) -> NexusError | None:
        """Send events and heartbeats until told to stop (None) or the token is gone (why)."""
        lease = feed.lease
        loop = asyncio.get_running_loop()
        next_beat = loop.time() + self._heartbeat_s
        while True:
            wait = next_beat - loop.time()
            if lease is not None:
                # Checks are timed by the clock, not by idleness: a busy stream is checked too.
                wait = min(wait, lease.due_in())
            item: Any = _TICK
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    item = await feed.queue.get()
            except TimeoutError:
                pass
            if feed.stopped:
                return None
            if item is _RESET:  # a new stream of the same name: read it from its start
                await _remove_consumer(self._js, feed.sub)
                feed.rewind()
                await self._follow(feed)
                continue
            if item is _BEHIND:  # the backlog is sent: read on where it ended
                await _remove_consumer(self._js, feed.sub)
                await self._follow(feed)
                continue
            if item is _RESUME:
                await self._resume(feed)
                continue
            beat = loop.time() >= next_beat
            if lease is not None and (beat or lease.due_in() == 0):
                ended = await lease.check()
                if ended is not None:
                    return ended
            if item is _TICK or item is _RECHECK:
                if beat:
                    await self._write(send, HEARTBEAT)
                    next_beat = loop.time() + self._heartbeat_s
                continue
            feed.taken(item)
            meta = item.metadata
            await self._write(send, event_frame(meta.sequence.stream, item.data or b""))
            next_beat = loop.time() + self._heartbeat_s

    async def _resume(self, feed: _Feed) -> None:
        """Replace the consumer of `feed` after a reconnect. While JetStream cannot answer
        yet, try again later (doubling the delay up to a cap); the stream meanwhile beats,
        checks its token and ends as usual. A server that restarted with memory storage has
        a new `NEXUS_EVENTS`, counting from 1: the stream reads it from its first event, as
        when the heartbeat's check finds it (`_watch_stream`), without waiting for that.

        Raises:
            NexusError: a failure that trying again cannot fix.
        """
        await _remove_consumer(self._js, feed.sub)
        feed.sub = None  # a failed try leaves none to remove again
        try:
            async with translate_nats_errors(f"subscribe to {feed.subject}"):
                created = (await self._js.stream_info(EVENTS_STREAM)).created
            if feed.created is not None and created != feed.created:
                feed.rewind()
                feed.created = created
                logger.warning(
                    "{} was created again: an open event stream reads it from its first event",
                    EVENTS_STREAM,
                )
            await self._follow(feed)
        except NexusError as exc:
            # A stream lost with a memory-storage server is created again by the next
            # stream.publish or stream.read (bus/assets.py): wait for it as for JetStream.
            if not exc.retryable and not stream_missing(exc):
                raise
            logger.info("event stream {}: no new consumer yet: {}", feed.subject, exc.detail)
            asyncio.get_running_loop().call_later(feed.resume_delay, feed.resume)
            feed.resume_delay = min(feed.resume_delay * 2, _RESUME_RETRY_MAX_S)
            return
        feed.resume_delay = _RESUME_RETRY_S


async def _watch_disconnect(receive: Any, feed: _Feed) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    feed.stop()


async def _remove_consumer(js: Any, sub: Any) -> None:
    """Unsubscribe and delete the ephemeral consumer now rather than after its idle timeout."""
    if sub is None:
        return
    name = getattr(sub, "_consumer", None)  # nats-py keeps the current (reset) consumer here
    with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
        await sub.unsubscribe()
    if name:
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await js.delete_consumer(EVENTS_STREAM, name)


def encode_gate_request(topic: str, after: int | None) -> bytes:
    """The `stream.read` body the shim sends to check the client may read `topic`."""
    return msgspec.json.encode({"topic": topic, "after_seq": after or 0, "limit": 1})
