"""An OpenAI-compatible model server over HTTP: OpenAI, vLLM, Ollama, llama.cpp server...

One `httpx.AsyncClient` per backend (connections reused), `POST {base_url}/chat/completions`
and `POST {base_url}/embeddings`. Every httpx exception and every upstream status is mapped
to a `NexusError` here and nowhere else (`map_transport_error`, `map_status`):

| upstream | ours |
|---|---|
| timeout (connect, read, write, pool), 408, 504 | 504 `upstream_timeout` |
| unreachable, transport errors, 5xx, 401/403, a reply off the wire format | 503 `unavailable` |
| 429 | 429 `rate_limited` with the upstream's `Retry-After` |
| 400, 404, 413, 422 | 400 `invalid_request` with the upstream's message |

The API key travels only in the `Authorization` header; it is never logged nor put in an
error's detail.
"""

from __future__ import annotations

import email.utils
import time
from typing import Any, Final

import httpx
import msgspec

from nexus_bus.ai.backend import Completion, CompletionCall
from nexus_bus.ai.settings import BackendSettings
from nexus_bus.errors import (
    InvalidRequest,
    NexusError,
    RateLimited,
    Unavailable,
    UpstreamTimeout,
)

_MAX_DETAIL: Final = 300
_INVALID: Final = frozenset({400, 404, 413, 422})
_TIMEOUT_STATUS: Final = frozenset({408, 504})


class _ChatChoiceMessage(msgspec.Struct):
    content: str | None = None


class _ChatChoice(msgspec.Struct):
    message: _ChatChoiceMessage
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class _ChatReply(msgspec.Struct):
    choices: list[_ChatChoice]
    model: str | None = None
    usage: _Usage | None = None


class _EmbeddingItem(msgspec.Struct):
    embedding: list[float]
    index: int = 0


class _EmbeddingsReply(msgspec.Struct):
    data: list[_EmbeddingItem]


_chat_decoder: Final = msgspec.json.Decoder(_ChatReply)
_embeddings_decoder: Final = msgspec.json.Decoder(_EmbeddingsReply)


def chat_body(call: CompletionCall) -> dict[str, Any]:
    """The `/chat/completions` request body of `call` (only fields the call sets)."""
    body: dict[str, Any] = {
        "model": call.model,
        "messages": [{"role": m.role, "content": m.content} for m in call.messages],
        "max_tokens": call.max_tokens,
    }
    if call.temperature is not None:
        body["temperature"] = call.temperature
    if call.stop:
        body["stop"] = list(call.stop)
    return body


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def _upstream_message(body: bytes) -> str:
    """The upstream's error message (OpenAI's `{"error": {"message"}}`), shortened."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return body[:_MAX_DETAIL].decode("utf-8", "replace")
    error = doc.get("error") if isinstance(doc, dict) else None
    message = error.get("message") if isinstance(error, dict) else error
    return str(message if message is not None else doc)[:_MAX_DETAIL]


def map_status(
    status: int, body: bytes, retry_after: str | None, backend: str, now: float
) -> NexusError:
    """The error for a non-2xx upstream reply."""
    if status == 429:
        wait = parse_retry_after(retry_after, now)
        return RateLimited(f"{backend}: the model server is rate limiting", retry_after=wait)
    if status in _TIMEOUT_STATUS:
        return UpstreamTimeout(f"{backend}: the model server timed out ({status})")
    if status in _INVALID:
        return InvalidRequest(f"{backend} refused the request: {_upstream_message(body)}")
    if status in (401, 403):
        return Unavailable(f"{backend} refused our credentials ({status}); check its API key")
    return Unavailable(f"{backend}: the model server answered {status}")


def map_transport_error(exc: httpx.HTTPError, backend: str) -> NexusError:
    """The error for an httpx failure before a reply arrived."""
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(f"{backend}: no answer from the model server in time")
    return Unavailable(f"{backend}: cannot reach the model server ({type(exc).__name__})")


class OpenAICompatibleBackend:
    """Calls an OpenAI-compatible server.

    Args:
        name: the backend's name in settings (used in errors and metrics).
        settings: its section.
        api_key: the bearer key, or None for servers that need none (Ollama, vLLM).
        transport: an httpx transport (tests of the adapter alone; None: the network).
    """

    def __init__(
        self,
        name: str,
        settings: BackendSettings,
        api_key: str | None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(
            base_url=settings.base_url.rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            limits=httpx.Limits(max_connections=settings.max_connections),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"OpenAICompatibleBackend({self.name!r}, {str(self._client.base_url)!r})"

    async def _post(self, path: str, body: dict[str, Any], timeout_s: float) -> bytes:
        try:
            reply = await self._client.post(path, json=body, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise map_transport_error(exc, self.name) from None
        if reply.status_code >= 300:
            raise map_status(
                reply.status_code,
                reply.content,
                reply.headers.get("retry-after"),
                self.name,
                time.time(),
            )
        return reply.content

    async def embed(self, texts: list[str], model: str, timeout_s: float) -> list[list[float]]:
        """`POST /embeddings`; vectors in input order.

        Raises:
            NexusError: mapped as the module says.
        """
        raw = await self._post("embeddings", {"model": model, "input": texts}, timeout_s)
        try:
            items = _embeddings_decoder.decode(raw).data
        except msgspec.DecodeError as exc:
            raise Unavailable(f"{self.name}: embeddings reply not understood: {exc}") from None
        if len(items) != len(texts):
            raise Unavailable(f"{self.name}: {len(items)} vectors for {len(texts)} texts")
        return [item.embedding for item in sorted(items, key=lambda i: i.index)]

    async def complete(self, call: CompletionCall, timeout_s: float) -> Completion:
        """`POST /chat/completions`; the first choice.

        Raises:
            NexusError: mapped as the module says.
        """
        raw = await self._post("chat/completions", chat_body(call), timeout_s)
        try:
            reply = _chat_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise Unavailable(f"{self.name}: completion reply not understood: {exc}") from None
        if not reply.choices:
            raise Unavailable(f"{self.name}: completion reply has no choices")
        choice, usage = reply.choices[0], reply.usage or _Usage()
        return Completion(
            model=reply.model or call.model,
            text=choice.message.content or "",
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            finish_reason=choice.finish_reason,
        )

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
