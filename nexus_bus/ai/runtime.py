"""The `ai.*` machinery of one worker: backends by model name, each behind its guard and
embedding batcher, with the cache and the shared budget.

Built once per worker from `settings.ai` on first use (`runtime_of`), kept in
`services.extras`, closed with the worker's services. Model resolution never invents a
result: a request naming a model no backend serves is `400 invalid_request` listing the
served ones, and one naming none where no default is set is `400 invalid_request` naming the
setting to set.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

from nexus_bus.ai.backend import Completion, CompletionCall, HashBackend, ModelBackend
from nexus_bus.ai.batcher import EmbedBatcher, MissCollector
from nexus_bus.ai.graphs import GraphRegistry, RunnableGraph, load_graphs
from nexus_bus.ai.guard import BackendGuard
from nexus_bus.ai.keys import (
    COMPLETE_NAMESPACE,
    EMBED_NAMESPACE,
    embed_key,
    estimate_embed_tokens,
    estimate_tokens,
    is_deterministic,
)
from nexus_bus.ai.keys import complete_key as completion_key
from nexus_bus.ai.settings import HASH_MODEL, AISettings, BackendSettings, read_api_key
from nexus_bus.ai.vectors import pack
from nexus_bus.cache import Cache, CachePolicy, Entry
from nexus_bus.client.gateway import Gateway
from nexus_bus.context import RequestContext
from nexus_bus.errors import InvalidRequest, NexusError, Unavailable, UpstreamTimeout
from nexus_bus.policies.ratelimit import SharedRateLimiter
from nexus_bus.resilience.gcra import RateLimit

T = TypeVar("T")

EXTRAS_KEY: Final = "ai.runtime"
_BUDGET_TIMEOUT_S: Final = 0.2
# A completion's cache lease covers the model's answer (its backend's timeout_s) and this
# much more for the fill's round trip to Redis.
_FILL_MARGIN_S: Final = 1.0
_LISTED_MODELS: Final = 10  # served models named in the 400 for a model nobody serves
_HASH_SETTINGS: Final = BackendSettings(kind="local", models=[HASH_MODEL])


@dataclass
class Route:
    """One backend with its guard and one embedding batcher per model."""

    backend: ModelBackend
    guard: BackendGuard
    max_batch: int
    batchers: dict[str, EmbedBatcher]
    max_running: int = 0  # embedding calls at once per model (0: the bulkhead alone bounds)

    def batcher(self, model: str) -> EmbedBatcher:
        """The batcher of `model` on this backend."""
        if model not in self.batchers:

            async def call(texts: list[str], remaining_s: float) -> list[list[float]]:
                # A batch runs in a task of its own: bounded by the latest of its callers'
                # deadlines, and cancelled once none waits, which is then their timeout.
                return await self.guard.call(
                    lambda timeout_s: self.backend.embed(texts, model, timeout_s),
                    remaining_s, cancel_is_timeout=True,
                )

            self.batchers[model] = EmbedBatcher(call, self.max_batch, self.max_running)
        return self.batchers[model]


def create_backend(name: str, settings: BackendSettings) -> ModelBackend:
    """The adapter for one backend section.

    Raises:
        ValueError: its API key cannot be read.
    """
    if settings.kind == "local":
        from nexus_bus.ai.local import LocalEmbeddingBackend

        return LocalEmbeddingBackend(name)
    from nexus_bus.ai.openai import OpenAICompatibleBackend

    key = read_api_key(settings, dict(os.environ))
    return OpenAICompatibleBackend(name, settings, key.get_secret_value() if key else None)


def minute_budget(per_min: float, cost: int) -> RateLimit:
    """A GCRA limit that lets `per_min` units a minute through, `cost` units per request.

    A request of cost c is one GCRA cell of c units: interval c * 60 s / per_min, and a
    tolerance of exactly one minute (burst per_min / c cells). The burst is fractional on
    purpose (`GCRA_LUA` reads it as a number): rounded down, a request costing more than
    half the budget could never pass. The 1e-6 keeps the float arithmetic on Redis's
    epoch-millisecond clock from refusing a request that exactly fits. One costing more than
    the whole budget never fits: `charge` refuses it before asking.

    A budget below one unit a minute (`requests_per_min` 0.5: a request every two minutes)
    has a tolerance of one unit's interval instead: a minute's worth, half a request, would
    never fit, and every request was refused.
    """
    cost = max(1, cost)
    burst = max(per_min, 1) / cost + 1e-6
    return RateLimit(per_min / 60 / cost, cast(int, burst))


class AIRuntime:
    """Routes, cache and budget of the `ai.*` operations in one worker.

    Args:
        settings: the `ai` section.
        routes: backend routes by model name (the built-in `hash-256` is added).
        redis: the shared store for budgets (None: no budgets).
    """

    def __init__(
        self, settings: AISettings, routes: dict[str, Route], redis: Any | None = None
    ) -> None:
        self.settings = settings
        self.routes = dict(routes)
        if HASH_MODEL not in self.routes:
            hashing = HashBackend()
            self.routes[HASH_MODEL] = Route(
                hashing, BackendGuard(hashing.name, _HASH_SETTINGS), 256, {}
            )
        self._limiter = SharedRateLimiter(redis, timeout_s=_BUDGET_TIMEOUT_S) if redis else None
        budget = settings.budget
        # Whether `charge` does anything: when not, a cache hit skips even the estimate.
        self.charging = self._limiter is not None and (
            budget.requests_per_min > 0 or budget.tokens_per_min > 0
        )
        self.embed_policy = CachePolicy(
            ttl_s=settings.cache_ttl_s, local_ttl_s=settings.local_cache_ttl_s, jitter=0.0
        )
        # One caller per key runs the model and the others wait for its answer: the lease and
        # the wait outlast the longest answer the backend allows (with the defaults, 2 s and
        # 0.5 s, every identical caller of a slower model ran it too). A caller still waits
        # no longer than its own deadline.
        self.complete_policies = {  # by model name, as the routes
            model: CachePolicy(
                ttl_s=settings.cache_ttl_s, jitter=0.0,
                lease_s=route.guard.timeout_s + _FILL_MARGIN_S,
                wait_s=route.guard.timeout_s + _FILL_MARGIN_S,
            )
            for model, route in self.routes.items()
        }
        self._graphs: GraphRegistry | None = None
        self._gateway: Gateway | None = None

    def graph(self, name: str) -> RunnableGraph:
        """The registered graph `name` (registries load from `ai.graphs` on first use).

        Raises:
            NotFound: no such graph.
            Unavailable: a registry in `ai.graphs` cannot be loaded.
        """
        if self._graphs is None:
            try:
                self._graphs = load_graphs(self.settings.graphs)
            except ValueError as exc:
                raise Unavailable(str(exc)) from exc
        return self._graphs.get(name)

    def gateway(self, ctx: RequestContext) -> Gateway:
        """The worker's gateway client for graphs' operation calls, on its own connection's
        inbox (created on first use, closed with the runtime)."""
        if self._gateway is None:
            services = ctx.services
            redis = services.redis if services.settings.resilience.enabled else None
            self._gateway = Gateway(services.nc, services.settings, redis=redis)
        return self._gateway

    @classmethod
    def from_settings(cls, settings: AISettings, redis: Any | None = None) -> AIRuntime:
        """One route per configured model.

        Raises:
            ValueError: a backend's API key cannot be read.
        """
        routes: dict[str, Route] = {}
        for name, section in settings.backends.items():
            backend = create_backend(name, section)
            # The local model uses every core for one batch: one call at a time, and what
            # arrives meanwhile goes in the next batch.
            running = 1 if section.kind == "local" else 0
            route = Route(backend, BackendGuard(name, section), section.max_batch, {}, running)
            for model in section.models:
                routes[model] = route
        return cls(settings, routes, redis)

    def resolve(self, model: str | None, purpose: str) -> tuple[str, Route]:
        """The model name and route for a request (`purpose`: "embed" or "complete").

        Raises:
            InvalidRequest: the request names a model no backend serves, or none where no
                default is set: the caller's to fix (a 503 would count against the op's
                breaker, shared by every caller, and retry a job until dead-lettered).
        """
        if model is None:
            model = (
                self.settings.default_embed_model
                if purpose == "embed"
                else self.settings.default_complete_model
            )
            if model is None:
                setting = f"NEXUS_AI__DEFAULT_{purpose.upper()}_MODEL"
                raise InvalidRequest(
                    f"no model named and {setting} is not set; name a model or set it "
                    f"(docs/ai.md; `{HASH_MODEL}` is the built-in lexical embedding model)"
                )
        route = self.routes.get(model)
        if route is None:
            served = sorted(self.routes)
            listed = ", ".join(served[:_LISTED_MODELS])
            listed += ", ..." if served[_LISTED_MODELS:] else ""
            raise InvalidRequest(
                f"no backend serves model {model[:100]!r} (served: {listed or 'none'}); "
                "operators add models with NEXUS_AI__BACKENDS__<NAME>__MODELS (docs/ai.md)"
            )
        return model, route

    async def charge(self, ctx: RequestContext, tokens: int) -> None:
        """Take one request and `tokens` from the caller's budget (shared by every replica).

        Raises:
            InvalidRequest: `tokens` is more than a whole minute's budget, which the request
                could never fit: a 429's Retry-After would be waited out in vain (and a job
                retried until dead-lettered). Nothing is taken.
            RateLimitExceeded: over a budget (429 with Retry-After).
        """
        budget = self.settings.budget
        if self._limiter is None:
            return
        if 0 < budget.tokens_per_min < tokens:
            raise InvalidRequest(
                f"this request is estimated at {tokens} tokens, more than the whole budget "
                f"of {budget.tokens_per_min:g} tokens a minute (ai.budget.tokens_per_min); "
                f"send less text or a lower max_tokens"
            )
        subject = ctx.principal.subject if ctx.principal else None
        if budget.requests_per_min > 0:
            limit = minute_budget(budget.requests_per_min, 1)
            await self._limiter.check(limit, subject, "ai", "budget_requests")
        if budget.tokens_per_min > 0:
            limit = minute_budget(budget.tokens_per_min, tokens)
            await self._limiter.check(limit, subject, "ai", "budget_tokens")

    async def embed(
        self, ctx: RequestContext, texts: list[str], model: str | None
    ) -> tuple[str, list[bytes]]:
        """Vectors for `texts` as little-endian float32 bytes (`vectors.pack`): cached by
        (model, normalized text), misses batched upstream.

        The bytes are what the cache holds, so a hit costs no per-number work. A request of
        one text (the common case) awaits its lookup directly: no task, and no timer unless
        it misses.

        Raises:
            NexusError: no backend, over budget, or the backend's mapped failure.
        """
        name, route = self.resolve(model, "embed")
        cache = ctx.services.cache
        batcher = route.batcher(name)
        if self.charging and name != HASH_MODEL:  # hash-256 is free
            await self.charge(ctx, estimate_embed_tokens(texts))
        if cache is None or name == HASH_MODEL:  # hash-256 is cheaper than a cache lookup
            vectors = await _within_deadline(ctx, name, batcher.embed(texts, ctx.remaining_s()))
            return name, [pack(v) for v in vectors]
        if len(texts) == 1:

            async def alone(text: str) -> list[float]:
                return (await batcher.embed([text], ctx.remaining_s()))[0]

            return name, [await self._cached(ctx, cache, name, texts[0], alone)]
        misses = MissCollector(batcher, len(texts), ctx.remaining_s)

        async def one(text: str) -> bytes:
            loaded = False

            async def load(text: str) -> list[float]:
                nonlocal loaded
                loaded = True
                return await misses.load(text)

            packed = await self._cached(ctx, cache, name, text, load)
            if not loaded:
                misses.settle()
            return packed

        return name, list(await asyncio.gather(*(one(t) for t in texts)))

    async def _cached(
        self,
        ctx: RequestContext,
        cache: Cache,
        model: str,
        text: str,
        load: Callable[[str], Awaitable[list[float]]],
    ) -> bytes:
        """The packed vector of `text` from the cache, or from `load` (bounded by the
        caller's deadline) stored there."""

        async def loader() -> Entry:
            return Entry.of(pack(await _within_deadline(ctx, model, load(text))))

        entry = await cache.fetch(
            EMBED_NAMESPACE, embed_key(model, text), loader, self.embed_policy
        )
        return entry.value

    async def complete(
        self, ctx: RequestContext, call: CompletionCall, *, use_cache: bool
    ) -> Completion:
        """Complete `call` under its backend's guards; cached only when deterministic and
        `use_cache`.

        Raises:
            NexusError: no backend, over budget, or the backend's mapped failure.
        """
        model, route = self.resolve(call.model, "complete")
        await self.charge(ctx, estimate_tokens(call))

        async def run() -> Completion:
            return await route.guard.call(
                lambda timeout_s: route.backend.complete(call, timeout_s), ctx.remaining_s()
            )

        cache = ctx.services.cache
        if not (use_cache and is_deterministic(call) and cache is not None):
            return await run()
        result: Completion = await cache.get_or_set(
            completion_key(call), run, self.settings.cache_ttl_s,
            namespace=COMPLETE_NAMESPACE, type=Completion,
            policy=self.complete_policies[model],
        )
        return result

    async def aclose(self) -> None:
        """Close the gateway and every backend once."""
        if self._gateway is not None:
            await self._gateway.close()
        seen: set[int] = set()
        for route in self.routes.values():
            if id(route.backend) not in seen:
                seen.add(id(route.backend))
                await route.backend.aclose()


async def _within_deadline(ctx: RequestContext, model: str, work: Awaitable[T]) -> T:
    """`await work`, or `upstream_timeout` when the caller's deadline comes first.

    Raises:
        UpstreamTimeout: the deadline passed.
    """
    try:
        async with asyncio.timeout(max(0.001, ctx.remaining_s())):
            return await work
    except TimeoutError as exc:
        if isinstance(exc, NexusError):  # the backend's own, already mapped
            raise
        raise UpstreamTimeout(f"embedding with {model} did not finish in time") from None


def runtime_of(ctx: RequestContext) -> AIRuntime:
    """This worker's runtime, built on first use from `settings.ai`.

    Raises:
        Unavailable: a backend cannot be built (its API key is missing).
    """
    extras = ctx.services.extras
    runtime = extras.get(EXTRAS_KEY)
    if runtime is None:
        try:
            runtime = AIRuntime.from_settings(ctx.services.settings.ai, ctx.services.redis)
        except ValueError as exc:
            raise Unavailable(f"ai backends cannot start: {exc}") from exc
        extras[EXTRAS_KEY] = runtime
        ctx.services.on_close.append(runtime.aclose)
    if not isinstance(runtime, AIRuntime):
        raise NexusError("services.extras['ai.runtime'] is not an AIRuntime")
    return runtime
