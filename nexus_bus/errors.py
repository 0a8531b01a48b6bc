"""The one error hierarchy: every failure a client can see has a stable code and status."""

from __future__ import annotations


class NexusError(Exception):
    """Base of every error nexus-bus raises or replies with.

    Attributes:
        code: stable snake_case identifier, part of the wire contract.
        http_status: the status the HTTP shim answers and `Nexus-Status` carries.
        retryable: whether the same request may succeed when sent again later.
        title: short human summary of the code.
        unsent: set on an error the gateway client raised before publishing the request
            (over a size limit, a header it refuses): no worker saw it, so it says nothing
            about the operation's health (its breaker counts no outcome).
        misrouted: set on the gateway client's `no_responders` for a request a worker
            answered `unknown_operation` while another worker of the op declares the action
            (a rolling upgrade): the op is healthy, so its breaker counts no outcome, and the
            request is retried to reach a worker that has the action.
    """

    code: str = "internal"
    http_status: int = 500
    retryable: bool = False
    title: str = "Internal error"
    unsent: bool = False
    misrouted: bool = False

    def __init__(self, detail: str | None = None, *, retry_after: float | None = None) -> None:
        # A handler's `NotFound(42)`: the problem's detail is text, or clients cannot read it.
        self.detail = str(detail) if detail else self.title
        self.retry_after = retry_after
        super().__init__(self.detail)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.detail!r})"


class InvalidToken(NexusError):
    """Missing, malformed, expired, revoked or badly signed token (401)."""

    code, http_status, title = "invalid_token", 401, "Invalid or missing token"


class Forbidden(NexusError, PermissionError):
    """A valid token without the scope the operation needs (403)."""

    code, http_status, title = "forbidden", 403, "Forbidden"


class InvalidRequest(NexusError, ValueError):
    """The request does not decode or does not validate (400)."""

    code, http_status, title = "invalid_request", 400, "Invalid request"


class PayloadTooLarge(NexusError, ValueError):
    """Body or headers larger than the configured limit (413)."""

    code, http_status, title = "payload_too_large", 413, "Payload too large"


class HeadersTooLarge(NexusError, ValueError):
    """Headers larger than the configured limit, or with forbidden characters (431)."""

    code, http_status, title = "headers_too_large", 431, "Request headers too large"


class UnsupportedMediaType(NexusError, ValueError):
    """A Content-Type the codec does not speak (415)."""

    code, http_status, title = "unsupported_media_type", 415, "Unsupported media type"


class UnknownOperation(NexusError, LookupError):
    """No such operation or action (404)."""

    code, http_status, title = "unknown_operation", 404, "Unknown operation"


class NotFound(NexusError, LookupError):
    """The addressed resource does not exist (404)."""

    code, http_status, title = "not_found", 404, "Not found"


class Conflict(NexusError):
    """A compare-and-set lost, or a state transition is not allowed (409)."""

    code, http_status, title = "conflict", 409, "Conflict"


class IdempotencyMismatch(NexusError):
    """An Idempotency-Key reused with a different request (422)."""

    code, http_status, title = "idempotency_mismatch", 422, "Idempotency key mismatch"


class RateLimited(NexusError):
    """Too many requests from this client (429)."""

    code, http_status, retryable, title = "rate_limited", 429, True, "Rate limited"


class CircuitOpen(NexusError):
    """A dependency's breaker is open; failing fast (503)."""

    code, http_status, retryable, title = "circuit_open", 503, True, "Circuit open"


class NoResponders(NexusError):
    """No worker serves the operation right now (503)."""

    code, http_status, retryable, title = "no_responders", 503, True, "No responders"


class UpstreamTimeout(NexusError, TimeoutError):
    """The operation did not answer within its budget (504)."""

    code, http_status, retryable, title = "upstream_timeout", 504, True, "Upstream timeout"


class Unavailable(NexusError):
    """A dependency (NATS, Redis, the token service) cannot be reached (503)."""

    code, http_status, retryable, title = "unavailable", 503, True, "Service unavailable"


class InternalError(NexusError):
    """An unexpected failure; details are in the logs under the request id (500)."""

    code, http_status, title = "internal", 500, "Internal error"


class ConfigError(NexusError):
    """The configuration is invalid: the message lists every problem at once.

    A fault of the deployment, not of a request (so not a 400): it stops a process at start,
    and a request that meets it gets a 500 that no retry will fix.
    """

    code, http_status, title = "invalid_config", 500, "Invalid configuration"


ERRORS_BY_CODE: dict[str, type[NexusError]] = {
    cls.code: cls
    for cls in (
        InvalidToken,
        Forbidden,
        InvalidRequest,
        PayloadTooLarge,
        HeadersTooLarge,
        UnsupportedMediaType,
        UnknownOperation,
        NotFound,
        Conflict,
        IdempotencyMismatch,
        RateLimited,
        CircuitOpen,
        NoResponders,
        UpstreamTimeout,
        Unavailable,
        InternalError,
        ConfigError,
    )
}


class RemoteError(NexusError):
    """An error reply whose code this version does not know (a newer worker's)."""

    def __init__(self, code: str, status: int, detail: str | None = None) -> None:
        self.code, self.http_status, self.title = code, status, code
        super().__init__(detail)


def error_from_code(code: str, detail: str | None = None, status: int = 500) -> NexusError:
    """Rebuild the error a reply carried, by its stable code.

    Args:
        code: the reply's `code`.
        detail: the reply's `detail`.
        status: the reply's status, used only for codes this version does not know.
    """
    cls = ERRORS_BY_CODE.get(code)
    if cls is not None:
        return cls(detail)
    return RemoteError(code, status if 400 <= status < 600 else 500, detail)
