"""`data` keys are linearizable registers, with the L1 on, while workers and Redis fail: no
read returns a value older than a write that completed before it began, and no read goes
back from a running write's value to the one it replaces (the seal: docs/cache.md).

Many clients over HTTP and NATS drive a few keys with random gets, puts and deletes through
several worker processes, while workers are paused (SIGSTOP), killed and restarted and Redis
is restarted empty; the recorded history is checked (`tests/linearizability.py`). The same
load on in-process workers with the L1's lease wait removed (the planted bug) must be caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.msg import Msg

from nexus_bus import Gateway, Worker
from nexus_bus.cache import Cache
from nexus_bus.cache.invalidation import CacheBus
from nexus_bus.cache.notice import Notice
from nexus_bus.effects.cache_sync import CacheWriteThrough
from nexus_bus.embedded import ServerProcess, free_port
from nexus_bus.handlers import builtin_groups
from tests.conftest import issue_test_token, make_settings, shared_keys_dir
from tests.faults.registers import Recorder, over_http, over_nats
from tests.helpers import pause
from tests.linearizability import Action, check, check_history, check_regular

ROOT = Path(__file__).resolve().parents[2]
LEASE_S = 0.5
TIMEOUT_S = 3.0
CACHE = {
    "local_ttl_s": LEASE_S,
    "breaker_reset_s": 0.1,
    "breaker_reset_max_s": 0.3,
}


def _env(nats_url: str, redis_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "NEXUS_NATS__URL": nats_url,
        "NEXUS_REDIS__URL": redis_url,
        "NEXUS_AUTH__KEYS_DIR": str(shared_keys_dir()),
        "NEXUS_LOG__LEVEL": "ERROR",
        "NEXUS_JOBS__ENABLED": "false",
        "NEXUS_CACHE__LOCAL_TTL_S": str(LEASE_S),
        "NEXUS_CACHE__BREAKER_RESET_S": "0.1",
        "NEXUS_CACHE__BREAKER_RESET_MAX_S": "0.3",
        "PYTHONPATH": str(ROOT),
    }


class Processes:
    """Worker and shim processes of the test, started in a temp dir, killed afterwards."""

    def __init__(self, env: dict[str, str], cwd: Path) -> None:
        self.env, self.cwd = env, cwd
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, *args: str) -> None:
        self.procs[name] = subprocess.Popen(
            [sys.executable, "-m", "nexus_bus", *args], env=self.env, cwd=self.cwd
        )

    def signal(self, name: str, sig: signal.Signals) -> None:
        if sig == signal.SIGSTOP:
            pause(self.procs[name])  # stopped on return, not just signalled
        else:
            self.procs[name].send_signal(sig)

    def kill(self, name: str) -> None:
        self.procs[name].kill()
        self.procs[name].wait(10)

    def close(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
            proc.kill()
            proc.wait(10)


@pytest.fixture
def processes(local_nats: ServerProcess, local_redis: ServerProcess, tmp_path: Path) -> Iterator[
    Processes
]:
    procs = Processes(_env(local_nats.url, local_redis.url + "/0"), tmp_path)
    try:
        yield procs
    finally:
        procs.close()


async def _serving_data(nats_url: str, workers: int) -> None:
    """Wait until `workers` distinct workers answer on the `data` queue group's $SRV, and
    `data.get` itself is answered (the $SRV endpoint may come up first)."""
    nc = await nats.connect(nats_url)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            inbox = nc.new_inbox()
            sub = await nc.subscribe(inbox)
            await nc.publish("$SRV.PING.nexus-data", b"", reply=inbox)
            seen = set()
            with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
                while True:
                    seen.add((await sub.next_msg(timeout=0.3)).data)
            await sub.unsubscribe()
            with contextlib.suppress(nats.errors.NoRespondersError, nats.errors.TimeoutError):
                if len(seen) >= workers:
                    await nc.request("nexus.data.get", b"{}", timeout=1)
                    return
            await asyncio.sleep(0.2)
        pytest.fail("the workers did not come up")
    finally:
        await nc.close()


async def _shim_ready(port: int) -> None:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get("/readyz", timeout=1)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    pytest.fail("the shim did not come up")


@contextlib.asynccontextmanager
async def _clients(
    recorder: Recorder,
    nats_url: str,
    keys: list[str],
    http_port: int | None,
    count: int,
    *,
    keyed: bool = False,
) -> AsyncIterator[asyncio.Event]:
    """`count` clients over NATS, and as many over HTTP when a shim port is given; `keyed`:
    the NATS clients' writes carry idempotency keys."""
    token = issue_test_token(("data:*",))
    settings = make_settings(nats_url, resilience={"enabled": False})
    gateway = await Gateway.connect(settings, token=token)
    http = httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{http_port or 1}",
        limits=httpx.Limits(max_connections=count + 1),
    )
    stop = asyncio.Event()
    sends = [("nats", over_nats(gateway, TIMEOUT_S, keyed=keyed))]
    if http_port:
        sends.append(("http", over_http(http, token, TIMEOUT_S)))
    tasks = [
        asyncio.create_task(recorder.client(f"{kind}{n}", send, keys, stop, seed=n * 7 + i))
        for i, (kind, send) in enumerate(sends)
        for n in range(count)
    ]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.gather(*tasks)
        await http.aclose()
        await gateway.close()


def _assert_history(recorder: Recorder, keys: list[str], report_dir: Path) -> None:
    """No stale read (a regular register), and linearizable: writes seal their key first
    (docs/cache.md), so reads never go from a running write's value back to the old one."""
    regular = check_regular(recorder.ops)
    atomic = check_history(recorder.ops)
    if regular.problems or atomic.problems:  # each register's history, to replay the checker
        dumps = [str(recorder.dump(key, report_dir / f"{key}.jsonl")) for key in keys]
        found = "\n".join([*regular.problems, *atomic.problems][:20])
        raise AssertionError(
            f"{found}\nhistories: {dumps}; stale answers left out: {recorder.stale_answers}"
        )
    # The complete search must have finished on most keys (the direct checks ran on all).
    assert len(atomic.inconclusive) < len(keys), atomic.inconclusive
    reads = [op for op in recorder.ops if op.action is Action.READ and op.value is not None]
    writes = [op for op in recorder.ops if op.action is Action.WRITE and op.complete]
    # A history worth checking: every key read and written many times.
    assert {op.key for op in reads} == set(keys) and len(reads) > 200 and len(writes) > 100


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_registers_stay_linearizable_while_workers_pause_die_and_redis_restarts(
    local_nats: ServerProcess,
    local_redis: ServerProcess,
    processes: Processes,
    uid: str,
    tmp_path: Path,
) -> None:
    http_port = free_port()
    for n in range(3):
        processes.start(f"w{n}", "worker", "--ops", "data")
    processes.start("shim", "shim", "--port", str(http_port))
    await asyncio.gather(_serving_data(local_nats.url, 3), _shim_ready(http_port))
    keys = [f"lin.{uid}.{n}" for n in range(3)]
    recorder = Recorder()
    async with _clients(recorder, local_nats.url, keys, http_port, count=5):
        await asyncio.sleep(1.5)
        processes.signal("w0", signal.SIGSTOP)  # a lease holder that answers nothing
        await asyncio.sleep(1.0)
        processes.signal("w0", signal.SIGCONT)
        await asyncio.sleep(1.0)
        processes.kill("w1")
        processes.start("w1", "worker", "--ops", "data")
        await asyncio.sleep(1.5)
        await asyncio.to_thread(local_redis.kill)  # restarted empty: holders forgotten
        await asyncio.sleep(0.3)
        await asyncio.to_thread(local_redis.start)
        await asyncio.sleep(1.5)
        processes.signal("w2", signal.SIGSTOP)
        await asyncio.sleep(0.8)
        processes.signal("w2", signal.SIGCONT)
        await asyncio.sleep(1.5)
    _assert_history(recorder, keys, tmp_path)


async def _in_process_history(
    nats_url: str, redis_url: str, uid: str, seconds: float, *, keyed: bool = False
) -> Recorder:
    """Three workers in this process (so a monkeypatch reaches them), NATS clients only."""
    settings = make_settings(nats_url, redis_url, cache=CACHE, jobs={"enabled": False})
    workers = [Worker(settings, builtin_groups(["data"])) for _ in range(3)]
    for worker in workers:
        await worker.start()
    keys = [f"planted.{uid}.{n}" for n in range(3)]
    recorder = Recorder()
    try:
        async with _clients(recorder, nats_url, keys, None, count=8, keyed=keyed):
            await asyncio.sleep(seconds)
    finally:
        for worker in workers:
            await worker.drain(1)
    return recorder


@pytest.mark.parametrize("planted", [False, True], ids=["leases", "planted-no-lease-wait"])
async def test_the_checker_catches_an_l1_that_skips_the_lease_wait(
    local_nats: ServerProcess,
    local_redis: ServerProcess,
    uid: str,
    planted: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The planted bug is the L1 that docs/cache.md used to rule out for `data`: writes return
    without waiting for the holders (only the invalidation broadcast tells them). In one
    process that broadcast overtakes the next request almost always, so it is delivered
    20 ms late here, as between processes on a busy machine."""
    if planted:
        on_notice = Cache.on_notice

        async def skip_the_wait(*args: object) -> None:
            return None  # the bug: return from a write while other L1s still hold the key

        def late_notice(self: Cache, notice: Notice) -> None:
            asyncio.get_running_loop().call_later(0.02, on_notice, self, notice)

        monkeypatch.setattr(Cache, "_revoke", skip_the_wait)
        monkeypatch.setattr(Cache, "on_notice", late_notice)
    recorder = await _in_process_history(local_nats.url, local_redis.url + "/0", uid, 4.0)
    if planted:
        problems = check(recorder.ops)
        assert any("stale read" in p for p in problems), "the planted bug went unnoticed"
    else:
        _assert_history(recorder, [f"planted.{uid}.{n}" for n in range(3)], tmp_path)


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "planted-unsealed"])
async def test_keyed_writes_seal_their_key_before_the_journal_commits_them(
    local_nats: ServerProcess,
    local_redis: ServerProcess,
    uid: str,
    sealed: bool,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A write with an `Idempotency-Key` goes through the effect journal, around the cached
    store, and must seal its key as the cached store's writes do. Revocations reach their
    holders 20 ms late here (a busy machine): a journaled write that wrote Redis first and
    revoked the L1 copies after (the planted bug, as the journal used to) let a read see the
    new value and a later read, on a worker still holding the key, the old one."""
    on_revoke = CacheBus._on_revoke

    async def late_revoke(self: CacheBus, msg: Msg) -> None:
        await asyncio.sleep(0.02)
        await on_revoke(self, msg)

    monkeypatch.setattr(CacheBus, "_on_revoke", late_revoke)
    if not sealed:

        async def no_seal(self: CacheWriteThrough, key: str) -> bool:
            return False

        monkeypatch.setattr(CacheWriteThrough, "seal", no_seal)
    redis = local_redis.url + "/0"
    recorder = await _in_process_history(local_nats.url, redis, uid, 4.0, keyed=True)
    keys = [f"planted.{uid}.{n}" for n in range(3)]
    if sealed:
        _assert_history(recorder, keys, tmp_path)
    else:
        assert check_history(recorder.ops).problems, "the unsealed journal went unnoticed"
