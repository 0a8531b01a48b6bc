"""Discovery's pure parts: registration documents, durations, endpoint counters, the
registration task against an in-memory registry, and the Consul settings."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from nexus_bus.config import ConfigError, ConsulSettings, load_settings
from nexus_bus.discovery import (
    CheckStatus,
    ConsulRegistry,
    EndpointStats,
    Instance,
    NotRegistered,
    Registration,
    RegistrationState,
    RegistryUnavailable,
    ServiceRegistration,
    go_duration,
    shim_registration,
    worker_registrations,
)
from nexus_bus.discovery.documents import op_of
from nexus_bus.discovery.lifecycle import create_backoff
from nexus_bus.discovery.registry import read_token, split_address, worst
from tests.helpers import eventually


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(5, "5s"), (3.0, "3s"), (0.5, "500ms"), (60, "60s"), (0.0001, "1ms"), (1.25, "1250ms")],
)
def test_go_durations(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_negative_durations_are_refused() -> None:
    with pytest.raises(ValueError):
        go_duration(-1)


def test_the_default_shim_registration_checks_readyz_every_5s_with_a_3s_timeout() -> None:
    doc = shim_registration(
        ConsulSettings(),
        instance="h-8080",
        address="10.0.0.7",
        port=8080,
        version="0.1.0",
        ops=["data", "ai", "data"],
    ).to_consul()
    assert doc["Name"] == "nexus-shim" and doc["ID"] == "nexus-shim-h-8080"
    assert (doc["Address"], doc["Port"]) == ("10.0.0.7", 8080)
    assert doc["Meta"] == {"version": "0.1.0", "ops": "ai,data", "instance": "h-8080"}
    assert "nexus-bus" in doc["Tags"]
    assert doc["Check"] == {
        "CheckID": "service:nexus-shim-h-8080",
        "Name": "nexus-shim readiness",
        "HTTP": "http://10.0.0.7:8080/readyz",
        "Method": "GET",
        "Interval": "5s",
        "Timeout": "3s",
        "DeregisterCriticalServiceAfter": "60s",
    }


def test_an_ipv6_address_is_bracketed_in_the_check_url() -> None:
    registration = shim_registration(
        ConsulSettings(), instance="i", address="fd00::7", port=80, version="1.0.0", ops=[]
    )
    assert registration.check.http == "http://[fd00::7]:80/readyz"


def test_workers_register_one_service_per_op_group_with_a_ttl_check() -> None:
    settings = ConsulSettings(ttl_s=10, tags=["blue"])
    docs = [
        r.to_consul()
        for r in worker_registrations(
            settings,
            [("data", ["put", "get"]), ("ai", ["embed"])],
            instance="N1",
            address="10.0.0.8",
            version="0.1.0",
        )
    ]
    assert [d["Name"] for d in docs] == ["nexus-data", "nexus-ai"]
    data = docs[0]
    assert data["ID"] == "nexus-data-N1" and "Port" not in data
    assert data["Meta"] == {
        "version": "0.1.0",
        "queue_group": "nexus.data",
        "actions": "get,put",
        "instance": "N1",
    }
    assert data["Tags"] == ["nexus-bus", "nats", "blue"]
    assert data["Check"] == {
        "CheckID": "service:nexus-data-N1",
        "Name": "nexus-data worker alive",
        "TTL": "10s",
        "DeregisterCriticalServiceAfter": "60s",
    }


def test_op_of_service_names() -> None:
    assert (op_of("nexus-data"), op_of("nexus-shim"), op_of("consul")) == ("data", None, None)


def test_endpoint_stats_count_requests_errors_and_time() -> None:
    stats = EndpointStats([("data", ["get", "put"])])
    stats.record("data", "get", 100)
    stats.record_reply("data", "get", 300, 200, {})
    stats.record_reply(
        "data",
        "put",
        50,
        409,
        {
            "Nats-Service-Error-Code": "409",
            "Nats-Service-Error": "revision mismatch",
        },
    )
    stats.record("data", "nope", 10)  # not an endpoint: not counted
    stats.record("other", "get", 10)
    get, put = stats.of("data")["get"], stats.of("data")["put"]
    assert (get.requests, get.errors, get.processing_ns, get.average_ns) == (2, 0, 400, 200)
    assert (put.requests, put.errors, put.last_error) == (1, 1, "409:revision mismatch")
    total = stats.totals("data")
    assert (total.requests, total.errors) == (3, 1)
    stats.reset()
    assert stats.totals("data").requests == 0 and stats.of("other") == {}


@pytest.mark.parametrize(
    ("address", "parts"),
    [
        ("http://127.0.0.1:8500", ("http", "127.0.0.1", 8500)),
        ("consul:8500", ("http", "consul", 8500)),
        ("https://consul.example", ("https", "consul.example", 8501)),
        ("http://[::1]:9500/", ("http", "::1", 9500)),
    ],
)
def test_consul_addresses(address: str, parts: tuple[str, str, int]) -> None:
    assert split_address(address) == parts


@pytest.mark.parametrize("address", ["ftp://x:1", "http://:8500"])
def test_bad_consul_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        split_address(address)


def test_the_token_comes_from_a_file_and_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    assert read_token(ConsulSettings(token_file=path)) == "s3cret-token"
    assert read_token(ConsulSettings()) is None
    inline = ConsulSettings(token="s3cret-token")
    assert read_token(inline) == "s3cret-token"
    assert "s3cret" not in repr(inline) and "s3cret" not in str(inline.model_dump())
    with pytest.raises(ConfigError, match="token_file"):
        read_token(ConsulSettings(token_file=tmp_path / "missing"))


def test_a_bad_consul_address_fails_when_the_client_is_made() -> None:
    with pytest.raises(ConfigError, match=r"consul\.address"):
        ConsulRegistry(ConsulSettings(address="http://consul:notaport"))


def test_consul_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().consul.enabled is False  # off unless asked for
    monkeypatch.setenv("NEXUS_CONSUL__ENABLED", "true")
    monkeypatch.setenv("NEXUS_CONSUL__ADDRESS", "http://consul:8500")
    monkeypatch.setenv("NEXUS_CONSUL__TOKEN", "t")
    settings = load_settings().consul
    assert settings.enabled and settings.address == "http://consul:8500"
    assert (settings.check_interval_s, settings.check_timeout_s) == (5.0, 3.0)
    monkeypatch.setenv("NEXUS_CONSUL__TOKEN_FILE", "/run/secrets/consul")
    with pytest.raises(ConfigError, match="token or token_file"):
        load_settings()


def test_a_check_timeout_longer_than_its_interval_is_refused() -> None:
    with pytest.raises(ConfigError, match="check_timeout_s"):
        load_settings(consul={"check_interval_s": 1, "check_timeout_s": 2})


def test_worst_status() -> None:
    assert worst([]) is CheckStatus.PASSING
    assert worst(["passing", "warning"]) is CheckStatus.WARNING
    assert worst(["passing", "bogus"]) is CheckStatus.CRITICAL


class MemoryRegistry:
    """An in-memory `ServiceRegistry` twin: fails the first `down` calls, then works."""

    def __init__(self, down: int = 0) -> None:
        self.down = down
        self.calls: list[str] = []
        self.services: dict[str, ServiceRegistration] = {}
        self.checks: dict[str, tuple[CheckStatus, str]] = {}

    def _maybe_fail(self, what: str) -> None:
        self.calls.append(what)
        if self.down > 0:
            self.down -= 1
            raise RegistryUnavailable("agent down")

    async def register(self, registration: ServiceRegistration) -> None:
        self._maybe_fail("register")
        self.services[registration.service_id] = registration

    async def deregister(self, service_id: str) -> None:
        self._maybe_fail("deregister")
        self.services.pop(service_id, None)

    async def update_check(self, check_id: str, status: CheckStatus, note: str = "") -> None:
        self._maybe_fail("update")
        if not any(r.check.check_id == check_id for r in self.services.values()):
            raise NotRegistered(check_id)
        self.checks[check_id] = (status, note)

    async def local_ids(self) -> set[str]:
        self._maybe_fail("services")
        return set(self.services)

    async def service_names(self) -> list[str]:
        return sorted({r.name for r in self.services.values()})

    async def instances(self, name: str) -> list[Instance]:
        return []

    async def close(self) -> None:
        return None


def registrations() -> list[ServiceRegistration]:
    return worker_registrations(
        ConsulSettings(), [("data", ["get"])], instance="I", address="a", version="1.0.0"
    )


async def wait_for_state(registration: Registration, state: RegistrationState) -> None:
    async with asyncio.timeout(5):
        while registration.state is not state:
            registration.changed.clear()
            await registration.changed.wait()


async def test_registration_retries_until_the_registry_answers_then_passes_ttls() -> None:
    registry = MemoryRegistry(down=3)
    registration = Registration(
        registry,
        registrations(),
        health=None,
        heartbeat_s=0.01,
        backoff=create_backoff(0.001, 0.002),
        rng=random.Random(1),
    )
    registration.start()
    await wait_for_state(registration, RegistrationState.REGISTERED)
    assert registry.calls[:4] == ["register"] * 4
    await eventually(lambda: "service:nexus-data-I" in registry.checks, "a TTL update")
    assert registry.checks["service:nexus-data-I"] == (CheckStatus.PASSING, "")
    await registration.stop(1)
    assert registry.services == {} and registration.state is RegistrationState.DEREGISTERED


async def test_an_unhealthy_process_fails_its_ttl_with_the_reason() -> None:
    registry = MemoryRegistry()

    async def health() -> str | None:
        return "NATS disconnected"

    registration = Registration(
        registry,
        registrations(),
        health=health,
        heartbeat_s=0.01,
        backoff=create_backoff(0.001, 0.002),
    )
    registration.start()
    await eventually(lambda: "service:nexus-data-I" in registry.checks, "a TTL update")
    assert registry.checks["service:nexus-data-I"] == (CheckStatus.CRITICAL, "NATS disconnected")
    await registration.stop(1)


async def test_a_forgotten_registration_is_registered_again() -> None:
    registry = MemoryRegistry()
    registration = Registration(
        registry, registrations(), heartbeat_s=0.01, backoff=create_backoff(0.001, 0.002)
    )
    registration.start()
    await wait_for_state(registration, RegistrationState.REGISTERED)
    registry.services.clear()  # the agent restarted without its state
    await eventually(lambda: bool(registry.services), "registered again")
    assert registry.calls.count("register") == 2
    await registration.stop(1)


async def test_stop_gives_up_on_an_unreachable_registry_within_its_timeout() -> None:
    registry = MemoryRegistry(down=10**6)
    registration = Registration(
        registry, registrations(), heartbeat_s=0.01, backoff=create_backoff(0.001, 0.002)
    )
    registration.start()
    await wait_for_state(registration, RegistrationState.UNREACHABLE)
    async with asyncio.timeout(2):
        await registration.stop(0.5)
    assert registration.state is RegistrationState.UNREACHABLE


def test_the_inventory_joins_srv_and_consul_by_instance() -> None:
    from nexus_bus.discovery.inventory import merge, missing_ops, render_table, rows_from_srv

    srv = rows_from_srv(
        [
            {
                "name": "nexus-data",
                "id": "W1",
                "version": "0.1.0",
                "metadata": {"address": "10.0.0.8"},
                "endpoints": [
                    {"num_requests": 3, "num_errors": 1},
                    {"num_requests": 2, "num_errors": 0},
                ],
            },
            {"name": "nexus-ai", "id": "W1", "version": "0.1.0", "endpoints": []},
            {"name": "somebody-else", "id": "X", "version": "1.0.0", "endpoints": []},
        ]
    )
    consul = [
        Instance(
            name="nexus-data",
            service_id="nexus-data-W1",
            address="10.0.0.8",
            port=0,
            status=CheckStatus.CRITICAL,
            meta={"instance": "W1"},
        ),
        Instance(
            name="nexus-shim",
            service_id="nexus-shim-h-80",
            address="10.0.0.9",
            port=80,
            status=CheckStatus.PASSING,
            meta={"instance": "h-80", "version": "0.1.0"},
        ),
    ]
    rows = merge(srv, consul)
    assert [(r.service, r.instance, r.health) for r in rows] == [
        ("nexus-shim", "h-80", "passing"),
        ("nexus-ai", "W1", "answering"),
        ("nexus-data", "W1", "critical"),
    ]
    data = rows[2]
    assert (data.requests, data.errors, data.sources) == (5, 1, ("$SRV", "consul"))
    assert rows[0].address == "10.0.0.9:80" and rows[0].requests is None
    assert missing_ops(rows, ["ai", "data", "stream"]) == ["data", "stream"]
    table = render_table(rows).splitlines()
    assert table[0].split() == [
        "service",
        "op",
        "instance",
        "address",
        "version",
        "health",
        "requests",
        "errors",
    ]
    expected = ["nexus-data", "data", "W1", "10.0.0.8", "0.1.0", "critical", "5", "1"]
    assert table[3].split() == expected


class SwallowingRegistry(MemoryRegistry):
    """Loses the first cancel while updating a check, as asyncio.wait_for can on 3.11."""

    def __init__(self) -> None:
        super().__init__()
        self.swallowed = 0

    async def update_check(self, check_id: str, status: CheckStatus, note: str = "") -> None:
        if self.swallowed == 0:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                self.swallowed += 1
        await super().update_check(check_id, status, note)


async def test_stop_ends_a_task_that_lost_a_cancel_and_never_registers_again() -> None:
    registry = SwallowingRegistry()
    registration = Registration(
        registry, registrations(), heartbeat_s=0.01, backoff=create_backoff(0.001, 0.002)
    )
    registration.start()
    await wait_for_state(registration, RegistrationState.REGISTERED)
    await asyncio.sleep(0.05)  # inside the update that swallows the cancel
    stopping = asyncio.create_task(registration.stop(1))
    done, _ = await asyncio.wait({stopping}, timeout=1.0)
    stopping.cancel()
    assert stopping in done, "stop() hung on the task that lost its cancel"
    assert registry.swallowed == 1
    assert registry.services == {} and registration.state is RegistrationState.DEREGISTERED
    await asyncio.sleep(0.1)
    assert registry.services == {} and registry.calls.count("register") == 1
