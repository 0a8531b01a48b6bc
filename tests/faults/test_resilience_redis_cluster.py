"""A real Redis Cluster with replicas (3 masters + 3 replicas) loses a master mid-load.

Reads keep being served (the cache fails open to the KV while the cluster fails over), and
no read returns a value older than a write that had completed before the read began.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from nexus_bus import Gateway, NexusError, Worker
from nexus_bus.embedded import RedisClusterProcesses, ServerProcess, find_redis_cli, redis_cluster
from nexus_bus.handlers import builtin_groups
from tests.conftest import make_settings

KEYS, KILL_AT_S, DURATION_S = 4, 1.5, 7.0


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    nodes = redis_cluster(tmp_path_factory.mktemp("redis-ha"), masters=3, replicas=1).start()
    try:
        yield nodes
    finally:
        nodes.kill()


def master_of(cluster: RedisClusterProcesses, key: str) -> ServerProcess:
    """The node serving `key`'s slot now (the cache tags entries with the key itself)."""
    cli, first = find_redis_cli(), cluster.nodes[0]
    slot = int(subprocess.run(
        [cli, "-p", str(first.port), "cluster", "keyslot", key],
        capture_output=True, text=True, check=True, timeout=5,
    ).stdout.strip())
    table = subprocess.run(
        [cli, "-p", str(first.port), "cluster", "nodes"],
        capture_output=True, text=True, check=True, timeout=5,
    ).stdout
    for line in table.splitlines():
        fields = line.split()
        if "master" not in fields[2]:
            continue
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        for span in fields[8:]:
            low, _, high = span.partition("-")
            if low.isdigit() and int(low) <= slot <= int(high or low):
                return next(n for n in cluster.nodes if n.port == port)
    raise AssertionError(f"no master owns slot {slot}")


def replica_of(cluster: RedisClusterProcesses, master: ServerProcess) -> ServerProcess:
    """The replica of `master`, once the master's own view of the cluster lists it (gossip
    can lag behind the replica's join by a moment)."""
    deadline = time.monotonic() + 10
    while True:
        table = subprocess.run(
            [find_redis_cli(), "-p", str(master.port), "cluster", "nodes"],
            capture_output=True, text=True, check=True, timeout=5,
        ).stdout
        rows = [line.split() for line in table.splitlines()]
        master_id = next(r[0] for r in rows if "myself" in r[2])
        ports = [int(r[1].split("@")[0].rsplit(":", 1)[1]) for r in rows if r[3] == master_id]
        if ports:
            port = ports[0]
            break
        assert time.monotonic() < deadline, f"no replica of {master.port} listed:\n{table}"
        time.sleep(0.1)
    return next(n for n in cluster.nodes if n.port == port)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_reads_are_served_and_never_older_than_a_completed_write_across_a_failover(
    local_nats: ServerProcess, cluster: RedisClusterProcesses, admin_token: str | None, uid: str
) -> None:
    # A NATS of its own: the session's worker also serves `data`, with the session's Redis as
    # its cache, and would answer half of these requests from another cache.
    nats_url = local_nats.url
    url = cluster.url.replace("redis://", "redis+cluster://", 1)
    # Verified tokens stay trusted through the failover (the revocation store's read path may
    # live on the master that dies, and auth fails closed: 503, which would open the op's
    # breaker). This test is about the cache: reads fail open to the KV while the cluster
    # fails over.
    settings = make_settings(nats_url, url, auth={"cache_ttl_s": 60})
    keys = [f"ha.{uid}.{i}" for i in range(KEYS)]
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    gw = await Gateway.connect(settings, token=admin_token)
    done = dict.fromkeys(keys, -1)  # the last write of each key that had completed
    reads: list[tuple[str, int, int]] = []  # key, floor when the read began, value read
    read_errors: list[str] = []
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        for key in keys:
            await gw.request("data", "put", {"key": key, "value": 0}, timeout=5)
            done[key] = 0
        victim = master_of(cluster, keys[0])
        replica = replica_of(cluster, victim)

        async def writer(key: str) -> None:
            n = 0
            while loop.time() - started < DURATION_S:
                n += 1
                try:
                    await gw.request("data", "put", {"key": key, "value": n}, timeout=5)
                except NexusError:
                    continue  # not completed: it sets no floor
                done[key] = n

        async def reader(key: str) -> None:
            while loop.time() - started < DURATION_S:
                floor = done[key]
                try:
                    got = await gw.request("data", "get", {"key": key}, timeout=5)
                except NexusError as exc:
                    read_errors.append(exc.code)
                    continue
                reads.append((key, floor, got["value"]))

        async def killer() -> None:
            # The replica falls behind for the last half second (the asynchronous replication
            # a real failover loses), then the master dies and that replica takes over.
            await asyncio.sleep(KILL_AT_S - 0.5)
            assert replica.proc is not None
            replica.proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(0.5)
            victim.kill()
            replica.proc.send_signal(signal.SIGCONT)

        await asyncio.gather(
            killer(), *(writer(k) for k in keys), *(reader(k) for k in keys), reader(keys[0])
        )
    finally:
        await gw.close()
        await worker.drain(1)

    assert not read_errors, sorted(set(read_errors))  # reads kept being served
    after_kill = [r for r in reads if r[0] == keys[0]]
    assert len(after_kill) > 20
    stale = [(k, floor, value) for k, floor, value in reads if value < floor]
    assert not stale, stale[:5]
