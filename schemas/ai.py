"""`ai.*`: embeddings and completions."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

Text = Annotated[str, msgspec.Meta(max_length=32_768)]


class EmbedRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Embed one text or a batch."""

    input: Text | Annotated[list[Text], msgspec.Meta(min_length=1, max_length=256)]
    model: str | None = None


class EmbedReply(msgspec.Struct, frozen=True, kw_only=True):
    """One vector per input text."""

    model: str
    vectors: list[list[float]]


class Message(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A chat message."""

    role: Literal["system", "user", "assistant"]
    content: Text


class CompleteRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Complete a prompt or a conversation (exactly one of `messages`, `prompt`)."""

    messages: Annotated[list[Message], msgspec.Meta(max_length=256)] | None = None
    prompt: Text | None = None
    model: str | None = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256


class Usage(msgspec.Struct, frozen=True, kw_only=True):
    """Token accounting."""

    prompt_tokens: int
    completion_tokens: int


class CompleteReply(msgspec.Struct, frozen=True, kw_only=True):
    """The completion."""

    model: str
    text: str
    usage: Usage
