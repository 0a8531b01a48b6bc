"""The pure parts of `nexus_bus.ai`: error mapping, keys, budgets, similarity, guards."""

from __future__ import annotations

import asyncio
import email.utils

import httpx
import pytest

from nexus_bus.ai.backend import ChatMessage, CompletionCall
from nexus_bus.ai.batcher import EmbedBatcher, MissCollector
from nexus_bus.ai.guard import BackendGuard
from nexus_bus.ai.keys import complete_key, embed_key, estimate_tokens, is_deterministic
from nexus_bus.ai.openai import chat_body, map_status, map_transport_error, parse_retry_after
from nexus_bus.ai.runtime import minute_budget
from nexus_bus.ai.settings import AISettings, BackendSettings, read_api_key
from nexus_bus.ai.similarity import cosine, text_of, top_k
from nexus_bus.config import ConfigError, load_settings
from nexus_bus.errors import (
    CircuitOpen,
    InvalidRequest,
    RateLimited,
    Unavailable,
    UpstreamTimeout,
)
from nexus_bus.resilience.gcra import decide


def call(**kw: object) -> CompletionCall:
    base: dict[str, object] = {
        "model": "m", "messages": (ChatMessage(role="user", content="hello world"),),
        "max_tokens": 10,
    }
    return CompletionCall(**{**base, **kw})  # type: ignore[arg-type]


def test_every_httpx_error_class_is_mapped() -> None:
    request = httpx.Request("POST", "http://x/v1/chat/completions")
    timeouts = [httpx.ConnectTimeout, httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout]
    for cls in timeouts:
        assert isinstance(map_transport_error(cls("t", request=request), "b"), UpstreamTimeout)
    others = [httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError, httpx.ProxyError,
              httpx.UnsupportedProtocol, httpx.TooManyRedirects]
    for cls in others:
        assert isinstance(map_transport_error(cls("t", request=request), "b"), Unavailable)


@pytest.mark.parametrize(
    ("status", "error"),
    [(400, InvalidRequest), (404, InvalidRequest), (413, InvalidRequest), (422, InvalidRequest),
     (401, Unavailable), (403, Unavailable), (500, Unavailable), (502, Unavailable),
     (503, Unavailable), (408, UpstreamTimeout), (504, UpstreamTimeout), (429, RateLimited)],
)
def test_status_mapping(status: int, error: type[Exception]) -> None:
    mapped = map_status(status, b'{"error": {"message": "nope"}}', "3", "b", now=0.0)
    assert type(mapped) is error
    if status == 429:
        assert mapped.retry_after == 3
    if error is InvalidRequest:
        assert "nope" in str(mapped)


def test_retry_after_forms() -> None:
    now = 1_000_000.0
    assert parse_retry_after("12", now) == 12
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert parse_retry_after(date, now) == pytest.approx(30, abs=1)
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None


def test_chat_body_sends_only_what_is_set() -> None:
    assert chat_body(call()) == {
        "model": "m", "messages": [{"role": "user", "content": "hello world"}], "max_tokens": 10
    }
    body = chat_body(call(temperature=0.0, stop=("x",)))
    assert body["temperature"] == 0.0 and body["stop"] == ["x"]


def test_cache_keys() -> None:
    assert embed_key("m", " a   b\n") == embed_key("m", "a b")
    assert embed_key("m", "a b") != embed_key("n", "a b") != embed_key("m", "A b")
    assert complete_key(call()) == complete_key(call())
    assert complete_key(call()) != complete_key(call(max_tokens=11))
    assert is_deterministic(call(temperature=0.0)) and not is_deterministic(call())
    assert estimate_tokens(call()) == 2 + 10


def test_minute_budget_admits_exactly_a_minutes_worth() -> None:
    now, tat = 1.7e12, None
    admitted = []
    for cost in (600, 600, 100, 300, 1):
        decision = decide(minute_budget(1000, cost), tat, now)
        admitted.append(decision.allowed)
        if decision.allowed:
            tat = decision.tat_ms
    assert admitted == [True, False, True, True, False]
    assert decide(minute_budget(1000, 5000), None, now).allowed is False


def test_a_request_budget_below_one_a_minute_spaces_requests_out() -> None:
    """`requests_per_min` 0.5: one request every two minutes (its burst was half a request,
    so every request was refused, and its Retry-After waited out in vain)."""
    limit, now = minute_budget(0.5, 1), 1.7e12
    first = decide(limit, None, now)
    assert first.allowed
    early = decide(limit, first.tat_ms, now + 60_000)
    assert not early.allowed and early.retry_after_ms == pytest.approx(60_000, abs=1)
    assert decide(limit, first.tat_ms, now + 120_000).allowed


def test_a_token_budget_below_one_token_a_minute_is_invalid() -> None:
    """Every request is estimated at a token or more, over such a minute's budget: each
    would be refused (400), so the setting is refused instead, by name."""
    with pytest.raises(ConfigError, match=r"ai\.budget\.tokens_per_min: .*at least 1"):
        load_settings(discover=False, ai={"budget": {"tokens_per_min": 0.5}})
    settings = load_settings(
        discover=False, ai={"budget": {"tokens_per_min": 1, "requests_per_min": 0.5}}
    )
    assert settings.ai.budget.requests_per_min == 0.5


def test_similarity() -> None:
    assert cosine([1, 0], [1, 0]) == pytest.approx(1) and cosine([0, 0], [1, 0]) == 0
    with pytest.raises(ValueError):
        cosine([1], [1, 2])
    items = [("a", [1.0, 0.0]), ("b", [0.7, 0.7]), ("c", [0.0, 1.0])]
    assert [k for k, _ in top_k([1.0, 0.1], items, 2)] == ["a", "b"]
    assert text_of("hi") == "hi" and text_of({"text": "t", "n": 1}) == "t"
    assert text_of({"n": 1}) == '{"n":1}' and text_of("  ") is None


def test_settings_refuse_a_model_served_twice_and_read_keys(tmp_path: object) -> None:
    one = {"kind": "openai", "base_url": "http://a/v1", "models": ["m"]}
    with pytest.raises(ValueError, match="served by both"):
        AISettings(backends={"a": one, "b": one})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="needs base_url"):
        BackendSettings(kind="openai", models=["m"])
    env_backend = BackendSettings(base_url="http://a", models=["m"], api_key_env="K")
    key = read_api_key(env_backend, {"K": "sk-1"})
    assert key is not None and key.get_secret_value() == "sk-1" and "sk-1" not in repr(key)
    with pytest.raises(ValueError, match="K is not set"):
        read_api_key(env_backend, {})


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_guard_retry_after_window_and_breaker() -> None:
    clock = Clock()
    guard = BackendGuard(
        "b", BackendSettings(base_url="http://a", models=["m"], breaker_failures=2), clock
    )

    async def limited(timeout_s: float) -> None:
        raise RateLimited("slow down", retry_after=5)

    async def broken(timeout_s: float) -> None:
        raise Unavailable("down")

    async def fine(timeout_s: float) -> str:
        return "ok"

    with pytest.raises(RateLimited):
        await guard.call(limited, 1)
    with pytest.raises(RateLimited) as waiting:
        await guard.call(fine, 1)
    assert waiting.value.retry_after == 5
    clock.now += 5
    assert await guard.call(fine, 1) == "ok"
    for _ in range(2):
        with pytest.raises(Unavailable):
            await guard.call(broken, 1)
    with pytest.raises(CircuitOpen):
        await guard.call(fine, 1)
    clock.now += 60
    assert await guard.call(fine, 1) == "ok"


async def test_batcher_joins_concurrent_callers() -> None:
    batches: list[list[str]] = []

    async def embed(texts: list[str], remaining_s: float) -> list[list[float]]:
        batches.append(texts)
        return [[float(len(t))] for t in texts]

    batcher = EmbedBatcher(embed, max_batch=3)
    results = await asyncio.gather(
        batcher.embed(["a"], 5), batcher.embed(["bb", "ccc"], 5), batcher.embed(["dddd"], 5)
    )
    assert results == [[[1.0]], [[2.0], [3.0]], [[4.0]]]
    assert batches == [["a", "bb", "ccc"], ["dddd"]]


async def test_batcher_with_one_call_at_a_time_batches_what_arrives_meanwhile() -> None:
    batches: list[list[str]] = []
    release = asyncio.Event()

    async def embed(texts: list[str], remaining_s: float) -> list[list[float]]:
        batches.append(texts)
        await release.wait()
        return [[1.0] for _ in texts]

    batcher = EmbedBatcher(embed, max_batch=2, max_running=1)
    first = asyncio.ensure_future(batcher.embed(["a"], 5))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    later = [asyncio.ensure_future(batcher.embed([t], 5)) for t in ("b", "c", "d")]
    await asyncio.sleep(0.01)
    assert batches == [["a"]]  # b, c, d wait for the running call
    release.set()
    await asyncio.gather(first, *later)
    assert batches == [["a"], ["b", "c"], ["d"]]


async def test_a_batch_gets_its_latest_callers_time_and_is_cancelled_when_all_have_left() -> None:
    given: list[float] = []
    cancelled = asyncio.Event()

    async def hang(texts: list[str], remaining_s: float) -> list[list[float]]:
        given.append(remaining_s)
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    batcher = EmbedBatcher(hang, max_batch=8)
    short = asyncio.ensure_future(asyncio.wait_for(batcher.embed(["a"], 0.05), 0.05))
    longer = asyncio.ensure_future(asyncio.wait_for(batcher.embed(["b"], 0.1), 0.1))
    with pytest.raises(TimeoutError):
        await short
    assert len(given) == 1 and 0.05 < given[0] <= 0.1  # one call, for the later deadline
    assert not cancelled.is_set()  # a caller still waits
    with pytest.raises(TimeoutError):
        await longer
    await asyncio.wait_for(cancelled.wait(), 1)  # nobody waits: the call is given up


async def test_a_requests_misses_are_given_up_once_its_caller_left() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def hang(texts: list[str], remaining_s: float) -> list[list[float]]:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return []

    misses = MissCollector(EmbedBatcher(hang, max_batch=8), 2, lambda: 30.0)
    loads = asyncio.gather(misses.load("a"), misses.load("b"))
    await asyncio.wait_for(started.wait(), 1)
    loads.cancel()  # the caller left before its deadline (its handler was cancelled)
    await asyncio.wait_for(cancelled.wait(), 1)


async def test_guard_counts_a_call_abandoned_by_its_callers_as_a_timeout() -> None:
    guard = BackendGuard(
        "b", BackendSettings(base_url="http://a", models=["m"], breaker_failures=2), Clock()
    )

    async def hang(timeout_s: float) -> None:
        await asyncio.sleep(60)

    for cancel_is_timeout in (False, True, True):
        call = asyncio.ensure_future(guard.call(hang, 30, cancel_is_timeout=cancel_is_timeout))
        await asyncio.sleep(0)  # upstream
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    assert guard.in_flight == 0
    with pytest.raises(CircuitOpen):  # two abandoned calls; the plain cancellation is no outcome
        await guard.call(hang, 30)
