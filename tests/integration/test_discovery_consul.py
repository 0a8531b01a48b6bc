"""Consul registration of real shim and worker processes, against the Consul agent double.

The double (tests/consul_double.py) is a real HTTP server speaking the agent API; it runs the
registered HTTP check against the real shim at the registered interval and timeout, and
expires TTL checks the real worker stops passing. Intervals here come from settings (short,
to stay fast); the defaults (5 s / 3 s) are asserted on the registration document.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest

from nexus_bus import RequestContext, Settings, Worker
from nexus_bus.discovery import RegistrationState
from nexus_bus.discovery.registry import ConsulRegistry
from nexus_bus.embedded import ServerProcess, free_port
from nexus_bus.observability import logger
from nexus_bus.specs.base import package_version
from tests.conftest import issue_test_token
from tests.consul_double import ConsulAgentDouble
from tests.helpers import eventually
from tests.integration.discovery_ops import Note, discovery_ops
from tests.integration.http_shim import bearer, running_shim
from tests.integration.test_auth_connections import Pki, make_pki

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def consul() -> Iterator[ConsulAgentDouble]:
    """A fresh agent double per test."""
    with ConsulAgentDouble() as double:
        yield double


def child_env(
    settings: Settings, redis_url: str, consul_address: str, **extra: str
) -> dict[str, str]:
    """The environment of a shim or worker process registering with the agent at an address."""
    return {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": redis_url,
        "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir),
        "NEXUS_LOG__LEVEL": "WARNING",
        "NEXUS_HTTP__DRAIN_DELAY_S": "0",
        "NEXUS_CONSUL__ENABLED": "true",
        "NEXUS_CONSUL__ADDRESS": consul_address,
        **extra,
    }


@contextlib.contextmanager
def process(args: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m nexus_bus <args>`, killed afterwards whatever happened."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_bus", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
        proc.wait(10)


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> int:
    await eventually(lambda: proc.poll() is not None, "process exit", timeout_s, poll_s=0.05)
    return proc.returncode


def shim_service_id(port: int) -> str:
    host = "".join(c if c.isalnum() or c in "-_" else "-" for c in socket.gethostname())
    return f"nexus-shim-{host}-{port}"


async def test_shim_http_check_runs_at_its_interval_and_timeout_and_sigterm_deregisters(
    settings: Settings, local_redis: ServerProcess, consul: ConsulAgentDouble
) -> None:
    port = free_port()
    env = child_env(
        settings,
        local_redis.url + "/0",
        consul.address,
        NEXUS_CONSUL__CHECK_INTERVAL_S="0.4",
        NEXUS_CONSUL__CHECK_TIMEOUT_S="0.3",
    )
    service_id = shim_service_id(port)
    with process(["shim", "--port", str(port)], env) as proc:
        await eventually(lambda: service_id in consul.service_ids(), "registration", 30, 0.05)
        service = consul.services[service_id]
        assert (service["Service"], service["Port"], service["Address"]) == (
            "nexus-shim",
            port,
            "127.0.0.1",
        )
        assert "nexus-bus" in service["Tags"]
        assert service["Meta"]["version"] == package_version()
        assert service["Meta"]["ops"] == "ai,auth,data,stream"
        check = consul.check_of(service_id)
        assert check is not None and check.kind == "http"
        assert check.http == f"http://127.0.0.1:{port}/readyz"
        assert (check.interval_text, check.timeout_text) == ("400ms", "300ms")
        assert check.deregister_after == 60

        await eventually(
            lambda: len(consul.runs_of(check.check_id)) >= 4 and check.status == "passing",
            "four check runs, passing",
            10,
            0.05,
        )
        runs = consul.runs_of(check.check_id)
        gaps = [b.started - (a.started + a.elapsed) for a, b in itertools.pairwise(runs)]
        assert all(0.38 <= gap < 0.4 + 0.6 for gap in gaps), gaps  # the interval, not ours
        assert all(r.timeout == 0.3 and r.http_status == 200 for r in runs[1:])

        # A shim that does not answer: the run gives up after the registered timeout.
        proc.send_signal(signal.SIGSTOP)
        try:
            await eventually(lambda: check.status == "critical", "critical while stopped", 5)
            stalled = [r for r in consul.runs_of(check.check_id) if r.http_status is None]
            assert stalled and 0.28 <= stalled[-1].elapsed < 1.0, stalled
        finally:
            proc.send_signal(signal.SIGCONT)
        await eventually(lambda: check.status == "passing", "passing again", 5)

        # /readyz failing (Redis gone): 503, critical.
        local_redis.kill()
        await eventually(
            lambda: (
                check.status == "critical" and consul.runs_of(check.check_id)[-1].http_status == 503
            ),
            "critical on 503",
            5,
        )

        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 20) == 0
        assert service_id not in consul.service_ids()
        assert ("PUT", f"/v1/agent/service/deregister/{service_id}", None) in consul.requests


async def test_default_registration_is_5s_3s_and_its_first_run_hits_readyz(
    settings: Settings, worker: Worker, consul: ConsulAgentDouble
) -> None:
    configured = settings.model_copy(
        update={
            "consul": settings.consul.model_copy(
                update={"enabled": True, "address": consul.address}
            )
        }
    )
    async with running_shim(configured) as shim:
        port = int(shim.url.rsplit(":", 1)[1])
        service_id = shim_service_id(port)
        await eventually(lambda: service_id in consul.service_ids(), "registration", 10)
        check = consul.check_of(service_id)
        assert check is not None
        assert (check.interval_text, check.timeout_text) == ("5s", "3s")
        assert (check.interval, check.timeout) == (5.0, 3.0)
        await eventually(lambda: check.status == "passing", "first run passing", 5)
        assert consul.runs_of(check.check_id)[0].timeout == 3.0
    assert service_id not in consul.service_ids()  # the shim deregisters on shutdown


async def test_worker_ttl_passes_lapses_when_stopped_and_sigterm_deregisters(
    settings: Settings, consul: ConsulAgentDouble
) -> None:
    env = child_env(settings, settings.redis.url, consul.address, NEXUS_CONSUL__TTL_S="0.9")
    with process(["worker", "--ops", "data,stream"], env) as proc:
        await eventually(lambda: len(consul.service_ids()) == 2, "two registrations", 30, 0.05)
        by_name = {s["Service"]: s for s in consul.services.values()}
        assert set(by_name) == {"nexus-data", "nexus-stream"}
        data = by_name["nexus-data"]
        assert data["Meta"]["queue_group"] == "nexus.data"
        assert data["Meta"]["actions"] == "delete,get,list,put"
        instance = data["Meta"]["instance"]
        assert by_name["nexus-stream"]["Meta"]["instance"] == instance
        assert data["ID"] == f"nexus-data-{instance}"
        check = consul.check_of(data["ID"])
        assert check is not None and check.kind == "ttl" and check.ttl == 0.9

        nc = await nats.connect(settings.nats.url)
        try:  # the same instance answers $SRV under the same id
            answer = await nc.request(f"$SRV.PING.nexus-data.{instance}", b"", timeout=2)
            assert json.loads(answer.data)["name"] == "nexus-data"
        finally:
            await nc.close()

        await eventually(lambda: check.status == "passing", "TTL passed", 5)
        proc.send_signal(signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            await eventually(lambda: check.status == "critical", "TTL lapsed", 5)
            assert time.monotonic() - stopped < 0.9 + 1.0
            assert check.output == "TTL expired"
        finally:
            proc.send_signal(signal.SIGCONT)
        await eventually(lambda: check.status == "passing", "passing after SIGCONT", 5)

        proc.send_signal(signal.SIGTERM)
        assert await wait_exit(proc, 20) == 0
        assert consul.service_ids() == set()
        deregistered = {p for m, p, _ in consul.requests if "/deregister/" in p}
        assert deregistered == {f"/v1/agent/service/deregister/{s['ID']}" for s in by_name.values()}


@contextlib.contextmanager
def blackhole() -> Iterator[str]:
    """An address that accepts connections and never answers (a hung agent)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    try:
        yield f"http://127.0.0.1:{server.getsockname()[1]}"
    finally:
        server.close()


@contextlib.asynccontextmanager
async def consul_worker(
    settings: Settings, address: str, op: str, **consul: Any
) -> AsyncIterator[Worker]:
    values = {"enabled": True, "address": address, **consul}
    configured = settings.model_copy(update={"consul": settings.consul.model_copy(update=values)})
    worker = Worker(configured, [discovery_ops(op)])
    started = time.monotonic()
    await worker.start()
    assert time.monotonic() - started < 3  # never waits for Consul
    try:
        yield worker
    finally:
        await worker.drain(1)


async def test_a_hung_agent_at_start_never_delays_a_request(
    settings: Settings, worker: Worker, uid: str
) -> None:
    op = f"hang{uid}"
    with blackhole() as address:
        # A call to this agent hangs 2 s; a request that waited on one would show it.
        consul = {"request_timeout_s": 2.0, "retry_base_s": 0.1, "retry_max_s": 0.2}
        async with consul_worker(settings, address, op, **consul) as w:
            shim_settings = settings.model_copy(
                update={
                    "consul": settings.consul.model_copy(
                        update={"enabled": True, "address": address}
                    )
                }
            )
            async with running_shim(shim_settings, groups=[discovery_ops(op)]) as shim:
                headers = bearer(issue_test_token())
                async with httpx.AsyncClient(base_url=shim.url, headers=headers) as client:
                    for _ in range(10):
                        began = time.monotonic()
                        answer = await client.post(f"/v1/{op}/ok", json={"note": "n"})
                        assert answer.status_code == 200
                        assert (await client.get("/readyz")).status_code == 200
                        assert time.monotonic() - began < 1.0
                        await asyncio.sleep(0.1)
                assert w.discovery is not None and w.discovery.registration is not None
                registration = w.discovery.registration
                await eventually(
                    lambda: registration.state is RegistrationState.UNREACHABLE,
                    "unreachable",
                    8,
                )


async def test_registers_once_the_agent_comes_back_logging_each_change_once(
    settings: Settings, uid: str
) -> None:
    port = free_port()  # nothing listens: connection refused
    lines: list[str] = []

    def sink(message: Any) -> None:
        lines.append(message.record["message"])

    sink_id = logger.add(sink, level="INFO", filter=lambda r: "consul" in r["message"])
    try:
        consul = {"retry_base_s": 0.05, "retry_max_s": 0.1}
        async with consul_worker(settings, f"http://127.0.0.1:{port}", f"back{uid}", **consul) as w:
            assert w.discovery is not None and w.discovery.registration is not None
            registration = w.discovery.registration
            await eventually(
                lambda: registration.state is RegistrationState.UNREACHABLE, "unreachable", 5
            )
            await asyncio.sleep(0.5)  # several more attempts fail meanwhile
            with ConsulAgentDouble(port) as double:
                await eventually(
                    lambda: (
                        double.service_ids() == {f"nexus-back{uid}-{w.discovery.instance}"}
                        if w.discovery
                        else False
                    ),
                    "registered after the agent came back",
                    5,
                )
                await eventually(
                    lambda: registration.state is RegistrationState.REGISTERED, "registered", 5
                )
                attempts = [p for _, p, _ in double.requests if p.endswith("/register")]
                assert len(attempts) == 1
    finally:
        logger.remove(sink_id)
    unreachable = [line for line in lines if "unreachable" in line]
    registered = [line for line in lines if "registered" in line and "deregistered" not in line]
    assert len(unreachable) == 1, lines
    assert len(registered) == 1, lines


async def test_the_acl_token_from_a_file_is_sent_and_never_logged(
    settings: Settings, uid: str, tmp_path: Path
) -> None:
    secret = f"acl-{uid}-secret"
    token_file = tmp_path / "consul-token"
    token_file.write_text(secret + "\n")
    lines: list[str] = []
    sink_id = logger.add(lambda m: lines.append(str(m)), level="DEBUG")
    try:
        with ConsulAgentDouble(acl_token=secret) as double:
            async with consul_worker(
                settings, double.address, f"acl{uid}", token_file=token_file
            ) as w:
                assert w.discovery is not None
                await eventually(lambda: len(double.service_ids()) == 1, "registered", 10)
                assert {token for _, _, token in double.requests} == {secret}
        with ConsulAgentDouble(acl_token="another-token") as refusing:
            async with consul_worker(
                settings, refusing.address, f"acl{uid}", token_file=token_file
            ) as w:
                assert w.discovery is not None and w.discovery.registration is not None
                registration = w.discovery.registration
                await eventually(
                    lambda: registration.state is RegistrationState.UNREACHABLE, "refused", 10
                )
    finally:
        logger.remove(sink_id)
    assert any("Permission denied" in line for line in lines), lines
    assert not any(secret in line for line in lines)


async def test_a_shim_the_agent_forgot_registers_again(
    settings: Settings, consul: ConsulAgentDouble
) -> None:
    # An agent restarted without its state, or one that reaped the shim after its check was
    # critical for DeregisterCriticalServiceAfter (Redis down a minute): the shim has no TTL
    # to pass, so nothing told it; it must notice and register again.
    port = free_port()
    values = {"enabled": True, "address": consul.address, "ttl_s": 0.6}
    consul_settings = settings.consul.model_copy(update=values)
    shim_settings = settings.model_copy(update={"consul": consul_settings})
    service_id = shim_service_id(port)
    async with running_shim(shim_settings, port=port):
        await eventually(lambda: service_id in consul.service_ids(), "registration", 10, 0.05)
        consul.forget(service_id)
        await eventually(lambda: service_id in consul.service_ids(), "registered again", 5, 0.05)


async def test_a_rotated_token_file_is_read_again(
    settings: Settings, uid: str, tmp_path: Path
) -> None:
    # A mounted secret (Kubernetes, Vault agent) is rewritten in place when the token rotates,
    # and the old token is revoked: the registration must pick up the new one.
    token_file = tmp_path / "consul-token"
    token_file.write_text("old-token\n")
    consul = {"token_file": token_file, "ttl_s": 0.6, "retry_base_s": 0.05, "retry_max_s": 0.1}
    with ConsulAgentDouble(acl_token="old-token") as double:
        async with consul_worker(settings, double.address, f"rot{uid}", **consul) as w:
            assert w.discovery is not None and w.discovery.registration is not None
            registration = w.discovery.registration
            await eventually(
                lambda: registration.state is RegistrationState.REGISTERED, "registered", 10
            )
            token_file.write_text("new-token\n")
            double.acl_token = "new-token"
            await eventually(
                lambda: any(token == "new-token" for _, _, token in double.requests[-3:]),
                "calls with the new token",
                5,
            )
            await eventually(
                lambda: registration.state is RegistrationState.REGISTERED, "registered", 5
            )
            assert double.requests[-1][2] == "new-token"


async def test_an_op_with_many_actions_registers_within_consuls_meta_limits(
    settings: Settings, consul: ConsulAgentDouble, uid: str
) -> None:
    # Consul refuses a meta value over 512 characters (400 Invalid Service Meta): an op of
    # 40 actions was never registered, its worker retrying forever as "consul unreachable".
    op = f"wide{uid}"
    ops = discovery_ops(op)
    for n in range(40):

        @ops.action(f"an_action_with_a_long_name_{n:02}", public=True)
        async def handler(req: Note, ctx: RequestContext) -> Note:
            """Echo."""
            return req

    values = {"enabled": True, "address": consul.address}
    consul_settings = settings.consul.model_copy(update=values)
    worker = Worker(settings.model_copy(update={"consul": consul_settings}), [ops])
    await worker.start()
    try:
        assert worker.discovery is not None and worker.discovery.registration is not None
        registration = worker.discovery.registration
        await eventually(
            lambda: registration.state is RegistrationState.REGISTERED, "registered", 10
        )
        service = consul.services[f"nexus-{op}-{worker.discovery.instance}"]
        actions = service["Meta"]["actions"]
        assert len(actions) <= 512 and actions.startswith("an_action_with_a_long_name_00,")
        assert actions.endswith(" more")
    finally:
        await worker.drain(1)


def routed_address() -> str | None:
    """This host's address on its default route, or None (no route: nothing to compare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 9))  # picks a route; sends nothing
        except OSError:
            return None
        return str(probe.getsockname()[0])


async def test_a_shim_on_every_interface_never_registers_a_loopback_address(
    settings: Settings, consul: ConsulAgentDouble
) -> None:
    # Debian and Ubuntu map the host name to 127.0.1.1 in /etc/hosts (this machine: to
    # 127.0.0.1): a shim on 0.0.0.0 registered that, and Consul's DNS handed other hosts a
    # loopback address for it.
    routed = routed_address()
    if routed is None or ipaddress.ip_address(routed).is_loopback:
        pytest.skip("this host has no address besides loopback")
    port = free_port()
    consul_settings = settings.consul.model_copy(
        update={"enabled": True, "address": consul.address}
    )
    shim_settings = settings.model_copy(update={"consul": consul_settings})
    service_id = shim_service_id(port)
    async with running_shim(shim_settings, host="0.0.0.0", port=port):
        await eventually(lambda: service_id in consul.service_ids(), "registration", 10, 0.05)
        address = consul.services[service_id]["Address"]
        assert not ipaddress.ip_address(address).is_loopback, address
        assert address == routed
        check = consul.check_of(service_id)
        assert check is not None
        await eventually(lambda: check.status == "passing", "the check passing", 15, 0.05)


def agent_tls(pki: Pki, *, client_certs: bool) -> ssl.SSLContext:
    """The agent's HTTPS: the test CA's server certificate; maybe requiring a client's."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.cert, pki.key)
    if client_certs:
        context.load_verify_locations(pki.ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@pytest.mark.parametrize("mode", ["verify off", "client certificate in one file"])
async def test_consul_tls_settings_reach_an_https_agent(
    settings: Settings, tmp_path: Path, uid: str, mode: str
) -> None:
    """docs/discovery.md: any of the tls settings switches to https. Before: `verify = false`
    alone left the address's http (spoken to the agent's TLS port, never registered), and a
    cert_file holding the key too (no key_file) was dropped without a word (the handshake
    refused), both retried forever as 'consul unreachable'."""
    pki = make_pki(tmp_path)
    if mode == "verify off":
        tls = {"verify": False}
        context = agent_tls(pki, client_certs=False)
    else:
        both = tmp_path / "client.pem"
        both.write_bytes(pki.cert.read_bytes() + pki.key.read_bytes())
        tls = {"ca_file": pki.ca, "cert_file": both}
        context = agent_tls(pki, client_certs=True)
    with ConsulAgentDouble(tls=context) as double:
        consul_tls = settings.consul.tls.model_copy(update=tls)
        async with consul_worker(
            settings, f"http://127.0.0.1:{double.port}", f"tls{uid}", tls=consul_tls
        ) as w:
            assert w.discovery is not None and w.discovery.registration is not None
            registration = w.discovery.registration
            await eventually(
                lambda: registration.state is RegistrationState.REGISTERED, "registered", 10
            )


async def test_an_unexpected_failure_does_not_end_the_registration_loop(
    settings: Settings, uid: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure the adapter does not map (a library's bug, an agent that is not Consul)
    ended the background loop without a word: the process never registered. Now it is
    logged with its traceback and retried."""
    register = ConsulRegistry.register
    failures = iter([RuntimeError("a library's bug")])

    async def once_broken(self: ConsulRegistry, registration: Any) -> None:
        if (failure := next(failures, None)) is not None:
            raise failure
        await register(self, registration)

    monkeypatch.setattr(ConsulRegistry, "register", once_broken)
    errors: list[str] = []
    sink_id = logger.add(lambda m: errors.append(str(m)), level="ERROR")
    port = free_port()
    try:
        with ConsulAgentDouble(port) as double:
            consul = {"retry_base_s": 0.05, "retry_max_s": 0.1}
            async with consul_worker(
                settings, f"http://127.0.0.1:{port}", f"odd{uid}", **consul
            ) as w:
                assert w.discovery is not None and w.discovery.registration is not None
                registration = w.discovery.registration
                await eventually(
                    lambda: registration.state is RegistrationState.REGISTERED, "registered", 5
                )
                assert len(double.service_ids()) == 1
    finally:
        logger.remove(sink_id)
    assert any("failed unexpectedly" in e and "a library's bug" in e for e in errors), errors
