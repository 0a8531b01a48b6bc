"""Errors as HTTP answers: problem documents, and the headers some statuses require.

Pure. The shim's one exception handler turns every NexusError into `problem_answer(...)`;
replies that workers send already carry their problem body, and only get the headers here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import msgspec

from nexus_bus.bus.metadata import is_ascii_digits
from nexus_bus.bus.replies import problem_of
from nexus_bus.constants import (
    AUTH_REALM,
    AUTH_SCHEME,
    CT_PROBLEM,
    H_RETRY_AFTER,
    H_WWW_AUTHENTICATE,
)
from nexus_bus.errors import NexusError
from nexus_bus.policies.ratelimit import RateLimitExceeded

Headers = list[tuple[bytes, bytes]]

_encoder: Final = msgspec.json.Encoder()
_RETRY_AFTER: Final = H_RETRY_AFTER.lower().encode()
_WWW_AUTHENTICATE: Final = H_WWW_AUTHENTICATE.lower().encode()
# RFC 6750 §3: a request without credentials gets the bare challenge; one whose token failed
# is told so (`error="invalid_token"`), which tells clients to refresh rather than to log in.
_CHALLENGE: Final = f'{AUTH_SCHEME} realm="{AUTH_REALM}"'.encode()
_CHALLENGE_INVALID: Final = _CHALLENGE + b', error="invalid_token"'
RETRYABLE_STATUSES: Final = frozenset({429, 503})
CT_PROBLEM_BYTES: Final = CT_PROBLEM.encode()


class MethodNotAllowed(NexusError):
    """The route exists but not for this method (405)."""

    code, http_status, title = "method_not_allowed", 405, "Method not allowed"

    def __init__(self, detail: str | None = None, *, allow: str = "") -> None:
        super().__init__(detail)
        self.allow = allow


class RequestTimeout(NexusError, TimeoutError):
    """The client did not send its request within the read timeout (408)."""

    code, http_status, title = "request_timeout", 408, "Request timeout"


class ClientGone(NexusError, ConnectionError):
    """The client disconnected before its request was read; there is nobody to answer.

    499 is NGINX's convention, for metrics and logs only: nobody receives it.
    """

    code, http_status, title = "client_closed", 499, "Client closed the connection"


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete HTTP answer: status, extra headers and body."""

    status: int
    content_type: bytes
    headers: Headers
    body: bytes


def status_headers(
    status: int, *, token_sent: bool, retry_after: float | None, default_retry_after: int
) -> Headers:
    """The headers a status requires: a Bearer challenge on 401, Retry-After on 429 and 503.

    Args:
        token_sent: whether the request carried an Authorization header.
        retry_after: seconds the failing side asked for, when it said.
        default_retry_after: seconds to send otherwise.
    """
    if status == 401:
        return [(_WWW_AUTHENTICATE, _CHALLENGE_INVALID if token_sent else _CHALLENGE)]
    if status in RETRYABLE_STATUSES:
        seconds = default_retry_after if retry_after is None else max(0, round(retry_after))
        return [(_RETRY_AFTER, str(seconds).encode())]
    return []


def retry_after_of(value: str | None) -> float | None:
    """A Retry-After value in whole seconds from a reply header; None when absent or a date."""
    if value and is_ascii_digits(value) and len(value) <= 9:
        return float(value)
    return None


def problem_answer(
    error: NexusError, request_id: str, *, token_sent: bool, default_retry_after: int
) -> Answer:
    """The problem+json answer for `error`, with the headers its status requires."""
    headers = status_headers(
        error.http_status,
        token_sent=token_sent,
        retry_after=error.retry_after,
        default_retry_after=default_retry_after,
    )
    if isinstance(error, MethodNotAllowed) and error.allow:
        headers.append((b"allow", error.allow.encode()))
    elif isinstance(error, RateLimitExceeded):  # a job refused by its rate limit (jobs.py)
        for name, value in error.headers.items():
            headers.append((name.lower().encode(), value.encode()))
    body = _encoder.encode(problem_of(error, request_id))
    return Answer(error.http_status, CT_PROBLEM_BYTES, headers, body)
