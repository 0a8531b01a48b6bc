import random
from typing import Any

import pytest

from nexus_bus import nats_headers

PIECES = [
    b"Nexus-Request-Id",
    b"traceparent",
    b"A B",
    b" Lead",
    b"Trail ",
    b"X\tY",
    b"\xff\xfe",
    b"Caf\xc3\xa9",
    b"",
    b":",
    b": ",
    b"value",
    b" spaced value ",
    b"\xe2\x82\xac",
    b"\xff",
    b"k",
    b"Nats-Msg-Id",
    b"\x1c",
    b"\x0b",
    b"\r",
    b"\n",
    b"\r\n",
]


def random_block(rng: random.Random) -> bytes:
    lines = []
    for _ in range(rng.randint(0, 8)):
        name = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3)))
        value = b"".join(rng.choice(PIECES) for _ in range(rng.randint(0, 3)))
        lines.append(name + rng.choice([b":", b": ", b"", b":\t"]) + value)
    return b"\r\n".join(lines) + rng.choice([b"", b"\r\n", b"\r\n\r\n"])


def test_identical_to_nats_py_on_generated_blocks() -> None:
    original = nats_headers.original_parser().__func__
    rng = random.Random(1234)
    for _ in range(20_000):
        block = random_block(rng)
        assert nats_headers.parse_header_lines(block) == original(block), block


@pytest.mark.parametrize(
    "block",
    [b"", b"\r\n", b"A: b\r\nC:d\r\n\r\n", b"Bad Name: x\r\nGood: y", b"\xff: x\r\nk: \xff"],
)
def test_known_cases(block: bytes) -> None:
    original = nats_headers.original_parser().__func__
    assert nats_headers.parse_header_lines(block) == original(block)


def test_install_targets_the_known_parser() -> None:
    from nats.aio.client import Client

    assert nats_headers.install() is True
    assert Client._parse_header_lines(b"A: b\r\n") == {"A": "b"}


NAME_PIECES = ["Nexus-Request-Id", "traceparent", "A", " ", "\t", "B C", "x:y", "é", "", "~!#"]
VALUE_PIECES = ["v", " ", "\r", "\n", "\r\n", "é", "Bearer abc.def", "\t", "", "\x0b", "€"]


class Recorder:
    """The parts of a nats-py Client that `_send_publish` touches."""

    def __init__(self) -> None:
        self.stats = {"out_msgs": 0, "out_bytes": 0}
        self._flush_queue = None
        self.sent: list[bytes] = []

    async def _send_command(self, cmd: bytes) -> None:
        self.sent.append(bytes(cmd))


async def published(send: object, headers: dict[str, str] | None) -> tuple[object, object]:
    client = Recorder()
    try:
        await send(client, "s.x", "_INBOX.r", b"body", 4, headers)  # type: ignore[operator]
    except Exception as exc:
        return type(exc), str(exc)
    return client.sent, client.stats


async def test_sending_is_identical_to_nats_py_on_generated_headers() -> None:
    original = nats_headers.original_send_publish()
    rng = random.Random(4321)
    for _ in range(5_000):
        headers = {
            "".join(rng.choice(NAME_PIECES) for _ in range(rng.randint(0, 2))): "".join(
                rng.choice(VALUE_PIECES) for _ in range(rng.randint(0, 3))
            )
            for _ in range(rng.randint(0, 5))
        }
        ours = await published(nats_headers.send_publish, headers)
        assert ours == await published(original, headers), headers
    assert await published(nats_headers.send_publish, None) == await published(original, None)


def test_install_replaces_both() -> None:
    from nats.aio.client import Client

    assert nats_headers.install() is True
    assert Client._send_publish is nats_headers.send_publish


async def publish_outcome(
    fast: bool, subject: str, reply: str, payload: bytes, headers: Any
) -> Any:
    """What one publish on a fresh, unconnected client leaves (nats-py buffers it while
    disconnected) or raises."""
    from nats.aio.client import Client

    nc = Client()
    nc._max_payload = 64
    try:
        if fast:
            await nats_headers.publish(nc, subject, payload, reply=reply, headers=headers)
        else:
            await nc.publish(subject, payload, reply=reply, headers=headers)
    except Exception as exc:
        return type(exc)
    return [bytes(c) for c in nc._pending], nc._pending_data_size, dict(nc.stats)


@pytest.mark.parametrize(
    ("subject", "reply", "payload", "headers"),
    [
        ("nexus.echo.say", "_INBOX.a.1", b'{"msg":"hi"}', {"Nexus-Request-Id": "r", "A": " b "}),
        ("nexus.echo.say", "", b"", None),
        ("s", "", b"x", {}),
        ("s.é", "r.é", b"\r\n", {"K": "v\r\nX: y"}),
        ("", "", b"", None),
        ("bad subject", "", b"", None),
        ("s", "bad\r\nreply", b"", None),
        ("s", "", b"y" * 65, None),
        ("s", "", b"", {"Bad Name": "v"}),
    ],
)
async def test_publish_is_nats_py_publish(
    subject: str, reply: str, payload: bytes, headers: Any
) -> None:
    """The same bytes queued, the same counters, the same errors as `Client.publish`."""
    assert nats_headers.install()
    expected = await publish_outcome(False, subject, reply, payload, headers)
    assert await publish_outcome(True, subject, reply, payload, headers) == expected


async def test_publish_refuses_like_nats_py_when_closed_or_buffer_full() -> None:
    from nats import errors
    from nats.aio.client import Client

    closed = Client()
    closed._status = Client.CLOSED
    with pytest.raises(errors.ConnectionClosedError):
        await nats_headers.publish(closed, "s", b"")
    full = Client()
    full._max_pending_size = 4
    with pytest.raises(errors.OutboundBufferLimitError):
        await nats_headers.publish(full, "s", b"12345")
