"""Clients that drive `data` keys as registers and record a history for the checker.

Each client sends random gets, puts (of values unique in the whole run) and deletes on a few
keys, back to back, over HTTP (the shim) or NATS (the gateway client), and records every
operation with the times it was sent and answered (`tests.linearizability.Op`). A put or a
delete that failed has an unknown outcome; a failed get says nothing and is left out, and so
does a stale-if-error answer (`Nexus-Stale-Age`): the contract marks it as possibly old, so
it is counted, not checked.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from nexus_bus import Gateway, NotFound
from nexus_bus.constants import H_STALE_AGE
from tests.linearizability import Action, Op

# (action, payload) -> (status, body); raising means no answer.
Send = Callable[[str, dict[str, Any]], Awaitable[tuple[int, dict[str, Any]]]]


class StaleAnswer(Exception):
    """A read answered from the cache on failure, marked `Nexus-Stale-Age`."""


def over_http(client: httpx.AsyncClient, token: str, timeout_s: float) -> Send:
    """Requests through the HTTP shim at `client`'s base URL."""
    headers = {"Authorization": f"Bearer {token}"}

    async def send(action: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        response = await client.post(
            f"/v1/data/{action}", json=payload, headers=headers, timeout=timeout_s
        )
        if H_STALE_AGE in response.headers:
            raise StaleAnswer(response.headers[H_STALE_AGE])
        return response.status_code, response.json()

    return send


def over_nats(gateway: Gateway, timeout_s: float, *, keyed: bool = False) -> Send:
    """Requests through the gateway client (NATS request/reply); `keyed`: each write with an
    `Idempotency-Key` of its own, so that workers journal it (the effect journal)."""

    async def send(action: str, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        key = uuid.uuid4().hex if keyed and action != "get" else None
        try:
            reply = await gateway.request(
                "data", action, payload, timeout=timeout_s, idempotency_key=key
            )
        except NotFound:
            return 404, {}
        return 200, reply

    return send


class Recorder:
    """The shared history and a source of values no two writes share."""

    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.errors: list[str] = []
        self.stale_answers = 0
        self._values = itertools.count()

    def dump(self, key: str, path: Path) -> Path:
        """Write `key`'s history as JSON lines (one Op each) to `path`, for a failure report."""
        with path.open("w") as out:
            for op in self.ops:
                if op.key == key:
                    out.write(json.dumps([op.action, op.value, op.invoke, op.complete, op.client]))
                    out.write("\n")
        return path

    def value(self, client: str) -> str:
        """A value written once in the whole run."""
        return f"{client}-{next(self._values)}"

    async def client(
        self, name: str, send: Send, keys: list[str], stop: asyncio.Event, seed: int
    ) -> None:
        """Random operations on `keys` until `stop` is set."""
        rng = random.Random(seed)
        while not stop.is_set():
            key, roll = rng.choice(keys), rng.random()
            if roll < 0.55:
                await self._read(name, send, key)
            elif roll < 0.88:
                await self._update(name, send, key, Action.WRITE, self.value(name))
            else:
                await self._update(name, send, key, Action.DELETE, None)

    async def _read(self, name: str, send: Send, key: str) -> None:
        start = time.monotonic()
        try:
            status, body = await send("get", {"key": key})
        except StaleAnswer:
            self.stale_answers += 1
            return
        except Exception as exc:  # no answer: a read that says nothing
            self.errors.append(f"get: {exc!r}")
            return
        end = time.monotonic()
        if status == 200:
            self.ops.append(Op(key, Action.READ, body["value"], start, end, name))
        elif status == 404:
            self.ops.append(Op(key, Action.READ, None, start, end, name))
        else:
            self.errors.append(f"get: {status} {body.get('code')}")

    async def _update(
        self, name: str, send: Send, key: str, action: Action, value: str | None
    ) -> None:
        start = time.monotonic()
        wire = "put" if action is Action.WRITE else "delete"
        payload: dict[str, Any] = {"key": key, "value": value} if value else {"key": key}
        end: float | None = None
        try:
            status, body = await send(wire, payload)
            if status == 200:
                end = time.monotonic()
            else:
                self.errors.append(f"{wire}: {status} {body.get('code')}")
        except Exception as exc:  # no answer: the write may or may not have landed
            self.errors.append(f"{wire}: {exc!r}")
        # A delete's `deleted` is not recorded: the KV store reads, then deletes (two steps),
        # so two concurrent deletes can both answer true. The checker would flag that, and
        # rightly, but it is the record store's contract, not the cache's (docs/cache.md).
        self.ops.append(Op(key, action, value, start, end, name))
