"""The seam between the `ai.*` operations and model servers: `ModelBackend`, and the built-in
lexical model `hash-256`.

A backend does one upstream call per method and maps its library's failures to `NexusError`
itself (one place per adapter). Guards (timeout, breaker, bulkhead, Retry-After) wrap it in
`guard.py`; batching and caching live above it, so a backend stays a thin adapter.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Final, Protocol

from nexus_bus.ai.settings import HASH_MODEL
from nexus_bus.errors import InvalidRequest

_DIMS: Final = 256
_WORD: Final = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatMessage:
    """One message of a conversation."""

    role: str
    content: str


@dataclass(frozen=True, slots=True, kw_only=True)
class CompletionCall:
    """What a completion asks of a backend (the wire request, resolved)."""

    model: str
    messages: tuple[ChatMessage, ...]
    max_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Completion:
    """A backend's answer to a `CompletionCall`."""

    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


class ModelBackend(Protocol):
    """A model server (or an in-process model) serving some model names."""

    name: str

    async def embed(self, texts: list[str], model: str, timeout_s: float) -> list[list[float]]:
        """One vector per text, in order.

        Raises:
            NexusError: every failure, mapped (`upstream_timeout`, `unavailable`,
                `rate_limited`, `invalid_request`).
        """
        ...

    async def complete(self, call: CompletionCall, timeout_s: float) -> Completion:
        """Complete a conversation.

        Raises:
            NexusError: every failure, mapped as for `embed`.
        """
        ...

    async def aclose(self) -> None:
        """Release connections or models."""
        ...


def hash_embed(text: str, dims: int = _DIMS) -> list[float]:
    """The `hash-256` embedding of `text` (unit length; all zeros for text with no words).

    Signed feature hashing of words and character trigrams: deterministic and fast, good for
    near-duplicate detection and lexical similarity; it knows nothing of meaning.
    """
    vector = [0.0] * dims
    words = _WORD.findall(text.lower())
    features = words + [w[i : i + 3] for w in words for i in range(max(1, len(w) - 2))]
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dims
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


class HashBackend:
    """The lexical `hash-256` model: served only when a request names it."""

    name = "builtin-hash"

    async def embed(self, texts: list[str], model: str, timeout_s: float) -> list[list[float]]:
        """`hash_embed` of every text."""
        return [hash_embed(t) for t in texts]

    async def complete(self, call: CompletionCall, timeout_s: float) -> Completion:
        """Never: `hash-256` is an embedding model.

        Raises:
            InvalidRequest: always.
        """
        raise InvalidRequest(f"{HASH_MODEL} is an embedding model; it cannot complete")

    async def aclose(self) -> None:
        """Nothing to release."""
