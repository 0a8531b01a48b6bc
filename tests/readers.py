"""Client connections reading with nats-py's parser or with nexus-bus's FastParser."""

from __future__ import annotations

from typing import Any

import nats
import pytest
from nats.aio.client import Client

from nexus_bus import nats_parser

# Runs a test on a stock nats-py connection and on one reading with nats_parser.FastParser.
READERS = pytest.mark.parametrize("fast", [False, True], ids=["nats-py", "fast-parser"])


async def connection(url: str, fast: bool, **options: Any) -> Client:
    """A nats-py connection to `url`, reading with FastParser when `fast`."""
    nc = await nats.connect(url, **options)
    if fast:
        assert nats_parser.install(nc)
    return nc
