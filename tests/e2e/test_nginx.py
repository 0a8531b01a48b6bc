"""End to end through real NGINX (compose/nginx/nginx.conf) in front of two shim processes.

NGINX comes from Debian's `nginx` package (the Makefile's test setup installs it); the shims
are `nexus-bus shim` processes on loopback, served by the session's real worker over real
NATS and Redis. One shim is killed in the middle of a load, and every request must still be
answered correctly.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest

from nexus_bus import Settings, Worker
from nexus_bus.embedded import free_port
from tests.helpers import task_stacks
from tests.integration.http_shim import PROBE_OP, bearer, poll_until, probe_worker

CONFIG = Path(__file__).resolve().parents[2] / "compose" / "nginx" / "nginx.conf"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (make test installs Debian's nginx)"
)


@dataclass
class Edge:
    """NGINX on a port, and the shim processes behind it."""

    url: str
    shims: list[tuple[str, subprocess.Popen[bytes]]]


def render_config(source: str, tmp: Path, port: int, upstreams: list[int]) -> str:
    """compose/nginx/nginx.conf with local upstreams, listen address and file paths."""
    servers = "".join(
        f"        server 127.0.0.1:{p} max_fails=2 fail_timeout=5s;\n" for p in upstreams
    )
    text, count = re.subn(
        r"(# upstream-servers-begin\n).*?(\s*# upstream-servers-end)",
        lambda m: m.group(1) + servers + m.group(2).lstrip("\n"),
        source,
        flags=re.S,
    )
    assert count == 1, "upstream markers missing from nginx.conf"
    temp = "".join(
        f"    {name}_temp_path {tmp / name};\n"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    replacements = {
        "listen 8080;": f"listen 127.0.0.1:{port};",
        "pid /var/run/nginx.pid;": f"pid {tmp / 'nginx.pid'};",
        "error_log /dev/stderr warn;": f"error_log {tmp / 'error.log'} warn;",
        "access_log /dev/stdout nexus;": f"access_log {tmp / 'access.log'} nexus;",
        "    # temp-paths\n": temp,
    }
    for old, new in replacements.items():
        assert old in text, f"{old!r} missing from nginx.conf"
        text = text.replace(old, new)
    if os.geteuid() == 0:
        text = "user root;\n" + text  # workers must read the temp dirs made under pytest's tmp
    return text


def start_nginx(
    prefix: Path, conf: Path, stderr: int | IO[bytes] = subprocess.DEVNULL
) -> subprocess.Popen[bytes]:
    """NGINX in the foreground on `conf`, with `prefix` for its temp, log and pid files."""
    assert NGINX is not None
    return subprocess.Popen(
        [NGINX, "-p", str(prefix), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL, stderr=stderr,
    )


def start_shim(settings: Settings, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": settings.redis.url,
        # The shim verifies tokens itself on async submits, job status and event streams.
        "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir),
        "NEXUS_HTTP__TRUSTED_PROXIES": '["127.0.0.1/32"]',
        "NEXUS_HTTP__DRAIN_DELAY_S": "0",
        "NEXUS_LOG__LEVEL": "WARNING",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "nexus_bus", "shim", "--port", str(port)],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


async def answers(url: str, path: str = "/healthz") -> bool:
    try:
        async with httpx.AsyncClient(base_url=url, timeout=2) as c:
            return (await c.get(path)).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture
def processes(
    settings: Settings, tmp_path: Path
) -> Iterator[tuple[str, list[tuple[str, subprocess.Popen[bytes]]], subprocess.Popen[bytes]]]:
    shim_ports = [free_port(), free_port()]
    shims = [
        (f"http://127.0.0.1:{p}", start_shim(settings, p, tmp_path / f"shim-{p}.log"))
        for p in shim_ports
    ]
    edge_port = free_port()
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_config(CONFIG.read_text(), tmp_path, edge_port, shim_ports))
    with (tmp_path / "nginx.stderr").open("wb") as err:
        nginx = start_nginx(tmp_path, conf, err)
    try:
        yield f"http://127.0.0.1:{edge_port}", shims, nginx
    finally:
        stop(nginx)
        for _, proc in shims:
            stop(proc)


@pytest.fixture
async def edge(
    processes: tuple[str, list[tuple[str, subprocess.Popen[bytes]]], subprocess.Popen[bytes]],
    worker: Worker,
    settings: Settings,
) -> AsyncIterator[Edge]:
    url, shims, nginx = processes
    async with probe_worker(settings):

        async def shims_ready() -> bool:
            return all(await asyncio.gather(*(answers(u, "/readyz") for u, _ in shims)))

        async def nginx_up() -> bool:
            if nginx.poll() is not None:
                raise RuntimeError("nginx exited; see nginx.stderr / error.log in tmp_path")
            return await answers(url)

        # Shims first: probing NGINX earlier would count failures against them (max_fails).
        await poll_until(shims_ready, 30)
        await poll_until(nginx_up, 10)
        yield Edge(url, shims)


async def http_requests_served(shim_url: str) -> float:
    """The shim's own count of answered requests (from its /metrics)."""
    async with httpx.AsyncClient(base_url=shim_url) as c:
        text = (await c.get("/metrics")).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nexus_request_duration_seconds_count") and 'transport="http"' in line
    )


async def test_requests_ids_traces_and_client_address_pass_through(
    edge: Edge, admin_token: str | None, uid: str
) -> None:
    async with httpx.AsyncClient(base_url=edge.url, headers=bearer(admin_token)) as c:
        put = await c.post("/v1/data/put", json={"key": f"e2e.{uid}", "value": 42})
        assert put.status_code == 200
        assert re.fullmatch(r"[0-9a-f]{32}", put.headers["x-request-id"])  # NGINX's own id
        got = await c.post("/v1/data/get", json={"key": f"e2e.{uid}"})
        assert got.json()["value"] == 42
        trace_id = uuid.uuid4().hex
        seen = await c.post(
            f"/v1/{PROBE_OP}/echo",
            json={},
            headers={
                "X-Request-Id": f"mine-{uid}",
                "traceparent": f"00-{trace_id}-{'ab' * 8}-01",
                "X-Forwarded-For": "198.51.100.66",  # a spoof: NGINX must not pass it on
            },
        )
        assert seen.headers["x-request-id"] == f"mine-{uid}"
        assert seen.json()["request_id"] == f"mine-{uid}"
        assert seen.json()["trace_id"] == trace_id
        assert seen.json()["client_ip"] == "127.0.0.1"
        missing = await c.post("/v1/data/get", json={"key": f"nope.{uid}"})
        assert missing.status_code == 404
        assert missing.headers["content-type"] == "application/problem+json"


async def test_server_sent_events_are_not_buffered(
    edge: Edge, admin_token: str | None, uid: str
) -> None:
    topic = f"e2e{uid}"
    async with httpx.AsyncClient(base_url=edge.url, headers=bearer(admin_token), timeout=10) as c:
        first = await c.post("/v1/stream/publish", json={"topic": topic, "event": "before"})
        async with c.stream(
            "GET", f"/v1/events/{topic}", headers={"Last-Event-ID": str(first.json()["seq"])}
        ) as resp:
            assert resp.status_code == 200
            lines = resp.aiter_lines()
            started = time.monotonic()
            live = await c.post("/v1/stream/publish", json={"topic": topic, "event": {"n": 1}})
            seq = live.json()["seq"]
            async with asyncio.timeout(5):
                async for line in lines:
                    if line == f"id: {seq}":
                        break
            # Heartbeats come every 15 s: seeing the event sooner proves nothing held it back.
            assert time.monotonic() - started < 5


async def test_killing_a_shim_mid_load_loses_no_request(
    edge: Edge, admin_token: str | None, uid: str
) -> None:
    callers, duration_s, kill_after_s = 12, 4.0, 1.5
    outcomes: list[tuple[float, str]] = []
    stacks: list[str] = []  # the in-process worker's tasks at the first failure
    cut: list[str] = []  # answers cut by the kill, retried with their key
    loop = asyncio.get_running_loop()
    started = loop.time()
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    async with httpx.AsyncClient(
        base_url=edge.url, headers=bearer(admin_token), timeout=15, limits=limits
    ) as c:

        async def post(path: str, body: object, key: str) -> httpx.Response:
            # A shim killed between writing an answer's head and its body cuts that answer
            # mid-way, after NGINX has passed the head on: nothing can replay it then. The
            # client retries with the same Idempotency-Key, which makes that safe.
            for _ in range(3):
                try:
                    return await c.post(path, json=body, headers={"Idempotency-Key": key})
                except httpx.RemoteProtocolError:
                    cut.append(key)
            raise AssertionError(f"{key}: cut three times")

        async def caller(n: int) -> None:
            i = 0
            while loop.time() - started < duration_s:
                key = f"load.{uid}.{n}.{i}"
                # Every request carries an Idempotency-Key, so NGINX may replay it elsewhere.
                put = await post("/v1/data/put", {"key": key, "value": [n, i]}, f"put-{key}")
                got = await post("/v1/data/get", {"key": key}, f"get-{key}")
                ok = put.status_code == 200 and got.status_code == 200
                ok = ok and got.json()["value"] == [n, i]
                failed = put if put.status_code != 200 else got
                outcomes.append((loop.time() - started, "ok" if ok else f"{put.status_code}/"
                                 f"{got.status_code} {failed.text[:300]}"))
                if not ok and not stacks:
                    stacks.append(task_stacks(gateway_only=True))
                i += 1

        async def killer() -> None:
            await asyncio.sleep(kill_after_s)
            served = [await http_requests_served(u) for u, _ in edge.shims]
            assert all(n > 0 for n in served), f"NGINX did not balance: {served}"
            edge.shims[0][1].kill()  # SIGKILL: no drain, in-flight requests are cut

        await asyncio.gather(killer(), *(caller(n) for n in range(callers)))

    failures = [o for o in outcomes if o[1] != "ok"]
    if failures and stacks:  # shown with the failure (pytest would truncate it in the assert)
        print(f"the gateway's tasks at the first failure:\n{stacks[0]}", file=sys.stderr)
    assert not failures, failures[:5]
    assert len(cut) <= callers, cut  # only answers in flight at the kill
    after_kill = [t for t, _ in outcomes if t > kill_after_s + 0.2]
    assert len(after_kill) > callers, "the load did not go on after the kill"
    assert edge.shims[0][1].poll() is not None
