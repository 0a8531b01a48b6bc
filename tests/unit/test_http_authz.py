"""The shim's own authorization (async submits, job status, stream leases) without servers."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexus_bus.auth import (
    FailureLimiter,
    Keyring,
    MemoryRevocationStore,
    TokenAuthenticator,
    TokenCodec,
    TokenPolicy,
    TokenVerifier,
    VerificationCache,
)
from nexus_bus.errors import Forbidden, InvalidToken, Unavailable
from nexus_bus.http.authz import ShimAuthorizer, StreamLease, credentials
from nexus_bus.http.sse import end_frame
from nexus_bus.operations import Operations

NOW = 1_800_000_000.0

shop = Operations("shop")


@shop.action("ping", public=True)
async def ping(req: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Public."""
    return {}


@shop.action("buy")
async def buy(req: dict[str, Any], ctx: Any) -> dict[str, Any]:
    """Needs `shop:buy`."""
    return {}


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class Rig:
    """A verifier with a 30 s clock leeway over an in-memory revocation store."""

    def __init__(self, *, cache_ttl_s: float = 5.0) -> None:
        self.clock = Clock()
        self.store = MemoryRevocationStore()
        self.codec = TokenCodec(
            Keyring({}, {"k1": Ed25519PrivateKey.generate()}), TokenPolicy(leeway_s=30)
        )
        self.verifier = TokenVerifier(
            self.codec, self.store, VerificationCache(ttl_s=cache_ttl_s, max_entries=100),
            clock=self.clock,
        )
        auth = TokenAuthenticator(
            self.verifier, FailureLimiter(max_failures=5, window_s=60.0), clock=self.clock
        )
        self.authz = ShimAuthorizer(auth, [shop], recheck_s=cache_ttl_s, clock=self.clock)

    def token(self, *scopes: str, ttl_s: int = 600, jti: str = "j1") -> str:
        issued = self.codec.issue("svc", frozenset(scopes), ttl_s, now=int(NOW), jti=jti)
        return issued.token

    async def lease(self, token: str) -> StreamLease:
        lease = await self.authz.lease(credentials(f"Bearer {token}", ""), "shop", "buy")
        assert lease is not None
        return lease


async def test_a_lease_is_rechecked_every_cache_ttl_and_at_exp() -> None:
    rig = Rig(cache_ttl_s=5)
    lease = await rig.lease(rig.token("shop:buy", ttl_s=12))
    assert lease.jti == "j1" and lease.due_in() == 5
    rig.clock.now += 5
    assert lease.due_in() == 0 and await lease.check() is None
    assert rig.store.lookups == 2  # the cached answer was stale: the store was asked again
    rig.clock.now += 4
    assert lease.due_in() == 1
    assert await lease.check() is None  # answered from the cache: the store's answer of t=5
    assert lease.due_in() == 1  # so the next check is due at t=10, not t=14
    rig.clock.now += 1
    assert await lease.check() is None
    assert rig.store.lookups == 3
    assert lease.due_in() == 2  # the token's exp comes before the next periodic check
    rig.clock.now = NOW + 12
    ended = await lease.check()
    # Verification would accept it for the 30 s leeway; the stream ends at exp all the same.
    assert isinstance(ended, InvalidToken) and "expired" in ended.detail


async def test_a_revoked_lease_ends_once_the_notice_makes_it_stale() -> None:
    rig = Rig(cache_ttl_s=5)
    lease = await rig.lease(rig.token("shop:buy"))
    await rig.store.revoke("j1")
    assert await lease.check() is None  # still within the cached answer's bound
    rig.verifier.on_revoked("j1")
    lease.mark_stale()
    assert lease.due_in() == 0
    ended = await lease.check()
    assert isinstance(ended, InvalidToken) and "revoked" in ended.detail


async def test_a_lease_dates_its_checks_from_the_store_answer_they_rest_on() -> None:
    """A ticket request (or a second stream) keeps the token's cache entry fresh; without a
    notice, the stream still ends within one cache ttl of the revocation, not two."""
    rig = Rig(cache_ttl_s=5)
    token = rig.token("shop:buy")
    await rig.authz.authorize(credentials(f"Bearer {token}", ""), "shop", "buy")  # t=0
    rig.clock.now += 4
    lease = await rig.lease(token)  # t=4, answered from the cache entry of t=0
    assert lease.due_in() == 1
    rig.clock.now += 0.5
    await rig.store.revoke("j1")  # t=4.5, and the notice is lost
    rig.clock.now += 0.5
    ended = await lease.check()  # t=5: within 5 s of the revocation
    assert isinstance(ended, InvalidToken) and "revoked" in ended.detail


async def test_a_lease_ends_when_the_store_cannot_answer() -> None:
    rig = Rig(cache_ttl_s=5)
    lease = await rig.lease(rig.token("shop:buy"))
    rig.store.available = False
    rig.clock.now += 5
    assert isinstance(await lease.check(), Unavailable)


async def test_without_a_cache_ttl_only_exp_and_notices_time_checks() -> None:
    rig = Rig(cache_ttl_s=0)
    lease = await rig.lease(rig.token("shop:buy", ttl_s=100))
    assert lease.due_in() == 100


async def test_async_submits_are_refused_as_a_worker_would() -> None:
    rig = Rig()
    anonymous = credentials(None, "192.0.2.1")
    await rig.authz.authorize(anonymous, "shop", "ping")  # public stays public
    with pytest.raises(InvalidToken):
        await rig.authz.authorize(anonymous, "shop", "buy")
    with pytest.raises(InvalidToken):
        await rig.authz.authorize(anonymous, "other", "ping")  # unknown to the shim: closed
    reader = credentials(f"Bearer {rig.token('shop:ping', jti='j2')}", "192.0.2.1")
    with pytest.raises(Forbidden):
        await rig.authz.authorize(reader, "shop", "buy")
    buyer = credentials(f"Bearer {rig.token('shop:*', jti='j3')}", "192.0.2.1")
    await rig.authz.authorize(buyer, "shop", "buy")


async def test_job_readers_need_a_token_then_the_jobs_scope() -> None:
    rig = Rig()
    with pytest.raises(InvalidToken):
        await rig.authz.authenticate(credentials(None, ""))
    reader = await rig.authz.authenticate(credentials(f"Bearer {rig.token('data:get')}", ""))
    assert reader is not None
    assert rig.authz.permits(reader, "data", "get")
    assert not rig.authz.permits(reader, "shop", "buy")
    assert rig.authz.permits(reader, "shop", "ping")  # a public action's jobs
    assert not rig.authz.permits(None, "data", "get")


async def test_with_auth_off_everything_passes() -> None:
    authz = ShimAuthorizer(None, [shop], recheck_s=5)
    anonymous = credentials(None, "")
    assert not authz.enabled
    await authz.authorize(anonymous, "shop", "buy")
    assert await authz.authenticate(anonymous) is None
    assert authz.permits(None, "shop", "buy")
    assert await authz.lease(anonymous, "shop", "buy") is None


def test_end_frame_is_a_named_event_with_the_problem() -> None:
    frame = end_frame(InvalidToken("token revoked"), "req-1")
    head, _, data = frame.partition(b"\ndata: ")
    assert head == b"event: end" and frame.endswith(b"\n\n") and b"\nid:" not in frame
    problem = msgspec.json.decode(data.strip())
    assert problem["code"] == "invalid_token" and problem["status"] == 401
    assert problem["detail"] == "token revoked" and problem["request_id"] == "req-1"
