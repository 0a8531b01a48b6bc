"""Subject building and validation: nothing reaches a NATS subject without passing here.

nats-py writes subjects straight into the protocol line (`PUB <subject> <reply> <len>`), so a
space, CR/LF, wildcard or dot inside a token would redirect replies or inject commands.
"""

from __future__ import annotations

import functools
import re
from typing import Final

from nexus_bus.constants import (
    BUILTIN_RESERVED_OPS,
    DLQ_PREFIX,
    EVENTS_PREFIX,
    JOBS_PREFIX,
    RESERVED_OPS,
    SUBJECT_ROOT,
    TOKEN_PATTERN,
)
from nexus_bus.errors import InvalidRequest, UnknownOperation

_TOKEN: Final = re.compile(TOKEN_PATTERN)
# An inbox reply subject: prefix, then tokens of safe characters only (no wildcards, no spaces).
# Matched with fullmatch() like every guard here: `$` would let a final newline through.
_INBOX_TAIL: Final = re.compile(r"(\.[A-Za-z0-9_-]{1,128}){1,4}")
MAX_SUBJECT_BYTES: Final = 256


def check_token(value: str, what: str = "token") -> str:
    """Return `value` if it is a valid single subject token.

    Raises:
        InvalidRequest: when it is empty, too long, or has a character outside the allowlist.
    """
    if not isinstance(value, str) or _TOKEN.fullmatch(value) is None:
        raise InvalidRequest(f"invalid {what} {value!r}: must match {TOKEN_PATTERN}")
    return value


def check_operation(op: str, action: str, *, allow_reserved: frozenset[str] = frozenset()) -> None:
    """Validate an operation name as a client may address it.

    Raises:
        InvalidRequest: a token is malformed.
        UnknownOperation: the op is reserved for nexus-bus internals.
    """
    check_token(op, "op")
    check_token(action, "action")
    if op in RESERVED_OPS and op not in allow_reserved:
        raise UnknownOperation(f"op {op!r} is reserved")


@functools.lru_cache(maxsize=4096)
def client_subject(op: str, action: str) -> str:
    """The subject a client may send `op.action` to, validated once per distinct pair.

    Failures are not cached (lru_cache does not store exceptions), and the cache is bounded,
    so hostile names cannot grow it.

    Raises:
        InvalidRequest: a token is malformed.
        UnknownOperation: the op is reserved (`auth` is served by nexus-bus and allowed).
    """
    check_operation(op, action, allow_reserved=BUILTIN_RESERVED_OPS)
    return f"{SUBJECT_ROOT}.{op}.{action}"


def operation_subject(op: str, action: str) -> str:
    """`nexus.<op>.<action>`, the core request/reply subject of an operation."""
    check_token(op, "op")
    check_token(action, "action")
    return f"{SUBJECT_ROOT}.{op}.{action}"


def operation_wildcard(op: str) -> str:
    """`nexus.<op>.*`, what a worker subscribes to for every action of an op."""
    return f"{SUBJECT_ROOT}.{check_token(op, 'op')}.*"


def queue_group(op: str) -> str:
    """`nexus.<op>`, the queue group every worker of an op joins."""
    return f"{SUBJECT_ROOT}.{check_token(op, 'op')}"


def jobs_subject(op: str, action: str) -> str:
    """`nexus.jobs.<op>.<action>`, where asynchronous submissions go."""
    return f"{JOBS_PREFIX}.{check_token(op, 'op')}.{check_token(action, 'action')}"


def dlq_subject(op: str, action: str) -> str:
    """`nexus.dlq.<op>.<action>`, where exhausted jobs are dead-lettered."""
    return f"{DLQ_PREFIX}.{check_token(op, 'op')}.{check_token(action, 'action')}"


def events_subject(topic: str) -> str:
    """`nexus.events.<topic>`, the stream subject of an event topic."""
    return f"{EVENTS_PREFIX}.{check_token(topic, 'topic')}"


def parse_operation_subject(subject: str) -> tuple[str, str]:
    """Split `nexus.<op>.<action>` into its tokens.

    Raises:
        UnknownOperation: the subject is not of that shape.
    """
    parts = subject.split(".")
    if len(parts) != 3 or parts[0] != SUBJECT_ROOT:
        raise UnknownOperation(f"not an operation subject: {subject[:80]!r}")
    return parts[1], parts[2]


def is_inbox(reply: str, prefix: str) -> bool:
    """Whether `reply` is an inbox subject a worker may answer on.

    FastStream and nats-py reply to whatever `reply_to` a publisher set; answering only on
    inbox-shaped subjects stops a direct publisher from making a worker publish onto a
    command subject.
    """
    if len(reply) > MAX_SUBJECT_BYTES or not reply.startswith(prefix):
        return False
    return _INBOX_TAIL.fullmatch(reply[len(prefix) :]) is not None
