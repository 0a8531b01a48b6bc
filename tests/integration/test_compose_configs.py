"""The compose stack's configuration, checked with the real tools available here.

There is no Docker engine on CI, so the stack itself is not started; its NATS configs are
validated by the real nats-server, its settings by our own loader, and its file references
by looking at the tree.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from nats.js.api import StreamConfig

from nexus_bus.config import load_settings
from nexus_bus.embedded import find_nats_server, free_port, nats_cluster

COMPOSE = Path(__file__).resolve().parents[2] / "compose"


def compose_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return doc


@pytest.mark.parametrize("node", [1, 2, 3])
def test_nats_cluster_configs_are_valid_for_the_real_server(node: int) -> None:
    result = subprocess.run(
        [find_nats_server(), "-t", "-c", str(COMPOSE / "nats" / f"nats-{node}.conf")],
        env={**os.environ, "NEXUS_NATS_PASSWORD": "test-only"},
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    text = (COMPOSE / "nats" / f"nats-{node}.conf").read_text()
    assert "sync_interval: always" in text and "$NEXUS_NATS_PASSWORD" in text
    assert 'ping_interval: "10s"' in text and "ping_max: 2" in text  # partitions: 30 s


def test_services_reference_existing_files_and_services() -> None:
    services = compose_doc()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./") and not source.startswith("./secrets"):
                assert (COMPOSE / source).exists(), f"{name}: {source} is missing"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"
    workers = {f"worker-{op}" for op in ("data", "stream", "ai", "auth")}
    assert {"nats-1", "nats-2", "nats-3", "redis", "shim-1", "shim-2", "nginx"} | workers <= set(
        services
    )
    for name in workers:  # each serves its own op group
        assert services[name]["command"] == ["worker", "--ops", name.removeprefix("worker-")]


def test_the_stack_environment_is_valid_nexus_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(compose_doc()["x-nexus-env"])
    for key, value in env.items():
        monkeypatch.setenv(
            key, str(value).replace("${NEXUS_NATS_PASSWORD:?set it in compose/.env}", "p")
        )
    settings = load_settings()
    assert len(settings.nats.servers) == 3 and settings.jetstream.replicas == 3
    assert settings.nats.user == "nexus" and settings.nats.password is not None
    assert settings.redis.password is not None


def test_prometheus_rules_use_the_documented_metric_names() -> None:
    rules = yaml.safe_load((COMPOSE / "prometheus" / "rules.yml").read_text())
    exprs = " ".join(r["expr"] for g in rules["groups"] for r in g["rules"])
    for metric in (
        "nexus_request_duration_seconds",
        "nexus_jobs_dead_lettered_total",
        "nexus_circuit_state",
        "nexus_cache_requests_total",  # the hit ratio over 5 minutes, not since start
    ):
        assert metric in exprs
    # The error ratio is counted from answers' statuses (per transport); the dashboard breaks
    # errors down by code.
    dashboard = (COMPOSE / "grafana" / "dashboards" / "nexus-overview.json").read_text()
    assert "nexus_error_rate_total" in dashboard


def test_every_shim_and_worker_registers_with_the_compose_consul(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    doc = compose_doc()
    services = doc["services"]
    assert services["consul"]["image"].startswith("hashicorp/consul:")
    assert "-server" in services["consul"]["command"]
    for name in ("worker-data", "worker-stream", "worker-ai", "worker-auth", "shim-1", "shim-2"):
        env = services[name]["environment"]
        assert env["NEXUS_CONSUL__ENABLED"] == "true", name
        assert env["NEXUS_CONSUL__ADDRESS"] == "http://consul:8500", name
    for key, value in doc["x-nexus-env"].items():
        monkeypatch.setenv(key, str(value))
    consul = load_settings().consul
    assert consul.enabled and (consul.check_interval_s, consul.check_timeout_s) == (5.0, 3.0)


def test_nexus_services_wait_for_the_whole_cluster_and_restart() -> None:
    """Workers create R3 streams at startup and exit when they cannot: each nexus service waits
    for every NATS node, and every service comes back after it exits."""
    services = compose_doc()["services"]
    nexus = [name for name in services if name.startswith(("worker-", "shim-"))]
    for name in nexus:
        needs = services[name]["depends_on"]
        for node in ("nats-1", "nats-2", "nats-3", "redis"):
            assert needs[node] == {"condition": "service_healthy"}, f"{name} on {node}"
    for name, service in services.items():
        assert service.get("restart") == "unless-stopped", name


def _healthz(port: int, query: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz?{query}", timeout=3) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_nats_healthcheck_passes_only_once_the_cluster_serves_r3_streams(
    tmp_path: Path,
) -> None:
    """The real nats-server, asked what the compose healthcheck asks: a lone node of a fresh
    cluster is not healthy (an R3 stream cannot be created yet); with all three it is."""
    check = compose_doc()["x-nats"]["healthcheck"]["test"][-1]
    query = urllib.parse.urlsplit(check).query
    nodes = nats_cluster(tmp_path, 3)
    monitor = [free_port() for _ in nodes]
    for node, port in zip(nodes, monitor, strict=True):
        node.argv += ["-m", str(port)]
    try:
        nodes[0].start()
        time.sleep(1)  # a node alone: nothing more comes if we wait
        assert _healthz(monitor[0], query) == 503
        for node in nodes[1:]:
            node.start()
        deadline = time.monotonic() + 30
        while _healthz(monitor[0], query) != 200:
            assert time.monotonic() < deadline, "the cluster never became healthy"
            time.sleep(0.2)
        asyncio.run(_create_r3_stream(nodes[0].url))
    finally:
        for node in nodes:
            node.kill()


async def _create_r3_stream(url: str) -> None:
    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().add_stream(StreamConfig(name="R3", num_replicas=3))
        assert info.config.num_replicas == 3
    finally:
        await nc.close()
