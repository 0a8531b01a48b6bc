"""Authentication on the plain-NATS path: real nats-server, real redis-server, real workers.

Requests go straight onto `nexus.*` with nats-py (no gateway), as a NATS client in any
language would send them, so the worker alone is the boundary under test.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.js.api import StorageType

from nexus_bus import Gateway, InvalidToken, Operations, RequestContext, Settings, Worker
from nexus_bus.auth import (
    Keyring,
    NoAuthentication,
    TokenCodec,
    generate_key,
    token_service_of,
)
from nexus_bus.auth.service import revocation_store
from nexus_bus.config import ConfigError
from nexus_bus.constants import AUTH_REVOKED_BUCKET, AUTH_REVOKED_KEY
from nexus_bus.embedded import ServerProcess
from nexus_bus.redis_client import create_redis
from tests.conftest import issue_test_token, make_settings, shared_keys_dir

NOW = int(time.time())


def token(*scopes: str, subject: str = "svc", ttl_s: int = 600) -> str:
    return issue_test_token(scopes or ("*",), subject=subject, ttl_s=ttl_s)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "iss": "nexus-bus", "aud": "nexus-bus", "sub": "mallory", "scope": "*",
        "iat": NOW, "nbf": NOW, "exp": NOW + 600, "jti": uuid.uuid4().hex,
    }
    values.update(changes)
    return values


def unsigned(header: dict[str, Any], body: dict[str, Any]) -> str:
    """The signing input of a hand-made token: `header.payload`."""
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"


def signed_with_test_key(header: dict[str, Any], body: dict[str, Any]) -> str:
    """A hand-made token really signed with the session's key (to isolate one flaw)."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    key: Any = load_pem_private_key((shared_keys_dir() / "test-k1.pem").read_bytes(), None)
    signing_input = unsigned(header, body)
    return f"{signing_input}.{b64(key.sign(signing_input.encode()))}"


async def call(
    nc: Client, subject: str, payload: Any = None, *, bearer: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    hdrs = dict(headers or {})
    if bearer is not None:
        hdrs["Authorization"] = f"Bearer {bearer}"
    msg = await nc.request(subject, msgspec.json.encode(payload or {}), timeout=5, headers=hdrs)
    body = msgspec.json.decode(msg.data) if msg.data else {}
    return int((msg.headers or {}).get("Nexus-Status", "500")), body


@pytest.fixture
async def nc(nats_url: str, worker: Worker) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


def probe_group(op: str) -> Operations:
    """An op of this test's own: `whoami`, `ping` (public), `worker`, `mint` (own key)."""
    ops = Operations(op)

    @ops.action("whoami")
    async def whoami(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        assert ctx.principal is not None
        return {"subject": ctx.principal.subject, "scopes": sorted(ctx.principal.scopes)}

    @ops.action("ping", public=True)
    async def ping(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return {"pong": True, "anonymous": ctx.principal is None}

    @ops.action("worker")
    async def which_worker(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return {"worker": id(ctx.services)}

    @ops.action("mint")
    async def mint(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        # What auth.issue does, on this test's worker (whose keys differ from the session's).
        service = await token_service_of(ctx.services)
        signed = service.issue(req["subject"], frozenset(req["scopes"]), issuer=ctx.principal)
        return {"token": signed.token, "kid": signed.kid}

    return ops


@asynccontextmanager
async def serving(settings: Settings, *groups: Operations) -> AsyncIterator[list[Worker]]:
    workers = [Worker(settings, groups)]
    await workers[0].start()
    try:
        yield workers
    finally:
        for w in workers:
            await w.drain(1)


# --- 401: missing and bad tokens -------------------------------------------------------


async def test_missing_token_is_401_invalid_token(nc: Client, gateway: Gateway) -> None:
    status, problem = await call(nc, "nexus.data.get", {"key": "k"})
    assert status == 401 and problem["code"] == "invalid_token"
    assert "missing" in problem["detail"]
    anonymous = Gateway(gateway.nc, gateway.settings)  # same connection, no default token
    with pytest.raises(InvalidToken):
        await anonymous.request("data", "get", {"key": "k"})


def _bad_tokens() -> dict[str, str]:
    good = token("*")
    head, body, sig = good.split(".")
    other_dir = Path(shared_keys_dir().parent / f"other-{uuid.uuid4().hex}")
    generate_key(other_dir, kid="test-k1")  # same kid, different key
    wrong_key = TokenCodec(Keyring.from_dir(other_dir)).issue(
        "mallory", frozenset({"*"}), 600, now=NOW, jti="x"
    ).token
    generate_key(other_dir, kid="zz-unknown")
    unknown_kid = TokenCodec(Keyring.from_dir(other_dir, active_kid="zz-unknown")).issue(
        "mallory", frozenset({"*"}), 600, now=NOW, jti="x"
    ).token
    public_raw = Keyring.from_dir(shared_keys_dir()).verification_key("test-k1")
    assert public_raw is not None
    hs_input = unsigned({"alg": "HS256", "kid": "test-k1"}, claims())
    hs_mac = hmac.new(public_raw.public_bytes_raw(), hs_input.encode(), hashlib.sha256)
    flipped = "AAAA" if sig[-4:] != "AAAA" else "BBBB"
    return {
        "tampered-payload": f"{head}.{b64(json.dumps(claims()).encode())}.{sig}",
        "tampered-signature": f"{head}.{body}.{sig[:-4]}{flipped}",
        "truncated": good[: len(good) // 2],
        "truncated-signature": good[:-10],
        "oversized": good + "A" * 5000,
        "wrong-key": wrong_key,
        "unknown-kid": unknown_kid,
        "alg-none": unsigned({"alg": "none", "kid": "test-k1"}, claims()) + ".",
        "alg-hs256-confusion": f"{hs_input}.{b64(hs_mac.digest())}",
        "expired": signed_with_test_key(
            {"alg": "EdDSA", "kid": "test-k1"},
            claims(iat=NOW - 7200, nbf=NOW - 7200, exp=NOW - 3600),
        ),
        "not-yet-valid": signed_with_test_key(
            {"alg": "EdDSA", "kid": "test-k1"}, claims(iat=NOW, nbf=NOW + 3600, exp=NOW + 7200)
        ),
        "malformed": "not-a-token",
        "empty-claims": signed_with_test_key({"alg": "EdDSA", "kid": "test-k1"}, {}),
    }


@pytest.fixture(scope="module")
def bad_tokens() -> dict[str, str]:
    return _bad_tokens()


@pytest.mark.parametrize(
    "kind",
    [
        "tampered-payload", "tampered-signature", "truncated", "truncated-signature",
        "oversized", "wrong-key", "unknown-kid", "alg-none", "alg-hs256-confusion", "expired",
        "not-yet-valid", "malformed", "empty-claims",
    ],
)
async def test_bad_tokens_are_401_on_the_nats_path(
    nc: Client, bad_tokens: dict[str, str], kind: str
) -> None:
    status, problem = await call(
        nc, "nexus.data.get", {"key": "k"}, bearer=bad_tokens[kind],
        headers={"Nexus-Client-Ip": f"198.51.100.{hash(kind) % 200}"},  # no 429 across cases
    )
    assert (status, problem["code"]) == (401, "invalid_token"), problem


async def test_other_authorization_schemes_are_401(nc: Client) -> None:
    for value in ("Basic dXNlcjpwYXNz", "Bearer", token("*")):
        msg = await nc.request(
            "nexus.data.get", b'{"key":"k"}', timeout=5, headers={"Authorization": value}
        )
        assert msg.headers is not None and msg.headers["Nexus-Status"] == "401"


# --- 403 and scopes ------------------------------------------------------------------


async def test_scopes_exact_wildcard_and_missing(nc: Client, uid: str) -> None:
    key = f"auth-{uid}"
    status, _ = await call(nc, "nexus.data.put", {"key": key, "value": 1}, bearer=token("data:put"))
    assert status == 200
    status, reply = await call(nc, "nexus.data.get", {"key": key}, bearer=token("data:get"))
    assert status == 200 and reply["value"] == 1
    status, problem = await call(nc, "nexus.data.put", {"key": key, "value": 2},
                                 bearer=token("data:get"))
    assert (status, problem["code"]) == (403, "forbidden")
    assert "data:put" in problem["detail"]
    status, _ = await call(nc, "nexus.data.delete", {"key": key}, bearer=token("data:*"))
    assert status == 200
    topic = {"topic": f"t{uid}"}
    status, problem = await call(nc, "nexus.stream.read", topic, bearer=token("data:*"))
    assert (status, problem["code"]) == (403, "forbidden")
    status, _ = await call(nc, "nexus.stream.read", topic, bearer=token("*"))
    assert status == 200


async def test_public_operations_are_explicit(nats_url: str, redis_url: str, uid: str) -> None:
    op = f"probe{uid}"
    async with serving(make_settings(nats_url, redis_url), probe_group(op)):
        client = await nats.connect(nats_url)
        try:
            status, reply = await call(client, f"nexus.{op}.ping")
            assert status == 200 and reply == {"pong": True, "anonymous": True}
            status, problem = await call(client, f"nexus.{op}.whoami")
            assert (status, problem["code"]) == (401, "invalid_token")
            status, problem = await call(client, f"nexus.{op}.ping", bearer="garbage.x.y")
            assert status == 401  # a token that is sent is checked, even on a public op
            status, reply = await call(
                client, f"nexus.{op}.whoami", bearer=token(f"{op}:whoami", subject="bob")
            )
            assert status == 200 and reply == {"subject": "bob", "scopes": [f"{op}:whoami"]}
        finally:
            await client.close()


# --- the token service operations ---------------------------------------------------


async def test_issue_verify_revoke_over_nats(nc: Client, gateway: Gateway, uid: str) -> None:
    status, issued = await call(
        nc, "nexus.auth.issue", {"subject": f"svc-{uid}", "scopes": ["data:get"], "ttl_s": 300},
        bearer=gateway.token,
    )
    assert status == 200 and issued["expires_at"] - time.time() == pytest.approx(300, abs=5)
    fresh = issued["token"]
    status, _ = await call(nc, "nexus.data.list", {}, bearer=fresh)
    assert status == 403
    status, problem = await call(nc, "nexus.data.get", {"key": f"none-{uid}"}, bearer=fresh)
    assert (status, problem["code"]) == (404, "not_found")  # past auth: the key is absent

    status, claims_ = await call(nc, "nexus.auth.verify", {"token": fresh}, bearer=gateway.token)
    assert status == 200
    assert claims_ == {"subject": f"svc-{uid}", "scopes": ["data:get"],
                       "expires_at": issued["expires_at"], "jti": issued["jti"]}
    status, problem = await call(nc, "nexus.auth.verify", {"token": fresh}, bearer=fresh)
    assert (status, problem["code"]) == (403, "forbidden")  # verify needs auth:verify

    status, reply = await call(nc, "nexus.auth.revoke", {"jti": issued["jti"]},
                               bearer=gateway.token)
    assert status == 200 and reply == {"jti": issued["jti"], "revoked": True}
    status, problem = await call(nc, "nexus.data.get", {"key": f"none-{uid}"}, bearer=fresh)
    assert (status, problem["code"]) == (401, "invalid_token") and "revoked" in problem["detail"]
    status, problem = await call(nc, "nexus.auth.verify", {"token": fresh}, bearer=gateway.token)
    assert status == 401 and "revoked" in problem["detail"]


async def test_issue_cannot_escalate_and_needs_its_scope(nc: Client, uid: str) -> None:
    issuer = token("auth:issue", "data:*", subject=f"issuer-{uid}")
    status, issued = await call(
        nc, "nexus.auth.issue", {"subject": "x", "scopes": ["data:get"]}, bearer=issuer
    )
    assert status == 200
    for scopes in (["*"], ["auth:revoke"], ["stream:*"]):
        status, problem = await call(
            nc, "nexus.auth.issue", {"subject": "x", "scopes": scopes}, bearer=issuer
        )
        assert (status, problem["code"]) == (403, "forbidden"), scopes
    status, problem = await call(
        nc, "nexus.auth.issue", {"subject": "x", "scopes": ["data:get"]}, bearer=issued["token"]
    )
    assert (status, problem["code"]) == (403, "forbidden")
    status, problem = await call(nc, "nexus.auth.revoke", {"jti": "x"}, bearer=issuer)
    assert (status, problem["code"]) == (403, "forbidden")


async def test_an_issued_token_does_not_outlive_its_issuers(nc: Client, uid: str) -> None:
    """Delegation narrows lifetimes as it narrows scopes: before, a two-minute token holding
    `auth:issue` minted itself a 30-day copy (that copy the next one, and so on), which
    revoking or waiting out the original did not end."""
    issuer = token("auth:issue", "data:*", subject=f"issuer-{uid}", ttl_s=120)
    expires = json.loads(base64.urlsafe_b64decode(issuer.split(".")[1] + "=="))["exp"]
    for ttl in ({"ttl_s": 30 * 24 * 3600}, {}):  # the longest allowed, and the 1 h default
        status, issued = await call(
            nc, "nexus.auth.issue",
            {"subject": f"copy-{uid}", "scopes": ["auth:issue", "data:*"], **ttl},
            bearer=issuer,
        )  # fmt: skip
        assert status == 200, issued
        assert issued["expires_at"] <= expires, (ttl, issued["expires_at"] - expires)
    status, _ = await call(nc, "nexus.data.get", {"key": f"k{uid}"}, bearer=issued["token"])
    assert status == 404  # a working token, for as long as its issuer's


async def test_revocation_reaches_every_worker_at_once(
    nats_url: str, redis_url: str, gateway: Gateway, uid: str
) -> None:
    op = f"probe{uid}"
    # A long cache TTL, so only the notice can explain the refusals; no throttling in the way.
    settings = make_settings(
        nats_url, redis_url, auth={"cache_ttl_s": 60, "rate_limit_failures": 1000}
    )
    group = probe_group(op)
    async with serving(settings, group) as workers:
        second = Worker(settings, [group])
        await second.start()
        workers.append(second)
        issued = await gateway.request("auth", "issue", {"subject": uid, "scopes": [f"{op}:*"]})
        client = await nats.connect(nats_url)
        try:
            seen = set()
            for _ in range(40):  # the queue group spreads these over both workers' caches
                status, reply = await call(client, f"nexus.{op}.worker", bearer=issued["token"])
                assert status == 200
                seen.add(reply["worker"])
            assert len(seen) == 2
            await gateway.request("auth", "revoke", {"jti": issued["jti"]})
            for _ in range(40):
                status, problem = await call(client, f"nexus.{op}.worker", bearer=issued["token"])
                assert (status, problem["code"]) == (401, "invalid_token")
        finally:
            await client.close()


async def test_revocation_without_notice_is_bounded_by_cache_ttl(
    nats_url: str, redis_url: str, uid: str
) -> None:
    op = f"probe{uid}"
    ttl = 1.0
    settings = make_settings(nats_url, redis_url, auth={"cache_ttl_s": ttl})
    codec = TokenCodec(Keyring.from_dir(shared_keys_dir()))
    jti = uuid.uuid4().hex
    bearer = codec.issue(uid, frozenset({"*"}), 600, now=int(time.time()), jti=jti).token
    async with serving(settings, probe_group(op)):
        client = await nats.connect(nats_url)
        redis = create_redis(settings.redis)
        try:
            assert (await call(client, f"nexus.{op}.whoami", bearer=bearer))[0] == 200
            # Revoke in the store only, as if every notice were lost.
            await revocation_store(settings, redis, client).revoke(jti)
            revoked_at = time.monotonic()
            while (await call(client, f"nexus.{op}.whoami", bearer=bearer))[0] == 200:
                assert time.monotonic() - revoked_at < ttl + 3, "revocation not seen in time"
            status, problem = await call(client, f"nexus.{op}.whoami", bearer=bearer)
            assert status == 401 and "revoked" in problem["detail"]
        finally:
            await redis.aclose()
            await client.close()


async def test_any_jti_can_be_revoked(nc: Client, gateway: Gateway, uid: str) -> None:
    # Not a KV key as it is (spaces, wildcards, a final dot): recorded under its hash.
    jti = f"odd id {uid} *>."
    bearer = TokenCodec(Keyring.from_dir(shared_keys_dir())).issue(
        uid, frozenset({"*"}), 600, now=int(time.time()), jti=jti
    ).token
    assert (await call(nc, "nexus.data.get", {"key": f"none-{uid}"}, bearer=bearer))[0] == 404
    reply = await gateway.request("auth", "revoke", {"jti": jti})
    assert reply == {"jti": jti, "revoked": True}
    status, problem = await call(nc, "nexus.data.get", {"key": f"none-{uid}"}, bearer=bearer)
    assert status == 401 and "revoked" in problem["detail"]


async def test_revocations_last_as_long_as_a_token_can(
    local_nats: ServerProcess, redis_url: str
) -> None:
    def settings(max_ttl_s: int) -> Settings:
        return make_settings(
            local_nats.url, redis_url, auth={"max_ttl_s": max_ttl_s, "leeway_s": 5}
        )

    client = await nats.connect(local_nats.url)
    redis = create_redis(settings(60).redis)
    js = client.jetstream()
    stream = f"KV_{AUTH_REVOKED_BUCKET}"
    try:
        await revocation_store(settings(3600), redis, client).revoke("j1")
        config = (await js.stream_info(stream)).config
        assert config.max_age == 3605  # auth.max_ttl_s + auth.leeway_s
        assert config.max_msgs_per_subject == 1 and config.num_replicas == 1
        assert config.storage == StorageType.FILE
        assert not config.allow_direct  # reads from the leader, never a lagging follower
        expiry = int(await redis.hget(AUTH_REVOKED_KEY, "j1")) / 1000 - time.time()
        assert 3599 < expiry <= 3605  # the read path's copy
        # Longer-lived tokens allowed now: the records must last longer too.
        await revocation_store(settings(7200), redis, client).revoke("j2")
        assert (await js.stream_info(stream)).config.max_age == 7205
        # A process with shorter-lived tokens (older settings) never cuts them short.
        await revocation_store(settings(60), redis, client).revoke("j3")
        assert (await js.stream_info(stream)).config.max_age == 7205
    finally:
        await redis.aclose()
        await client.close()


# --- key rotation ---------------------------------------------------------------------


async def test_key_rotation_keeps_old_tokens_until_the_key_is_retired(
    nats_url: str, redis_url: str, tmp_path: Path, uid: str
) -> None:
    op = f"probe{uid}"
    keys = tmp_path / "keys"
    old_kid = generate_key(keys, kid="2026a-old")
    settings = make_settings(nats_url, redis_url, auth={"keys_dir": str(keys)})
    old_token = TokenCodec(Keyring.from_dir(keys)).issue(
        "old", frozenset({"*"}), 600, now=int(time.time()), jti=uuid.uuid4().hex
    ).token
    new_kid = generate_key(keys, kid="2026b-new")  # rotation: a newer key appears
    client = await nats.connect(nats_url)
    try:
        async with serving(settings, probe_group(op)):
            status, issued = await call(
                client, f"nexus.{op}.mint", {"subject": "new", "scopes": ["*"]}, bearer=old_token
            )
            assert status == 200
            header = json.loads(base64.urlsafe_b64decode(issued["token"].split(".")[0] + "=="))
            assert header["kid"] == issued["kid"] == new_kid  # new tokens: the newest key
            for bearer, who in ((old_token, "old"), (issued["token"], "new")):
                status, reply = await call(client, f"nexus.{op}.whoami", bearer=bearer)
                assert (status, reply.get("subject")) == (200, who)
        for file in keys.glob(f"{old_kid}*"):
            file.unlink()  # retire the old key
        async with serving(settings, probe_group(op)):
            status, problem = await call(client, f"nexus.{op}.whoami", bearer=old_token)
            assert status == 401 and "key id" in problem["detail"]
            status, _ = await call(client, f"nexus.{op}.whoami", bearer=issued["token"])
            assert status == 200
    finally:
        await client.close()


# --- brute force ------------------------------------------------------------------------


async def test_repeated_failures_are_429_without_locking_out_valid_clients(
    nats_url: str, redis_url: str, uid: str
) -> None:
    op = f"probe{uid}"
    settings = make_settings(
        nats_url, redis_url, auth={"rate_limit_failures": 3, "rate_limit_window_s": 60}
    )
    attacker = {"Nexus-Client-Ip": "203.0.113.9"}
    valid = token(f"{op}:*", subject="valid-client")
    async with serving(settings, probe_group(op)):
        client = await nats.connect(nats_url)
        try:
            status, _ = await call(client, f"nexus.{op}.whoami", bearer=valid, headers=attacker)
            assert status == 200
            for _ in range(3):
                status, _ = await call(
                    client, f"nexus.{op}.whoami", bearer="x.y.z", headers=attacker
                )
                assert status == 401
            status, problem = await call(client, f"nexus.{op}.whoami", bearer="x.y.z",
                                         headers=attacker)
            assert (status, problem["code"]) == (429, "rate_limited")
            status, _ = await call(client, f"nexus.{op}.whoami", headers=attacker)
            assert status == 429
            # The valid client at the same address, already proven, is not locked out...
            status, reply = await call(client, f"nexus.{op}.whoami", bearer=valid, headers=attacker)
            assert status == 200 and reply["subject"] == "valid-client"
            # ...nor is anyone elsewhere, including plain NATS clients (grouped by subject).
            other = token(f"{op}:*", subject="elsewhere")
            status, _ = await call(client, f"nexus.{op}.whoami", bearer=other,
                                   headers={"Nexus-Client-Ip": "192.0.2.1"})
            assert status == 200
            assert (await call(client, f"nexus.{op}.whoami", bearer=token(f"{op}:*")))[0] == 200
        finally:
            await client.close()


# --- configuration ------------------------------------------------------------------------


async def test_worker_without_keys_refuses_to_start(
    nats_url: str, redis_url: str, tmp_path: Path, uid: str
) -> None:
    settings = make_settings(nats_url, redis_url, auth={"keys_dir": str(tmp_path / "none")})
    worker = Worker(settings, [probe_group(f"probe{uid}")])
    with pytest.raises(ConfigError, match="no keys"):
        await worker.start()
    client = await nats.connect(nats_url)
    try:
        with pytest.raises(nats.errors.NoRespondersError):  # nothing half-started serves
            await client.request(f"nexus.probe{uid}.ping", b"{}", timeout=2)
    finally:
        await client.close()


async def test_auth_can_be_switched_off_only_explicitly(
    nats_url: str, redis_url: str, uid: str
) -> None:
    op = f"probe{uid}"
    settings = make_settings(nats_url, redis_url, auth={"enabled": False})
    async with serving(settings, probe_group(op)) as workers:
        assert isinstance(workers[0].authenticator, NoAuthentication)
        client = await nats.connect(nats_url)
        try:
            status, _ = await call(client, f"nexus.{op}.worker")
            assert status == 200
        finally:
            await client.close()
