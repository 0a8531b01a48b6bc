"""Embedding vectors as little-endian float32 bytes: the cached form and the base64 wire form.
Pure.

An embedding is kept as its float32 components packed little-endian, 4 bytes a dimension
(1536 bytes for MiniLM's 384), which is exactly what OpenAI's `encoding_format: "base64"`
sends base64-encoded. A cache hit answered in base64 then does no per-number work: the
bytes go from the cache to the JSON encoder, which base64-encodes them in C. The float form
unpacks them into Python floats, each the exact value of its float32 component. The stdlib's
`array` does both in C, so the base install needs no numpy.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable
from typing import Final

_NATIVE_LITTLE: Final = sys.byteorder == "little"
_FLOAT32: Final = "f"
_ITEM_BYTES: Final = 4


def pack(vector: Iterable[float]) -> bytes:
    """`vector` as little-endian float32 bytes (each component rounded to float32).

    Raises:
        TypeError: a component that is not a number.
    """
    values = array(_FLOAT32, vector)
    if not _NATIVE_LITTLE:
        values.byteswap()
    return values.tobytes()


def unpack(data: bytes) -> list[float]:
    """The components of a packed vector, as Python floats.

    Raises:
        ValueError: `data` is not a whole number of float32 components.
    """
    if len(data) % _ITEM_BYTES:
        raise ValueError(f"{len(data)} bytes is not a whole number of float32 components")
    values = array(_FLOAT32)
    values.frombytes(data)
    if not _NATIVE_LITTLE:
        values.byteswap()
    return values.tolist()
