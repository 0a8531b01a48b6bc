"""Shared test helpers: connections with and without the opt-in speedups, waiting for a
condition, pausing a process, what the gateway's tasks are doing, and JSON that grows when
stored."""

from __future__ import annotations

import asyncio
import io
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

from nexus_bus.bus import _speedups

# Runs a test on a stock nats-py connection and on one with the opt-in speedups installed.
READERS = pytest.mark.parametrize("fast", [False, True], ids=["nats-py", "speedups"])


async def delete_streams(url: str, *names: str) -> None:
    """Delete JetStream streams (a bucket is its `KV_` stream) from a connection of its own,
    as an operator or a lost server would take them from under running processes."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        for name in names:
            await js.delete_stream(name)
    finally:
        await nc.close()


def pause(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGSTOP `proc` and return once it is stopped. The signal is delivered asynchronously:
    a server that runs on for a moment on the other CPU answers what reaches it first."""
    assert proc is not None
    proc.send_signal(signal.SIGSTOP)
    stat = Path(f"/proc/{proc.pid}/stat")
    deadline = time.monotonic() + 5
    while stat.read_text().rsplit(")", 1)[1].split()[0] != "T":  # the state, after the name
        assert time.monotonic() < deadline, f"process {proc.pid} did not stop"
        time.sleep(0.001)


def task_stacks(*, gateway_only: bool = False) -> str:
    """Where each asyncio task of this loop is waiting, innermost last (`gateway_only`: only
    the tasks inside the gateway's code, an in-process worker's handlers say): for a hang or
    a failure that a test cannot reproduce at will to explain itself. `Task.get_stack` shows
    one frame of a suspended coroutine; this follows what each one awaits."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        chain: list[str] = []
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is None:
                break
            code = frame.f_code
            chain.append(f"  {code.co_filename}:{frame.f_lineno} {code.co_qualname}")
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        if not gateway_only or any("nexus_bus" in line for line in chain):
            out.write(f"{task.get_name()}:\n" + "\n".join(chain) + "\n")
    return out.getvalue()


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


def json_that_grows(stored: int) -> bytes:
    """A JSON array whose msgspec encoding, the form `data.put` and `stream.publish` store, is
    exactly `stored` bytes long (at least 104).

    `1e15` (4 bytes) is stored as `1000000000000000.0` (18 bytes), so a request carrying it
    stays far below the limits the stored value comes close to.
    """
    n = (stored - 104) // 19
    text = b"[" + b"1e15," * n + b'"' + b"a" * (stored - 4 - 19 * n) + b'"]'
    assert len(msgspec.json.encode(msgspec.json.decode(text))) == stored
    return text
