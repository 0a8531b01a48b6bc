"""`ai.*`: embeddings, completions, similarity search and graph runs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=32_768)]
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Prefix = Annotated[str, msgspec.Meta(max_length=256)]


EncodingFormat = Annotated[
    Literal["float", "base64"],
    msgspec.Meta(
        description=(
            "How each vector is written: `float`, an array of numbers; `base64`, its "
            "little-endian float32 bytes in base64 (as OpenAI's embeddings API)"
        )
    ),
]


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Embed one text or a batch with `model` (default: `ai.default_embed_model`).

    `encoding_format: "base64"` writes each vector as the base64 of its little-endian
    float32 bytes (about a quarter of the float form's size; what OpenAI clients ask for).
    """

    input: Text | Annotated[list[Text], msgspec.Meta(min_length=1, max_length=256)]
    model: ModelName | None = None
    encoding_format: EncodingFormat = "float"


class EmbedReply(msgspec.Struct, frozen=True, kw_only=True):
    """One vector per input text: arrays of numbers, or base64 strings of little-endian
    float32 bytes when the request asked for `encoding_format: "base64"` (MessagePack
    replies carry those bytes as binary)."""

    model: str
    vectors: list[list[float] | bytes]


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A chat message."""

    role: Literal["system", "user", "assistant"]
    content: Text


class CompleteRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Complete a prompt or a conversation (exactly one of `messages`, `prompt`).

    `cache: true` with `temperature: 0` serves a repeated request from the cache.
    """

    messages: Annotated[list[Message], msgspec.Meta(max_length=256)] | None = None
    prompt: Text | None = None
    model: ModelName | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    temperature: Annotated[float, msgspec.Meta(ge=0, le=2)] | None = None
    stop: (
        Annotated[str, msgspec.Meta(max_length=256)]
        | Annotated[list[Annotated[str, msgspec.Meta(max_length=256)]], msgspec.Meta(max_length=4)]
        | None
    ) = None
    cache: bool = False


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token accounting."""

    prompt_tokens: int
    completion_tokens: int


class CompleteReply(msgspec.Struct, frozen=True, kw_only=True):
    """The completion."""

    model: str
    text: str
    usage: Usage
    finish_reason: str | None = None


class SimilarRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Rank the `data` values under `prefix` by similarity to `text`."""

    text: Text
    prefix: Prefix = ""
    model: ModelName | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 10
    max_scan: Annotated[int, msgspec.Meta(ge=1, le=10_000)] | None = None


class Match(msgspec.Struct, frozen=True, kw_only=True):
    """One ranked key."""

    key: str
    score: float


class SimilarReply(msgspec.Struct, frozen=True, kw_only=True):
    """Best matches first; `truncated` when more keys existed than were scanned."""

    model: str
    matches: list[Match]
    scanned: int
    truncated: bool


Token = Annotated[str, msgspec.Meta(pattern="^[a-z][a-z0-9_-]{0,63}$")]


class RunRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Run the registered graph `graph` from `input`; with `topic`, each node's update is
    published as an event there (`GET /v1/events/{topic}` streams it as SSE)."""

    graph: Token
    input: dict[str, Any] = msgspec.field(default_factory=dict)
    topic: Token | None = None


class RunError(msgspec.Struct, frozen=True, kw_only=True):
    """The error that ended a run, and the operation call that raised it."""

    code: str
    status: int
    detail: str
    call: str | None = None


class RunReply(msgspec.Struct, frozen=True, kw_only=True):
    """The graph's last state, the nodes it ran in order, and how it ended."""

    graph: str
    status: Literal["succeeded", "failed"]
    output: dict[str, Any]
    steps: list[str]
    error: RunError | None = None
