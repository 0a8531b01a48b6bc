"""nats-py's exceptions as `NexusError`s: the one mapping for the NATS adapter.

Everything that calls nats-py on a request's path (the gateway's requests, the store's KV
and stream calls) translates failures here, so no `nats.*` exception reaches a handler or a
client, and each kind of failure means the same status everywhere. `tests/unit/
test_error_mappers.py` checks that every exception class nats-py defines maps to one.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

import nats.errors
import nats.js.errors

from nexus_bus.errors import (
    Conflict,
    InternalError,
    InvalidRequest,
    NexusError,
    NoResponders,
    NotFound,
    PayloadTooLarge,
    Unavailable,
    UpstreamTimeout,
)

# Refused before anything was sent: the request (or our own use of the API) is at fault.
_REFUSED = (
    nats.errors.BadSubjectError,
    nats.errors.BadHeaderError,
    nats.errors.BadTimeoutError,
    nats.errors.InvalidCallbackTypeError,
    nats.js.errors.InvalidKeyError,
    nats.js.errors.InvalidBucketNameError,
    nats.js.errors.InvalidObjectNameError,
)
_NOT_FOUND = (
    nats.js.errors.KeyNotFoundError,
    nats.js.errors.KeyDeletedError,
    nats.js.errors.NoKeysError,
    nats.js.errors.ObjectNotFoundError,
    nats.js.errors.ObjectDeletedError,
)
_CONFLICT = (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.ObjectAlreadyExists)
_WRONG_LAST_SEQUENCE = 10071  # JetStream's err_code for a compare-and-set that lost
# JetStream's err_codes for a request it refused as malformed: a subject that is not one (a
# consumer's filter with an empty token) and a request it could not read (a sequence past
# 2^64 - 1). Our own configuration can cause them too, so they mean the caller's input only
# where a call says its subject or sequence came from there (`input_errors`).
INVALID_SUBJECT: Final = 10052
BAD_REQUEST: Final = 10025
_TIMEOUT = (nats.errors.TimeoutError, nats.js.errors.FetchTimeoutError)
# Our code used the API wrongly, or the server answered what we cannot handle: not the
# caller's fault, and a retry will not help.
_INTERNAL = (
    nats.errors.NotJSMessageError,
    nats.errors.MsgAlreadyAckdError,
    nats.errors.JsonParseError,
    nats.errors.ProtocolError,
    nats.js.errors.ConsumerInvalidResetError,
    nats.js.errors.BadObjectMetaError,
    nats.js.errors.LinkIsABucketError,
    nats.js.errors.DigestMismatchError,
    nats.js.errors.KeyHistoryTooLargeError,
    nats.js.errors.KeyValueLimitMarkerTTLNotSupportedError,
)


# (what nats-py raised, what it means, the detail), in order: the first family that matches.
_FAMILIES: Final[tuple[tuple[tuple[type[BaseException], ...], type[NexusError], str], ...]] = (
    ((*_TIMEOUT, TimeoutError), UpstreamTimeout, "{what} did not answer in time"),
    (
        (nats.errors.MaxPayloadError,),
        PayloadTooLarge,
        "{what}: the message exceeds the server's max_payload",
    ),
    (_REFUSED, InvalidRequest, "{what}: refused by the NATS client ({name})"),
    (_NOT_FOUND, NotFound, "{what}: not found"),
    (_CONFLICT, Conflict, "{what}: changed concurrently"),
    (_INTERNAL, InternalError, "{what}: unexpected NATS answer ({name})"),
    (
        (nats.errors.OutboundBufferLimitError,),
        Unavailable,
        "{what}: NATS is unreachable and the reconnect buffer is full",
    ),
)


def map_nats_error(
    exc: BaseException,
    what: str = "NATS",
    *,
    jetstream: bool = False,
    input_errors: Collection[int] = (),
) -> NexusError:
    """The `NexusError` a nats-py failure means to a caller.

    Args:
        exc: what nats-py (or the transport under it) raised.
        what: what was being done, for the detail ("data.get", "get of key k").
        jetstream: the call was a JetStream API request: "no responders" there means
            JetStream is not available (503 `unavailable`), not that no worker serves an op.
        input_errors: JetStream err_codes that, on this call, mean the caller's input was
            malformed (400 `invalid_request`, not retried) rather than that JetStream failed
            (503 `unavailable`, which is retried and counts against the op's breaker).

    Connection states (closed, draining, reconnecting, a full reconnect buffer, no servers,
    TLS and credentials) and everything else nats-py raises are `Unavailable` (503,
    retryable): the bus, not the request, is at fault. The order matters: JetStream's
    not-found and conflict errors are subclasses of its generic API error.
    """
    if isinstance(exc, NexusError):
        return exc
    name = type(exc).__name__
    if isinstance(exc, nats.errors.NoRespondersError):
        if jetstream:
            return Unavailable(f"{what}: JetStream unavailable")
        return NoResponders(f"no worker serves {what}")
    for family, error, detail in _FAMILIES:
        if isinstance(exc, family):
            return error(detail.format(what=what, name=name))
    if isinstance(exc, nats.js.errors.APIError):
        return _api_error(exc, what, input_errors)
    if isinstance(exc, nats.errors.Error | OSError):
        return Unavailable(f"{what}: NATS connection unavailable ({name})")
    return InternalError(f"{what}: unexpected error ({name})")


def _api_error(
    exc: nats.js.errors.APIError, what: str, input_errors: Collection[int]
) -> NexusError:
    """What the JetStream API answered, by its error code (the class is not always specific:
    a KV update with a stale revision can come back as a plain `APIError`)."""
    err_code = getattr(exc, "err_code", None)
    if err_code == _WRONG_LAST_SEQUENCE:
        return Conflict(f"{what}: changed concurrently")
    if isinstance(exc, nats.js.errors.NotFoundError):
        return NotFound(f"{what}: not found")
    description = getattr(exc, "description", None)
    if err_code in input_errors:
        return InvalidRequest(f"{what}: refused by JetStream: {description}")
    if err_code is None and description is None:  # no API answer at all (JetStream is off)
        return Unavailable(f"{what}: JetStream unavailable ({type(exc).__name__})")
    return Unavailable(f"{what}: JetStream error {err_code}: {description}")
