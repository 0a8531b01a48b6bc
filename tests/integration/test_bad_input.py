"""Bad input over real NATS: clear errors with stable codes, and nobody else is hurt."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import nats
import pytest

from nexus_bus import (
    Gateway,
    InvalidRequest,
    NoResponders,
    NotFound,
    PayloadTooLarge,
    UnknownOperation,
    Worker,
)
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import HeadersTooLarge, NexusError
from nexus_bus.handlers import builtin_groups
from tests.conftest import make_settings
from tests.helpers import json_that_grows

INJECTED_TOKENS = ["a.b", "a b", "a\r\nPUB nexus.data.delete 2", "*", ">", "", "A", "x" * 65]


@pytest.mark.parametrize("bad", INJECTED_TOKENS)
async def test_subject_injection_is_refused_before_publishing(gateway: Gateway, bad: str) -> None:
    for op, action in ((bad, "get"), ("data", bad)):
        with pytest.raises((InvalidRequest, UnknownOperation)):
            await gateway.request(op, action, {"key": "k"})
    assert not gateway.nc.is_closed


@pytest.mark.parametrize("op", ["jobs", "dlq", "events", "sys"])
async def test_reserved_ops_are_refused(gateway: Gateway, op: str) -> None:
    with pytest.raises(UnknownOperation):
        await gateway.request(op, "x", {})


async def test_unknown_op_and_action(gateway: Gateway) -> None:
    with pytest.raises(UnknownOperation) as info:  # no worker declared it (docs/registry.md)
        await gateway.request("nosuchop", "get", {}, timeout=5)
    assert info.value.http_status == 404
    with pytest.raises(UnknownOperation) as info:
        await gateway.request("data", "nosuchaction", {})
    assert info.value.http_status == 404


async def test_no_responders_is_immediate(gateway: Gateway) -> None:
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises((NoResponders, UnknownOperation)):
        await gateway.request("nobodyhome", "x", {}, timeout=10)
    assert loop.time() - started < 1


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "invalid_request"),
        (b'{"key": "k"} trailing', "invalid_request"),
        (b'{"key": "\xff"}', "invalid_request"),
        (b'{"key": "a b"}', "invalid_request"),
        (b'{"key": "k", "value": ' + b"[" * 5000 + b"]" * 5000 + b"}", "invalid_request"),
        (b'{"key": "k", "value": 1' + b"9" * 400 + b"}", "invalid_request"),
        # A "$"-anchored key pattern let a final newline through, to the NATS client's
        # subject check (503).
        (b'{"key": "k\\n", "value": 1}', "invalid_request"),
    ],
)
async def test_malformed_bodies_are_400(gateway: Gateway, body: bytes, code: str) -> None:
    with pytest.raises(NexusError) as info:
        await gateway.request("data", "put", body)
    assert info.value.code == code and info.value.http_status == 400


async def test_oversized_body_and_headers(gateway: Gateway) -> None:
    big = b'{"key": "k", "value": "' + b"x" * (gateway.settings.limits.max_body_bytes + 1) + b'"}'
    with pytest.raises(PayloadTooLarge):
        await gateway.request("data", "put", big)
    with pytest.raises(HeadersTooLarge):
        await gateway.request("data", "get", {"key": "k"}, token="t" * 100_000)
    with pytest.raises(InvalidRequest):
        await gateway.request("data", "get", {"key": "k"}, idempotency_key="a\r\nb")
    assert not gateway.nc.is_closed


async def test_worker_enforces_limits_for_direct_nats_clients(
    gateway: Gateway, nats_url: str
) -> None:
    """A plain NATS client bypasses the gateway; the worker must still refuse."""
    nc = await nats.connect(nats_url)
    auth = {"Authorization": f"Bearer {gateway.token}"} if gateway.token else {}
    try:
        limit = gateway.settings.limits.max_body_bytes
        body = b'{"key":"k","value":"' + b"x" * limit + b'"}'
        msg = await nc.request("nexus.data.put", body, timeout=5, headers=auth)
        assert msg.headers is not None and msg.headers["Nexus-Status"] == "413"
        msg = await nc.request("nexus.data.get", b"{", timeout=5, headers=auth)
        assert msg.headers is not None and msg.headers["Nexus-Status"] == "400"
        assert msg.headers["Nats-Service-Error-Code"] == "400"
        msg = await nc.request(
            "nexus.data.get",
            b'{"key":"k"}',
            timeout=5,
            headers={**auth, "Content-Type": "text/xml"},
        )
        assert msg.headers is not None and msg.headers["Nexus-Status"] == "415"
        # JSON is UTF-8 (RFC 8259): a body declared in another charset is refused too.
        for content_type, status in (
            ("application/json; charset=latin-1", "415"),
            ("application/json; charset=UTF-8", "404"),  # accepted: the key does not exist
        ):
            msg = await nc.request(
                "nexus.data.get",
                b'{"key":"no.such.key.charset"}',
                timeout=5,
                headers={**auth, "Content-Type": content_type},
            )
            assert msg.headers is not None and msg.headers["Nexus-Status"] == status
    finally:
        await nc.close()


async def test_bad_requests_do_not_break_in_flight_ones(gateway: Gateway, uid: str) -> None:
    await gateway.request("data", "put", {"key": f"ok.{uid}", "value": 1})
    oversized = b'{"key":"k","value":"' + b"x" * 2_000_000 + b'"}'

    async def good() -> int:
        return int((await gateway.request("data", "get", {"key": f"ok.{uid}"}))["value"])

    async def bad(i: int) -> str:
        body = [oversized, b"{", b"[" * 3000][i % 3]
        try:
            await gateway.request("data", "put", body)
        except NexusError as exc:
            return exc.code
        return "accepted"

    results = await asyncio.gather(*(good() for _ in range(50)), *(bad(i) for i in range(30)))
    assert results[:50] == [1] * 50
    assert "accepted" not in results[50:]
    assert not gateway.nc.is_closed
    assert await good() == 1


@pytest.fixture
async def small_worker(
    small_nats: ServerProcess, redis_url: str, admin_token: str | None
) -> AsyncIterator[tuple[Worker, Gateway]]:
    """`data` and `stream` served on a server of the test's own, with a 64 KiB max_payload."""
    settings = make_settings(small_nats.url, redis_url)
    worker = Worker(settings, builtin_groups(["data", "stream"]))
    await worker.start()
    gateway = await Gateway.connect(settings, token=admin_token)
    try:
        yield worker, gateway
    finally:
        await gateway.close()
        await worker.drain(1)


@pytest.mark.parametrize("write", ["create", "update", "keyed", "event"])
async def test_a_value_over_max_payload_with_its_write_headers_is_413_and_the_worker_stays(
    small_worker: tuple[Worker, Gateway], uid: str, write: str
) -> None:
    """A stored value that fits max_payload alone, but not with the headers its write carries
    (a compare-and-set's expected revision, an idempotent request's batch headers, the stream
    `stream.publish` expects): nats-py checks the value alone, the server closed the worker's
    connection for good, and the worker stopped."""
    worker, gateway = small_worker
    value = json_that_grows(worker.nc.max_payload - 8)  # too large for any header block
    key = f"big{uid}".encode()
    options: dict[str, Any] = {}
    if write == "event":
        op, action, body = "stream", "publish", b'{"topic":"t%s","event":%s}' % (key, value)
    else:
        op, action, condition = "data", "put", b""
        if write == "create":
            condition = b',"expected_revision":0'
        elif write == "update":
            revision = (await gateway.request("data", "put", {"key": key.decode(), "value": 1}))[
                "revision"
            ]
            condition = b',"expected_revision":%d' % revision
        else:
            options["idempotency_key"] = f"k{uid}"
        body = b'{"key":"%s","value":%s%s}' % (key, value, condition)
    with pytest.raises(PayloadTooLarge):
        await gateway.request(op, action, body, timeout=5, **options)
    assert worker.nc.is_connected and not worker.lost.is_set()
    # The worker still serves, and the same value sent without any header is stored: a
    # publish that carries none is held to the server's limit only.
    put = b'{"key":"%s","value":%s}' % (key, value)
    assert (await gateway.request("data", "put", put, timeout=5))["revision"] > 0


async def test_a_list_prefix_no_key_starts_with_is_400_and_opens_no_breaker(
    nats_url: str, redis_url: str, worker: object, admin_token: str | None, uid: str
) -> None:
    """A prefix with an empty token made a KV watch filter that is not a subject (`a..>`):
    JetStream refused it and the worker answered 503 `unavailable`, which the gateway retried
    and counted against the op's breaker, shared by every replica: one client's malformed
    listings opened `data` for everyone."""
    settings = make_settings(nats_url, redis_url)  # default policies: breakers shared
    client = await Gateway.connect(settings, token=admin_token)
    other = await Gateway.connect(settings, token=admin_token)  # another replica
    try:
        for prefix in ["..", "a..", "a.b..", ".a.", "."] * 2:
            with pytest.raises(InvalidRequest) as info:
                await client.request("data", "list", {"prefix": prefix})
            assert info.value.http_status == 400 and "prefix" in info.value.detail
        await asyncio.sleep(settings.resilience.sync_interval_ms / 1000 * 2)
        for gateway in (client, other):
            with pytest.raises(NotFound):  # answered by a worker, not by an open breaker
                await gateway.request("data", "get", {"key": f"absent.{uid}"})
    finally:
        await client.close()
        await other.close()


# MessagePack values JSON cannot carry. msgspec encodes none of these keys: written by hand.
NO_JSON_FORM = {
    "nil-key": b"\x81\xc0\x01",  # {nil: 1}
    "bool-key": b"\x81\xc3\x01",  # {true: 1}
    "array-key": b"\x81\x92\x01\x02\x01",  # {[1, 2]: 1}
    "nan": msgspec.msgpack.encode(float("nan")),
    "infinity": msgspec.msgpack.encode([float("inf")]),
}


@pytest.mark.parametrize("value", NO_JSON_FORM.values(), ids=NO_JSON_FORM.keys())
@pytest.mark.parametrize(("op", "action"), [("data", "put"), ("stream", "publish")])
async def test_a_msgpack_value_json_cannot_carry_is_400_and_not_stored(
    gateway: Gateway, uid: str, op: str, action: str, value: bytes
) -> None:
    """Values are stored as JSON: such a key failed the handler's re-encoding (500
    `internal`), and NaN or an infinity was stored, to be read back as null."""
    fields = (b"\xa3key", b"\xa5value") if op == "data" else (b"\xa5topic", b"\xa5event")
    name = f"odd{uid}"
    body = b"\x82" + fields[0] + msgspec.msgpack.encode(name) + fields[1] + value
    with pytest.raises(InvalidRequest) as info:
        await gateway.request(op, action, body, media="msgpack")
    assert info.value.http_status == 400
    if op == "data":
        with pytest.raises(NotFound):
            await gateway.request("data", "get", {"key": name})
    else:
        assert (await gateway.request("stream", "read", {"topic": name}))["events"] == []


async def test_stream_read_returns_what_fits_a_reply_and_reads_on(
    small_worker: tuple[Worker, Gateway], uid: str
) -> None:
    """Events that fit one by one but not all in one reply: a read with the default limit
    answered 413 `payload_too_large`, every time, so the topic could not be read past them
    without guessing a smaller limit. Now a read returns the events that fit, and the
    reader goes on after the last one."""
    _, gateway = small_worker
    topic = f"t{uid}"
    published = [
        (await gateway.request("stream", "publish", {"topic": topic, "event": "x" * 30_000}))[
            "seq"
        ]
        for _ in range(3)
    ]
    read: list[int] = []
    after = 0
    while len(read) < len(published):
        reply = await gateway.request(
            "stream", "read", {"topic": topic, "after_seq": after}, timeout=5
        )
        assert reply["events"]
        read += [event["seq"] for event in reply["events"]]
        after = read[-1]
    assert read == published
