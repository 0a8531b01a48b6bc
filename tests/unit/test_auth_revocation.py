"""Revoked ids as KV keys: any `jti` a token can carry maps to one valid key of its own."""

from __future__ import annotations

import uuid

import pytest
from nats.js.kv import VALID_KEY_RE

from nexus_bus.auth.revocation import revocation_key
from nexus_bus.auth.service import new_jti


def is_valid_kv_key(key: str) -> bool:
    """nats-py's rule for a key (it refuses anything else before sending)."""
    return bool(VALID_KEY_RE.match(key)) and not key.startswith(".") and not key.endswith(".")


@pytest.mark.parametrize("jti", [new_jti(), uuid.uuid4().hex, str(uuid.uuid4()), "x", "A_b-9"])
def test_ids_that_are_key_tokens_are_their_own_key(jti: str) -> None:
    assert revocation_key(jti) == jti


@pytest.mark.parametrize(
    "jti",
    [
        "", "a b", "a.b", ".", "*", ">", "a.>", "ä", "a\nb", "x" * 129, "x" * 3000,
        "sha256." + "0" * 64, "\ud800",
    ],
)
def test_other_ids_are_keyed_by_their_hash(jti: str) -> None:
    key = revocation_key(jti)
    assert is_valid_kv_key(key)
    assert key.startswith("sha256.") and len(key) == len("sha256.") + 64
    assert key != jti  # even an id that looks like a hashed key is hashed again


def test_keys_do_not_collide() -> None:
    ids = ["a", "a.", "a ", "A", "a.b", "a/b", "a=b", "sha256.a", "x" * 128, "x" * 129]
    assert len({revocation_key(jti) for jti in ids}) == len(ids)
