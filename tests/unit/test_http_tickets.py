"""Stream tickets' pure parts: shape, storage key, query parsing and the redeem check."""

from __future__ import annotations

import hashlib

import msgspec
import pytest

from nexus_bus.constants import SSE_TICKET_KEY_PREFIX
from nexus_bus.errors import InvalidToken
from nexus_bus.http.tickets import (
    TicketRecord,
    check_record,
    new_ticket,
    stream_url,
    ticket_key,
    ticket_of,
)


def test_tickets_are_long_random_and_url_safe() -> None:
    tickets = {new_ticket() for _ in range(100)}
    assert len(tickets) == 100
    assert all(len(t) == 43 and t.replace("-", "").replace("_", "").isalnum() for t in tickets)


def test_redis_holds_only_the_hash() -> None:
    assert ticket_key("abc") == SSE_TICKET_KEY_PREFIX + hashlib.sha256(b"abc").hexdigest()


def test_the_ticket_comes_from_the_query() -> None:
    assert ticket_of(b"") is None
    assert ticket_of(b"last_event_id=4") is None
    assert ticket_of(b"last_event_id=4&ticket=t-1") == "t-1"
    assert stream_url("orders", "t-1") == "/v1/events/orders?ticket=t-1"


def test_redeem_checks_presence_shape_and_topic() -> None:
    record = msgspec.json.encode(TicketRecord(topic="orders", authorization="Bearer x"))
    assert check_record(record, "orders") == "Bearer x"
    for raw, topic in ((None, "orders"), (b"garbage", "orders"), (record, "other")):
        with pytest.raises(InvalidToken):
            check_record(raw, topic)
