"""FastParser against nats-py's own parser: the same stream in, the same messages out."""

from __future__ import annotations

import asyncio
import itertools
import random
from typing import Any

import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.errors import ProtocolError
from nats.protocol.parser import Parser

from nexus_bus import nats_parser

SIDS = (1, 2, 3)
SUBJECTS = (b"nexus.echo.say", b"_INBOX.abc.1f2e", b"a", b"x.y.z")
REPLIES = (b"", b"_INBOX.abc.99", b"r")
HEADERS = (
    None,
    b"NATS/1.0\r\n\r\n",
    b"NATS/1.0\r\nNexus-Status: 200\r\nNexus-Request-Id: abc\r\n\r\n",
    b"NATS/1.0\r\nBad Name: x\r\nk: \xff\r\n\r\n",
    b"NATS/1.0 503\r\n\r\n",
    b"NATS/1.0 100 Idle Heartbeat\r\nNats-Last-Consumer: 7\r\n\r\n",
)
PAYLOADS = (b"", b"hello", b'{"msg":"hello"}', b"with\r\nCRLF inside", b"MSG 1 2 3\r\n")
OTHERS = (
    b"PING\r\n", b"PONG\r\n", b"+OK\r\n", b"INFO {\"server_id\":\"x\"}\r\n",
    b"-ERR 'Stale Connection'\r\n",
)


class Recorder(Client):
    """A client that records what its parser dispatches instead of acting on it."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[Any] = []
        for sid in SIDS:
            self._subs[sid] = Subscription(self, sid, "x", pending_msgs_limit=0)

    async def _process_ping(self) -> None:
        self.events.append("ping")

    async def _process_pong(self) -> None:
        self.events.append("pong")

    async def _process_info(self, info: Any, initial_connection: bool = False) -> None:
        self.events.append(("info", info))

    async def _process_err(self, err_msg: str) -> None:
        self.events.append(("err", err_msg))

    def delivered(self) -> list[Any]:
        out = []
        for sid in SIDS:
            queue = self._subs[sid]._pending_queue
            while not queue.empty():
                msg = queue.get_nowait()
                out.append((sid, msg.subject, msg.reply, msg.data, msg.headers))
        return out


def message(rng: random.Random) -> bytes:
    sid = rng.choice(SIDS)
    subject, reply = rng.choice(SUBJECTS), rng.choice(REPLIES)
    headers, payload = rng.choice(HEADERS), rng.choice(PAYLOADS)
    head = b"%s %d %s" % (subject, sid, reply) if reply else b"%s %d" % (subject, sid)
    if headers is None:
        return b"MSG %s %d\r\n%s\r\n" % (head, len(payload), payload)
    total = len(headers) + len(payload)
    return b"HMSG %s %d %d\r\n%s%s\r\n" % (head, len(headers), total, headers, payload)


def stream(rng: random.Random, length: int) -> bytes:
    parts = [
        rng.choice(OTHERS) if rng.random() < 0.15 else message(rng) for _ in range(length)
    ]
    return b"".join(parts)


async def run(parser_class: type[Parser], chunks: list[bytes]) -> tuple[list[Any], Any]:
    nc = Recorder()
    nc._ps = parser_class(nc)
    error: Any = None
    try:
        for chunk in chunks:
            await nc._ps.parse(chunk)
    except ProtocolError as exc:
        error = type(exc)
    return nc.events + nc.delivered(), error


def compare(chunks: list[bytes]) -> None:
    async def both() -> None:
        expected = await run(Parser, chunks)
        assert await run(nats_parser.FastParser, chunks) == expected, chunks

    asyncio.run(both())


def test_same_messages_from_generated_streams_cut_anywhere() -> None:
    rng = random.Random(2026)
    for _ in range(60):
        data = stream(rng, rng.randint(1, 6))
        cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
        bounds = [0, *cuts, len(data)]
        compare([data[a:b] for a, b in itertools.pairwise(bounds)])


def test_same_messages_with_every_single_cut() -> None:
    data = b"".join(message(random.Random(seed)) for seed in range(4)) + b"PING\r\n"
    for cut in range(1, len(data)):
        compare([data[:cut], data[cut:]])
    compare([data[i : i + 1] for i in range(len(data))])  # a byte at a time


@pytest.mark.parametrize(
    "line",
    [
        b"MSG  a 1 5\r\nhello\r\n",  # extra spaces: nats-py's regex path
        b"MSG a\t1 5\r\nhello\r\n",
        b"MSG a 1 r\n5\r\nhello\r\n",  # a lone LF the regex refuses
        b"MSG a x 5\r\nhello\r\n",  # a sid that is not a number
        b"MSG a 1 2 3 5\r\nhello\r\n",
        b"HMSG a 1 12 +17\r\nNATS/1.0\r\n\r\nhello\r\n",
        b"HMSG a 1 r 12 17 \r\nNATS/1.0\r\n\r\nhello\r\n",
        b"MSGX a 1 5\r\nhello\r\n",
        b"BOGUS\r\n",
        b"MSG a 1 5\r\nhelloXY",  # a payload without its CRLF: taken as nats-py does
    ],
)
def test_unusual_lines_behave_as_in_nats_py(line: bytes) -> None:
    compare([line + b"MSG b 2 2\r\nok\r\n"])


def test_a_full_queue_is_left_to_nats_py() -> None:
    """The slow-consumer path (error callback, message dropped) stays nats-py's own."""

    async def check() -> None:
        nc = Recorder()
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        nc._error_cb = on_error
        nc._subs[1] = Subscription(nc, 1, "x", pending_msgs_limit=1)
        nc._ps = nats_parser.FastParser(nc)
        await nc._ps.parse(b"MSG a 1 1\r\nx\r\nMSG a 1 1\r\ny\r\n")
        assert [m.data for m in [nc._subs[1]._pending_queue.get_nowait()]] == [b"x"]
        assert len(errors) == 1

    asyncio.run(check())


def test_direct_delivery_skips_the_queue_but_not_statuses() -> None:
    async def check() -> None:
        nc = Recorder()
        assert nats_parser.install(nc)
        got: list[Msg] = []
        assert nats_parser.deliver_directly(nc._subs[1], got.append)
        await nc._ps.parse(
            b"MSG a 1 r 2\r\nok\r\nHMSG a 1 16 16\r\nNATS/1.0 503\r\n\r\n\r\n"
        )
        assert [(m.subject, m.reply, m.data) for m in got] == [("a", "r", b"ok")]
        status = nc._subs[1]._pending_queue.get_nowait()  # for the subscription's callback
        assert status.headers == {"Status": "503"}
        assert nc.stats["in_msgs"] == 2

    asyncio.run(check())


def test_install_keeps_partial_input_and_refuses_unknown_parsers() -> None:
    async def check() -> None:
        nc = Recorder()
        await nc._ps.parse(b"MSG a 1 5\r\nhel")  # nats-py's parser, mid-payload
        assert nats_parser.install(nc)
        assert nats_parser.install(nc)  # idempotent
        await nc._ps.parse(b"lo\r\n")
        assert [m[3] for m in nc.delivered()] == [b"hello"]

        other = Recorder()
        other._ps = type("Custom", (Parser,), {})(other)
        assert not nats_parser.install(other)
        assert not nats_parser.deliver_directly(other._subs[1], print)

    asyncio.run(check())
