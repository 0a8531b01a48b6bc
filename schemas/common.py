"""Field types shared by several operations."""

from __future__ import annotations

from typing import Annotated, Final

import msgspec

# Every pattern ends in `$(?!\n)`: msgspec matches `pattern` with Python's `re.search`, where
# `$` also matches just before a final newline, so `^[a-z]+$` lets "k\n" through (and a key
# with a newline reaches a NATS subject). `\Z` would fix Python but is not ECMA-262, the regex
# dialect of JSON Schema; in ECMA-262 `$` is already the end and the lookahead is a no-op.
END: Final = r"$(?!\n)"
KEY_PATTERN: Final = r"^[-/_=a-zA-Z0-9]+(\.[-/_=a-zA-Z0-9]+)*" + END
TOPIC_PATTERN: Final = r"^[a-z][a-z0-9_-]{0,63}" + END
# The start of a key: whole tokens, each followed by one dot, then perhaps part of a token
# ("", "users.", "users.4"). Never an empty token: "a..", ".a." or "." start no key, and as
# a KV watch filter ("a..>") they are not even a subject.
LIST_PREFIX_PATTERN: Final = r"^([-/_=a-zA-Z0-9]+\.)*[-/_=a-zA-Z0-9]*" + END
MESSAGE_ID_PATTERN: Final = r"^[A-Za-z0-9._:-]{1,128}" + END

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
