"""Shared test helpers: connections with and without the opt-in speedups, and waiting for a
condition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from nexus_bus.bus import _speedups

# Runs a test on a stock nats-py connection and on one with the opt-in speedups installed.
READERS = pytest.mark.parametrize("fast", [False, True], ids=["nats-py", "speedups"])


async def connection(url: str, fast: bool, **options: Any) -> Client:
    """A nats-py connection to `url`, with the speedups installed when `fast`."""
    nc = await nats.connect(url, **options)
    if fast:
        assert _speedups.install(nc)
    return nc

async def eventually(
    condition: Callable[[], bool], what: str, timeout_s: float = 5.0, poll_s: float = 0.005
) -> None:
    """Return once `condition()` holds; fail after `timeout_s` seconds. A transient state
    (a connection passing through draining) needs `poll_s=0`: checked every loop turn."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(poll_s)
