"""The problem document (RFC 9457 fields) every error reply carries."""

from __future__ import annotations

import msgspec


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An error reply body: `application/problem+json` over HTTP and NATS alike."""

    type: str
    title: str
    status: int
    code: str
    detail: str | None = None
    request_id: str | None = None
