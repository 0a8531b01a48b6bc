import random

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
