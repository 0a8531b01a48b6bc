"""Faster drop-ins for nats-py's header parsing and encoding, with identical results.

nats-py 2.16 parses every received header block with `Client._parse_header_lines`, which
tests each header name for whitespace with a Python generator over its characters. On our
request path (four to six headers each way) that generator was a fifth of a worker's CPU
time (see docs/benchmarks.md). This version does the same work with one precompiled regex
search per name.

Sending, `Client._send_publish` strips and regex-checks every header name of every message
and grows a bytearray piece by piece. The names a process sends are few and always the same
(`Nexus-Request-Id`, `traceparent`, ...): here each name is checked and encoded once, and
the block is joined in one step; values are treated exactly as before, except that
`str.translate` (which only replaces CR and LF, and takes 10 µs on a bearer token) runs only
on values that contain one.

Opt-in (`NEXUS_NATS__SPEEDUPS=true`), installed per connection by `nexus_bus.bus._speedups`.
`tests/unit/test_speedups.py` checks each against the original (generated input, the same
bytes queued and the same errors), and `install()` refuses a nats-py whose code it does not
recognise (a fingerprint of the names each original uses), so an upgrade can only fall back
to the original, never change behaviour.
"""

from __future__ import annotations

import re
import types
from typing import Any, Final

import nats.aio.client
from nats import errors
from nats.aio.client import Client
from nats.protocol import command as prot_command

_CRLF: Final = b"\r\n"
# For str patterns `\s` matches exactly the characters for which str.isspace() is true.
_WHITESPACE: Final = re.compile(r"\s")

_original = Client.__dict__.get("_parse_header_lines")
_original_send_publish = Client.__dict__.get("_send_publish")
_KNOWN_SEND_NAMES: Final = (
    "errors", "BadSubjectError", "prot_command", "pub_cmd", "bytearray", "extend",
    "NATS_HDR_LINE", "_CRLF_", "items", "strip", "_HEADER_KEY_RE", "fullmatch",
    "BadHeaderError", "encode", "translate", "_HEADER_VALUE_NEWLINES", "hpub_cmd", "stats",
    "_send_command", "_flush_queue", "empty", "_flush_pending",
)
# nats-py's own name check and value translation, when this nats-py has them (install()
# refuses otherwise); looked up softly so a release that renames them cannot break imports.
_HEADER_KEY_RE: Final[Any] = getattr(nats.aio.client, "_HEADER_KEY_RE", None)
_HEADER_VALUE_NEWLINES: Final[Any] = getattr(nats.aio.client, "_HEADER_VALUE_NEWLINES", None)
_HEAD: Final = b"NATS/1.0\r\n"
_SKIP: Final = b""
# Header name as given -> b"Name: " (checked), or _SKIP for a blank name. Bounded: a process
# sending ever new names (it should not) stops caching rather than growing.
_names: dict[str, bytes] = {}
_MAX_NAMES: Final = 512
# Received: raw header name -> its key, or None for a name nats-py would skip.
_parsed_names: dict[bytes, str | None] = {}
_UNSEEN: Final[Any] = object()
# The global and attribute names nats-py 2.16's parser uses: a fingerprint of its code.
_KNOWN_NAMES: Final = (
    "split",
    "_CRLF_",
    "partition",
    "strip",
    "decode",
    "UnicodeDecodeError",
    "any",
)


def parse_header_lines(raw: bytes) -> dict[str, str]:
    """Parse a NATS header block (`Name: Value\\r\\n` lines), exactly like nats-py 2.16."""
    out: dict[str, str] = {}
    for line in raw.split(_CRLF):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = _parsed_names.get(name, _UNSEEN)
        if key is _UNSEEN:
            key = _parse_name(name)
        if key is None:
            continue
        out[key] = value.strip().decode("utf-8", "replace")
    return out


def _parse_name(name: bytes) -> str | None:
    try:
        key: str | None = name.strip().decode("ascii")
    except UnicodeDecodeError:
        key = None
    else:
        if _WHITESPACE.search(key):  # type: ignore[arg-type]
            key = None
    if len(_parsed_names) < _MAX_NAMES:
        _parsed_names[name] = key
    return key


def encode_headers(headers: dict[str, Any]) -> bytes:
    """The header block nats-py 2.16 sends for `headers`, byte for byte.

    Raises:
        nats.errors.BadHeaderError: a name outside the HTTP token alphabet (as nats-py).
    """
    parts = [_HEAD]
    append = parts.append
    for k, v in headers.items():
        name = _names.get(k)
        if name is None:
            name = _encode_name(k)
        if name is _SKIP:
            continue
        append(name)
        value = v.strip()
        if "\r" in value or "\n" in value:  # translate() is slow (10 µs for a token) and
            value = value.translate(_HEADER_VALUE_NEWLINES)  # changes nothing else
        append(value.encode())
        append(_CRLF)
    append(_CRLF)
    return b"".join(parts)


def _encode_name(k: str) -> bytes:
    key = k.strip()
    if not key:
        name = _SKIP
    elif not _HEADER_KEY_RE.fullmatch(key):
        raise errors.BadHeaderError(key)
    else:
        name = key.encode() + b": "
    if len(_names) < _MAX_NAMES:
        _names[k] = name
    return name


async def send_publish(
    self: Client,
    subject: str,
    reply: str,
    payload: bytes,
    payload_size: int,
    headers: dict[str, Any] | None,
) -> None:
    """nats-py 2.16's `Client._send_publish`, with `encode_headers` for the header block."""
    if subject == "":
        raise errors.BadSubjectError
    if headers is None:
        pub_cmd = prot_command.pub_cmd(subject, reply, payload)
    else:
        pub_cmd = prot_command.hpub_cmd(subject, reply, encode_headers(headers), payload)
    self.stats["out_msgs"] += 1
    self.stats["out_bytes"] += payload_size
    await self._send_command(pub_cmd)
    if self._flush_queue is not None and self._flush_queue.empty():
        await self._flush_pending()


def original_parser() -> Any:
    """nats-py's own parser (a staticmethod), for the equivalence test."""
    return _original


def original_send_publish() -> Any:
    """nats-py's own `_send_publish`, for the equivalence test."""
    return _original_send_publish


def install(nc: Client) -> bool:
    """Use the faster header parser and encoder on `nc` only (never on its class).

    Each is installed only over the nats-py code it was written against (a fingerprint of
    the names each original uses): on other code `nc` keeps nats-py's own.

    Returns:
        Whether both were installed.
    """
    code = getattr(getattr(_original, "__func__", None), "__code__", None)
    send_code = getattr(_original_send_publish, "__code__", None)
    fits = (
        code is not None
        and code.co_names == _KNOWN_NAMES
        and send_code is not None
        and send_code.co_names == _KNOWN_SEND_NAMES
        and _HEADER_KEY_RE is not None
        and _HEADER_VALUE_NEWLINES is not None
        and type(nc).__dict__.get("_send_publish", _original_send_publish)
        is _original_send_publish
    )
    if not fits:
        return False
    # Instance attributes shadow the class's: nats-py calls both through `self.`, and every
    # other client in the process keeps the originals.
    nc.__dict__["_parse_header_lines"] = parse_header_lines
    nc.__dict__["_send_publish"] = types.MethodType(send_publish, nc)
    return True


def installed(nc: Client) -> bool:
    """Whether `nc` parses and encodes headers with this module."""
    return nc.__dict__.get("_parse_header_lines") is parse_header_lines
