import pytest

from nexus_bus.bus.subjects import (
    check_operation,
    dlq_subject,
    events_subject,
    is_inbox,
    jobs_subject,
    operation_subject,
    operation_wildcard,
    parse_operation_subject,
    queue_group,
)
from nexus_bus.errors import InvalidRequest, UnknownOperation

INJECTIONS = [
    "",
    "a.b",
    "a b",
    "a\r\nPUB x 1",
    "a\n",
    "*",
    ">",
    "a*",
    "A",
    "1a",
    "a" * 65,
    "é",
    "a\x00",
    "a\t",
]


def test_builds_subjects() -> None:
    assert operation_subject("data", "get") == "nexus.data.get"
    assert operation_wildcard("data") == "nexus.data.*"
    assert queue_group("data") == "nexus.data"
    assert jobs_subject("data", "put") == "nexus.jobs.data.put"
    assert dlq_subject("data", "put") == "nexus.dlq.data.put"
    assert events_subject("orders") == "nexus.events.orders"


@pytest.mark.parametrize("bad", INJECTIONS)
def test_every_subject_builder_refuses_injection(bad: str) -> None:
    for build in (
        lambda: operation_subject(bad, "get"),
        lambda: operation_subject("data", bad),
        lambda: jobs_subject("data", bad),
        lambda: events_subject(bad),
    ):
        with pytest.raises(InvalidRequest):
            build()


def test_max_length_token_is_accepted() -> None:
    assert operation_subject("a" * 64, "b") == f"nexus.{'a' * 64}.b"


@pytest.mark.parametrize("op", ["jobs", "dlq", "events", "sys", "auth"])
def test_reserved_ops_are_refused(op: str) -> None:
    with pytest.raises(UnknownOperation):
        check_operation(op, "x")


def test_auth_is_allowed_where_builtin() -> None:
    check_operation("auth", "verify", allow_reserved=frozenset({"auth"}))


def test_parse_operation_subject() -> None:
    assert parse_operation_subject("nexus.data.get") == ("data", "get")
    with pytest.raises(UnknownOperation):
        parse_operation_subject("nexus.data.get.extra")


@pytest.mark.parametrize(
    ("reply", "ok"),
    [
        ("_INBOX.abc123", True),
        ("_INBOX.Zx8u2.QgHj7", True),
        ("nexus.data.delete", False),
        ("_INBOX.>", False),
        ("_INBOX.*", False),
        ("_INBOX.a b", False),
        ("_INBOX.", False),
        ("_INBOXX.abc", False),
        ("_INBOX." + "a" * 300, False),
    ],
)
def test_only_inbox_shaped_replies(reply: str, ok: bool) -> None:
    assert is_inbox(reply, "_INBOX") is ok
