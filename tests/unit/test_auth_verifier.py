"""Verifier (cache + revocation) and authenticator (401/403/429/503) without servers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexus_bus.auth.authenticator import TokenAuthenticator, bearer_token, client_key
from nexus_bus.auth.cache import VerificationCache
from nexus_bus.auth.keys import Keyring
from nexus_bus.auth.limiter import FailureLimiter
from nexus_bus.auth.revocation import MemoryRevocationStore
from nexus_bus.auth.service import TokenService
from nexus_bus.auth.tokens import TokenCodec, TokenPolicy
from nexus_bus.auth.verifier import TokenVerifier
from nexus_bus.constants import H_CLIENT_IP
from nexus_bus.context import Principal
from nexus_bus.errors import Forbidden, InvalidRequest, InvalidToken, RateLimited, Unavailable
from nexus_bus.operations import Operation

NOW = 1_800_000_000.0


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def _noop(req: Any, ctx: Any) -> None:
    return None


def operation(op: str = "data", action: str = "get", *, public: bool = False) -> Operation:
    return Operation(op, action, _noop, Any, Any, public=public)


class Rig:
    """A token service and authenticator over an in-memory revocation store."""

    def __init__(self, *, cache_ttl_s: float = 5.0, failures: int = 3) -> None:
        self.clock = Clock()
        self.store = MemoryRevocationStore()
        codec = TokenCodec(
            Keyring({}, {"k1": Ed25519PrivateKey.generate()}), TokenPolicy(leeway_s=0)
        )
        self.verifier = TokenVerifier(
            codec, self.store, VerificationCache(ttl_s=cache_ttl_s, max_entries=100),
            clock=self.clock,
        )
        self.service = TokenService(
            codec, self.verifier, self.store, default_ttl_s=600, clock=self.clock
        )
        self.auth = TokenAuthenticator(
            self.verifier, FailureLimiter(max_failures=failures, window_s=60.0), clock=self.clock
        )

    def token(self, *scopes: str, ttl_s: int = 600) -> str:
        return self.service.issue("svc", frozenset(scopes or {"*"}), ttl_s).token

    async def call(self, token: str | None, op: Operation | None = None,
                   ip: str | None = None) -> Principal | None:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        if ip:
            headers[H_CLIENT_IP] = ip
        return await self.auth.authenticate(headers, op or operation())


async def test_cache_hit_skips_the_store_until_stale() -> None:
    rig = Rig()
    token = rig.token("data:get")
    first = await rig.service.verify(token)
    assert first.subject == "svc" and first.scopes == {"data:get"}
    await rig.service.verify(token)
    assert rig.store.lookups == 1  # the second came from the cache
    rig.clock.now += 5
    await rig.service.verify(token)
    assert rig.store.lookups == 2  # stale: the revocation store is asked again


async def test_without_cache_every_verification_asks_the_store() -> None:
    rig = Rig(cache_ttl_s=0)
    token = rig.token()
    for _ in range(3):
        await rig.service.verify(token)
    assert rig.store.lookups == 3


async def test_cache_is_never_used_past_expiry() -> None:
    rig = Rig(cache_ttl_s=60)
    token = rig.token(ttl_s=10)
    await rig.service.verify(token)
    rig.clock.now += 10
    with pytest.raises(InvalidToken, match="expired"):
        await rig.service.verify(token)
    assert not rig.verifier.is_known(token)


async def test_revocation_is_immediate_here_and_bounded_elsewhere() -> None:
    here, there = Rig(cache_ttl_s=5), None
    token = here.token()
    await here.service.verify(token)
    jti = (await here.service.verify(token)).jti
    assert jti
    # Another process that shares the store but missed the notice:
    there = TokenVerifier(
        here.verifier.codec, here.store, VerificationCache(ttl_s=5, max_entries=10),
        clock=here.clock,
    )
    await there.verify(token)
    await here.service.revoke(jti)
    assert jti in here.store.revoked
    with pytest.raises(InvalidToken, match="revoked"):
        await here.service.verify(token)  # this process: at once
    await there.verify(token)  # the other: still cached...
    here.clock.now += 5
    with pytest.raises(InvalidToken, match="revoked"):
        await there.verify(token)  # ...but never longer than cache_ttl_s
    there.on_revoked("unrelated")  # notices for other ids harm nothing


async def test_a_notice_during_a_lookup_keeps_the_answer_out_of_the_cache() -> None:
    rig = Rig()
    token = rig.token()

    class RacingStore(MemoryRevocationStore):
        async def is_revoked(self, jti: str) -> bool:
            rig.verifier.on_revoked(jti)  # the notice lands while we ask
            return False

    rig.verifier.revocations = RacingStore()
    await rig.verifier.verify(token)
    assert not rig.verifier.is_known(token)


class GatedStore(MemoryRevocationStore):
    """Each lookup (counted when it starts) waits for `gate`: callers pile up behind one."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def is_revoked(self, jti: str) -> bool:
        self.lookups += 1
        await self.gate.wait()
        self.lookups -= 1  # the twin counts it again
        return await super().is_revoked(jti)


async def settle() -> None:
    """Let every task started so far run up to its first real wait."""
    for _ in range(5):
        await asyncio.sleep(0)


async def test_concurrent_checks_of_a_stale_token_share_one_store_lookup() -> None:
    rig = Rig()
    token = rig.token()
    store = GatedStore()
    rig.verifier.revocations = store
    checks = [asyncio.create_task(rig.verifier.verify(token)) for _ in range(128)]
    await settle()
    assert store.lookups == 1  # not one per request in flight (a Redis pool ran dry)
    store.gate.set()
    principals = await asyncio.gather(*checks)
    assert {p.jti for p in principals} == {principals[0].jti} and store.lookups == 1
    assert rig.verifier.is_known(token)


async def test_a_notice_sends_later_callers_to_the_store_and_keeps_the_shared_answer_out() -> None:
    rig = Rig()
    token = rig.token()
    jti = (await rig.verifier.verify(token)).jti
    assert jti is not None
    rig.clock.now += 10  # the cached answer is stale: the next checks ask the store
    store = GatedStore()
    rig.verifier.revocations = store
    before = asyncio.create_task(rig.verifier.verify(token))
    await settle()
    await store.revoke(jti)
    rig.verifier.on_revoked(jti)  # the notice
    after = asyncio.create_task(rig.verifier.verify(token))
    await settle()
    assert store.lookups == 2  # the caller after the notice did not join the earlier lookup
    store.gate.set()
    with pytest.raises(InvalidToken, match="revoked"):
        await after
    with pytest.raises(InvalidToken, match="revoked"):
        await before  # its lookup, answered after the revocation, says so too
    assert not rig.verifier.is_known(token)


async def test_a_cancelled_caller_leaves_the_shared_lookup_to_the_others() -> None:
    rig = Rig()
    token = rig.token()
    store = GatedStore()
    rig.verifier.revocations = store
    first = asyncio.create_task(rig.verifier.verify(token))
    second = asyncio.create_task(rig.verifier.verify(token))
    await settle()
    first.cancel()
    store.gate.set()
    assert (await second).subject and store.lookups == 1
    with pytest.raises(asyncio.CancelledError):
        await first


class DelayedAnswerStore(MemoryRevocationStore):
    """Each lookup reads the store at once, and its answer arrives when `gate` opens (a
    Redis reply in flight)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def is_revoked(self, jti: str) -> bool:
        answer = await super().is_revoked(jti)
        await self.gate.wait()
        return answer


async def test_a_caller_joining_a_lookup_keeps_the_bound_from_when_the_store_was_asked() -> None:
    rig = Rig(cache_ttl_s=5.0)
    token = rig.token()
    jti = (await rig.verifier.verify(token)).jti
    assert jti is not None
    rig.clock.now += 10  # the cached answer is stale: the next check asks the store
    asked_at = rig.clock.now
    store = DelayedAnswerStore()
    rig.verifier.revocations = store
    first = asyncio.create_task(rig.verifier.verify(token))
    await settle()  # the store said "not revoked" now; the answer is on its way
    rig.clock.now += 2
    await store.revoke(jti)  # stored at asked_at + 2; its notice is lost
    revoked_at = rig.clock.now
    rig.clock.now += 1
    joined = asyncio.create_task(rig.verifier.verify(token))  # shares the earlier lookup
    await settle()
    store.gate.set()
    await asyncio.gather(first, joined, return_exceptions=True)  # either answer is in bound
    assert rig.clock.now - asked_at < 5
    # The bound: refused within cache_ttl_s of the revocation being stored, notice lost.
    rig.clock.now = revoked_at + 5.0 + 0.5
    with pytest.raises(InvalidToken, match="revoked"):
        await rig.verifier.verify(token)


async def test_without_a_cache_every_check_asks_the_store_itself() -> None:
    rig = Rig(cache_ttl_s=0)  # docs/auth.md: every request verifies and asks the store
    token = rig.token()
    jti = (await rig.verifier.verify(token)).jti
    assert jti is not None
    store = DelayedAnswerStore()
    rig.verifier.revocations = store
    first = asyncio.create_task(rig.verifier.verify(token))
    await settle()  # the store said "not revoked"; the answer is on its way
    await store.revoke(jti)  # its notice is lost
    after = asyncio.create_task(rig.verifier.verify(token))  # began after the revocation
    await settle()
    store.gate.set()
    assert (await first).jti == jti  # began before it
    with pytest.raises(InvalidToken, match="revoked"):
        await after


async def test_unreachable_store_is_503_never_a_silent_allow() -> None:
    rig = Rig()
    rig.store.available = False
    with pytest.raises(Unavailable):
        await rig.call(rig.token())
    with pytest.raises(Unavailable):
        await rig.service.revoke("j")


async def test_missing_token_is_401_unless_the_operation_is_public() -> None:
    rig = Rig()
    with pytest.raises(InvalidToken, match="missing"):
        await rig.call(None)
    assert await rig.call(None, operation(public=True)) is None
    with pytest.raises(InvalidToken):
        await rig.call("garbage", operation(public=True))  # a token sent is always checked


async def test_scopes_decide_403() -> None:
    rig = Rig()
    token = rig.token("data:get")
    principal = await rig.call(token, operation("data", "get"))
    assert principal is not None and principal.subject == "svc"
    with pytest.raises(Forbidden, match="data:put"):
        await rig.call(token, operation("data", "put"))
    assert await rig.call(rig.token("data:*"), operation("data", "put"))
    assert await rig.call(rig.token("*"), operation("auth", "revoke"))
    with pytest.raises(Forbidden):
        await rig.call(rig.token("data:*"), operation("stream", "read"))


@pytest.mark.parametrize(
    ("value", "token"),
    [("Bearer abc", "abc"), ("bearer  abc ", "abc"), ("BEARER abc", "abc")],
)
def test_bearer_parsing(value: str, token: str) -> None:
    assert bearer_token({"Authorization": value}) == token
    assert bearer_token({"authorization": value}) == token


@pytest.mark.parametrize("value", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer   ", "abc", ""])
def test_other_authorization_values_are_401(value: str) -> None:
    with pytest.raises(InvalidToken):
        bearer_token({"Authorization": value})


def test_client_key_prefers_the_address_then_the_claimed_subject() -> None:
    rig = Rig()
    token = rig.token()
    assert client_key({H_CLIENT_IP: "10.0.0.1"}, token, 4096) == "ip:10.0.0.1"
    assert client_key({}, token, 4096) == "sub:svc"
    assert client_key({}, "garbage", 4096) == "nats:anonymous"


async def test_repeated_failures_are_429_but_proven_clients_still_pass() -> None:
    rig = Rig(failures=3)
    good = rig.token("data:get")
    await rig.call(good, ip="1.2.3.4")  # proven before the attack
    for _ in range(3):
        with pytest.raises(InvalidToken):
            await rig.call("forged.token.value", ip="1.2.3.4")
    with pytest.raises(RateLimited) as info:
        await rig.call("forged.token.value", ip="1.2.3.4")
    assert info.value.retry_after is not None and info.value.retry_after > 0
    with pytest.raises(RateLimited):
        await rig.call(None, ip="1.2.3.4")
    with pytest.raises(RateLimited):
        await rig.call(rig.token("data:get"), ip="1.2.3.4")  # unproven: waits it out
    assert await rig.call(good, ip="1.2.3.4")  # proven: not locked out
    assert await rig.call(rig.token("data:get"), ip="5.6.7.8")  # other clients unaffected
    rig.clock.now += 60
    assert await rig.call(rig.token("data:get"), ip="1.2.3.4")  # the window passes


async def test_forbidden_is_not_counted_as_an_auth_failure() -> None:
    rig = Rig(failures=1)
    token = rig.token("data:get")
    for _ in range(3):
        with pytest.raises(Forbidden):
            await rig.call(token, operation("data", "put"), ip="1.1.1.1")
    assert await rig.call(rig.token("data:get"), ip="1.1.1.1")


async def test_issue_delegates_only_held_scopes_and_caps_ttl() -> None:
    rig = Rig()
    issuer = Principal("ops", frozenset({"auth:issue", "data:*"}))
    signed = rig.service.issue("svc", frozenset({"data:get"}), 60, issuer=issuer)
    assert signed.claims.exp - signed.claims.iat == 60
    assert rig.service.issue("svc", frozenset({"data:*"}), issuer=issuer).claims.exp == NOW + 600
    for scope in ("*", "auth:revoke", "stream:*"):
        with pytest.raises(Forbidden, match="cannot grant"):
            rig.service.issue("svc", frozenset({scope}), issuer=issuer)
    with pytest.raises(InvalidRequest, match="maximum"):
        rig.service.issue("svc", frozenset({"data:get"}), 10**9)
    with pytest.raises(InvalidRequest, match="scope"):
        rig.service.issue("svc", frozenset({"DATA"}))


async def test_issue_operation_refuses_an_anonymous_caller() -> None:
    from nexus_bus.bus.metadata import new_trace
    from nexus_bus.context import RequestContext
    from nexus_bus.handlers.auth import issue
    from nexus_bus.schemas.auth import IssueRequest

    # What a worker with auth disabled would pass: no principal (and no services needed).
    ctx = RequestContext(
        op="auth", action="issue", request_id="r", trace=new_trace(), deadline_ms=0,
        services=None,  # type: ignore[arg-type]
    )
    with pytest.raises(Forbidden, match="authenticated caller"):
        await issue(IssueRequest(subject="x", scopes=["*"]), ctx)
