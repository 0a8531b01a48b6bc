"""The shim answers a hot `data.get` from the cache, and refuses and answers as a worker would.

Real nats-server and redis-server on free ports, a real worker and a real shim (uvicorn). The
reads the shim answers itself are told apart from the worker's by the worker's own request
count, and by stopping the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import httpx
import msgspec
import nats
import nats.aio.client
import pytest
from nats.aio.msg import Msg

from nexus_bus import Gateway, Operations, RequestContext, Settings, Worker
from nexus_bus.errors import Forbidden
from nexus_bus.handlers import builtin_groups
from nexus_bus.schemas.data import GetReply, GetRequest, PutReply, PutRequest
from tests.conftest import issue_test_token, make_settings
from tests.integration.http_shim import RunningShim, poll_until, running_shim
from tests.servers import ServerProcess

LEASE_S = 2.0  # long: a stale L1 copy would still be served, were it not revoked


@pytest.fixture
def own_settings(local_nats: ServerProcess, local_redis: ServerProcess) -> Settings:
    return make_settings(
        local_nats.url, local_redis.url + "/0", cache={"local_ttl_s": LEASE_S}
    )


@pytest.fixture
async def worker(own_settings: Settings) -> AsyncIterator[Worker]:
    worker = Worker(own_settings, builtin_groups(["data"]))
    await worker.start()
    try:
        yield worker
    finally:
        await worker.drain(1)


@pytest.fixture
async def gateway(own_settings: Settings, worker: Worker) -> AsyncIterator[Gateway]:
    gw = await Gateway.connect(own_settings, token=issue_test_token())
    try:
        yield gw
    finally:
        await gw.close()


@pytest.fixture
async def shim(own_settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    async with running_shim(own_settings) as running:
        yield running


@pytest.fixture
async def http(shim: RunningShim) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {issue_test_token()}"}
    async with httpx.AsyncClient(base_url=shim.url, headers=headers, timeout=10) as client:
        yield client


class Sent:
    """Counts the `data.get` requests sent to the workers, on a plain NATS subscription."""

    def __init__(self) -> None:
        self.count = 0

    async def seen(self, _: Msg) -> None:
        self.count += 1

    async def settled(self, nc: nats.aio.client.Client) -> int:
        await nc.flush()
        await asyncio.sleep(0.05)
        return self.count


@pytest.fixture
async def sent(own_settings: Settings) -> AsyncIterator[tuple[Sent, nats.aio.client.Client]]:
    nc = await nats.connect(own_settings.nats.url)
    counter = Sent()
    await nc.subscribe("nexus.data.get", cb=counter.seen)
    await nc.flush()
    try:
        yield counter, nc
    finally:
        await nc.close()


async def test_a_hot_read_is_answered_by_the_shim_byte_for_byte_as_the_worker_answers(
    own_settings: Settings,
    worker: Worker,
    shim: RunningShim,
    http: httpx.AsyncClient,
    sent: tuple[Sent, nats.aio.client.Client],
    uid: str,
) -> None:
    key = f"c.{uid}"
    put = await http.post("/v1/data/put", json={"key": key, "value": {"n": 1, "s": "é"}})
    assert put.status_code == 200, put.text
    forwarding = running_shim(own_settings, cached_reads=False)
    async with forwarding as other, httpx.AsyncClient(base_url=other.url) as direct:
        by_worker = await direct.post("/v1/data/get", json={"key": key}, headers=http.headers)
    counter, nc = sent
    before = await counter.settled(nc)
    answers = [await http.post("/v1/data/get", json={"key": key}) for _ in range(20)]
    assert await counter.settled(nc) == before  # none reached the worker
    for answer in answers:
        assert answer.status_code == 200
        assert answer.content == by_worker.content
        assert answer.headers["content-type"] == by_worker.headers["content-type"]
    # The worker stops: the shim still answers what the cache holds.
    await worker.drain(1)
    again = await http.post("/v1/data/get", json={"key": key})
    assert again.status_code == 200 and again.content == by_worker.content


async def test_a_write_elsewhere_revokes_the_shims_copy_before_it_returns(
    shim: RunningShim, http: httpx.AsyncClient, gateway: Gateway, uid: str
) -> None:
    key = f"c.{uid}"
    # A Redis younger than one lease makes every write wait (the holders a restart lost):
    # let this test's fresh one age first, so that only the shim's acknowledgement counts.
    await asyncio.sleep(LEASE_S)
    for value in range(5):
        # Written over NATS, by the worker: the shim's L1 copy (a 5 s lease) must be gone
        # before the put returns, so the very next read sees the new value.
        started = time.monotonic()
        await gateway.request("data", "put", {"key": key, "value": value})
        # The shim acknowledged the revocation: the writer did not wait out its lease.
        assert time.monotonic() - started < LEASE_S / 2
        first = await http.post("/v1/data/get", json={"key": key})
        second = await http.post("/v1/data/get", json={"key": key})
        assert first.json()["value"] == value and second.json()["value"] == value
    deleted = await gateway.request("data", "delete", {"key": key})
    assert deleted["deleted"] is True
    gone = await http.post("/v1/data/get", json={"key": key})
    assert gone.status_code == 404 and gone.json()["code"] == "not_found"


async def test_the_shim_refuses_a_hot_read_as_the_worker_would(
    shim: RunningShim, http: httpx.AsyncClient, uid: str
) -> None:
    key = f"c.{uid}"
    await http.post("/v1/data/put", json={"key": key, "value": 1})
    assert (await http.post("/v1/data/get", json={"key": key})).status_code == 200  # cached
    anonymous = await http.post("/v1/data/get", json={"key": key}, headers={"Authorization": ""})
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "invalid_token"
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    other_scope = {"Authorization": f"Bearer {issue_test_token(scopes=['data:put'])}"}
    forbidden = await http.post("/v1/data/get", json={"key": key}, headers=other_scope)
    assert forbidden.status_code == 403 and forbidden.json()["code"] == "forbidden"
    forged = {"Authorization": "Bearer not.a.token"}
    refused = await http.post("/v1/data/get", json={"key": key}, headers=forged)
    assert refused.status_code == 401


async def test_what_the_cache_cannot_answer_goes_to_the_worker_unchanged(
    shim: RunningShim,
    http: httpx.AsyncClient,
    sent: tuple[Sent, nats.aio.client.Client],
    uid: str,
) -> None:
    missing = await http.post("/v1/data/get", json={"key": f"none.{uid}"})
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    bodies = (b'{"key": 5}', b'{"key": "a b"}', b'{"key": "k", "x": 1}', b'{"key": "\xff"}')
    for body in (*bodies, b"[", b""):
        bad = await http.post(
            "/v1/data/get", content=body, headers={"Content-Type": "application/json"}
        )
        assert bad.status_code == 400, body
        assert bad.json()["code"] == "invalid_request", body
    key = f"c.{uid}"
    await http.post("/v1/data/put", json={"key": key, "value": 1})
    await http.post("/v1/data/get", json={"key": key})  # now cached
    counter, nc = sent
    before = await counter.settled(nc)
    keyed = await http.post(
        "/v1/data/get", json={"key": key}, headers={"Idempotency-Key": f"k-{uid}"}
    )
    assert keyed.status_code == 200
    assert await counter.settled(nc) == before + 1  # the worker's journal answered it


async def test_a_cached_read_spends_the_callers_rate_limit(
    local_nats: ServerProcess, local_redis: ServerProcess, uid: str
) -> None:
    settings = make_settings(
        local_nats.url,
        local_redis.url + "/0",
        resilience={"ops": {"data.get": {"rate_limit_per_s": 0.1, "rate_limit_burst": 3}}},
    )
    worker = Worker(settings, builtin_groups(["data"]))
    await worker.start()
    try:
        async with running_shim(settings) as shim:
            headers = {"Authorization": f"Bearer {issue_test_token()}"}
            async with httpx.AsyncClient(base_url=shim.url, headers=headers) as http:
                key = f"c.{uid}"
                await http.post("/v1/data/put", json={"key": key, "value": 1})
                statuses = [
                    (await http.post("/v1/data/get", json={"key": key})).status_code
                    for _ in range(6)
                ]
    finally:
        await worker.drain(1)
    assert statuses[:3] == [200, 200, 200] and set(statuses[3:]) == {429}, statuses


async def test_with_cached_reads_off_every_read_goes_to_the_worker(
    own_settings: Settings, worker: Worker, sent: tuple[Sent, nats.aio.client.Client], uid: str
) -> None:
    async with running_shim(own_settings, cached_reads=False) as shim:
        assert shim.app._cached is None
        headers = {"Authorization": f"Bearer {issue_test_token()}"}
        async with httpx.AsyncClient(base_url=shim.url, headers=headers) as http:
            key = f"c.{uid}"
            await http.post("/v1/data/put", json={"key": key, "value": 1})
            counter, nc = sent
            before = await counter.settled(nc)
            for _ in range(3):
                assert (await http.post("/v1/data/get", json={"key": key})).status_code == 200
            assert await counter.settled(nc) == before + 3



# A deployment's own `data` group (not the built-in one): its `get` lets a caller read only
# the keys under its own subject. The shim knows it (it was given these groups) and must not
# answer it as if it were the built-in `data.get`.
own_data = Operations("data", description="Per-subject records.")


@own_data.action("put")
async def own_put(req: PutRequest, ctx: RequestContext) -> PutReply:
    """Write a key under the caller's subject only."""
    assert ctx.principal is not None
    if not req.key.startswith(f"{ctx.principal.subject}."):
        raise Forbidden("not your key")
    revision = await ctx.services.records.put(req.key, msgspec.json.encode(req.value))
    return PutReply(key=req.key, revision=revision)


@own_data.action("get")
async def own_get(req: GetRequest, ctx: RequestContext) -> GetReply:
    """Read a key under the caller's subject only."""
    assert ctx.principal is not None
    if not req.key.startswith(f"{ctx.principal.subject}."):
        raise Forbidden("not your key")
    record = await ctx.services.records.get(req.key)
    return GetReply(key=req.key, value=msgspec.json.decode(record.value), revision=record.revision)


async def test_a_data_group_of_ones_own_is_never_answered_by_the_shim(
    own_settings: Settings, uid: str
) -> None:
    worker = Worker(own_settings, [own_data])
    await worker.start()
    try:
        async with running_shim(own_settings, groups=[own_data]) as shim:
            owner = {"Authorization": f"Bearer {issue_test_token(subject=f'alice{uid}')}"}
            other = {"Authorization": f"Bearer {issue_test_token(subject=f'bob{uid}')}"}
            async with httpx.AsyncClient(base_url=shim.url) as http:
                key = f"alice{uid}.k"
                put = await http.post("/v1/data/put", json={"key": key, "value": 1}, headers=owner)
                assert put.status_code == 200, put.text
                mine = await http.post("/v1/data/get", json={"key": key}, headers=owner)
                assert mine.status_code == 200, mine.text  # now cached
                theirs = await http.post("/v1/data/get", json={"key": key}, headers=other)
    finally:
        await worker.drain(1)
    assert theirs.status_code == 403, theirs.text  # the group's own rule, as its worker says


async def test_an_empty_authorization_is_refused_in_the_workers_words(
    own_settings: Settings, shim: RunningShim, http: httpx.AsyncClient, uid: str
) -> None:
    key = f"c.{uid}"
    await http.post("/v1/data/put", json={"key": key, "value": 1})
    assert (await http.post("/v1/data/get", json={"key": key})).status_code == 200  # cached
    empty = {"Authorization": "", "X-Request-Id": f"r-{uid}"}
    here = await http.post("/v1/data/get", json={"key": key}, headers=empty)
    forwarding = running_shim(own_settings, cached_reads=False)
    async with forwarding as other, httpx.AsyncClient(base_url=other.url) as direct:
        there = await direct.post("/v1/data/get", json={"key": key}, headers=empty)
    assert there.status_code == 401
    assert (here.status_code, here.content) == (there.status_code, there.content)
    assert here.headers["www-authenticate"] == there.headers["www-authenticate"]


async def test_a_shim_cut_off_from_nats_vouches_for_no_cached_value(
    local_nats: ServerProcess, shim: RunningShim, http: httpx.AsyncClient, uid: str
) -> None:
    """Without NATS the shim hears no floors (nor revocations): it leaves reads to the
    workers, which it cannot reach either. The caller gets what a failed call gets: here the
    stale-if-error answer, marked as such (docs/resilience.md), never an unmarked value."""
    key = f"c.{uid}"
    await http.post("/v1/data/put", json={"key": key, "value": 1})
    assert (await http.post("/v1/data/get", json={"key": key})).status_code == 200  # cached
    local_nats.stop()
    nc = shim.app.nc
    assert nc is not None

    async def cut() -> bool:
        return not nc.is_connected

    await poll_until(cut, 10)
    cut_off = await http.post("/v1/data/get", json={"key": key})
    assert cut_off.status_code == 200 and "nexus-stale-age" in cut_off.headers, cut_off.text
