"""Fixtures the fault tests share: a 3-node NATS cluster with JetStream on loopback."""

from __future__ import annotations

import asyncio
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
