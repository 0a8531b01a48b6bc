"""Reply construction: success and error replies with the contract's headers and bodies."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, NamedTuple

import msgspec

from nexus_bus.bus.metadata import is_ascii_digits
from nexus_bus.constants import (
    CT_JSON,
    CT_PROBLEM,
    H_CONTENT_TYPE,
    H_REQUEST_ID,
    H_RETRY_AFTER,
    H_SERVICE_ERROR,
    H_SERVICE_ERROR_CODE,
    H_STATUS,
    PROBLEM_TYPE_BASE,
)
from nexus_bus.errors import InternalError, NexusError, error_from_code
from nexus_bus.schemas.problem import Problem

_problem_encoder: Final = msgspec.json.Encoder()
_problem_decoder: Final = msgspec.json.Decoder(Problem)
_MAX_ERROR_HEADER: Final = 256
_REPLY_STATUS_CLASSES: Final = frozenset("245")  # the first digit of a status a worker sends
# A problem's detail is for people: a handler quoting a large input in it would otherwise make
# the error reply outgrow max_payload, and its own code and status would give way to a 413.
_MAX_DETAIL: Final = 4096


class Reply(NamedTuple):
    """A reply as it travels: status, headers and encoded body (one per request: a named
    tuple is built several times faster than a frozen dataclass)."""

    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True, slots=True)
class Expired:
    """The request's deadline passed before it started; nobody waits for an answer."""

    request_id: str


def problem_of(error: NexusError, request_id: str | None) -> Problem:
    """The problem document describing `error`, its detail cut at 4096 characters."""
    detail = error.detail
    if len(detail) > _MAX_DETAIL:
        detail = f"{detail[:_MAX_DETAIL]}… (cut at {_MAX_DETAIL} characters)"
    return Problem(
        type=PROBLEM_TYPE_BASE + error.code,
        title=error.title,
        status=error.http_status,
        code=error.code,
        detail=detail,
        request_id=request_id,
    )


def _header_safe(text: str) -> str:
    cleaned = "".join(c if c.isprintable() and c.isascii() else " " for c in text)
    return cleaned[:_MAX_ERROR_HEADER]


def service_error_headers(error: NexusError) -> dict[str, str]:
    """The NATS micro error headers of an error reply (`Nats-Service-Error-Code`, and
    `Nats-Service-Error`: `<code>: <detail>`, made safe for a header)."""
    return {
        H_SERVICE_ERROR_CODE: str(error.http_status),
        H_SERVICE_ERROR: _header_safe(f"{error.code}: {error.detail}"),
    }


def error_reply(error: NexusError, request_id: str) -> Reply:
    """An error reply: `Nexus-Status`, the NATS micro error headers and a problem body."""
    headers = {
        H_STATUS: str(error.http_status),
        **service_error_headers(error),
        H_CONTENT_TYPE: CT_PROBLEM,
        H_REQUEST_ID: request_id,
    }
    if error.retry_after is not None:
        headers[H_RETRY_AFTER] = str(max(0, math.ceil(error.retry_after)))
    body = _problem_encoder.encode(problem_of(error, request_id))
    return Reply(error.http_status, headers, body)


def success_reply(body: bytes, content_type: str, request_id: str, status: int = 200) -> Reply:
    """A success reply."""
    headers = {H_STATUS: str(status), H_REQUEST_ID: request_id}
    if content_type != CT_JSON:  # JSON is the default; one header less on the hot path
        headers[H_CONTENT_TYPE] = content_type
    return Reply(status, headers, body)


def status_of(headers: dict[str, str] | None) -> int:
    """The `Nexus-Status` of a received reply; a reply without one, or with a status no
    worker sends (1xx, 3xx, below 100), is treated as 500.

    Only 2xx is a success and only 4xx and 5xx carry a problem document: taking `000` or
    `302` as a success would hand a broken responder's body to the caller as its result
    (and the HTTP shim cannot answer with a status below 200).
    """
    raw = (headers or {}).get(H_STATUS, "")
    if len(raw) == 3 and is_ascii_digits(raw) and raw[0] in _REPLY_STATUS_CLASSES:
        return int(raw)
    return 500


def error_of(status: int, body: bytes, headers: dict[str, str] | None = None) -> NexusError:
    """The NexusError an error reply stands for, read from its problem body and headers."""
    try:
        problem = _problem_decoder.decode(body)
    except (msgspec.MsgspecError, RecursionError):
        # A body nested deeper than the interpreter's stack raises RecursionError, even
        # inside fields the decoder skips.
        return InternalError(f"error reply {status} without a problem document")
    error = error_from_code(problem.code, problem.detail, problem.status)
    retry_after = (headers or {}).get(H_RETRY_AFTER, "")
    if len(retry_after) <= 6 and is_ascii_digits(retry_after):
        error.retry_after = float(retry_after)
    return error
