"""Where tests get real servers: environment URLs, testcontainers, or local binaries.

Order: `NEXUS_TEST_NATS_URL` / `NEXUS_TEST_REDIS_URL` → testcontainers when a Docker
engine answers → local binaries on free ports in a temp dir, killed by PID afterwards. Tests
that kill and restart servers always use local binaries (`local_nats`, `local_redis`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from nexus_bus.embedded import ServerProcess, nats_server, redis_server


def docker_engine_answers() -> bool:
    """Whether a Docker engine responds (quickly); no engine means skip, not fail."""
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if host.startswith("unix://") and not Path(host[len("unix://") :]).exists():
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@contextlib.contextmanager
def nats_url(tmp: Path) -> Iterator[str]:
    """A NATS (JetStream) URL for the session."""
    if url := os.environ.get("NEXUS_TEST_NATS_URL"):
        yield url
        return
    if docker_engine_answers():
        from testcontainers.community.nats import NatsContainer

        with NatsContainer(jetstream=True) as container:  # type: ignore[call-arg]
            yield container.nats_uri()
        return
    with local(nats_server(tmp / "nats")) as server:
        yield server.url


@contextlib.contextmanager
def redis_url(tmp: Path) -> Iterator[str]:
    """A Redis URL for the session."""
    if url := os.environ.get("NEXUS_TEST_REDIS_URL"):
        yield url
        return
    if docker_engine_answers():
        from testcontainers.community.redis import RedisContainer

        with RedisContainer() as container:
            host = container.get_container_host_ip()
            yield f"redis://{host}:{container.get_exposed_port(6379)}/0"
        return
    with local(redis_server(tmp / "redis")) as server:
        yield server.url + "/0"


@contextlib.contextmanager
def local(server: ServerProcess) -> Iterator[ServerProcess]:
    """Start a local server process; kill it afterwards whatever happened."""
    server.start()
    try:
        yield server
    finally:
        server.kill()
