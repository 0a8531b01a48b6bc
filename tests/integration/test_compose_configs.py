"""The compose stack's configuration, checked with the real tools available here.

There is no Docker engine on CI, so the stack itself is not started; its NATS configs are
validated by the real nats-server, its settings by our own loader, and its file references
by looking at the tree.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from nexus_bus.config import load_settings
from nexus_bus.embedded import find_nats_server

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
        "nexus_cache_hit_ratio",
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
