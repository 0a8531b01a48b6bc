"""`Record.decode` / `Record.json`: handlers read stored values typed, not as raw bytes."""

from __future__ import annotations

import msgspec
import pytest

from nexus_bus import InternalError
from nexus_bus.store import Record


class Price(msgspec.Struct, frozen=True, kw_only=True):
    sku: str
    cents: int


def test_a_record_decodes_into_a_type_or_plain_json() -> None:
    record = Record("price.apple", b'{"sku": "apple", "cents": 120}', 3)
    assert record.decode(Price) == Price(sku="apple", cents=120)
    assert record.json() == {"sku": "apple", "cents": 120}
    assert Record("n", b"120", 1).decode(int) == 120


def test_a_value_that_does_not_fit_is_an_internal_error_naming_the_key() -> None:
    with pytest.raises(InternalError, match=r"price\.pear does not decode as Price"):
        Record("price.pear", b'{"sku": "pear"}', 1).decode(Price)
    with pytest.raises(InternalError, match="not-json"):
        Record("not-json", b"\xff", 1).json()
