"""Hostile and broken HTTP input: every answer a problem document, never a 500, never a hang.

Limits the shim enforces itself (the app, on uvicorn's documented settings). Heads that never
complete or keep coming, silent connections and lingering after an early 413 are NGINX's:
tests/e2e/test_nginx_limits.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from nexus_bus import Settings, Worker
from tests.integration.http_shim import (
    PROBE_OP,
    RunningShim,
    bearer,
    probe_worker,
    raw_exchange,
    running_shim,
)

READ_TIMEOUT_S = 0.6


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    # A short read timeout so slow-client tests take a second, not ten.
    async with probe_worker(settings), running_shim(
        settings, read_timeout_s=READ_TIMEOUT_S
    ) as running:
        yield running


@pytest.fixture
async def client(shim: RunningShim, admin_token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token)) as c:
        yield c


def assert_problem(resp: httpx.Response, status: int, code: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == code
    assert resp.json()["request_id"] == resp.headers["x-request-id"]


def parse_raw(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one raw HTTP/1.1 answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return status, headers, body


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"key": "k"} trailing garbage',
        b'{"key": "\xff\xfe"}',
        b"\xef\xbb\xbf\xff",
        b'{"key": "k", "value": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"key": "k", "value": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}",
        b'{"key": "k", "value": 1' + b"9" * 5000 + b"}",
        b'{"key": "k", "value": 1e999999}',
        b'{"key": "k\\n", "value": 1}',  # "$" in a key pattern once let the newline through
        b"",
        b"null",
        b'"just a string"',
    ],
)
async def test_malformed_bodies_are_400_problems(client: httpx.AsyncClient, body: bytes) -> None:
    resp = await client.post(
        "/v1/data/put", content=body, headers={"Content-Type": "application/json"}
    )
    assert_problem(resp, 400, "invalid_request")


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "application/xml",
        "application/json; charset=latin-1",  # JSON is UTF-8 (RFC 8259)
        "application/json;charset=utf-16",
    ],
)
async def test_unsupported_content_types_are_415(
    client: httpx.AsyncClient, content_type: str
) -> None:
    resp = await client.post(
        "/v1/data/get", content=b'{"key":"k"}', headers={"Content-Type": content_type}
    )
    assert_problem(resp, 415, "unsupported_media_type")


async def test_json_with_parameters_and_no_content_type_are_accepted(
    client: httpx.AsyncClient, uid: str
) -> None:
    key = f"ct.{uid}"
    put = await client.post(
        "/v1/data/put",
        content=b'{"key":"%s","value":1}' % key.encode(),
        headers={"Content-Type": "application/json; charset=utf-8"},
    )
    assert put.status_code == 200
    upper = await client.post(
        "/v1/data/get",
        content=b'{"key":"%s"}' % key.encode(),
        headers={"Content-Type": 'application/json; charset="UTF-8"'},
    )
    assert upper.status_code == 200
    bare = await client.post("/v1/data/get", content=b'{"key":"%s"}' % key.encode())
    assert bare.status_code == 200 and bare.json()["value"] == 1


async def test_declared_oversized_body_is_413_before_reading(
    shim: RunningShim, settings: Settings
) -> None:
    limit = settings.limits.max_body_bytes
    request = (
        b"POST /v1/data/put HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % (limit + 1)
    )
    started = time.monotonic()
    # No body is sent at all: the answer must not wait for it.
    status, headers, body = parse_raw(await raw_exchange(shim.url, request, read_timeout_s=5))
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["code"] == "payload_too_large"
    assert json.loads(body)["request_id"] == headers["x-request-id"] != ""
    assert time.monotonic() - started < READ_TIMEOUT_S


async def test_streamed_oversized_body_is_413(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    limit = settings.limits.max_body_bytes

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"key":"k","value":"'
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536
        yield b'"}'

    resp = await client.post(
        "/v1/data/put", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert_problem(resp, 413, "payload_too_large")


@pytest.mark.parametrize("how", ["one chunk", "trickled"])
async def test_oversized_headers_are_431(shim: RunningShim, settings: Settings, how: str) -> None:
    big = b"X-Filler: " + b"a" * (settings.http.max_header_bytes + 10) + b"\r\n"
    request = b"POST /v1/data/get HTTP/1.1\r\nHost: x\r\n" + big + b"Content-Length: 2\r\n\r\n{}"
    if how == "one chunk":
        answer = await raw_exchange(shim.url, request)
    else:
        host, port = shim.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        for i in range(0, len(request), 4096):
            writer.write(request[i : i + 4096])
            await writer.drain()
            if writer.is_closing() or reader.at_eof():
                break
            await asyncio.sleep(0)
        answer = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    status, headers, body = parse_raw(answer)
    assert status == 431 and headers["content-type"] == "application/problem+json"
    assert json.loads(body)["code"] == "headers_too_large"
    assert json.loads(body)["request_id"] == headers["x-request-id"] != ""


async def test_many_headers_adding_up_are_431(
    client: httpx.AsyncClient, settings: Settings
) -> None:
    """Measured by the app: the problem carries the request id of its answer, the client's."""
    headers = {f"x-h{i}": "v" * 200 for i in range(settings.http.max_header_bytes // 200 + 5)}
    resp = await client.post("/v1/data/get", json={"key": "k"}, headers=headers)
    assert_problem(resp, 431, "headers_too_large")
    resp = await client.post(
        "/v1/data/get", json={"key": "k"}, headers={**headers, "X-Request-Id": "mine-431"}
    )
    assert_problem(resp, 431, "headers_too_large")
    assert resp.json()["request_id"] == "mine-431"


async def test_malformed_http_is_a_400(shim: RunningShim) -> None:
    """uvicorn's own answer (plain text): the request never reaches the app."""
    status, _, _ = parse_raw(
        await raw_exchange(shim.url, b"POST /v1/data/get HTTP/1.1\r\nBad Header\r\n\r\n")
    )
    assert status == 400


async def test_slow_body_times_out_with_408(shim: RunningShim) -> None:
    host, port = shim.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/data/get HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{\"key\":"  # 7 of the 100 promised bytes
    )
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(-1), 10)
    writer.close()
    status, _, body = parse_raw(answer)
    assert status == 408 and b"request_timeout" in body


async def test_keep_alive_connection_serves_many_requests(client: httpx.AsyncClient) -> None:
    # The read timer of one request must never fire on the next one's idle wait.
    for _ in range(3):
        resp = await client.post(f"/v1/{PROBE_OP}/sleep", json={"ms": int(READ_TIMEOUT_S * 700)})
        assert resp.status_code == 200
        await asyncio.sleep(READ_TIMEOUT_S * 0.7)


async def test_bad_requests_do_not_disturb_good_ones(
    client: httpx.AsyncClient, settings: Settings, uid: str
) -> None:
    key = f"mix.{uid}"
    await client.post("/v1/data/put", json={"key": key, "value": 7})
    oversized = b'{"key":"k","value":"' + b"x" * (settings.limits.max_body_bytes + 1) + b'"}'
    bad_bodies = [oversized, b"{", b"[" * 3000, b'{"key":"\xff"}']

    async def good() -> int:
        resp = await client.post("/v1/data/get", json={"key": key})
        return int(resp.json()["value"])

    async def bad(i: int) -> int:
        resp = await client.post(
            "/v1/data/put", content=bad_bodies[i % 4], headers={"Content-Type": "application/json"}
        )
        return resp.status_code

    results = await asyncio.gather(*(good() for _ in range(40)), *(bad(i) for i in range(20)))
    assert results[:40] == [7] * 40
    assert set(results[40:]) <= {400, 413}
