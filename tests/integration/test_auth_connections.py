"""Connection security: every NATS and Redis connection honours user/password, token, NKey and
TLS settings, against real servers configured to require them.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import nkeys
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nexus_bus import Gateway, Settings, Worker, load_settings
from nexus_bus.bus.connection import connect_nats
from nexus_bus.embedded import ServerProcess, free_port, nats_server, redis_server
from nexus_bus.errors import Unavailable
from nexus_bus.handlers import builtin_groups
from nexus_bus.redis_client import create_redis
from tests import servers
from tests.conftest import issue_test_token, shared_keys_dir


@dataclass(frozen=True)
class Pki:
    """A throwaway CA and a server certificate for 127.0.0.1, generated per test."""

    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    """A throwaway CA and a server certificate in the test's folder."""
    return make_pki(tmp_path)


def make_pki(tmp_path: Path) -> Pki:
    """A throwaway CA and a server certificate for 127.0.0.1 (also usable as a client's)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("nexus-test-ca")).issuer_name(_name("nexus-test-ca"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1")).issuer_name(ca.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Pki(tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server-key.pem")
    paths.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return paths


def _nats(tmp_path: Path, *args: str) -> Iterator[ServerProcess]:
    with servers.local(nats_server(tmp_path / "nats-secured", extra_args=list(args))) as server:
        yield server


def settings_for(nats: dict[str, object], redis: dict[str, object]) -> Settings:
    """Test settings (auth on, the session's key) with these connection sections."""
    return load_settings(
        nats=nats, redis=redis, log={"level": "WARNING"},
        auth={"keys_dir": str(shared_keys_dir())},
    )


def secured(url: str, redis_url: str, **nats: object) -> Settings:
    return settings_for(
        {"url": url, "connect_timeout_s": 1.0, "max_reconnect_attempts": 1, **nats},
        {"url": redis_url},
    )


async def assert_refused(settings: Settings) -> None:
    """No connection is made. (nats-py may retry a failed TLS handshake without end, so a
    refusal shows either as an error or as no connection within a few seconds.)"""
    with pytest.raises((Unavailable, TimeoutError)):
        nc = await asyncio.wait_for(connect_nats(settings.nats), 5)
        await nc.close()


async def serve_one_request(settings: Settings, uid: str) -> None:
    """A worker and a gateway on the secured connection: one real round trip."""
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    try:
        async with await Gateway.connect(settings, token=issue_test_token()) as gw:
            await gw.request("data", "put", {"key": f"sec-{uid}", "value": uid})
            assert (await gw.request("data", "get", {"key": f"sec-{uid}"}))["value"] == uid
    finally:
        await worker.drain(1)


async def test_nats_user_and_password(tmp_path: Path, redis_url: str, uid: str) -> None:
    for server in _nats(tmp_path, "--user", "nexus", "--pass", "s3cret-pw"):
        good = secured(server.url, redis_url, user="nexus", password="s3cret-pw")
        await serve_one_request(good, uid)
        await assert_refused(secured(server.url, redis_url, user="nexus", password="wrong"))
        await assert_refused(secured(server.url, redis_url))
        assert "s3cret-pw" not in repr(good) and "s3cret-pw" not in str(good.model_dump())


async def test_nats_token(tmp_path: Path, redis_url: str, uid: str) -> None:
    for server in _nats(tmp_path, "--auth", "nats-token-123"):
        await serve_one_request(secured(server.url, redis_url, token="nats-token-123"), uid)
        await assert_refused(secured(server.url, redis_url, token="other"))


async def test_nats_nkey(tmp_path: Path, redis_url: str, uid: str) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    seed_file = tmp_path / "user.nk"
    seed_file.write_bytes(seed)
    seed_file.chmod(0o600)
    conf = tmp_path / "nkey.conf"
    conf.write_text(f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}\n')
    for server in _nats(tmp_path, "-c", str(conf)):
        await serve_one_request(secured(server.url, redis_url, nkey_seed_file=str(seed_file)), uid)
        await assert_refused(secured(server.url, redis_url))


async def test_nats_tls(tmp_path: Path, redis_url: str, pki: Pki, uid: str) -> None:
    args = ["--tls", "--tlscert", str(pki.cert), "--tlskey", str(pki.key)]
    for server in _nats(tmp_path, *args):
        url = f"tls://127.0.0.1:{server.port}"
        await serve_one_request(secured(url, redis_url, tls={"ca_file": str(pki.ca)}), uid)
        await assert_refused(secured(url, redis_url))  # the system CAs do not know ours


async def test_redis_password(tmp_path: Path) -> None:
    with servers.local(redis_server(tmp_path / "r", extra_args=["--requirepass", "r3dis-pw"])) as r:
        good = settings_for({}, {"url": r.url + "/0", "password": "r3dis-pw"})
        client = create_redis(good.redis)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        bad = create_redis(settings_for({}, {"url": r.url + "/0"}).redis)
        try:
            with pytest.raises(Exception, match=r"(?i)auth"):
                await bad.ping()
        finally:
            await bad.aclose()


async def test_redis_tls(tmp_path: Path, pki: Pki) -> None:
    port = free_port()
    args = [
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(pki.cert),
        "--tls-key-file", str(pki.key), "--tls-ca-cert-file", str(pki.ca),
        "--tls-auth-clients", "no",
    ]
    server = redis_server(tmp_path / "rt", port, extra_args=args)
    try:
        server.start()
    except Unavailable as exc:
        if "tls" in str(exc).lower() and "not" in str(exc).lower():
            pytest.skip("this redis-server is built without TLS")
        raise
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        good = settings_for({}, {"url": url, "tls": {"ca_file": str(pki.ca)}})
        client = create_redis(good.redis)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
        plain = create_redis(settings_for({}, {"url": f"redis://127.0.0.1:{port}/0"}).redis)
        try:
            with pytest.raises(Exception):  # noqa: B017 - any failure: a plaintext client is refused
                await plain.ping()
        finally:
            await plain.aclose()
    finally:
        server.kill()
