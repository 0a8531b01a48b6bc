"""The HTTP shim's pure parts: client address, labels, problems, head parsing, SSE frames."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from starlette.routing import Match

from nexus_bus.config import Settings
from nexus_bus.errors import (
    HeadersTooLarge,
    InvalidRequest,
    InvalidToken,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    UpstreamTimeout,
)
from nexus_bus.http.app import ShimApp
from nexus_bus.http.client_ip import TrustedProxies
from nexus_bus.http.deadlines import ReadDeadlines
from nexus_bus.http.forward import budget_s, prefers_async
from nexus_bus.http.jobs import job_location
from nexus_bus.http.labels import OTHER, OperationLabels
from nexus_bus.http.problems import (
    ClientGone,
    MethodNotAllowed,
    problem_answer,
    retry_after_of,
    status_headers,
)
from nexus_bus.http.request import DRAIN_BYTES, DRAIN_S, declared_length, parse_head, read_body
from nexus_bus.http.routes import EVENTS_ROUTE, JOB_ROUTE, OPERATION_ROUTE, TICKET_ROUTE
from nexus_bus.http.sse import event_frame, last_event_id, retry_frame

# --- client address ---------------------------------------------------------------------


def test_untrusted_peer_is_the_client_whatever_it_forwards() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip("203.0.113.5", "1.2.3.4") == "203.0.113.5"
    assert TrustedProxies([]).client_ip("203.0.113.5", "1.2.3.4") == "203.0.113.5"


def test_trusted_proxy_chain_is_read_right_to_left() -> None:
    proxies = TrustedProxies(["10.0.0.0/8", "127.0.0.1/32"])
    # The client forged the leftmost entry; the proxies appended the real hops.
    assert proxies.client_ip("127.0.0.1", "6.6.6.6, 198.51.100.7, 10.1.2.3") == "198.51.100.7"
    assert proxies.client_ip("10.0.0.1", "198.51.100.7") == "198.51.100.7"
    assert proxies.client_ip("10.0.0.1", None) == "10.0.0.1"


def test_all_trusted_or_garbage_hops() -> None:
    proxies = TrustedProxies(["10.0.0.0/8"])
    assert proxies.client_ip("10.0.0.1", "10.0.0.2, 10.0.0.3") == "10.0.0.2"
    assert proxies.client_ip("10.0.0.1", "not-an-ip") == "10.0.0.1"
    assert proxies.client_ip("10.0.0.1", "198.51.100.7, junk, 10.0.0.9") == "10.0.0.9"
    assert proxies.client_ip(None, "198.51.100.7") == ""


def test_ipv6_proxies() -> None:
    proxies = TrustedProxies(["::1/128"])
    assert proxies.client_ip("::1", "2001:db8::7") == "2001:db8::7"


# --- metric labels ----------------------------------------------------------------------


def test_labels_only_for_served_operations_and_bounded() -> None:
    labels = OperationLabels(max_pairs=2)
    assert labels.of("data", "get", served=False) == (OTHER, OTHER)
    assert labels.of("data", "get", served=True) == ("data", "get")
    assert labels.of("data", "get", served=False) == ("data", "get")  # known now
    assert labels.of("data", "put", served=True) == ("data", "put")
    assert labels.of("data", "list", served=True) == (OTHER, OTHER)  # budget spent


# --- problems ---------------------------------------------------------------------------


def test_401_challenge_says_invalid_token_only_when_one_was_sent() -> None:
    bare = status_headers(401, token_sent=False, retry_after=None, default_retry_after=1)
    told = status_headers(401, token_sent=True, retry_after=None, default_retry_after=1)
    assert bare == [(b"www-authenticate", b'Bearer realm="nexus-bus"')]
    assert told == [(b"www-authenticate", b'Bearer realm="nexus-bus", error="invalid_token"')]


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_on_429_and_503(status: int) -> None:
    assert status_headers(status, token_sent=False, retry_after=None, default_retry_after=2) == [
        (b"retry-after", b"2")
    ]
    assert status_headers(status, token_sent=False, retry_after=7.4, default_retry_after=2) == [
        (b"retry-after", b"7")
    ]
    assert status_headers(404, token_sent=True, retry_after=3, default_retry_after=2) == []


def test_retry_after_header_values() -> None:
    assert retry_after_of("12") == 12.0
    assert retry_after_of(None) is None
    assert retry_after_of("Wed, 21 Oct 2015 07:28:00 GMT") is None
    assert retry_after_of("-1") is None


def test_problem_answer_document() -> None:
    answer = problem_answer(
        RateLimited("slow down", retry_after=3), "rid-1", token_sent=True, default_retry_after=1
    )
    assert answer.status == 429 and answer.content_type == b"application/problem+json"
    assert (b"retry-after", b"3") in answer.headers
    doc = msgspec.json.decode(answer.body)
    assert doc == {
        "type": "https://nexus-bus.dev/problems/rate_limited",
        "title": "Rate limited",
        "status": 429,
        "code": "rate_limited",
        "detail": "slow down",
        "request_id": "rid-1",
    }
    not_allowed = problem_answer(
        MethodNotAllowed("no", allow="GET"), "r", token_sent=False, default_retry_after=1
    )
    assert not_allowed.status == 405 and (b"allow", b"GET") in not_allowed.headers
    unauthorized = problem_answer(InvalidToken(), "r", token_sent=False, default_retry_after=1)
    assert unauthorized.headers[0][0] == b"www-authenticate"
    assert problem_answer(NotFound(), "r", token_sent=False, default_retry_after=1).headers == []
    gone = problem_answer(Unavailable(), "r", token_sent=False, default_retry_after=5)
    assert gone.headers == [(b"retry-after", b"5")]


# --- request head and body --------------------------------------------------------------


def test_parse_head_picks_first_and_joins_forwarded_for() -> None:
    head = parse_head(
        [
            (b"authorization", b"Bearer a"),
            (b"authorization", b"Bearer b"),
            (b"x-forwarded-for", b"1.1.1.1"),
            (b"x-forwarded-for", b"2.2.2.2"),
            (b"x-request-id", b"rid"),
            (b"content-type", b"application/json"),
            (b"x-other", b"ignored"),
            (b"idempotency-key", b"caf\xe9"),
        ]
    )
    assert head.authorization == "Bearer a"
    assert head.forwarded_for == "1.1.1.1, 2.2.2.2"
    assert head.request_id == "rid" and head.content_type == "application/json"
    assert head.idempotency_key == "caf\xe9"  # refused later, before NATS (not ASCII)
    assert head.traceparent is None


def test_parse_head_limit() -> None:
    head = parse_head([(b"x-big", b"v" * 2000), (b"x-request-id", b"mine")])
    assert head.request_id == "mine"  # read before the size is refused: the 431 carries it
    with pytest.raises(HeadersTooLarge):
        head.check_size(1000)
    head.check_size(4096)


def test_declared_length() -> None:
    head = parse_head([(b"content-length", b"100")])
    assert declared_length(head, 100) == 100
    with pytest.raises(PayloadTooLarge):
        declared_length(head, 99)
    with pytest.raises(InvalidRequest):
        declared_length(parse_head([(b"content-length", b"1e3")]), 100)
    assert declared_length(parse_head([]), 100) is None


def receiver(*messages: dict[str, Any]) -> Any:
    queue = list(messages)

    async def receive() -> dict[str, Any]:
        return queue.pop(0)

    return receive


async def test_read_body_single_and_chunked() -> None:
    one = receiver({"type": "http.request", "body": b"abc", "more_body": False})
    assert await read_body(one, 10, None) == b"abc"
    parts = receiver(
        {"type": "http.request", "body": b"ab", "more_body": True},
        {"type": "http.request", "body": b"cd", "more_body": False},
    )
    assert await read_body(parts, 10, ReadDeadlines(1.0)) == b"abcd"


async def test_read_body_refuses_as_soon_as_the_limit_is_crossed() -> None:
    parts = receiver(
        {"type": "http.request", "body": b"x" * 6, "more_body": True},
        {"type": "http.request", "body": b"x" * 6, "more_body": True},
        # the limit is crossed: the rest is read and dropped, not kept, so that the client
        # has finished sending when the 413 goes out (no reset before it reads it)
        {"type": "http.request", "body": b"x" * 6, "more_body": False},
    )
    with pytest.raises(PayloadTooLarge):
        await read_body(parts, 10, None)
    with pytest.raises(PayloadTooLarge):
        await read_body(receiver({"type": "http.request", "body": b"x" * 11}), 10, None)


async def test_a_refused_body_is_drained_only_so_far() -> None:
    chunk = 64 * 1024
    read = 0

    async def endless() -> dict[str, Any]:
        nonlocal read
        read += chunk
        return {"type": "http.request", "body": b"x" * chunk, "more_body": True}

    with pytest.raises(PayloadTooLarge):
        await read_body(endless, 10, None)
    assert DRAIN_BYTES <= read <= DRAIN_BYTES + 2 * chunk  # then the 413, whatever follows

    async def trickle() -> dict[str, Any]:
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x" * 8, "more_body": True}

    started = time.monotonic()
    with pytest.raises(PayloadTooLarge):
        await read_body(trickle, 10, None)
    assert time.monotonic() - started < DRAIN_S + 0.3


async def test_read_body_client_gone() -> None:
    with pytest.raises(ClientGone):
        await read_body(receiver({"type": "http.disconnect"}), 10, None)


# --- operation route helpers ------------------------------------------------------------


def test_budget() -> None:
    assert budget_s(None, default_ms=5000, max_ms=60000) == 5.0
    assert budget_s("250", default_ms=5000, max_ms=60000) == 0.25
    assert budget_s("999999", default_ms=5000, max_ms=60000) == 60.0
    assert budget_s("9" * 16, default_ms=5000, max_ms=60000) == 60.0  # the schema's 16 digits
    for bad in ("-1", "1.5", "x", "9" * 17):
        with pytest.raises(InvalidRequest):
            budget_s(bad, default_ms=5000, max_ms=60000)
    for spent in ("0", "000"):  # a spent budget: the answer to a passed deadline
        with pytest.raises(UpstreamTimeout):
            budget_s(spent, default_ms=5000, max_ms=60000)


@pytest.mark.parametrize(
    ("value", "wanted"),
    [
        ("respond-async", True),
        ("Respond-Async", True),
        ("return=minimal, respond-async", True),
        ("respond-async; wait=10", True),
        ("wait=10", False),
        ("respond-asyncx", False),
        (None, False),
        ("", False),
    ],
)
def test_prefers_async(value: str | None, wanted: bool) -> None:
    assert prefers_async(value) is wanted


def test_job_location() -> None:
    assert job_location("ab" * 16) == "/v1/jobs/" + "ab" * 16


# --- SSE --------------------------------------------------------------------------------


def test_event_frames() -> None:
    assert event_frame(7, b'{"a":1}') == b'id: 7\ndata: {"a":1}\n\n'
    assert event_frame(8, b"one\ntwo\r\nthree\rfour") == (
        b"id: 8\ndata: one\ndata: two\ndata: three\ndata: four\n\n"
    )
    assert retry_frame(1500) == b"retry: 1500\n\n"


def test_last_event_id_sources() -> None:
    assert last_event_id("42", b"") == 42
    assert last_event_id(None, b"last_event_id=7&x=1") == 7
    assert last_event_id("3", b"last_event_id=7") == 3  # the header wins
    assert last_event_id(None, b"") is None
    assert last_event_id("", b"") is None
    for bad in ("x", "-1", "1" * 20):
        with pytest.raises(InvalidRequest):
            last_event_id(bad, b"")


# --- route templates --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "template"),
    [
        ("/v1/data/get", OPERATION_ROUTE),
        ("/v1/jobsx/run", OPERATION_ROUTE),  # only the exact first segments are left out
        ("/v1/eventsy/read", OPERATION_ROUTE),
        ("/v1/jobs/0123abc", JOB_ROUTE),
        ("/v1/events/orders", EVENTS_ROUTE),
        ("/v1/events/orders/ticket", TICKET_ROUTE),
    ],
)
def test_the_operation_route_is_first_yet_shadows_no_other(path: str, template: str) -> None:
    routes = ShimApp(Settings())._router.routes
    assert routes[0].name == OPERATION_ROUTE
    scope = {"type": "http", "path": path, "root_path": "", "method": "GET"}
    matched = next(r for r in routes if r.matches(scope)[0] is Match.FULL)
    assert matched.name == template
