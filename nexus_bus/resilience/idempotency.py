"""Idempotency keys on the synchronous path: validation, scoping and fingerprints. Pure.

A key is scoped to (token subject, op, action): two callers, or two operations, never share
a record. The record's Redis name, and the effect scope the request's writes are journaled
under, are a digest of that scope, so any printable key is safe in them and their length is
fixed. The fingerprint (a digest of content type and body) tells a
repeat from a different request reusing the key (`422 idempotency_mismatch`).
"""

from __future__ import annotations

import hashlib
from typing import Final

from nexus_bus.errors import InvalidRequest

MAX_KEY_CHARS: Final = 255
_ANONYMOUS: Final = "-"  # the subject of requests without a token (auth off, public ops)


def check_key(key: str) -> str:
    """Return `key` when it is 1 to 255 printable ASCII characters.

    Raises:
        InvalidRequest: empty, longer than 255 characters, or not printable ASCII (400).
    """
    if not key or len(key) > MAX_KEY_CHARS:
        raise InvalidRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters")
    if not (key.isascii() and key.isprintable()):
        raise InvalidRequest("Idempotency-Key must be printable ASCII")
    return key


def scope_digest(subject: str | None, op: str, action: str, key: str) -> str:
    """The SHA-256 (hex) of `key`'s scope: this subject and operation.

    It names the key's Redis record and the effect scope its writes are journaled under.
    """
    scope = "\0".join((subject or _ANONYMOUS, op, action, key)).encode()
    return hashlib.sha256(scope).hexdigest()


def record_name(prefix: str, subject: str | None, op: str, action: str, key: str) -> str:
    """The Redis name of the record of `key` for this subject and operation."""
    return prefix + scope_digest(subject, op, action, key)


def fingerprint(content_type: str | None, body: bytes) -> str:
    """What makes two requests with the same key the same request."""
    digest = hashlib.sha256((content_type or "").encode() + b"\0" + body)
    return digest.hexdigest()[:32]
