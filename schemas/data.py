"""`data.*`: the key/value system of record."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from nexus_bus.schemas.common import LIST_PREFIX_PATTERN, Key, Limit


class GetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Read one key."""

    key: Key


class GetReply(msgspec.Struct, frozen=True, kw_only=True):
    """A key's current value and its KV revision."""

    key: str
    value: Any
    revision: int


class PutRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Write a key; with `expected_revision`, only if the key is still at that revision.

    `expected_revision: 0` means "only if the key does not exist".
    """

    key: Key
    value: Any
    expected_revision: Annotated[int, msgspec.Meta(ge=0)] | None = None


class PutReply(msgspec.Struct, frozen=True, kw_only=True):
    """The revision the write created."""

    key: str
    revision: int


class DeleteRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Delete a key."""

    key: Key


class DeleteReply(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a live value was deleted."""

    key: str
    deleted: bool


class ListRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """List keys, optionally only those starting with `prefix`."""

    prefix: Annotated[str, msgspec.Meta(pattern=LIST_PREFIX_PATTERN, max_length=256)] = ""
    limit: Limit = 100


class ListReply(msgspec.Struct, frozen=True, kw_only=True):
    """Matching keys in lexical order, at most `limit`."""

    keys: list[str]
