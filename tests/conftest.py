"""Shared fixtures: real NATS and Redis, settings, a running worker and a gateway client."""

from __future__ import annotations

import asyncio
import atexit
import functools
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import nats
import nats.aio.client
import pytest

from nexus_bus import Gateway, Settings, Worker, load_settings
from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.bus.connection import connect_nats
from nexus_bus.embedded import ServerProcess, nats_server, redis_server
from nexus_bus.handlers import builtin_groups
from nexus_bus.observability import configure_logging
from nexus_bus.services import Services, close_services, create_services
from tests import servers
from tests.helpers import task_stacks


@pytest.fixture(scope="session", autouse=True)
def _logging() -> None:
    configure_logging("nexus-test", "WARNING", json_lines=False)


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A shared NATS server with JetStream for the whole session."""
    with servers.nats_url(tmp_path_factory.mktemp("nats")) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A shared Redis server for the whole session."""
    with servers.redis_url(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def local_nats(tmp_path: Path) -> Iterator[ServerProcess]:
    """A NATS server of this test's own, which the test may kill and restart."""
    with servers.local(nats_server(tmp_path / "nats")) as server:
        yield server


SMALL_MAX_PAYLOAD = 64 * 1024


@pytest.fixture
def small_nats(tmp_path: Path) -> Iterator[ServerProcess]:
    """A NATS server of this test's own whose max_payload is 64 KiB: messages at the limit
    stay small, and a connection the server closes over one is not a shared one."""
    config = tmp_path / "small-payload.conf"
    config.write_text(f"max_payload: {SMALL_MAX_PAYLOAD}\n")
    with servers.local(nats_server(tmp_path / "nats", extra_args=["-c", str(config)])) as server:
        yield server


@pytest.fixture
def local_redis(tmp_path: Path) -> Iterator[ServerProcess]:
    """A Redis server of this test's own, which the test may kill and restart."""
    with servers.local(redis_server(tmp_path / "redis")) as server:
        yield server


@functools.cache
def shared_keys_dir() -> Path:
    """A signing key for the whole test run, generated into a temp dir (never a fixed key)."""
    path = Path(tempfile.mkdtemp(prefix="nexus-test-keys-"))
    atexit.register(shutil.rmtree, path, True)
    generate_key(path, kid="test-k1")
    return path


def issue_test_token(
    scopes: tuple[str, ...] = ("*",), *, subject: str = "test-admin", ttl_s: int = 24 * 3600
) -> str:
    """A token signed with the test key, as `nexus-bus token issue` would make it."""
    codec = TokenCodec(Keyring.from_dir(shared_keys_dir()))
    return codec.issue(
        subject, frozenset(scopes), ttl_s, now=int(time.time()), jti=uuid.uuid4().hex
    ).token


def make_settings(nats: str, redis: str | None = None, **overrides: object) -> Settings:
    """Test settings pointing at the given servers, enforcing auth with the test key."""
    auth: dict[str, object] = {"keys_dir": str(shared_keys_dir())}
    extra_auth = overrides.pop("auth", None)
    if isinstance(extra_auth, dict):
        auth.update(extra_auth)
    values: dict[str, object] = {"nats": {"url": nats}, "log": {"level": "WARNING"}, "auth": auth}
    if redis:
        values["redis"] = {"url": redis}
    values.update(overrides)
    return load_settings(**values)


async def bounded_teardown(step: Awaitable[None], what: str, seconds: float = 20.0) -> None:
    """Await a session fixture's teardown step; past `seconds`, print every asyncio task's
    stack (pytest-timeout shows only threads, and the loop is one of them) and fail."""
    try:
        async with asyncio.timeout(seconds):
            await step
    except TimeoutError:
        print(f"\n{what} took over {seconds} s; asyncio tasks:", file=sys.stderr)
        print(task_stacks(), file=sys.stderr)
        raise


@pytest.fixture(scope="session")
def settings(nats_url: str, redis_url: str) -> Settings:
    """Settings for the shared servers."""
    return make_settings(nats_url, redis_url)


@pytest.fixture(scope="session")
async def worker(settings: Settings) -> AsyncIterator[Worker]:
    """A worker serving every built-in op on the shared NATS."""
    w = Worker(settings, builtin_groups())
    await w.start()
    yield w
    await bounded_teardown(w.drain(1), "the session worker's drain")


@pytest.fixture(scope="session")
def admin_token() -> str | None:
    """A token with every scope (`*`), signed with the session's test key."""
    return issue_test_token()


@pytest.fixture(scope="session")
async def gateway(
    settings: Settings, worker: Worker, admin_token: str | None
) -> AsyncIterator[Gateway]:
    """A gateway client on its own connection, sending `admin_token` by default."""
    gw = await Gateway.connect(settings, token=admin_token)
    yield gw
    await bounded_teardown(gw.close(), "the session gateway's close")


@pytest.fixture
async def nats_pair(nats_url: str) -> AsyncIterator[tuple[nats.aio.client.Client, ...]]:
    """Two plain nats-py connections: one to serve on, one to call from."""
    server_side, client = await nats.connect(nats_url), await nats.connect(nats_url)
    yield server_side, client
    await server_side.close()
    await client.close()


@pytest.fixture
def uid() -> str:
    """A unique token for isolating keys, topics and subjects per test."""
    return uuid.uuid4().hex[:12]


@asynccontextmanager
async def open_services(settings: Settings) -> AsyncIterator[Services]:
    """What one worker process builds: its own NATS connection, Redis client and cache."""
    nc = await connect_nats(settings.nats)
    services = await create_services(nc, settings)
    try:
        yield services
    finally:
        await close_services(services)
        await nc.drain()
