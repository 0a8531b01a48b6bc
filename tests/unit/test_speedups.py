"""The opt-in speedups (nexus_bus/bus/_speedups): identical to nats-py, per connection only,
off by default, loud when they cannot install."""

import random
from typing import Any

import pytest

from nexus_bus.bus import _speedups
from nexus_bus.bus._speedups import headers as nats_headers

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


def test_install_is_per_connection_and_identical() -> None:
    from nats.aio.client import Client

    ours, theirs = Client(), Client()
    assert _speedups.install(ours) is True
    assert _speedups.installed(ours) and not _speedups.installed(theirs)
    assert ours._parse_header_lines(b"A: b\r\n") == {"A": "b"}
    # The class keeps nats-py's own code: every other client is untouched.
    assert Client.__dict__["_parse_header_lines"] is nats_headers.original_parser()
    assert Client.__dict__["_send_publish"] is nats_headers.original_send_publish()


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


async def publish_outcome(
    fast: bool, subject: str, reply: str, payload: bytes, headers: Any
) -> Any:
    """What one publish on a fresh, unconnected client leaves (nats-py buffers it while
    disconnected) or raises."""
    from nats.aio.client import Client

    nc = Client()
    if fast:
        assert _speedups.install(nc)
    nc._max_payload = 64
    try:
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
        ("s", "", b"y" * 65, None),
        ("s", "", b"", {"Bad Name": "v"}),
    ],
)
async def test_publish_with_speedups_is_nats_py_publish(
    subject: str, reply: str, payload: bytes, headers: Any
) -> None:
    """The same bytes queued, the same counters, the same errors as stock nats-py."""
    expected = await publish_outcome(False, subject, reply, payload, headers)
    assert await publish_outcome(True, subject, reply, payload, headers) == expected


def test_another_nats_py_minor_is_refused_with_a_warning_and_a_metric(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nats.aio.client import Client

    from nexus_bus.observability import METRICS

    monkeypatch.setattr(_speedups, "_nats_py_minor", lambda: "2.17")
    before = METRICS.speedups_unavailable._value.get()
    nc = Client()
    warnings: list[str] = []
    sink = _speedups.logger.add(lambda m: warnings.append(str(m)), level="WARNING")
    try:
        assert _speedups.install(nc) is False
    finally:
        _speedups.logger.remove(sink)
    assert not _speedups.installed(nc)
    assert METRICS.speedups_unavailable._value.get() == before + 1
    assert warnings and "2.16" in warnings[0] and "2.17" in warnings[0]
