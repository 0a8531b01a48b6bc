"""Field types shared by several operations."""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

KEY_PATTERN: Final = r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*$"
TOPIC_PATTERN: Final = r"^[a-z][a-z0-9_-]{0,63}$"

Key = Annotated[
    str,
    msgspec.Meta(
        pattern=KEY_PATTERN,
        min_length=1,
        max_length=256,
        description="A NATS KV key: [-/_=.a-zA-Z0-9]+, dot-separated tokens, at most 256 bytes.",
    ),
]
Topic = Annotated[str, msgspec.Meta(pattern=TOPIC_PATTERN, description="An event topic token.")]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
