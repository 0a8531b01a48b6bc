"""Regressions found in review: each of these once stalled, disconnected or 500-ed a replica."""

from __future__ import annotations

import asyncio

import msgspec
import nats
import pytest

from nexus_bus import Gateway, Operations, RequestContext, Worker
from nexus_bus.errors import NexusError, PayloadTooLarge
from tests.conftest import make_settings
from tests.integration.http_shim import raw_exchange, running_shim


class Size(msgspec.Struct, frozen=True, kw_only=True):
    bytes: int = 0
    seconds: float = 0.0


class Blob(msgspec.Struct, frozen=True, kw_only=True):
    data: str


def blob_ops(op: str) -> Operations:
    ops = Operations(op)

    @ops.action("make", public=True)
    async def make(req: Size, ctx: RequestContext) -> Blob:
        await asyncio.sleep(req.seconds)
        return Blob(data="x" * req.bytes)

    return ops


@pytest.fixture
async def blob_worker(nats_url: str, redis_url: str, uid: str):  # type: ignore[no-untyped-def]
    settings = make_settings(nats_url, redis_url, worker={"concurrency": 1})
    worker = Worker(settings, [blob_ops(f"blob{uid}")])
    await worker.start()
    yield worker, f"blob{uid}"
    await worker.drain(1)


async def test_a_non_ascii_digit_deadline_cannot_leak_concurrency_slots(
    blob_worker: tuple[Worker, str], nats_url: str
) -> None:
    """`"²".isdigit()` is True but int("²") fails: it once raised after a slot was taken."""
    _, op = blob_worker
    nc = await nats.connect(nats_url)
    try:
        for _ in range(3):  # more than the worker's concurrency of 1
            msg = await nc.request(
                f"nexus.{op}.make", b"{}", timeout=5, headers={"Nexus-Deadline": "²"}
            )
            assert msg.headers is not None and msg.headers["Nexus-Status"] == "200"
    finally:
        await nc.close()


async def test_an_oversized_reply_becomes_413_and_the_worker_stays_connected(
    blob_worker: tuple[Worker, str], gateway: Gateway
) -> None:
    worker, op = blob_worker
    too_big = worker.nc.max_payload  # the body alone fits nowhere with its headers
    with pytest.raises(PayloadTooLarge):
        await gateway.request(op, "make", {"bytes": too_big - 20})
    await asyncio.sleep(0.2)
    assert worker.nc.is_connected
    assert (await gateway.request(op, "make", {"bytes": 10}))["data"] == "x" * 10


async def test_drain_answers_requests_already_delivered(
    blob_worker: tuple[Worker, str], gateway: Gateway
) -> None:
    """With concurrency 1, three requests wait in the process when drain starts."""
    worker, op = blob_worker
    calls = [asyncio.create_task(gateway.request(op, "make", {"seconds": 0.3})) for _ in range(4)]
    await asyncio.sleep(0.1)
    await worker.drain(5)
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, dict) for r in results), results


async def test_msgpack_extension_types_are_400(
    gateway: Gateway, nats_url: str, admin_token: str | None, uid: str
) -> None:
    nc = await nats.connect(nats_url)
    try:
        body = msgspec.msgpack.encode({"key": f"ext.{uid}", "value": msgspec.msgpack.Ext(1, b"x")})
        headers = {"Content-Type": "application/msgpack"}
        if admin_token:
            headers["Authorization"] = f"Bearer {admin_token}"
        msg = await nc.request("nexus.data.put", body, timeout=5, headers=headers)
        assert msg.headers is not None and msg.headers["Nexus-Status"] == "400"
    finally:
        await nc.close()


def _http(path: bytes, extra: bytes, body: bytes = b"{}", method: bytes = b"POST") -> bytes:
    return (
        method + b" " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n" % len(body) + extra + b"\r\n" + body
    )


async def test_non_ascii_digits_in_http_headers_are_400(
    settings,
    worker: Worker,
    admin_token: str | None,
    uid: str,  # type: ignore[no-untyped-def]
) -> None:
    auth = b"Authorization: Bearer " + (admin_token or "").encode() + b"\r\n"
    async with running_shim(settings) as shim:
        out = await raw_exchange(
            shim.url, _http(b"/v1/data/get", auth + b"Nexus-Timeout-Ms: \xb2\r\n", b'{"key":"a"}')
        )
        assert out.split(b"\r\n")[0].split()[1] == b"400"
        out = await raw_exchange(
            shim.url,
            _http(b"/v1/events/t" + uid.encode(), auth + b"Last-Event-ID: \xb2\r\n", b"", b"GET"),
        )
        assert out.split(b"\r\n")[0].split()[1] == b"400"


async def test_the_gateway_maps_a_full_reconnect_buffer_to_unavailable(
    local_nats,
    redis_url: str,
    admin_token: str | None,  # type: ignore[no-untyped-def]
) -> None:
    gw = await Gateway.connect(make_settings(local_nats.url, redis_url), token=admin_token)
    try:
        local_nats.kill()
        codes = set()
        for _ in range(12):  # 12 x 400 KB overflows nats-py's 2 MiB reconnect buffer
            try:
                await gw.request(
                    "data", "put", b'{"key":"k","value":"' + b"x" * 400_000 + b'"}', timeout=0.2
                )
            except NexusError as exc:
                codes.add(exc.code)
        assert codes <= {"upstream_timeout", "unavailable"} and "unavailable" in codes
    finally:
        await gw.close()  # must not raise with the server gone


async def test_the_sse_stream_cap_holds_under_concurrent_opens(
    settings, worker: Worker, admin_token: str | None, uid: str  # type: ignore[no-untyped-def]
) -> None:
    async def open_stream(url: str) -> tuple[bytes, asyncio.StreamWriter]:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /v1/events/t" + uid.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: Bearer " + (admin_token or "").encode() + b"\r\n\r\n"
        )
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 10), writer

    async with running_shim(settings, sse_max_streams=2) as shim:
        opened = await asyncio.gather(*(open_stream(shim.url) for _ in range(10)))
        statuses = sorted(line.split()[1] for line, _ in opened)
        for _, writer in opened:
            writer.close()
        await asyncio.sleep(0.3)
    assert statuses.count(b"200") == 2 and statuses.count(b"503") == 8
