from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest

from nexus_bus.bus import codec
from nexus_bus.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from nexus_bus.schemas.data import PutRequest

LIMITS = {"max_bytes": 4096, "max_depth": 8}


def test_round_trip_json_and_msgpack() -> None:
    req = PutRequest(key="a.b", value={"x": [1, 2.5, None, "s"]})
    for media in ("json", "msgpack"):
        body = codec.encode(req, media)
        assert codec.decode(body, PutRequest, media=media, **LIMITS) == req


@pytest.mark.parametrize(
    "body",
    [
        b"{",
        b'{"key": "a", "value": 1} trailing',
        b'{"key": "\xff\xfe", "value": 1}',
        b'{"key": "a", "value": 1' + b"0" * 40 + b"}",
        b"",
        b'{"value": 1}',
        b'{"key": "bad key", "value": 1}',
    ],
)
def test_malformed_input_is_invalid_request(body: bytes) -> None:
    with pytest.raises(InvalidRequest):
        codec.decode(body, PutRequest, **LIMITS)


# MessagePack values JSON cannot carry. msgspec encodes none of these keys: written by hand.
NO_JSON_FORM = {
    "nil-key": b"\x81\xc0\x01",  # {nil: 1}
    "bool-key": b"\x81\xc3\x01",  # {true: 1}
    "array-key": b"\x81\x92\x01\x02\x01",  # {[1, 2]: 1}
    "nested-key": b"\x91\x81\xc2\x01",  # [{false: 1}]
    "nan": msgspec.msgpack.encode(float("nan")),
    "infinity": msgspec.msgpack.encode({"a": [float("-inf")]}),
    "infinite-key": b"\x81\xcb\x7f\xf0\x00\x00\x00\x00\x00\x00\x01",  # {inf: 1}
    # The timestamp extension (-1), which msgspec decodes into a datetime (stored: a string).
    "timestamp-32": msgspec.msgpack.encode(datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC)),
    "timestamp-64": msgspec.msgpack.encode([datetime(2500, 1, 1, tzinfo=UTC)]),
    "timestamp-96": msgspec.msgpack.encode({"a": datetime(1900, 1, 1, tzinfo=UTC)}),
}


@pytest.mark.parametrize("value", NO_JSON_FORM.values(), ids=NO_JSON_FORM.keys())
def test_a_request_value_json_cannot_carry_is_invalid_request(value: bytes) -> None:
    """Values are stored and passed on as JSON: such a key failed the handler's re-encoding
    (500), and NaN or an infinity came back as null. A reply is taken as it came."""
    body = b"\x82\xa3key\xa1k\xa5value" + value  # {"key": "k", "value": <value>}
    with pytest.raises(InvalidRequest):
        codec.decode(body, PutRequest, media="msgpack", json_only=True, **LIMITS)
    assert codec.decode(value, media="msgpack", **LIMITS) is not None


def test_number_keys_are_accepted_as_json_writes_them() -> None:
    """JSON writes every object key as text; a typed `dict[int, ...]` reaches a handler
    from a JSON body too."""
    body = msgspec.msgpack.encode({"key": "k", "value": {1: "a", 2.5: "b", "c": 1.5}})
    value = codec.decode(body, PutRequest, media="msgpack", json_only=True, **LIMITS).value
    assert value == {1: "a", 2.5: "b", "c": 1.5}
    assert msgspec.json.encode(value) == b'{"1":"a","2.5":"b","c":1.5}'
    typed = codec.decode(b'{"1": 2}', dict[int, int], json_only=True, **LIMITS)
    assert codec.decode(msgspec.msgpack.encode(typed), dict[int, int], media="msgpack",
                        json_only=True, **LIMITS) == typed == {1: 2}


def test_too_deep_is_invalid_request_not_recursion_error() -> None:
    nested = b'{"key": "k", "value": ' + b"[" * 20 + b"]" * 20 + b"}"
    with pytest.raises(InvalidRequest, match="nested"):
        codec.decode(nested, PutRequest, **LIMITS)
    hopeless = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidRequest):
        codec.decode(hopeless, max_bytes=1 << 20, max_depth=32)


def test_depth_within_limit_is_accepted() -> None:
    ok = b'{"key": "k", "value": ' + b"[" * 6 + b"]" * 6 + b"}"
    assert codec.decode(ok, PutRequest, **LIMITS).value == [[[[[[]]]]]]


def test_oversized_body_is_413_before_decoding() -> None:
    with pytest.raises(PayloadTooLarge):
        codec.decode(b" " * 4097, PutRequest, **LIMITS)


def test_media_types() -> None:
    assert codec.media_type(None) == "json"
    assert codec.media_type("application/json; charset=utf-8") == "json"
    assert codec.media_type("application/msgpack") == "msgpack"
    with pytest.raises(UnsupportedMediaType):
        codec.media_type("text/xml")


@pytest.mark.parametrize(
    "declared", ["charset=UTF-8", 'charset="utf-8"', " CharSet = utf-8 ", "foo=bar; charset=utf-8"]
)
def test_json_in_utf8_is_accepted_however_spelled(declared: str) -> None:
    assert codec.media_type(f"application/json; {declared}") == "json"


@pytest.mark.parametrize("charset", ["latin-1", "iso-8859-1", "utf-16", '"us-ascii"', ""])
def test_json_in_any_other_charset_is_415(charset: str) -> None:
    """JSON is UTF-8 (RFC 8259): a body declared otherwise would be read as something else."""
    with pytest.raises(UnsupportedMediaType):
        codec.media_type(f"application/json; charset={charset}")


def test_depth_counts_structs_and_containers() -> None:
    class Box(msgspec.Struct):
        inner: list[dict[str, int]]

    codec.check_value(Box(inner=[{"a": 1}]), 3)
    with pytest.raises(InvalidRequest):
        codec.check_value(Box(inner=[{"a": 1}]), 2)


@pytest.mark.parametrize(
    "number", [b"1" + b"9" * 400, b"18446744073709551616", b"-9223372036854775809"]
)
def test_huge_integers_are_refused(number: bytes) -> None:
    with pytest.raises(InvalidRequest, match="out of range"):
        codec.decode(b'{"key": "k", "value": ' + number + b"}", PutRequest, **LIMITS)
    assert codec.decode(b'{"key": "k", "value": 18446744073709551615}', PutRequest, **LIMITS)


@pytest.mark.parametrize(
    "body",
    [b"98765432109876543210", b"-98765432109876543210", b" 98765432109876543210",
     b"[98765432109876543210]", b"[1,98765432109876543210]", b'{"a":98765432109876543210}',
     b'{"a": -98765432109876543210}', b"[1,\n\t98765432109876543210]",
     # after fractions long enough to lose their first digits to the quick scan
     b"[0.0012345678901234567891,98765432109876543210]", b"[1.99999999,99999999999999999999]"],
)
def test_every_place_a_long_integer_can_stand_is_scanned(body: bytes) -> None:
    assert codec.may_hold_long_integer(body)
    with pytest.raises(InvalidRequest, match="out of range"):
        codec.decode(body, Any, **LIMITS)


@pytest.mark.parametrize(
    "body",
    [b"[0.0012345678901234567891, -0.00054381724447011948]", b'{"s": "x1234567890123456789012"}',
     b"[1.5e-07, 123456789012345678]"],
)
def test_fractions_and_strings_are_not_walked(body: bytes) -> None:
    # A float vector's digits after the point made every float-form embedding reply walk.
    assert not codec.may_hold_long_integer(body)
