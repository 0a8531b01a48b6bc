"""Request/reply over one wildcard inbox subscription, as nats-py's `request()` does it.

nats-py's new-style request is the same design: one `<inbox>.<id>.*` subscription per
connection, a future per request keyed by the last subject token. Per request it also
draws a 22-character NUID plus two random bytes for the token, wraps the wait in
`asyncio.wait_for` (a task and more) and registers a done-callback; on the gateway's
request path that was about a sixth of the client's CPU (docs/benchmarks.md). Here the
token is a counter plus four random bytes (unique within this inbox, and not guessable from
another reply subject), and timeouts share a timer per 10 ms of deadlines. Only nats-py's
public API is used (`new_inbox`, `subscribe`, `publish`). Semantics are
nats-py's: `NoRespondersError` when the server answers for a subject nobody serves,
`TimeoutError` when no reply came in time (here up to 10 ms after the timeout), publish
errors unchanged.
"""

from __future__ import annotations

import asyncio
from math import ceil
from os import urandom
from typing import Final

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

_STATUS: Final = "Status"  # nats-py puts the inline status of a reply under this key
_NO_RESPONDERS: Final = "503"
_ENTROPY_BYTES: Final = 4096


# Deadlines are grouped in slots of 1/_SLOTS_PER_S s, one timer per slot: a request times
# out at the end of its deadline's slot (up to 10 ms late), and a burst of timeouts (a
# stalled worker with thousands of requests waiting) costs one timer per slot, not per
# request nor a scan of every waiting request per timer.
_SLOTS_PER_S: Final = 100
_FOREVER: Final = float("inf")


class Inbox:
    """Sends requests on `nc` and routes each reply to its waiting caller."""

    __slots__ = (
        "_entropy", "_entropy_at", "_loop", "_nc", "_next", "_prefix", "_prefix_len",
        "_slots", "_started", "_waiting",
    )

    def __init__(self, nc: Client) -> None:
        self._nc = nc
        self._prefix = nc.new_inbox() + "."
        self._prefix_len = len(self._prefix)
        self._waiting: dict[str, asyncio.Future[Msg]] = {}  # reply token -> its caller
        # Deadline slot -> the tokens waiting in it. A timer per request (call_later and
        # cancel) cost 1.5 µs, a tenth of the request's own path here.
        self._slots: dict[int, set[str]] = {}
        self._next = 0
        self._entropy = ""  # hex digits from os.urandom, 8 (4 bytes) per request, never reused
        self._entropy_at = 0
        self._started: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _start(self) -> None:
        # The first callers share one subscription; a failed start is retried by the next.
        if self._started is None:
            self._loop = asyncio.get_running_loop()
            self._started = self._loop.create_future()
            try:
                await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
            except BaseException as exc:
                started, self._started = self._started, None
                if isinstance(exc, asyncio.CancelledError):
                    started.cancel()  # the first caller was cancelled, not the start
                else:
                    started.set_exception(exc)
                    started.exception()  # retrieved: later callers retry instead
                raise
            self._started.set_result(None)
        else:
            started = self._started
            await asyncio.wait([started])  # never raises what the start raised
            if started.cancelled():
                await self._start()  # its caller gave up: this one starts it
            else:
                started.result()  # the start's error, if it failed

    def _deliver(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject[self._prefix_len :], None)
        if future is not None and not future.done():
            future.set_result(msg)

    async def _on_reply(self, msg: Msg) -> None:
        self._deliver(msg)

    async def request(
        self, subject: str, payload: bytes, *, timeout_s: float, headers: dict[str, str] | None
    ) -> Msg:
        """Publish a request and wait for its reply.

        Raises:
            nats.errors.NoRespondersError: nobody serves `subject`.
            nats.errors.TimeoutError: no reply within `timeout_s` seconds.
            nats.errors.Error: the publish failed (closed, draining, buffer full...).
        """
        if self._started is None or not self._started.done():
            await self._start()
        loop = self._loop
        assert loop is not None
        self._next += 1
        # The counter makes it unique; the random part makes it unguessable, so a responder
        # that saw one reply subject cannot answer other callers' requests in their place.
        at = self._entropy_at
        if at >= len(self._entropy):
            # One system call per 1,024 requests: getrandom() per request was a visible
            # share of the shim's time on a shared core.
            self._entropy = urandom(_ENTROPY_BYTES).hex()
            at = 0
        self._entropy_at = at + 8
        token = f"{self._next:x}{self._entropy[at : at + 8]}"
        # Worked out before anything is registered: NaN raises here; inf waits for ever,
        # as nats-py's request() does.
        slot = None if timeout_s == _FOREVER else ceil((loop.time() + timeout_s) * _SLOTS_PER_S)
        future: asyncio.Future[Msg] = loop.create_future()
        tokens: set[str] | None = None
        if slot is not None:
            tokens = self._slots.get(slot)
            if tokens is None:
                loop.call_at(slot / _SLOTS_PER_S, self._expire, slot)
                tokens = self._slots[slot] = set()
            tokens.add(token)
        self._waiting[token] = future
        try:
            await self._nc.publish(subject, payload, reply=self._prefix + token, headers=headers)
            msg = await future
        finally:
            self._waiting.pop(token, None)
            if tokens is not None:
                tokens.discard(token)
        if msg.headers and msg.headers.get(_STATUS) == _NO_RESPONDERS:
            raise nats.errors.NoRespondersError
        return msg

    def _expire(self, slot: int) -> None:
        """Fail the requests of a deadline slot that are still waiting."""
        for token in self._slots.pop(slot, ()):
            future = self._waiting.pop(token, None)
            if future is not None and not future.done():
                future.set_exception(nats.errors.TimeoutError())
