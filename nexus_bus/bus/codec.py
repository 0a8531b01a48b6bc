"""Body encoding and decoding, JSON or MessagePack, with size and nesting limits.

Decoding is where untrusted bytes meet our types; every failure becomes a 4xx NexusError.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Final, TypeVar

import msgspec

from nexus_bus.constants import CT_JSON, CT_MSGPACK, CT_PROBLEM
from nexus_bus.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType

T = TypeVar("T")

_json_encoder: Final = msgspec.json.Encoder()
_msgpack_encoder: Final = msgspec.msgpack.Encoder()
# An integer beyond 64 bits has 19 digits or more, the first not 0 (JSON has no leading
# zeros), after a delimiter, whitespace or its sign: a run of digits after a decimal point (a
# float's fraction, which the float form of a vector is full of) or inside a string never
# needs the walk of `check_value`.
_LONG_INTEGER: Final = re.compile(rb"[\[:,\s-]-?[1-9]\d{18}")
_LONG_AT_START: Final = re.compile(rb"-?[1-9]\d{18}")
# Both need a run of 19 digits not after a decimal point. With every digit mapped to "9" and
# the first 8 digits of every fraction blanked out (a float's shortest form has at most 17
# significant digits and 4 leading zeros), a body without such a run is ruled out at C speed:
# 4 µs for a 7 KB vector of floats, where the regexes walk it position by position in 30-50.
_DIGITS_AS_NINE: Final = bytes.maketrans(b"012345678", b"999999999")
_FRACTION_START: Final = b".99999999"
_FRACTION_BLANK: Final = b"........."
_NINETEEN_DIGITS: Final = b"9" * 19
_JSON_TYPES: Final = frozenset({CT_JSON, CT_PROBLEM, "text/json", ""})
_MSGPACK_TYPES: Final = frozenset({CT_MSGPACK, "application/x-msgpack", "application/vnd.msgpack"})
_CHARSET: Final = "charset"
_UTF8: Final = "utf-8"


def media_type(content_type: str | None) -> str:
    """Normalise a Content-Type to the codec's media type (`json` or `msgpack`).

    Raises:
        UnsupportedMediaType: for anything else, and for JSON declared in a charset other
            than UTF-8.
    """
    base, _, params = (content_type or "").partition(";")
    base = base.strip().lower()
    if base in _JSON_TYPES:
        if params:
            _check_json_charset(params)
        return "json"
    if base in _MSGPACK_TYPES:
        return "msgpack"
    raise UnsupportedMediaType(f"unsupported content type {base!r}; use {CT_JSON} or {CT_MSGPACK}")


def _check_json_charset(params: str) -> None:
    """Refuse a `charset` parameter other than UTF-8 (any case, quoted or not).

    JSON exchanged between systems is UTF-8 (RFC 8259 §8.1); a body declared as latin-1 would
    be decoded as UTF-8 all the same and mean something else than its sender meant.
    """
    for param in params.split(";"):
        name, _, value = param.partition("=")
        if name.strip().lower() == _CHARSET:
            charset = value.strip().strip('"').lower()
            if charset != _UTF8:
                raise UnsupportedMediaType(
                    f"JSON must be UTF-8 (RFC 8259), not charset={charset[:40]!r}"
                )


def content_type_of(media: str) -> str:
    """The Content-Type header for a media type from `media_type()`."""
    return CT_MSGPACK if media == "msgpack" else CT_JSON


def encode(value: Any, media: str = "json") -> bytes:
    """Encode a reply or request body."""
    if media == "msgpack":
        return _msgpack_encoder.encode(value)
    return _json_encoder.encode(value)


def decode(
    body: bytes,
    type_: type[T] | Any = Any,
    *,
    media: str = "json",
    max_bytes: int,
    max_depth: int,
    json_only: bool = False,
) -> T:
    """Decode and validate a body against `type_`.

    `json_only` (a request body) also refuses MessagePack values JSON cannot carry (see
    `check_value`); a reply is taken as it came.

    Raises:
        PayloadTooLarge: the body exceeds `max_bytes`.
        InvalidRequest: malformed input, trailing garbage, bad UTF-8, out-of-range numbers,
            schema mismatch, nesting deeper than `max_depth`, or with `json_only` a value
            JSON cannot carry.
    """
    if len(body) > max_bytes:
        raise PayloadTooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes}")
    try:
        if media == "msgpack":
            value = msgspec.msgpack.decode(body, type=type_)
        else:
            value = msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request: {exc}") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"malformed {media} body: {exc}") from None
    except RecursionError:
        raise InvalidRequest(f"body nested deeper than {max_depth} levels") from None
    # For JSON, cheap byte scans (C speed) rule out most bodies: nesting deeper than
    # max_depth needs more than max_depth brackets, and a 64-bit overflow needs 19 digits.
    if (
        media != "json"
        or body.count(b"[") + body.count(b"{") > max_depth
        or may_hold_long_integer(body)
    ):
        check_value(value, max_depth, json_only=json_only)
    if json_only and media == "msgpack" and any(mark in body for mark in _TIMESTAMP_MARKS):
        _refuse_timestamps(body)
    return value


# The timestamp extension (type -1) in its three sizes: msgspec decodes it into a datetime,
# never an `Ext`, wherever any value or a datetime may stand. The bytes may also stand inside
# a string or a binary value: then the untyped decode below finds no datetime.
_TIMESTAMP_MARKS: Final = (b"\xd6\xff", b"\xd7\xff", b"\xc7\x0c\xff")


def _refuse_timestamps(body: bytes) -> None:
    """Refuse a MessagePack body holding a timestamp: an extension type, which JSON has no
    form for (stored, it came back as an ISO string).

    Raises:
        InvalidRequest: the body holds one.
    """
    stack: list[Any] = [msgspec.msgpack.decode(body)]  # decoded once already: it is valid
    while stack:
        item = stack.pop()
        if isinstance(item, datetime):
            raise InvalidRequest("MessagePack extension types are not accepted (a timestamp)")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)


def may_hold_long_integer(body: bytes) -> bool:
    """Whether a JSON body may hold an integer of 19 digits or more (so perhaps beyond 64
    bits). False positives only cost `check_value`'s walk; a miss would let one through."""
    digits = body.translate(_DIGITS_AS_NINE).replace(_FRACTION_START, _FRACTION_BLANK)
    if digits.find(_NINETEEN_DIGITS) == -1:
        return False  # the common case: no integer of 19 digits can be there
    return _LONG_INTEGER.search(body) is not None or _LONG_AT_START.match(body) is not None


_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


def check_value(value: Any, max_depth: int, *, json_only: bool = False) -> None:
    """Refuse values nested deeper than `max_depth` or with integers beyond 64 bits, and with
    `json_only` what else JSON cannot carry.

    msgspec decodes arbitrarily large integers into untyped (`Any`) fields; most clients
    cannot represent them and Python refuses to print ones past 4300 digits. Iterative, so
    hostile input cannot exhaust the stack.

    `json_only` is for request bodies, which must mean the same in either media: values are
    stored and passed on as JSON. A MessagePack map key that is nil, a boolean or an array
    has no JSON form (re-encoding it failed in the handler: 500, and a job was
    dead-lettered); NaN and the infinities are no JSON number (stored, they came back as
    null). Other keys JSON writes as text, as every object key is: a number or a typed key
    (`dict[int, ...]`, which a JSON body reaches as digits too) stays accepted. A JSON body
    never holds any of these; a reply is not checked for them, since the client asked for
    MessagePack.

    Raises:
        InvalidRequest: too deep, an out-of-range number, or with `json_only` a map key or
            number JSON cannot carry.
    """
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, msgspec.msgpack.Ext):
            # MessagePack extension types have no JSON form: refuse them at the door.
            raise InvalidRequest("MessagePack extension types are not accepted")
        if isinstance(item, dict):
            if json_only:
                _check_keys(item)
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        elif isinstance(item, msgspec.Struct):
            children = [getattr(item, f) for f in item.__struct_fields__]
        else:
            if type(item) is int and not _INT_MIN <= item <= _INT_MAX:
                raise InvalidRequest("number out of range: integers must fit in 64 bits")
            if json_only and type(item) is float and not math.isfinite(item):
                raise InvalidRequest(_NOT_FINITE)
            continue
        if depth > max_depth:
            raise InvalidRequest(f"body nested deeper than {max_depth} levels")
        stack.extend((child, depth + 1) for child in children)


_NOT_FINITE: Final = "number out of range: NaN and infinities have no JSON form"
# The MessagePack map keys JSON has no form for, as msgspec decodes them into `Any`.
_KEYS_WITHOUT_JSON: Final = {type(None): "nil", bool: "a boolean", tuple: "an array"}


def _check_keys(item: dict[Any, Any]) -> None:
    """Refuse map keys JSON has no form for (see `check_value`)."""
    for key in item:
        if type(key) is str:
            continue
        if kind := _KEYS_WITHOUT_JSON.get(type(key)):
            raise InvalidRequest(f"map keys must be strings or numbers, not {kind}")
        if type(key) is float and not math.isfinite(key):
            raise InvalidRequest(_NOT_FINITE)
