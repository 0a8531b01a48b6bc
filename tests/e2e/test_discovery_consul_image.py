"""The shim against the real `hashicorp/consul` image, wherever a Docker engine answers.

Registration, the HTTP check turning critical when `/readyz` fails, and deregistration on
SIGTERM, all judged by real Consul. Without a Docker engine (these CI machines) the module
skips with that reason; the agent double covers the same ground in tests/integration.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest

from nexus_bus import Settings
from nexus_bus.embedded import ServerProcess, free_port
from tests import servers
from tests.helpers import eventually
from tests.integration.test_discovery_consul import child_env, process, wait_exit

pytestmark = pytest.mark.skipif(
    not servers.docker_engine_answers(),
    reason="no Docker engine answers: the real hashicorp/consul image cannot run here",
)

CONSUL_IMAGE = "hashicorp/consul:1.20"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return msgspec.json.decode(response.read())


@pytest.fixture(scope="module")
def consul_address() -> Iterator[str]:
    """A real Consul agent in dev mode; the host is `host.docker.internal` inside it."""
    from testcontainers.core.container import DockerContainer

    container = (
        DockerContainer(CONSUL_IMAGE)
        .with_command("agent -dev -client 0.0.0.0")
        .with_exposed_ports(8500)
        .with_kwargs(extra_hosts={"host.docker.internal": "host-gateway"})
    )
    with container:
        host = container.get_container_host_ip()
        address = f"http://{host}:{container.get_exposed_port(8500)}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if get_json(f"{address}/v1/status/leader"):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        yield address


async def test_real_consul_checks_the_shim_and_forgets_it_on_sigterm(
    settings: Settings, local_redis: ServerProcess, consul_address: str
) -> None:
    port = free_port()
    env = child_env(
        settings,
        local_redis.url + "/0",
        consul_address,
        NEXUS_CONSUL__SERVICE_ADDRESS="host.docker.internal",
        NEXUS_CONSUL__CHECK_INTERVAL_S="1",
        NEXUS_CONSUL__CHECK_TIMEOUT_S="1",
    )

    def shim_checks() -> list[dict[str, Any]]:
        checks = get_json(f"{consul_address}/v1/agent/checks")
        return [c for c in checks.values() if c["ServiceName"] == "nexus-shim"]

    with process(["shim", "--host", "0.0.0.0", "--port", str(port)], env) as proc:
        await eventually(
            lambda: [c["Status"] for c in shim_checks()] == ["passing"], "passing", 60, 0.5
        )
        [check] = shim_checks()
        definition = get_json(f"{consul_address}/v1/agent/service/{check['ServiceID']}")
        assert definition["Port"] == port and definition["Meta"]["ops"]
        assert (check["Interval"], check["Timeout"]) == ("1s", "1s")
        local_redis.kill()  # /readyz answers 503
        await eventually(
            lambda: [c["Status"] for c in shim_checks()] == ["critical"], "critical", 30, 0.5
        )
        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 30) == 0
        assert shim_checks() == []
        services = get_json(f"{consul_address}/v1/agent/services").values()
        assert all(s["Service"] != "nexus-shim" for s in services)
