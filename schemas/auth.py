"""`auth.*`: the token service."""

from __future__ import annotations

from typing import Annotated

import msgspec

from nexus_bus.schemas.common import END

_TOKEN = r"[a-z][a-z0-9_-]{0,63}"
Scope = Annotated[str, msgspec.Meta(pattern=rf"^(\*|{_TOKEN}:(\*|{_TOKEN}))" + END)]


class IssueRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Issue a token (needs scope `auth:issue`)."""

    subject: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    scopes: Annotated[list[Scope], msgspec.Meta(max_length=64)]
    ttl_s: Annotated[int, msgspec.Meta(ge=1, le=30 * 24 * 3600)] | None = None


class IssueReply(msgspec.Struct, frozen=True, kw_only=True):
    """The signed token."""

    token: str
    expires_at: int
    jti: str


class VerifyRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Verify a token."""

    token: Annotated[str, msgspec.Meta(max_length=8192)]


class VerifyReply(msgspec.Struct, frozen=True, kw_only=True):
    """The verified claims."""

    subject: str
    scopes: list[str]
    expires_at: int
    jti: str


class RevokeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Revoke a token by id (needs scope `auth:revoke`)."""

    jti: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class RevokeReply(msgspec.Struct, frozen=True, kw_only=True):
    """Whether the id is now revoked."""

    jti: str
    revoked: bool
