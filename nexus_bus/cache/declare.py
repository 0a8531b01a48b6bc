"""Per-operation cache declarations for handlers: read-through, write-through, invalidation.

    ops = Operations("profiles")
    PROFILES = CachePolicy(ttl_s=300, negative_ttl_s=10, stale_s=30)

    @ops.action("get")
    @read_through("profiles", key=lambda req: req.id, policy=PROFILES)
    async def get(req: GetProfile, ctx: RequestContext) -> Profile: ...

    @ops.action("update")
    @write_through("profiles", key=lambda req: req.id, value=lambda req, reply: reply.profile,
                   policy=PROFILES)
    async def update(req: UpdateProfile, ctx: RequestContext) -> Updated: ...

The wrappers keep the handler's signature and annotations (`Operations` reads the request
and reply types from them) and use `ctx.services.cache`; without a cache they just call the
handler. Replies are cached as JSON and decoded as the handler's return type. With
`revision=`, entries are ordered by that revision (compare-and-set); without it, by leases.
Each wrapper records its declaration (`declarations`), so a worker checks at start that the
declarations of a namespace agree (`declaration_problems`).
"""

from __future__ import annotations

import functools
import typing
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import msgspec

from nexus_bus.cache.core import Cache
from nexus_bus.cache.entries import UNVERSIONED, Entry, Kind
from nexus_bus.cache.policy import CachePolicy
from nexus_bus.errors import NotFound


class HandlerContext(Protocol):
    """What the decorators need of a handler's context (a `RequestContext`): its services.

    A protocol, so the cache (a layer below the runtime) never imports the runtime's
    `RequestContext`.
    """

    @property
    def services(self) -> Any:
        """The worker's services; the decorators use `services.cache` when it is set."""
        ...


# (request, context) -> reply; the context is a `RequestContext` (see `HandlerContext`).
Handler = Callable[[Any, Any], Awaitable[Any]]
KeyOf = Callable[[Any], str]
RevisionOf = Callable[[Any], int]

_DEFAULT_POLICY: Final = CachePolicy()
_DECLARATIONS: Final = "__nexus_cache_declarations__"
_READ: Final = "read_through"
_encode: Final = msgspec.json.Encoder().encode


def _cache_of(ctx: HandlerContext) -> Cache | None:
    return getattr(ctx.services, "cache", None)


@dataclass(frozen=True, slots=True)
class Declaration:
    """One cache declaration around a handler.

    Attributes:
        kind: `read_through`, `write_through` or `invalidates`.
        namespace: the cache namespace.
        policy: its policy.
        versioned: whether entries are ordered by a revision (`revision=`).
    """

    kind: str
    namespace: str
    policy: CachePolicy
    versioned: bool


def declarations(handler: Handler) -> tuple[Declaration, ...]:
    """The cache declarations around `handler`, innermost first."""
    declared: tuple[Declaration, ...] = getattr(handler, _DECLARATIONS, ())
    return declared


def declaration_problems(handlers: Iterable[tuple[str, Handler]]) -> list[str]:
    """Why the declarations around `handlers` (named `op.action`) cannot keep their guarantee:
    each entry names the handler and the namespace. Empty: none.

    A write without `revision=` in a namespace read with one cannot be ordered against the
    reads' fills: a versioned fill needs no lease, so neither the eviction nor the unversioned
    write that revokes the lease stops a fill loaded before the write, and the old reply is
    served for `ttl_s`. (Short TTLs are no problem: a policy bounds its own versioned fills,
    `CachePolicy.fill_age_s`.)
    """
    declared = [(name, d) for name, handler in handlers for d in declarations(handler)]
    read_by_revision = {d.namespace for _, d in declared if d.kind == _READ and d.versioned}
    return [
        f"{name}: cache {d.namespace!r}: {d.kind} needs revision= like the namespace's"
        " read_through (without it, a fill loaded before the write lands after it)"
        for name, d in declared
        if d.kind != _READ and not d.versioned and d.namespace in read_by_revision
    ]


def _declare(
    wrapper: Handler, kind: str, namespace: str, policy: CachePolicy, versioned: bool
) -> Handler:
    # functools.wraps copied the inner declarations (the wrapped function's __dict__).
    declared = Declaration(kind, namespace, policy, versioned)
    setattr(wrapper, _DECLARATIONS, (*declarations(wrapper), declared))
    return wrapper


def read_through(
    namespace: str,
    *,
    key: KeyOf,
    policy: CachePolicy = _DEFAULT_POLICY,
    revision: RevisionOf | None = None,
) -> Callable[[Handler], Handler]:
    """Serve the handler's reply from the cache; run the handler only on a miss.

    Args:
        namespace: the cache namespace (and `cache` metric label).
        key: the cache key of a request.
        policy: TTLs, negative caching (a `NotFound` from the handler), stale window, L1.
        revision: the revision of a reply, to order fills against writes by revision.
    """

    def decorate(fn: Handler) -> Handler:
        reply_type = typing.get_type_hints(fn).get("return", Any)

        @functools.wraps(fn)
        async def cached(req: Any, ctx: Any) -> Any:
            cache = _cache_of(ctx)
            if cache is None:
                return await fn(req, ctx)
            missing: list[NotFound] = []

            async def load() -> Entry:
                try:
                    reply = await fn(req, ctx)
                except NotFound as exc:
                    missing.append(exc)
                    return Entry.absent()
                return Entry.of(_encode(reply), revision(reply) if revision else UNVERSIONED)

            entry = await cache.fetch(namespace, key(req), load, policy)
            if entry.kind is Kind.ABSENT:
                raise missing[0] if missing else NotFound(f"{namespace}: not found")
            return msgspec.json.decode(entry.value, type=reply_type)

        return _declare(cached, _READ, namespace, policy, revision is not None)

    return decorate


def write_through(
    namespace: str,
    *,
    key: KeyOf,
    value: Callable[[Any, Any], Any],
    policy: CachePolicy = _DEFAULT_POLICY,
    revision: RevisionOf | None = None,
) -> Callable[[Handler], Handler]:
    """After the handler succeeds, store `value(request, reply)` as the key's cached reply.

    Args:
        namespace: the namespace its `read_through` reads.
        key: the cache key of a request.
        value: what the reading operation would now reply (it is decoded as that type).
        policy: the same policy as the reading operation.
        revision: the revision of a reply; without it the write revokes in-flight loads.
    """

    def decorate(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def writing(req: Any, ctx: Any) -> Any:
            reply = await fn(req, ctx)
            cache = _cache_of(ctx)
            if cache is not None:
                rev = revision(reply) if revision else UNVERSIONED
                entry = Entry.of(_encode(value(req, reply)), rev)
                await cache.write(namespace, key(req), entry, policy)
            return reply

        return _declare(writing, "write_through", namespace, policy, revision is not None)

    return decorate


def invalidates(
    namespace: str,
    *,
    key: KeyOf,
    policy: CachePolicy = _DEFAULT_POLICY,
    revision: RevisionOf | None = None,
) -> Callable[[Handler], Handler]:
    """After the handler succeeds, drop the key's cached reply (the next read loads it).

    Args:
        namespace: the namespace its `read_through` reads.
        key: the cache key of a request.
        policy: the same policy as the reading operation.
        revision: the revision the write reached; older fills in flight are then refused.
    """

    def decorate(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def invalidating(req: Any, ctx: Any) -> Any:
            reply = await fn(req, ctx)
            cache = _cache_of(ctx)
            if cache is not None:
                if revision is None:
                    await cache.invalidate(namespace, key(req), policy)
                else:
                    await cache.write(namespace, key(req), Entry.fence(revision(reply)), policy)
            return reply

        return _declare(invalidating, "invalidates", namespace, policy, revision is not None)

    return decorate
