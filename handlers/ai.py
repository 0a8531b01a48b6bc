"""`ai.*`: embeddings and completions.

`ai.embed` ships a dependency-free model, `hash-256`: signed feature hashing of words and
character trigrams, L2-normalised — deterministic, fast, good for near-duplicate detection and
lexical similarity. Larger models plug in as providers: put an object with
`async embed(texts, model) -> list[list[float]]` in `services.extras["ai.embedder"]`, or with
`async complete(request) -> CompleteReply` in `services.extras["ai.completer"]`.
`ai.complete` answers 503 `unavailable` until a completer is configured: nexus-bus does not
fake a language model.
"""

from __future__ import annotations

import hashlib
import math
import re
from typing import Any, Final

from nexus_bus import Operations, RequestContext, Unavailable
from nexus_bus.errors import InvalidRequest
from nexus_bus.schemas.ai import CompleteReply, CompleteRequest, EmbedReply, EmbedRequest

ops = Operations("ai", description="Embeddings and completions.")

HASH_MODEL: Final = "hash-256"
_DIMS: Final = 256
_WORD: Final = re.compile(r"\w+", re.UNICODE)


def hash_embed(text: str, dims: int = _DIMS) -> list[float]:
    """The `hash-256` embedding of `text` (unit length; all zeros for text with no words)."""
    vector = [0.0] * dims
    words = _WORD.findall(text.lower())
    features = words + [w[i : i + 3] for w in words for i in range(max(1, len(w) - 2))]
    for feature in features:
        digest = hashlib.blake2b(feature.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "little") % dims
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector))
    return [v / norm for v in vector] if norm else vector


@ops.action("embed")
async def embed(req: EmbedRequest, ctx: RequestContext) -> EmbedReply:
    """Embed one text or a batch; one vector per text."""
    texts = [req.input] if isinstance(req.input, str) else list(req.input)
    model = req.model or HASH_MODEL
    provider: Any = ctx.services.extras.get("ai.embedder")
    if provider is not None and model != HASH_MODEL:
        return EmbedReply(model=model, vectors=await provider.embed(texts, model))
    if model != HASH_MODEL:
        raise InvalidRequest(f"unknown embedding model {model!r}; built in: {HASH_MODEL}")
    return EmbedReply(model=HASH_MODEL, vectors=[hash_embed(t) for t in texts])


@ops.action("complete")
async def complete(req: CompleteRequest, ctx: RequestContext) -> CompleteReply:
    """Complete a prompt or conversation with the configured completion provider."""
    if (req.messages is None) == (req.prompt is None):
        raise InvalidRequest("give exactly one of `messages` and `prompt`")
    provider: Any = ctx.services.extras.get("ai.completer")
    if provider is None:
        raise Unavailable("no completion provider is configured on this worker")
    reply: CompleteReply = await provider.complete(req)
    return reply
