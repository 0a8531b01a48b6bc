"""Scopes (`op:action`, `op:*`, `*`), delegation, and CLI parsing of scopes and durations."""

from __future__ import annotations

import pytest

from nexus_bus.auth.scopes import allows, check_scope, covers, parse_duration, parse_scopes
from nexus_bus.errors import InvalidRequest


@pytest.mark.parametrize(
    ("grants", "op", "action", "allowed"),
    [
        ({"data:get"}, "data", "get", True),
        ({"data:get"}, "data", "put", False),
        ({"data:*"}, "data", "put", True),
        ({"data:*"}, "stream", "read", False),
        ({"*"}, "auth", "revoke", True),
        (set(), "data", "get", False),
        ({"data:get*"}, "data", "get", False),
        ({"*:get"}, "data", "get", False),
        ({"data"}, "data", "get", False),
    ],
)
def test_allows(grants: set[str], op: str, action: str, allowed: bool) -> None:
    assert allows(frozenset(grants), op, action) is allowed
    assert allows(list(grants), op, action) is allowed


@pytest.mark.parametrize(
    ("grants", "scope", "covered"),
    [
        ({"*"}, "*", True),
        ({"*"}, "data:*", True),
        ({"data:*"}, "*", False),
        ({"data:*"}, "data:*", True),
        ({"data:*"}, "data:get", True),
        ({"data:get"}, "data:*", False),
        ({"data:get"}, "data:get", True),
        ({"auth:issue"}, "data:get", False),
    ],
)
def test_covers_decides_what_may_be_delegated(grants: set[str], scope: str, covered: bool) -> None:
    assert covers(frozenset(grants), scope) is covered


def test_scopes_parse_from_the_cli_form() -> None:
    assert parse_scopes("data:get,data:put") == {"data:get", "data:put"}
    assert parse_scopes(" data:* , * ") == {"data:*", "*"}
    for bad in ("", "data", "Data:get", "data:get:x", "data:", ":get", "a b:c"):
        with pytest.raises(InvalidRequest):
            parse_scopes(bad)
    assert check_scope("ai:embed") == "ai:embed"


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("15m", 900), ("1h", 3600), ("7d", 604800)]
)
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "0", "1w", "h", "-5m", "1.5h", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(InvalidRequest):
        parse_duration(text)
