"""Scopes and what they allow: `op:action`, `op:*` and `*`. Pure functions.

A token's scopes are a set of grants. An operation needs the scope `op:action`; a grant of
`op:*` covers every action of the op and `*` covers everything. The same rule decides what a
caller may delegate: `auth.issue` mints only scopes the caller's own grants cover, so holding
`auth:issue` alone never turns into `*`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from nexus_bus.errors import InvalidRequest

WILDCARD: Final = "*"
_TOKEN: Final = r"[a-z][a-z0-9_-]{0,63}"
# Both matched with fullmatch(): a `$` anchor would let a final newline through.
_SCOPE: Final = re.compile(rf"\*|{_TOKEN}:(\*|{_TOKEN})")
_DURATION: Final = re.compile(r"(\d{1,9})([smhd]?)")
_UNIT_S: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def allows(grants: Iterable[str] | frozenset[str], op: str, action: str) -> bool:
    """Whether `grants` include the scope of `op.action` (exactly, by `op:*`, or by `*`)."""
    held = grants if isinstance(grants, frozenset) else frozenset(grants)
    return WILDCARD in held or f"{op}:{WILDCARD}" in held or f"{op}:{action}" in held


def covers(grants: frozenset[str], scope: str) -> bool:
    """Whether `grants` include everything `scope` would grant (for delegation)."""
    if WILDCARD in grants:
        return True
    if scope == WILDCARD:
        return False
    op, _, action = scope.partition(":")
    if action == WILDCARD:
        return f"{op}:{WILDCARD}" in grants
    return allows(grants, op, action)


def check_scope(scope: str) -> str:
    """`scope` when well-formed.

    Raises:
        InvalidRequest: not `op:action`, `op:*` or `*`.
    """
    if not _SCOPE.fullmatch(scope):
        raise InvalidRequest(f"invalid scope {scope[:80]!r}: use op:action, op:* or *")
    return scope


def parse_scopes(text: str) -> frozenset[str]:
    """Scopes from a comma- or space-separated list (the CLI's `--scopes`).

    Raises:
        InvalidRequest: any scope is malformed, or there is none.
    """
    items = [s for s in re.split(r"[,\s]+", text.strip()) if s]
    if not items:
        raise InvalidRequest("no scopes given")
    return frozenset(check_scope(s) for s in items)


def parse_duration(text: str) -> int:
    """Seconds from `90`, `90s`, `15m`, `1h` or `7d`.

    Raises:
        InvalidRequest: anything else, or zero.
    """
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or int(m.group(1)) == 0:
        raise InvalidRequest(f"invalid duration {text[:40]!r}: use e.g. 90s, 15m, 1h or 7d")
    return int(m.group(1)) * _UNIT_S[m.group(2)]
