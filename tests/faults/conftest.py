"""Fixtures the fault tests share: a 3-node NATS cluster with JetStream on loopback, and the
processes a test starts (killed at its end, whatever happened)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from nexus_bus.embedded import ServerProcess, nats_cluster


@pytest.fixture
def nats_nodes(tmp_path: Path) -> Iterator[list[ServerProcess]]:
    """Three clustered nats-servers, started; each test may kill any of them."""
    nodes = nats_cluster(tmp_path / "cluster", 3)
    try:
        for node in nodes:
            node.start()
        yield nodes
    finally:
        for node in nodes:
            node.kill()


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """The processes a test starts (it appends them): killed, and reaped, after it."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def wait_for_jetstream(urls: list[str], timeout_s: float = 30) -> None:
    """Until the cluster has elected a meta leader and answers JetStream requests."""
    nc = await nats.connect(urls)
    try:
        js = nc.jetstream(timeout=1)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await js.account_info()
                return
            except (nats.errors.Error, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.25)
    finally:
        await nc.close()
