"""Browser event streams: a short-lived, single-topic, single-use ticket instead of a token."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from nexus_bus import Settings, Worker
from tests.conftest import issue_test_token
from tests.integration.http_shim import RunningShim, bearer, running_shim
from tests.integration.test_http_sse import EventReader, publish

TICKET_TTL_S = 1.0


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    async with running_shim(
        settings, sse_heartbeat_s=0.3, sse_ticket_ttl_s=TICKET_TTL_S
    ) as running:
        yield running


@pytest.fixture
async def client(shim: RunningShim, admin_token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token), timeout=10) as c:
        yield c


@pytest.fixture
async def browser(shim: RunningShim) -> AsyncIterator[httpx.AsyncClient]:
    """What EventSource is: a client that cannot send Authorization."""
    async with httpx.AsyncClient(base_url=shim.url, timeout=10) as c:
        yield c


async def ticket_for(client: httpx.AsyncClient, topic: str) -> dict[str, object]:
    resp = await client.post(f"/v1/events/{topic}/ticket")
    assert resp.status_code == 200, resp.text
    assert resp.headers["cache-control"] == "no-store"
    issued: dict[str, object] = resp.json()
    return issued


def refused(resp: httpx.Response) -> None:
    assert resp.status_code == 401, resp.text
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["code"] == "invalid_token"


async def test_a_ticket_opens_its_stream_once(
    client: httpx.AsyncClient, browser: httpx.AsyncClient, uid: str
) -> None:
    topic = f"tk{uid}"
    issued = await ticket_for(client, topic)
    assert issued["expires_in"] == int(TICKET_TTL_S)
    url = str(issued["url"])
    assert url == f"/v1/events/{topic}?ticket={issued['ticket']}"
    first = await publish(client, topic, "before")
    async with browser.stream("GET", f"{url}&last_event_id={first - 1}") as resp:
        assert resp.status_code == 200
        assert await EventReader(resp).next_event() == (first, "before")
    refused(await browser.get(url))  # single use


async def test_wrong_topic_expired_or_made_up_tickets_are_401(
    client: httpx.AsyncClient, browser: httpx.AsyncClient, uid: str
) -> None:
    issued = await ticket_for(client, f"a{uid}")
    refused(await browser.get(f"/v1/events/b{uid}?ticket={issued['ticket']}"))
    refused(await browser.get(f"/v1/events/a{uid}?ticket={issued['ticket']}"))  # used up above
    expiring = await ticket_for(client, f"c{uid}")
    await asyncio.sleep(TICKET_TTL_S + 0.2)
    refused(await browser.get(str(expiring["url"])))
    refused(await browser.get(f"/v1/events/c{uid}?ticket={'x' * 43}"))
    refused(await browser.get(f"/v1/events/c{uid}?ticket=short"))


async def test_tickets_need_a_token_with_the_stream_scope(
    browser: httpx.AsyncClient, admin_token: str | None, uid: str
) -> None:
    if admin_token is None:
        pytest.skip("authentication is off in this test run")
    resp = await browser.post(f"/v1/events/t{uid}/ticket")
    refused(resp)
    assert resp.headers["www-authenticate"].startswith("Bearer")
    narrow = bearer(issue_test_token(("data:get",)))
    resp = await browser.post(f"/v1/events/t{uid}/ticket", headers=narrow)
    assert resp.status_code == 403 and resp.json()["code"] == "forbidden"
    resp = await browser.get(f"/v1/events/t{uid}/ticket")
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"


async def test_the_stream_holds_the_token_the_ticket_stands_for(
    settings: Settings, client: httpx.AsyncClient, browser: httpx.AsyncClient, uid: str
) -> None:
    if settings.auth.enabled is False:
        pytest.skip("authentication is off in this test run")
    short = issue_test_token(("stream:read",), ttl_s=2)
    topic = f"exp{uid}"
    resp = await browser.post(f"/v1/events/{topic}/ticket", headers=bearer(short))
    assert resp.status_code == 200, resp.text
    async with browser.stream("GET", resp.json()["url"]) as stream:
        assert stream.status_code == 200
        lines = []
        async with asyncio.timeout(15):
            async for line in stream.aiter_lines():
                lines.append(line)
                if line.startswith("data: ") and "invalid_token" in line:
                    break
        assert "event: end" in lines  # the lease re-checks the token, and it expired
