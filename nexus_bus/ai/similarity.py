"""Ranking by cosine similarity, and the text `ai.similar` reads from a stored value. Pure."""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from typing import Any, Final

import msgspec

_encode: Final = msgspec.json.Encoder().encode


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity; 0 when either vector is all zeros.

    Raises:
        ValueError: vectors of different lengths.
    """
    if len(a) != len(b):
        raise ValueError(f"vectors of {len(a)} and {len(b)} dimensions")
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def text_of(value: Any) -> str | None:
    """The text of a stored value: a string, a `text` field, else its JSON (None: empty)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, dict) and isinstance(value.get("text"), str):
        text = value["text"]
    else:
        text = _encode(value).decode()
    return text if text.strip() else None


def top_k(
    query: Sequence[float], items: list[tuple[str, Sequence[float]]], k: int
) -> list[tuple[str, float]]:
    """The `k` items most similar to `query`, best first (ties by key)."""
    scored = ((cosine(query, vector), key) for key, vector in items)
    best = heapq.nsmallest(k, scored, key=lambda s: (-s[0], s[1]))
    return [(key, score) for score, key in best]
