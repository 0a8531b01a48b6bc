"""`GET /v1/events/{topic}`: Server-Sent Events from NEXUS_EVENTS over a real shim."""

from __future__ import annotations

import asyncio
import io
import json
import tracemalloc
from collections.abc import AsyncIterator

import httpx
import msgspec
import pytest

from nexus_bus import Gateway, Settings, Worker
from nexus_bus.constants import EVENTS_STREAM
from nexus_bus.observability import configure_logging
from tests.conftest import issue_test_token
from tests.integration.http_shim import RunningShim, bearer, poll_until, running_shim

HEARTBEAT_S = 0.3


@pytest.fixture(scope="module")
async def shim(settings: Settings, worker: Worker) -> AsyncIterator[RunningShim]:
    async with running_shim(settings, sse_heartbeat_s=HEARTBEAT_S, sse_retry_ms=1500) as running:
        yield running


@pytest.fixture
async def client(shim: RunningShim, admin_token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=shim.url, headers=bearer(admin_token), timeout=10) as c:
        yield c


async def publish(client: httpx.AsyncClient, topic: str, event: object) -> int:
    resp = await client.post("/v1/stream/publish", json={"topic": topic, "event": event})
    assert resp.status_code == 200, resp.text
    seq: int = resp.json()["seq"]
    return seq


async def publish_when_back(
    client: httpx.AsyncClient, topic: str, event: object, *, tries: int = 100, pause_s: float = 0.2
) -> int:
    """`publish`, tried until the servers answer again (after a restart of NATS)."""
    for _ in range(tries - 1):
        try:
            return await publish(client, topic, event)
        except AssertionError:
            await asyncio.sleep(pause_s)
    return await publish(client, topic, event)


class EventReader:
    """Reads SSE frames off a streaming response: events, comments and fields."""

    def __init__(self, resp: httpx.Response) -> None:
        self._lines = resp.aiter_lines()
        self.comments: list[str] = []
        self.retry: int | None = None

    async def next_event(self, timeout_s: float = 5) -> tuple[int, object]:
        async with asyncio.timeout(timeout_s):
            event_id, data = None, []
            async for line in self._lines:
                if line.startswith(":"):
                    self.comments.append(line)
                elif line.startswith("retry: "):
                    self.retry = int(line[7:])
                elif line.startswith("id: "):
                    event_id = int(line[4:])
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif line == "" and event_id is not None:
                    return event_id, msgspec.json.decode("\n".join(data))
        raise AssertionError("stream ended")

    async def wait_comment(self, timeout_s: float = 5) -> str:
        async with asyncio.timeout(timeout_s):
            async for line in self._lines:
                if line.startswith(":"):
                    return line
        raise AssertionError("stream ended")


def topic_of(uid: str) -> str:
    return f"t{uid}"


async def test_resume_after_last_event_id_then_live(client: httpx.AsyncClient, uid: str) -> None:
    topic = topic_of(uid)
    seqs = [await publish(client, topic, {"n": i}) for i in range(3)]
    headers = {"Last-Event-ID": str(seqs[0])}
    async with client.stream("GET", f"/v1/events/{topic}", headers=headers) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        assert resp.headers["cache-control"] == "no-cache"
        assert resp.headers["x-accel-buffering"] == "no"
        assert resp.headers["x-request-id"]
        reader = EventReader(resp)
        assert await reader.next_event() == (seqs[1], {"n": 1})
        assert await reader.next_event() == (seqs[2], {"n": 2})
        assert reader.retry == 1500
        live = await publish(client, topic, "multi\nline")
        assert await reader.next_event() == (live, "multi\nline")


async def test_without_last_event_id_only_new_events(client: httpx.AsyncClient, uid: str) -> None:
    topic = topic_of(uid)
    await publish(client, topic, "old")
    async with client.stream("GET", f"/v1/events/{topic}") as resp:
        reader = EventReader(resp)
        await reader.wait_comment()  # subscribed: the heartbeat proves the stream is live
        new = await publish(client, topic, "new")
        assert await reader.next_event() == (new, "new")


async def test_query_parameter_resumes_too(client: httpx.AsyncClient, uid: str) -> None:
    topic = topic_of(uid)
    first = await publish(client, topic, 1)
    second = await publish(client, topic, 2)
    async with client.stream("GET", f"/v1/events/{topic}?last_event_id={first}") as resp:
        assert await EventReader(resp).next_event() == (second, 2)


async def test_heartbeats_keep_an_idle_stream_alive(client: httpx.AsyncClient, uid: str) -> None:
    async with client.stream("GET", f"/v1/events/{topic_of(uid)}") as resp:
        reader = EventReader(resp)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await reader.wait_comment() == ": keepalive"
        assert await reader.wait_comment() == ": keepalive"
        assert loop.time() - started < HEARTBEAT_S * 2 + 3


async def consumers_on(gateway: Gateway, topic: str) -> int:
    """Consumers of NEXUS_EVENTS reading `topic` (unique per test, so others never count)."""
    infos = await gateway.nc.jetstream().consumers_info(EVENTS_STREAM)
    return sum(1 for i in infos if i.config.filter_subject == f"nexus.events.{topic}")


async def test_client_leaving_removes_its_consumer(
    client: httpx.AsyncClient, gateway: Gateway, shim: RunningShim, uid: str
) -> None:
    topic = topic_of(uid)
    async with client.stream("GET", f"/v1/events/{topic}") as resp:
        reader = EventReader(resp)  # kept: a collected line iterator closes the response
        await reader.wait_comment()
        assert await consumers_on(gateway, topic) == 1
        assert shim.app._streams is not None and shim.app._streams.open_count >= 1
    # Deleted at once, not after the consumer's 30 s inactivity threshold.
    async def gone() -> bool:
        return await consumers_on(gateway, topic) == 0

    await poll_until(gone, 5)


async def test_streams_need_the_workers_authorization(
    shim: RunningShim, admin_token: str | None, uid: str
) -> None:
    if admin_token is None:
        pytest.skip("authentication is off in this test run")
    async with httpx.AsyncClient(base_url=shim.url) as anonymous:
        resp = await anonymous.get(f"/v1/events/{topic_of(uid)}")
        assert resp.status_code == 401 and resp.json()["code"] == "invalid_token"
        assert resp.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/events/Bad.Topic", {}),
        ("/v1/events/ok", {"Last-Event-ID": "nope"}),
        ("/v1/events/ok?last_event_id=-1", {}),
    ],
)
async def test_bad_topic_or_resume_point_is_400(
    client: httpx.AsyncClient, path: str, headers: dict[str, str]
) -> None:
    resp = await client.get(path, headers=headers)
    assert resp.status_code == 400 and resp.json()["code"] == "invalid_request"


async def test_drain_ends_streams(settings: Settings, admin_token: str | None, uid: str) -> None:
    async with (
        running_shim(settings, sse_heartbeat_s=HEARTBEAT_S) as own,
        httpx.AsyncClient(base_url=own.url, headers=bearer(admin_token)) as c,
    ):
        async with c.stream("GET", f"/v1/events/{topic_of(uid)}") as resp:
            reader = EventReader(resp)
            await reader.wait_comment()
            own.app.begin_drain()
            with pytest.raises(AssertionError, match="stream ended"):
                await reader.next_event(timeout_s=5)
        refused = await c.get(f"/v1/events/{topic_of(uid)}")
        assert refused.status_code == 503 and refused.headers["retry-after"]


async def test_a_shim_line_logged_while_serving_names_the_request_and_its_trace(
    settings: Settings, worker: Worker, uid: str
) -> None:
    """The line an event stream's end writes carries `correlation_id` and `trace_id`, the
    fields Loki queries filter on, as a worker's lines do (not only the id in its text)."""
    from tests.conftest import issue_test_token

    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    sink = io.StringIO()
    configure_logging("nexus-test", "INFO", sink=sink)
    try:
        async with (
            running_shim(settings, sse_heartbeat_s=0.3) as own,
            httpx.AsyncClient(base_url=own.url, timeout=15) as c,
        ):
            token = issue_test_token(("stream:read",), subject=f"short-{uid}", ttl_s=1)
            headers = {
                **bearer(token),
                "X-Request-Id": f"sse-{uid}",
                "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
            }
            async with c.stream("GET", f"/v1/events/t{uid}", headers=headers) as resp:
                assert resp.status_code == 200
                async for _ in resp.aiter_lines():  # until the token's exp ends the stream
                    pass
    finally:
        configure_logging("nexus-test", "WARNING", json_lines=False)
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    [ended] = [line for line in lines if line["message"].startswith(f"event stream t{uid}")]
    assert ended["correlation_id"] == f"sse-{uid}"
    assert ended["trace_id"] == trace_id


async def test_a_client_that_stops_reading_holds_no_more_than_a_backlog(
    client: httpx.AsyncClient, gateway: Gateway, uid: str
) -> None:
    """The shim keeps a bounded backlog for a client that reads slower than its topic is
    written, and reads the rest from JetStream when it catches up: every event arrives, in
    order. Before, the shim kept every event the server pushed (up to nats-py's 256 MiB a
    subscription, past which it dropped them unseen): here all 32 MB."""
    topic = topic_of(uid)
    event = msgspec.json.encode("x" * 32_000)
    js = gateway.nc.jetstream()
    async with client.stream("GET", f"/v1/events/{topic}") as resp:
        reader = EventReader(resp)
        await reader.wait_comment()  # then reads nothing while the events are written
        tracemalloc.start()
        try:
            seqs = [(await js.publish(f"nexus.events.{topic}", event)).seq for _ in range(1000)]
            await asyncio.sleep(1)
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < 8_000_000
        received = [(await reader.next_event())[0] for _ in seqs]
    assert received == seqs


async def test_drain_ends_a_busy_stream_without_a_gap(
    settings: Settings, worker: Worker, gateway: Gateway, admin_token: str | None, uid: str
) -> None:
    """Draining under a client that is behind: what it got before the stream ended has no
    hole, so resuming after its last id loses nothing. Before, making room for the stop
    dropped the oldest event held for the client, and the ones after it were still sent."""
    topic = topic_of(uid)
    event = msgspec.json.encode("x" * 32_000)
    js = gateway.nc.jetstream()
    async with (
        running_shim(settings, sse_heartbeat_s=HEARTBEAT_S) as own,
        httpx.AsyncClient(base_url=own.url, headers=bearer(admin_token)) as c,
        c.stream("GET", f"/v1/events/{topic}") as resp,
    ):
        reader = EventReader(resp)
        await reader.wait_comment()
        seqs = [(await js.publish(f"nexus.events.{topic}", event)).seq for _ in range(600)]
        await asyncio.sleep(1)
        own.app.begin_drain()
        received: list[int] = []
        with pytest.raises(AssertionError, match="stream ended"):
            while True:
                received.append((await reader.next_event())[0])
    assert received == seqs[: len(received)]


async def test_a_client_that_takes_nothing_is_dropped(
    settings: Settings, worker: Worker, gateway: Gateway, admin_token: str | None, uid: str
) -> None:
    """A client that stays connected but stops reading (a frozen tab, a stuck proxy): once
    its socket is full nothing can reach it, heartbeats neither, so nothing noticed; it held
    its place among `sse_max_streams` and its consumer for as long as the connection lived.
    Now a frame it does not take within `sse_send_timeout_s` closes the stream."""
    topic = topic_of(uid)
    event = msgspec.json.encode("x" * 32_000)
    js = gateway.nc.jetstream()
    async with (
        running_shim(settings, sse_heartbeat_s=HEARTBEAT_S, sse_send_timeout_s=1) as own,
        httpx.AsyncClient(base_url=own.url, headers=bearer(admin_token)) as c,
        c.stream("GET", f"/v1/events/{topic}") as resp,
    ):
        reader = EventReader(resp)  # kept: a collected line iterator closes the response
        await reader.wait_comment()  # then reads nothing more
        for _ in range(1000):
            await js.publish(f"nexus.events.{topic}", event)
        assert own.app._streams is not None

        async def dropped() -> bool:
            assert own.app._streams is not None
            return own.app._streams.open_count == 0 and await consumers_on(gateway, topic) == 0

        await poll_until(dropped, 10)


async def test_drain_ends_streams_that_were_opening(
    settings: Settings, worker: Worker, admin_token: str | None, uid: str
) -> None:
    """Streams still subscribing when the drain began end too. close_all() ended only the
    streams already registered; one between the shim's drain check and its consumer (a
    JetStream round trip or two) then streamed on through the drain until the shim exited.
    Forty streams opening at once, the drain at the first that starts, a few times over."""
    for round_ in range(4):
        async with (
            running_shim(settings, sse_heartbeat_s=HEARTBEAT_S) as own,
            httpx.AsyncClient(base_url=own.url, headers=bearer(admin_token), timeout=20) as c,
        ):
            started = asyncio.Event()
            topics = [f"t{uid}r{round_}n{i}" for i in range(40)]
            followers = [asyncio.create_task(follow_to_end(c, t, started)) for t in topics]
            await started.wait()
            own.app.begin_drain()
            try:
                async with asyncio.timeout(3):
                    await asyncio.gather(*followers)
            finally:
                for task in followers:
                    task.cancel()
                await asyncio.gather(*followers, return_exceptions=True)


async def follow_to_end(client: httpx.AsyncClient, topic: str, started: asyncio.Event) -> None:
    """Read a stream until it ends; `started` is set once it has begun."""
    async with client.stream("GET", f"/v1/events/{topic}") as resp:
        if resp.status_code == 200:
            started.set()
            async for _ in resp.aiter_lines():
                pass


async def test_one_caller_cannot_take_every_stream(
    settings: Settings, worker: Worker, uid: str
) -> None:
    """Past `sse_max_streams_per_caller` a caller's next stream is refused (429), while
    another caller's opens; a stream closed gives its caller the place back."""
    greedy = bearer(issue_test_token(("stream:read",), subject=f"greedy-{uid}"))
    other = bearer(issue_test_token(("stream:read",), subject=f"other-{uid}"))
    topic = topic_of(uid)
    async with (
        running_shim(settings, sse_heartbeat_s=HEARTBEAT_S, sse_max_streams_per_caller=2) as own,
        httpx.AsyncClient(base_url=own.url, timeout=10) as c,
    ):
        async with (
            c.stream("GET", f"/v1/events/{topic}", headers=greedy) as first,
            c.stream("GET", f"/v1/events/{topic}", headers=greedy) as second,
        ):
            assert first.status_code == second.status_code == 200
            refused = await c.get(f"/v1/events/{topic}", headers=greedy)
            assert refused.status_code == 429, refused.text
            assert refused.json()["code"] == "rate_limited"
            assert "too many open event streams for this caller" in refused.json()["detail"]
            async with c.stream("GET", f"/v1/events/{topic}", headers=other) as theirs:
                assert theirs.status_code == 200
        # Both of greedy's streams closed: its places are free again, once the shim has
        # seen the disconnects.
        async with asyncio.timeout(5):
            while True:
                async with c.stream("GET", f"/v1/events/{topic}", headers=greedy) as again:
                    if again.status_code == 200:
                        break
                    assert again.status_code == 429
                await asyncio.sleep(0.05)
