"""`nexus-bus services` on a running `up --consul` stack: every op healthy, from both sources."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nexus_bus import Worker
from nexus_bus.config import ConsulSettings
from nexus_bus.discovery import ConsulRegistry, worker_registrations
from nexus_bus.embedded import ServerProcess, free_port
from tests.conftest import make_settings
from tests.consul_double import ConsulAgentDouble
from tests.integration.discovery_ops import discovery_ops
from tests.integration.test_cli import run_cli

OPS = ("ai", "auth", "data", "stream")


def _both_sources(doc: dict[str, Any]) -> bool:
    workers = [r for r in doc["services"] if r["op"] in OPS]
    return bool(workers) and all(set(r["sources"]) == {"$SRV", "consul"} for r in workers)


def test_services_lists_every_op_of_an_up_stack_and_fails_on_a_missing_one(
    tmp_path: Path,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "CONSUL_"))}
    env["NEXUS_LOG__LEVEL"] = "WARNING"
    with ConsulAgentDouble() as consul:
        up = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nexus_bus",
                "up",
                "--workers",
                "1",
                "--nats-port",
                "0",
                "--redis-port",
                "0",
                "--consul",
                consul.address,
            ],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            expect = ",".join(OPS)
            listed = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # workers and the shim may still be starting
                if (tmp_path / ".nexus" / "stack.json").exists():
                    listed = run_cli(
                        "services",
                        "--json",
                        "--expect",
                        expect,
                        "--consul",
                        consul.address,
                        env=env,
                        cwd=tmp_path,
                    )
                    # Consul registration may trail $SRV under load: wait for both.
                    if listed.returncode == 0 and _both_sources(json.loads(listed.stdout)):
                        break
                time.sleep(0.5)
            assert listed is not None and listed.returncode == 0, listed
            doc = json.loads(listed.stdout)
            assert doc["missing"] == []
            rows = doc["services"]
            workers = [r for r in rows if r["op"] in OPS]
            assert {r["op"] for r in workers} == set(OPS)
            assert all(r["healthy"] and r["health"] == "passing" for r in workers), workers
            assert _both_sources(doc), json.dumps(workers)
            assert all(r["requests"] is not None and r["instance"] for r in workers)
            assert len({r["instance"] for r in workers}) == 1  # one worker process
            shims = [r for r in rows if r["service"] == "nexus-shim"]
            assert len(shims) == 1 and shims[0]["health"] == "passing", rows

            table = run_cli("services", "--consul", consul.address, env=env, cwd=tmp_path)
            assert table.returncode == 0
            assert table.stdout.splitlines()[0].split() == [
                "service",
                "op",
                "instance",
                "address",
                "version",
                "health",
                "requests",
                "errors",
            ]
            assert "nexus-data" in table.stdout and "nexus-shim" in table.stdout

            failing = run_cli(
                "services", "--json", "--expect", "data,nosuchop", env=env, cwd=tmp_path
            )
            assert failing.returncode == 1
            assert json.loads(failing.stdout)["missing"] == ["nosuchop"]

            up.send_signal(signal.SIGINT)
            assert up.wait(40) == 0
            assert consul.service_ids() == set()  # everything deregistered on the way out
        finally:
            if up.poll() is None:
                up.kill()
                up.wait(10)


async def test_services_fails_on_nothing_running_and_on_an_op_seen_only_critical(
    local_nats: ServerProcess, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "CONSUL_"))}
    env.update(NEXUS_NATS__URL=local_nats.url, NEXUS_LOG__LEVEL="WARNING")
    nothing = run_cli("services", "--json", "--wait", "0.3", env=env, cwd=tmp_path)
    assert nothing.returncode == 1 and json.loads(nothing.stdout)["services"] == []

    with ConsulAgentDouble() as consul:
        registry = ConsulRegistry(ConsulSettings(address=consul.address))
        [registration] = worker_registrations(
            ConsulSettings(),
            [("data", ["get"])],
            instance="W1",
            address="10.0.0.8",
            version="0.1.0",
        )
        await registry.register(registration)  # its TTL check starts critical, as in Consul
        await registry.close()
        seen = await asyncio.to_thread(
            run_cli,
            "services",
            "--json",
            "--wait",
            "0.3",
            "--consul",
            consul.address,
            env=env,
            cwd=tmp_path,
        )
    doc = json.loads(seen.stdout)
    assert seen.returncode == 1 and doc["missing"] == ["data"]
    assert [(r["service"], r["instance"], r["health"]) for r in doc["services"]] == [
        ("nexus-data", "W1", "critical")
    ]


async def test_services_shows_the_srv_answers_when_consul_is_unreachable(
    local_nats: ServerProcess, redis_url: str, tmp_path: Path, uid: str
) -> None:
    """Before: 'error: unavailable: consul catalog: ConnectionError' and nothing else, so in a
    Consul outage the operator lost the $SRV view too."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "CONSUL_"))}
    env.update(NEXUS_NATS__URL=local_nats.url, NEXUS_LOG__LEVEL="WARNING")
    worker = Worker(make_settings(local_nats.url, redis_url), [discovery_ops(f"out{uid}")])
    await worker.start()
    try:
        done = await asyncio.to_thread(
            run_cli, "services", "--wait", "1", "--consul", f"http://127.0.0.1:{free_port()}",
            env=env, cwd=tmp_path,
        )
    finally:
        await worker.drain(1)
    assert done.returncode == 1
    assert f"nexus-out{uid}" in done.stdout, done.stdout
    assert done.stderr.startswith("consul unreachable, showing $SRV answers only:"), done.stderr
