"""Every pattern that guards a subject token, key, id or header refuses a final newline.

Python's `$` matches just before a final "\\n", and msgspec's `Meta(pattern=...)` matches with
`re.search`: `^[a-z]+$` accepts "k\\n". Each guard is checked with a value it accepts, and the
same value with a newline appended, which it must refuse.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.auth.scopes import check_scope
from nexus_bus.auth.tokens import unverified_subject
from nexus_bus.bus.metadata import check_headers, clean_request_id
from nexus_bus.bus.subjects import check_token, client_subject, is_inbox
from nexus_bus.cache.heads import check_key
from nexus_bus.cache.keys import build_key
from nexus_bus.errors import InvalidRequest, InvalidToken
from nexus_bus.jobs.envelope import check_job_id, job_id_of_message
from nexus_bus.schemas import auth, data, stream

NL = "\n"


def _refuses(check: Callable[[str], Any], good: str, error: type[Exception]) -> None:
    check(good)  # accepted
    with pytest.raises(error):
        check(good + NL)


def test_subject_tokens() -> None:
    _refuses(check_token, "data", InvalidRequest)
    _refuses(lambda op: client_subject(op, "get"), "data", InvalidRequest)
    _refuses(lambda action: client_subject("data", action), "get", InvalidRequest)


def test_inbox_reply_subjects() -> None:
    assert is_inbox("_INBOX.abc.1", "_INBOX")
    assert not is_inbox("_INBOX.abc.1" + NL, "_INBOX")


def test_request_ids_are_replaced() -> None:
    assert clean_request_id("req-1") == "req-1"
    assert clean_request_id("req-1" + NL) != "req-1" + NL


def test_header_names() -> None:
    def check(name: str) -> None:
        check_headers({name: "v"}, max_value_bytes=100, max_total_bytes=1000)

    _refuses(check, "X-Custom", InvalidRequest)


def test_kv_keys_and_cache_namespaces() -> None:
    _refuses(check_key, "users.42", InvalidRequest)
    _refuses(lambda ns: build_key("nexus", ns, "k"), "data", ValueError)


def test_job_ids() -> None:
    job_id = "0123456789abcdef" * 2
    _refuses(check_job_id, job_id, InvalidRequest)
    # A `Nexus-Job-Id` with a newline is not taken as the job id: one is derived instead.
    assert job_id_of_message("data", "put", {"Nexus-Job-Id": job_id}, 1) == job_id
    assert job_id_of_message("data", "put", {"Nexus-Job-Id": job_id + NL}, 1) != job_id + NL


def test_scopes() -> None:
    _refuses(check_scope, "data:get", InvalidRequest)
    _refuses(check_scope, "*", InvalidRequest)


def test_key_ids(tmp_path: Path) -> None:
    _refuses(lambda kid: generate_key(tmp_path / kid.strip(), kid=kid), "k1", ValueError)


def test_token_shape(tmp_path: Path) -> None:
    generate_key(tmp_path, kid="k1")
    codec = TokenCodec(Keyring.from_dir(tmp_path))
    token = codec.issue("alice", frozenset({"*"}), 60, now=int(time.time()), jti="j1").token
    _refuses(lambda t: codec.verify(t, time.time()), token, InvalidToken)
    assert unverified_subject(token, 4096) == "alice"
    assert unverified_subject(token + NL, 4096) is None


@pytest.mark.parametrize(
    ("type_", "good", "guarded"),
    [
        (data.GetRequest, {"key": "users.42"}, "key"),
        (data.PutRequest, {"key": "users.42", "value": 1}, "key"),
        (data.DeleteRequest, {"key": "users.42"}, "key"),
        (data.ListRequest, {"prefix": "users."}, "prefix"),
        (stream.PublishRequest, {"topic": "orders", "event": 1}, "topic"),
        (stream.PublishRequest, {"topic": "orders", "event": 1, "id": "evt-1"}, "id"),
        (stream.ReadRequest, {"topic": "orders"}, "topic"),
        (auth.IssueRequest, {"subject": "s", "scopes": ["data:get"]}, "scopes"),
    ],
)
def test_request_schemas(type_: type[Any], good: dict[str, Any], guarded: str) -> None:
    msgspec.convert(good, type_)
    value = good[guarded]
    bad = [value[0] + NL] if isinstance(value, list) else value + NL
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({**good, guarded: bad}, type_)
