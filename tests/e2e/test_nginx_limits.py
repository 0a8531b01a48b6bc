"""The HTTP limits NGINX enforces in front of the shim (compose/nginx/nginx.conf).

uvicorn has no read timeout for a request head, no limit on a head that keeps coming, and
closes a connection with unread input without lingering; the shim uses only uvicorn's
documented settings (docs/http.md, "Limits per deployment"), so these limits are NGINX's:
`client_header_timeout`, `large_client_header_buffers`, `client_max_body_size` and its
lingering close. The config is the one compose runs, with its timeouts shortened to 1 s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from nexus_bus import Settings
from nexus_bus.embedded import free_port
from tests.e2e.test_nginx import (
    CONFIG,
    NGINX,
    answers,
    render_config,
    start_nginx,
    start_shim,
    stop,
)
from tests.integration.http_shim import poll_until

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (make test installs Debian's nginx)"
)
TIMEOUT_S = 1


@pytest.fixture(scope="module")
def edge_url(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("nginx-limits")
    shim_port, edge_port = free_port(), free_port()
    shim = start_shim(settings, shim_port, tmp / "shim.log")
    text = render_config(CONFIG.read_text(), tmp, edge_port, [shim_port])
    for name in ("client_header_timeout", "client_body_timeout"):
        assert f"{name} 10s;" in text
        text = text.replace(f"{name} 10s;", f"{name} {TIMEOUT_S}s;")
    conf = tmp / "nginx.conf"
    conf.write_text(text)
    nginx = start_nginx(tmp, conf)
    url = f"http://127.0.0.1:{edge_port}"
    try:
        asyncio.run(poll_until(lambda: answers(f"http://127.0.0.1:{shim_port}"), 30))
        asyncio.run(poll_until(lambda: answers(url), 10))
        yield url
    finally:
        stop(nginx)
        stop(shim)


async def exchange(url: str, data: bytes, wait_s: float = 10) -> tuple[bytes, float]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    try:
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(-1), wait_s)
    finally:
        writer.close()
    return answer, time.monotonic() - started


async def test_a_head_that_never_completes_is_cut_off(edge_url: str) -> None:
    answer, elapsed = await exchange(edge_url, b"POST /v1/data/get HTTP/1.1\r\nHost: x\r\n")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
    assert TIMEOUT_S * 0.8 <= elapsed < TIMEOUT_S + 3


async def test_a_silent_connection_is_closed(edge_url: str) -> None:
    answer, elapsed = await exchange(edge_url, b"")
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408")
    assert elapsed < TIMEOUT_S + 3


async def test_a_head_that_keeps_coming_is_refused(edge_url: str) -> None:
    """Beyond `large_client_header_buffers` (4 x 32k): refused before reaching a shim."""
    filler = b"".join(b"X-F%d: %s\r\n" % (i, b"a" * 8000) for i in range(40))
    answer, _ = await exchange(edge_url, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + filler + b"\r\n")
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 431, 494)


@pytest.mark.parametrize("declared", [True, False])
async def test_early_413_reaches_a_client_still_sending(edge_url: str, declared: bool) -> None:
    """The answer survives a body the client keeps sending after it (NGINX lingers: a close
    with unread input would make the kernel reset the connection and destroy the 413)."""
    size = 3 * 1024 * 1024
    framing = b"Content-Length: %d" % size if declared else b"Transfer-Encoding: chunked"
    head = (
        b"POST /v1/data/put HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + framing
        + b"\r\n\r\n"
    )
    host, port = edge_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head)
        chunk = b"x" * 65536
        with_reset = False
        for _ in range(size // len(chunk)):
            writer.write(chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            try:
                await writer.drain()
            except ConnectionResetError:
                with_reset = True
                break
        await asyncio.sleep(0.2)
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert not with_reset
    assert answer.startswith(b"HTTP/1.1 413") and b"payload_too_large" in answer


@pytest.fixture(scope="module")
def no_replica_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The compose config in front of an upstream that no shim listens on."""
    tmp = tmp_path_factory.mktemp("nginx-no-replica")
    edge_port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(render_config(CONFIG.read_text(), tmp, edge_port, [free_port()]))
    nginx = start_nginx(tmp, conf)
    url = f"http://127.0.0.1:{edge_port}"
    try:
        asyncio.run(poll_until(lambda: reachable(url), 10))
        yield url
    finally:
        stop(nginx)


@pytest.mark.parametrize("key", [None, "idem-1"], ids=["plain", "idempotency-key"])
async def test_nginx_answers_problem_documents_with_or_without_an_idempotency_key(
    edge_url: str, no_replica_url: str, key: str | None
) -> None:
    """NGINX's own answers, for a request retried on another replica (`@retryable`) too:
    a body over its limit, and no replica to answer."""
    extra = b"Idempotency-Key: %s\r\n" % key.encode() if key else b""
    head = b"POST /v1/data/put HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    answer = await first_answer(edge_url, head + extra + b"Content-Length: 3145728\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 413")
    assert b"application/problem+json" in answer and b"payload_too_large" in answer
    answer = await first_answer(no_replica_url, head + extra + b"Content-Length: 2\r\n\r\n{}")
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert b"application/problem+json" in answer and b'"code":"unavailable"' in answer
    assert b"Retry-After: 1" in answer and b"X-Request-Id: " in answer


async def reachable(url: str) -> bool:
    """Whether something accepts connections at `url` (whatever it answers)."""
    host, port = url.removeprefix("http://").split(":")
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except OSError:
        return False
    writer.close()
    return True


async def first_answer(url: str, data: bytes) -> bytes:
    """The head and body of the first answer to `data` (NGINX may keep the connection open,
    lingering for a body it refused)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(data)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return head + await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
