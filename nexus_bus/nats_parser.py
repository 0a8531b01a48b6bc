"""A faster reader for nats-py's protocol stream, with identical results, per connection.

nats-py 2.16's `Parser.parse` copies every read into a `bytearray`, then for each message
tries the `MSG` regex, then the `HMSG` regex, slices the matched groups, deletes the
consumed bytes, and copies header and payload out of the array; `Client._process_msg` then
takes two coroutines per message to build it and queue it for its subscription.
`FastParser` reads the messages (`MSG` and `HMSG`, all but a few operations in a busy
stream) straight from the bytes received, with one `find` and one `split` per control line,
and builds and queues a plain core subscription's message itself, exactly as
`_process_msg` would. With `deliver_directly` a subscription's messages skip its queue and
task altogether: the gateway's inbox takes its replies this way.

Anything else goes to nats-py's own code: `PING`, `INFO`, `-ERR`, `+OK` and a control line
it does not recognise exactly (extra spaces, tabs, signs) with the rest of that read to
nats-py's parser; inline statuses, JetStream subscriptions, auto-unsubscribe, old-style
requests and a subscription over its pending limits to `_process_msg`. A message split
across reads waits for the rest, appended without copying the whole per read.

It is installed per connection (`install(nc)`), only on the connections nexus-bus opens,
and only over the nats-py code it was written against (a fingerprint of the names each
replaced function uses). `tests/unit/test_nats_parser.py` feeds both parsers the same
generated streams, cut at every possible point, and compares what they deliver;
`tests/integration/test_nats_parser_faults.py` compares them over real NATS under faults.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from nats.aio import client as nats_client
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.protocol.parser import AWAITING_CONTROL_LINE, Parser

_HMSG: Final = b"HMSG "
_MSG: Final = b"MSG "
_CRLF: Final = b"\r\n"
_DIRECT: Final = "_nexus_deliver"  # a subscription's `deliver_directly` function
_PLAIN_HEAD: Final = b"NATS/1.0\r\n"  # a header block with no inline status
_PLAIN_HEAD_SIZE: Final = len(_PLAIN_HEAD)
_CR: Final = 13
_LF: Final = 10
_ZERO: Final = ord("0")
_NINE: Final = ord("9")
# The global and attribute names nats-py 2.16's code uses, for each function this module
# reads the protocol or delivers messages in place of: a fingerprint of that code.
_KNOWN_PARSE: Final = (
    "buf", "extend", "state", "AWAITING_CONTROL_LINE", "MSG_RE", "match", "groups",
    "msg_arg", "int", "needed", "end", "AWAITING_MSG_PAYLOAD", "Exception", "ProtocolError",
    "HMSG_RE", "header_needed", "OK_RE", "ERR_RE", "decode", "lower", "nc", "_process_err",
    "PING_RE", "_process_ping", "PONG_RE", "_process_pong", "INFO_RE", "json", "loads",
    "_process_info", "len", "MAX_CONTROL_LINE_SIZE", "_CRLF_", "CRLF_SIZE", "bytes",
    "_process_msg",
)
_KNOWN_PROCESS_MSG: Final = (
    "len", "stats", "_subs", "get", "_received", "_max_msgs", "pop", "_process_headers",
    "_build_message", "_jsi", "_active", "_is_control_message", "startswith", "nats", "js",
    "api", "Header", "CONSUMER_STALLED", "_ordered", "reply", "Msg", "Metadata",
    "_get_metadata_fields", "int", "_dseq", "reset_ordered_consumer", "_sseq", "_future",
    "cancelled", "set_result", "_pending_size", "_pending_bytes_limit", "_error_cb",
    "errors", "SlowConsumerError", "subject", "_pending_queue", "put_nowait", "asyncio",
    "QueueFull", "data", "track_sequences", "get_js_delivered", "_fciseq",
    "schedule_flow_control_response", "publish", "check_for_sequence_mismatch",
)
_KNOWN_PROCESS_HEADERS: Final = (
    "NATS_HDR_LINE_SIZE", "_SPC_BYTE_", "len", "NATS_HDR_LINE", "STATUS_MSG_LEN",
    "_CRLF_LEN_", "strip", "decode", "isdigit", "nats", "js", "api", "Header", "STATUS",
    "value", "find", "_CRLF_", "DESCRIPTION", "update", "_parse_header_lines", "parse_email",
    "headers", "keys", "any", "string", "whitespace", "append", "Exception", "_error_cb",
)
_KNOWN_BUILD_MESSAGE: Final = ("msg_class", "decode")


def _control_line(line: bytes, with_headers: bool) -> tuple[bytes, int, bytes, int, int] | None:
    """Subject, sid, reply, header and total size of a `MSG`/`HMSG` line (after the op),
    or None for a line nats-py's regexes would read differently or refuse."""
    args = line.split()
    count = len(args)
    if with_headers:
        if count == 5:
            subject, sid, reply, header_size, size = args
        elif count == 4:
            subject, sid, header_size, size = args
            reply = b""
        else:
            return None
        if not (sid.isdigit() and header_size.isdigit() and size.isdigit()):
            return None
        header_needed = int(header_size)
    else:
        if count == 4:
            subject, sid, reply, size = args
        elif count == 3:
            subject, sid, size = args
            reply = b""
        else:
            return None
        if not (sid.isdigit() and size.isdigit()):
            return None
        header_needed = 0
    # The regexes refuse trailing whitespace and a lone CR or LF inside the line (int
    # membership is a memchr; `b"\r" in line` costs five times more).
    if _CR in line or _LF in line or not _ZERO <= line[-1] <= _NINE:
        return None
    return subject, int(sid), reply, header_needed, int(size)


class FastParser(Parser):
    """nats-py's `Parser`, reading `MSG` and `HMSG` without regexes or copies."""

    # Bytes the operation at the start of `buf` needs in all, once its control line is in.
    _wanted: int

    def __init__(self, nc: Client) -> None:
        super().__init__(nc)
        self._parse_lines: Callable[[bytes], dict[str, str]] = nc._parse_header_lines
        self._msg_class: type[Msg] = nc.msg_class

    async def parse(self, data: bytes = b"") -> None:
        """Dispatch every complete message in `data` (after what an earlier read left)."""
        if self.state != AWAITING_CONTROL_LINE:  # nats-py's parser stopped mid-payload
            await super().parse(data)
            return
        if self.buf:  # the start of an operation that an earlier read cut
            joined = self._join(data)
            if joined is None:
                return
            data = joined
        pos = 0
        end = len(data)
        while pos < end:
            if data.startswith(_HMSG, pos):
                skip = 5
            elif data.startswith(_MSG, pos):
                skip = 4
            else:
                return await self._fall_back(data, pos)
            eol = data.find(_CRLF, pos)
            if eol < 0:
                break  # the control line is still coming
            control = _control_line(data[pos + skip : eol], skip == 5)
            if control is None:
                return await self._fall_back(data, pos)
            subject, sid, reply, header_needed, needed = control
            body = eol + 2
            after = body + needed
            if after + 2 > end:
                self._wanted = after + 2 - pos  # the payload is still coming
                break
            pos = after + 2
            headers = data[body : body + header_needed] or None
            payload = data[body + header_needed : after]
            delivered = self._deliver(sid, subject, reply, payload, headers)
            if delivered is not True:
                await self._otherwise(delivered, sid, subject, reply, payload, headers)
        if pos < end:
            self.buf = bytearray(data[pos:])  # an operation cut by the read: wait for the rest

    async def _otherwise(
        self,
        delivered: bool | Exception,
        sid: int,
        subject: bytes,
        reply: bytes,
        payload: bytes,
        headers: bytes | None,
    ) -> None:
        """A message `_deliver` left to nats-py, or whose direct callback raised (reported as
        nats-py's own consumer reports a callback's exception; reading goes on)."""
        if delivered is False:
            await self.nc._process_msg(sid, subject, reply, payload, headers)
        elif isinstance(delivered, Exception):
            await self.nc._error_cb(delivered)

    def _join(self, data: bytes) -> bytes | None:
        """What an earlier read left followed by `data`; None while the message it holds is
        still arriving (appended without a copy of the whole per read)."""
        if len(self.buf) + len(data) < self._wanted:
            self.buf += data
            return None
        joined = bytes(self.buf) + data
        self.buf = bytearray()
        self._wanted = 0
        return joined

    def reset(self) -> None:
        """Forget any partial input (nats-py calls this on reconnect)."""
        super().reset()
        self._wanted = 0

    def _deliver(
        self, sid: int, subject: bytes, reply: bytes, payload: bytes, headers: bytes | None
    ) -> bool | Exception:
        """`Client._process_msg` for the common case, without its coroutines: a core
        subscription (no JetStream, no auto-unsubscribe, no old-style request) with room in
        its queue, and headers with no inline status. False leaves the message to nats-py;
        an exception is what a direct callback raised."""
        nc = self.nc
        sub = nc._subs.get(sid)
        if (
            sub is None
            or sub._jsi is not None
            or sub._future is not None
            or sub._max_msgs > 0
            or (headers is not None and not headers.startswith(_PLAIN_HEAD))
        ):
            return False
        size = len(payload)
        direct = sub.__dict__.get(_DIRECT)
        if direct is None:
            limit = sub._pending_bytes_limit
            if (limit > 0 and sub._pending_size + size >= limit) or sub._pending_queue.full():
                return False  # nats-py reports the slow consumer
        hdr = None
        if headers is not None and len(headers) > _PLAIN_HEAD_SIZE:
            try:
                hdr = self._parse_lines(headers[_PLAIN_HEAD_SIZE:]) or None
            except Exception:  # nats-py reports it to the error callback
                return False
        stats = nc.stats
        stats["in_msgs"] += 1
        stats["in_bytes"] += size
        sub._received += 1
        msg = self._msg_class(
            subject=subject.decode(), reply=reply.decode(), data=payload, headers=hdr,
            _client=nc, _sid=sid,
        )
        if direct is not None:
            try:
                direct(msg)
            except Exception as exc:
                return exc
        else:
            sub._pending_size += size
            sub._pending_queue.put_nowait(msg)
        return True

    async def _fall_back(self, data: bytes, pos: int) -> None:
        # What is left is an operation this loop does not read: nats-py's parser takes it
        # and the rest of this read from here, and keeps what it cannot use yet.
        self.buf = bytearray(data[pos:])
        await super().parse()


def _names(function: Any) -> tuple[str, ...] | None:
    code = getattr(function, "__code__", None)
    return None if code is None else tuple(code.co_names)


def supported(nc: Client) -> bool:
    """Whether `nc` runs the nats-py code `FastParser` was written against."""
    cls = type(nc)
    return (
        type(getattr(nc, "_ps", None)) is Parser
        and _names(Parser.parse) == _KNOWN_PARSE
        and _names(cls._process_msg) == _KNOWN_PROCESS_MSG
        and _names(cls._process_headers) == _KNOWN_PROCESS_HEADERS
        and _names(cls._build_message) == _KNOWN_BUILD_MESSAGE
        and getattr(nats_client, "parse_email", True) is None
        and bytes(getattr(nats_client, "NATS_HDR_LINE", b"")) + _CRLF == _PLAIN_HEAD
    )


def install(nc: Client) -> bool:
    """Read `nc`'s stream with `FastParser` from now on, keeping any partial input.

    Call it on a connected client, before subscribing for `deliver_directly`.

    Returns:
        Whether it was installed (False on a nats-py it was not written for).
    """
    current: Any = getattr(nc, "_ps", None)
    if isinstance(current, FastParser):
        return True
    if not supported(nc):
        return False
    fast = FastParser(nc)
    fast.buf, fast.state, fast.needed = current.buf, current.state, current.needed
    fast.header_needed, fast.msg_arg = current.header_needed, current.msg_arg
    nc._ps = fast
    return True


def deliver_directly(sub: Subscription, deliver: Callable[[Msg], None]) -> bool:
    """Hand `sub`'s messages to `deliver` from the connection's reader, as they are parsed.

    This skips the subscription's queue and task: `deliver` must not block (it runs
    between two messages of the read loop); what it raises goes to the connection's error
    callback, as from a subscription callback, and reading goes on. Messages the fast path
    leaves to nats-py (inline statuses, a full queue) still reach the subscription's
    callback, so subscribe with one that does the same.

    Returns:
        Whether it is in place (False when the connection does not read with `FastParser`).
    """
    if not isinstance(getattr(sub._conn, "_ps", None), FastParser):
        return False
    sub.__dict__[_DIRECT] = deliver  # goes with the subscription (ids are never reused)
    return True


def delivers_directly(sub: Subscription) -> bool:
    """Whether `sub`'s messages go to a `deliver_directly` function."""
    return _DIRECT in sub.__dict__
