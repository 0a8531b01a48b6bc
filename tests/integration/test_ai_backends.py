"""`ai.*` against an OpenAI-compatible provider DOUBLE (a real HTTP server), over real NATS
and Redis: request shape, error mapping, Retry-After, breaker, bulkhead, budget, cache."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus_bus.ai.runtime import EXTRAS_KEY
from nexus_bus.errors import (
    CircuitOpen,
    InvalidRequest,
    RateLimited,
    Unavailable,
    UpstreamTimeout,
)
from tests.integration.ai_serving import ai_settings, ai_worker, openai_backend, serving_ai
from tests.model_provider_double import ProviderDouble, double_vector, provider_double

CHAT = "chat/completions"
EMBED = "embeddings"


@pytest.fixture
async def provider() -> AsyncIterator[ProviderDouble]:
    async with provider_double() as double:
        yield double


def section(provider: ProviderDouble, **backend: object) -> dict[str, object]:
    return {
        "backends": {"double": openai_backend(provider.base_url, ["chat-1", "emb-1"], **backend)},
        "default_complete_model": "chat-1",
    }


async def test_completion_request_shape_and_reply(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str, tmp_path: Path
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(f"sk-test-{uid}\n")
    settings = ai_settings(nats_url, redis_url, section(provider, api_key_file=str(key_file)))
    async with serving_ai(settings, f"ai{uid}") as gw:
        reply = await gw.request(f"ai{uid}", "complete", {
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "hello"}],
            "max_tokens": 12, "temperature": 0.5, "stop": ["\n"],
        })
        prompt = await gw.request(f"ai{uid}", "complete", {"prompt": "hi", "model": "chat-1"})
    first, second = provider.calls(CHAT)
    assert first == {
        "model": "chat-1",
        "messages": [{"role": "system", "content": "be brief"},
                     {"role": "user", "content": "hello"}],
        "max_tokens": 12, "temperature": 0.5, "stop": ["\n"],
    }
    assert second == {"model": "chat-1", "messages": [{"role": "user", "content": "hi"}],
                      "max_tokens": 256}
    headers = provider.requests[0][2]
    assert headers["Authorization"] == f"Bearer sk-test-{uid}"
    assert reply["text"] == "echo: hello" and reply["model"] == "chat-1"
    assert reply["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] > 0
    assert prompt["text"] == "echo: hi"


async def test_embeddings_are_batched_in_one_upstream_call(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider))
    texts = [f"alpha {uid}", f"beta {uid}", f"gamma {uid}"]
    async with serving_ai(settings, f"ai{uid}") as gw:
        reply = await gw.request(f"ai{uid}", "embed", {"input": texts, "model": "emb-1"})
    assert reply["model"] == "emb-1"
    assert reply["vectors"] == [pytest.approx(double_vector(t)) for t in texts]
    assert len(provider.calls(EMBED)) == 1
    assert sorted(provider.calls(EMBED)[0]["input"]) == sorted(texts)


@pytest.mark.parametrize(
    ("status", "error", "code"),
    [(400, InvalidRequest, "invalid_request"), (422, InvalidRequest, "invalid_request"),
     (500, Unavailable, "unavailable"), (503, Unavailable, "unavailable"),
     (401, Unavailable, "unavailable"), (504, UpstreamTimeout, "upstream_timeout")],
)
async def test_upstream_statuses_map_to_our_codes(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str,
    status: int, error: type[Exception], code: str,
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider))
    provider.fail(status, message=f"bad thing {uid}")
    async with serving_ai(settings, f"ai{uid}") as gw:
        with pytest.raises(error) as caught:
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
    assert caught.value.code == code  # type: ignore[attr-defined]
    if status in (400, 422):
        assert f"bad thing {uid}" in str(caught.value)
    assert "sk-" not in str(caught.value)


async def test_slow_upstream_is_an_upstream_timeout_within_the_callers_deadline(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider, timeout_s=10))
    provider.latency_s = 3.0
    async with serving_ai(settings, f"ai{uid}") as gw:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"}, timeout=0.6)
    assert time.monotonic() - started < 2.0  # the caller's 0.6 s, not the backend's 10 s


async def test_embeddings_past_their_callers_deadline_are_abandoned_and_open_the_breaker(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    # A batch runs in its own task: with only the backend's 30 s to bound it, each call
    # outlived its caller in a bulkhead slot and no timeout reached the breaker.
    settings = ai_settings(nats_url, redis_url, section(
        provider, timeout_s=30, breaker_failures=2, breaker_reset_s=30, max_concurrency=4))
    provider.latency_s = 1.0  # hangs, as far as the callers can tell (short: teardown waits)
    codes = []
    async with ai_worker(settings, f"ai{uid}") as (gw, worker):
        for i in range(4):  # one text (awaited directly), then two (a request's misses)
            texts = f"t{i} {uid}" if i % 2 == 0 else [f"t{i} {uid}", f"u{i} {uid}"]
            try:
                await gw.request(f"ai{uid}", "embed", {"input": texts, "model": "emb-1"},
                                 timeout=0.25)
            except (UpstreamTimeout, CircuitOpen) as exc:
                codes.append(exc.code)
        await asyncio.sleep(0.05)
        assert worker.services is not None
        guard = worker.services.extras[EXTRAS_KEY].routes["emb-1"].guard
        assert guard.in_flight == 0  # nothing upstream once its callers are gone
    assert codes == ["upstream_timeout"] * 2 + ["circuit_open"] * 2
    assert len(provider.calls(EMBED)) == 2


async def test_unreachable_server_is_unavailable(
    nats_url: str, redis_url: str, uid: str
) -> None:
    dead = {"backends": {"gone": openai_backend("http://127.0.0.1:9/v1", ["chat-1"])}}
    async with serving_ai(ai_settings(nats_url, redis_url, dead), f"ai{uid}") as gw:
        with pytest.raises(Unavailable, match="cannot reach"):
            await gw.request(f"ai{uid}", "complete", {"prompt": "x", "model": "chat-1"})


async def test_upstream_429_honours_retry_after(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider))
    provider.fail(429, retry_after="7")
    async with serving_ai(settings, f"ai{uid}") as gw:
        with pytest.raises(RateLimited) as first:
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        with pytest.raises(RateLimited) as second:
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
    assert first.value.retry_after == 7
    assert second.value.retry_after is not None and 5 <= second.value.retry_after <= 7
    assert len(provider.calls(CHAT)) == 1  # inside the window nothing was sent upstream


async def test_breaker_opens_after_consecutive_failures(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(
        nats_url, redis_url, section(provider, breaker_failures=2, breaker_reset_s=30)
    )
    provider.fail(500, times=5)
    async with serving_ai(settings, f"ai{uid}") as gw:
        for _ in range(2):
            with pytest.raises(Unavailable):
                await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        with pytest.raises(CircuitOpen) as opened:
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        # A 400 is an answer about the request, not the server: it never opens the breaker.
    assert opened.value.retry_after is not None and opened.value.retry_after >= 1
    assert len(provider.calls(CHAT)) == 2


async def test_client_errors_do_not_open_the_breaker(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider, breaker_failures=2))
    provider.fail(400, times=3)
    async with serving_ai(settings, f"ai{uid}") as gw:
        for _ in range(3):
            with pytest.raises(InvalidRequest):
                await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        assert (await gw.request(f"ai{uid}", "complete", {"prompt": "ok"}))["text"] == "echo: ok"


async def test_bulkhead_bounds_concurrent_upstream_calls(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider, max_concurrency=2))
    provider.latency_s = 0.2
    async with serving_ai(settings, f"ai{uid}") as gw:
        replies = await asyncio.gather(*(
            gw.request(f"ai{uid}", "complete", {"prompt": f"p{i}"}) for i in range(6)
        ))
    assert sorted(r["text"] for r in replies) == [f"echo: p{i}" for i in range(6)]
    assert provider.max_in_flight == 2 and len(provider.calls(CHAT)) == 6


async def test_budget_is_shared_per_token_subject(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    ai = {**section(provider), "budget": {"requests_per_min": 2}}
    settings = ai_settings(nats_url, redis_url, ai)
    from nexus_bus import Gateway
    from tests.conftest import issue_test_token

    async with serving_ai(settings, f"ai{uid}") as gw:
        for _ in range(2):
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        with pytest.raises(RateLimited) as over:
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        # Another subject has its own budget; a second gateway shares the first's.
        other = await Gateway.connect(settings, token=issue_test_token(subject=f"o{uid}"))
        try:
            await other.request(f"ai{uid}", "complete", {"prompt": "x"})
        finally:
            await other.close()
    assert over.value.retry_after is not None and over.value.retry_after >= 1
    assert len(provider.calls(CHAT)) == 3


async def test_tokens_budget_counts_max_tokens(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    ai = {**section(provider), "budget": {"tokens_per_min": 1000}}
    settings = ai_settings(nats_url, redis_url, ai)
    async with serving_ai(settings, f"ai{uid}") as gw:
        await gw.request(f"ai{uid}", "complete", {"prompt": "x", "max_tokens": 600})
        with pytest.raises(RateLimited):
            await gw.request(f"ai{uid}", "complete", {"prompt": "x", "max_tokens": 600})
        await gw.request(f"ai{uid}", "complete", {"prompt": "x", "max_tokens": 100})
    assert len(provider.calls(CHAT)) == 2


async def test_a_request_over_a_whole_minutes_token_budget_is_invalid_not_rate_limited(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    # A 429 would never stop: its Retry-After waited out, the request is refused again.
    ai = {**section(provider), "budget": {"tokens_per_min": 300, "requests_per_min": 1}}
    settings = ai_settings(nats_url, redis_url, ai)
    async with serving_ai(settings, f"ai{uid}") as gw:
        with pytest.raises(InvalidRequest, match=r"estimated at 306 tokens.* 300 tokens"):
            await gw.request(f"ai{uid}", "complete", {"prompt": "x", "max_tokens": 305})
        with pytest.raises(InvalidRequest, match=r"estimated at 325 tokens"):
            await gw.request(f"ai{uid}", "embed", {"input": "x" * 1300, "model": "emb-1"})
        # Neither took anything: the minute's one request is still there.
        await gw.request(f"ai{uid}", "complete", {"prompt": "x", "max_tokens": 200})
    assert len(provider.calls(CHAT)) == 1 and provider.calls(EMBED) == []


async def test_a_request_budget_below_one_a_minute_admits_one_request_every_few_minutes(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    # 0.5 a minute: one request, then the next two minutes later (every one was refused).
    ai = {**section(provider), "budget": {"requests_per_min": 0.5}}
    settings = ai_settings(nats_url, redis_url, ai)
    async with serving_ai(settings, f"ai{uid}") as gw:
        await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        with pytest.raises(RateLimited) as over:
            await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
    assert over.value.retry_after is not None and 100 <= over.value.retry_after <= 120
    assert len(provider.calls(CHAT)) == 1


async def test_deterministic_completions_and_embeddings_are_cached(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    settings = ai_settings(nats_url, redis_url, section(provider))
    body = {"prompt": f"cache me {uid}", "temperature": 0, "cache": True}
    async with serving_ai(settings, f"ai{uid}") as gw:
        one = await gw.request(f"ai{uid}", "complete", body)
        two = await gw.request(f"ai{uid}", "complete", body)
        # Not deterministic, or not opted in: every call goes upstream.
        for extra in ({"temperature": 0.7}, {"cache": False}):
            for _ in range(2):
                await gw.request(f"ai{uid}", "complete", {**body, **extra})
        e1 = await gw.request(f"ai{uid}", "embed", {"input": f"same  {uid} ", "model": "emb-1"})
        e2 = await gw.request(f"ai{uid}", "embed", {"input": f"same {uid}", "model": "emb-1"})
    assert one == two
    assert len(provider.calls(CHAT)) == 1 + 4
    assert e1 == e2 and len(provider.calls(EMBED)) == 1


async def test_concurrent_identical_cached_completions_run_the_model_once(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    # The model answers after the cache's default wait (0.5 s), and after max_fill_age_s
    # (lowered from 5 s to keep the test short): the others still wait for its answer.
    # Redis calls get 2 s rather than 150 ms: on a loaded CI machine a slow answer would fail
    # open (each caller loads by itself), which is not what this test is about.
    settings = ai_settings(nats_url, redis_url, section(provider),
                           cache={"max_fill_age_s": 0.5, "timeout_ms": 2000})
    provider.latency_s = 1.0
    body = {"prompt": f"same {uid}", "temperature": 0, "cache": True, "max_tokens": 16}
    async with serving_ai(settings, f"ai{uid}") as gw:
        replies = await asyncio.gather(
            *(gw.request(f"ai{uid}", "complete", body, timeout=5) for _ in range(4))
        )
        again = await gw.request(f"ai{uid}", "complete", body)  # and it was cached
    assert all(reply == again for reply in replies)
    assert len(provider.calls(CHAT)) == 1


def readme_line(containing: str) -> str:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    return next(line for line in text.splitlines() if containing in line)


async def test_a_model_nobody_serves_is_the_callers_error_and_no_default_names_the_setting(
    nats_url: str, redis_url: str, uid: str
) -> None:
    async with serving_ai(ai_settings(nats_url, redis_url, {}), f"ai{uid}") as gw:
        # A 400, not a 503: any caller could otherwise open the op's breaker (shared by every
        # caller and replica) by naming made-up models; the served ones are listed.
        for n in range(8):
            with pytest.raises(InvalidRequest, match=r"model 'nope\d' \(served: hash-256\)"):
                await gw.request(f"ai{uid}", "embed", {"input": "x", "model": f"nope{n}"})
        with pytest.raises(InvalidRequest, match="NEXUS_AI__BACKENDS__"):
            await gw.request(f"ai{uid}", "complete", {"prompt": "x", "model": "gpt-x"})
        for _ in range(4):  # nor does naming no model where no default is set
            with pytest.raises(InvalidRequest, match="NEXUS_AI__DEFAULT_COMPLETE_MODEL"):
                await gw.request(f"ai{uid}", "complete", {"prompt": "x"})
        with pytest.raises(InvalidRequest, match="NEXUS_AI__DEFAULT_EMBED_MODEL"):
            await gw.request(f"ai{uid}", "embed", {"input": "x"})
        lexical = await gw.request(f"ai{uid}", "embed", {"input": "x", "model": "hash-256"})
    assert lexical["model"] == "hash-256" and len(lexical["vectors"][0]) == 256
    # What `up`'s banner and the README tell a new user: this, not "answers 503" as before.
    from nexus_bus.cli import AI_HINT

    for said in (" ".join(AI_HINT.split()), readme_line("NEXUS_AI__BACKENDS__<NAME>")):
        assert "503" not in said and "400 invalid_request" in said, said


async def test_budget_is_shared_by_every_worker_replica(
    provider: ProviderDouble, nats_url: str, redis_url: str, uid: str
) -> None:
    from nexus_bus import Worker
    from tests.integration.ai_serving import ai_group

    ai = {**section(provider), "budget": {"requests_per_min": 2}}
    settings = ai_settings(nats_url, redis_url, ai)
    second = Worker(settings, [ai_group(f"ai{uid}")])
    await second.start()
    try:
        async with serving_ai(settings, f"ai{uid}") as gw:
            outcomes = []
            for i in range(6):
                try:
                    await gw.request(f"ai{uid}", "complete", {"prompt": f"p{i}"})
                    outcomes.append("ok")
                except RateLimited:
                    outcomes.append("429")
    finally:
        await second.drain(1)
    # Two replicas answer in turn; one budget in Redis admits two requests in all, not per replica.
    assert outcomes == ["ok", "ok", "429", "429", "429", "429"]
    assert len(provider.calls(CHAT)) == 2
