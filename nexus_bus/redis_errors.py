"""redis-py's exceptions as `NexusError`s: the one mapping for the Redis adapter.

Every Redis call whose failure reaches a caller (stream tickets, token revocation, the idempotency
records) translates it here; the cache never lets one through (it fails open to the store,
docs/cache.md). `tests/unit/test_error_mappers.py` checks that every exception class
redis-py defines maps to one.
"""

from __future__ import annotations

from typing import Final

import redis.exceptions as rex

from nexus_bus.errors import InternalError, NexusError, Unavailable

# What a Redis call can raise: redis-py's errors, and the socket's own under them.
REDIS_FAILURES: Final = (rex.RedisError, rex.RedisClusterException, OSError, TimeoutError)

# Our command was wrong (bad arguments, a script error, a lock misuse): a retry will not help.
# Subclasses of ResponseError that mean the server cannot serve now are listed first.
_UNAVAILABLE_RESPONSES = (
    rex.BusyLoadingError,
    rex.ReadOnlyError,
    rex.OutOfMemoryError,
    rex.MasterDownError,
    rex.TryAgainError,
    rex.ClusterDownError,
    rex.MovedError,
    rex.AskError,
)
_INTERNAL = (
    rex.ResponseError,
    rex.DataError,
    rex.LockError,
    rex.InvalidPipelineStack,
    rex.ChildDeadlockedError,
    rex.IncorrectPolicyType,
    rex.ClusterCrossSlotError,
    rex.CrossSlotTransactionError,
)


def map_redis_error(exc: BaseException, what: str = "Redis") -> NexusError:
    """The `NexusError` a redis-py failure means to a caller.

    Connection, timeout, authentication and cluster-state failures are `Unavailable` (503,
    retryable: Redis, not the request, is at fault); a command Redis refused as wrong is
    `InternalError` (500).
    """
    if isinstance(exc, NexusError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, _UNAVAILABLE_RESPONSES):
        return Unavailable(f"{what} cannot serve now ({name})")
    if isinstance(exc, _INTERNAL):
        return InternalError(f"{what} refused a command ({name})")
    if isinstance(exc, REDIS_FAILURES):
        return Unavailable(f"{what} cannot be reached ({name})")
    return InternalError(f"{what}: unexpected error ({name})")
