"""nexus-bus: an event-driven message-bus gateway on NATS, Redis and JetStream.

`Gateway` and `Worker` are imported on first use: they pull in nats-py and FastStream, which
a one-shot `nexus-bus call` (or anything importing only settings and errors) need not load.
"""

from typing import TYPE_CHECKING, Any

from nexus_bus.config import Settings, load_settings
from nexus_bus.context import Principal, RequestContext
from nexus_bus.errors import (
    Conflict,
    Forbidden,
    InternalError,
    InvalidRequest,
    InvalidToken,
    NexusError,
    NoResponders,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    UnknownOperation,
    UpstreamTimeout,
)
from nexus_bus.operations import Operation, Operations

if TYPE_CHECKING:
    from nexus_bus.client.gateway import Gateway
    from nexus_bus.runtime.worker import Worker

_LAZY = {"Gateway": "nexus_bus.client.gateway", "Worker": "nexus_bus.runtime.worker"}


def __getattr__(name: str) -> Any:
    """Import `Gateway` and `Worker` when first asked for (PEP 562)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nexus_bus' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Conflict",
    "Forbidden",
    "Gateway",
    "InternalError",
    "InvalidRequest",
    "InvalidToken",
    "NexusError",
    "NoResponders",
    "NotFound",
    "Operation",
    "Operations",
    "PayloadTooLarge",
    "Principal",
    "RateLimited",
    "RequestContext",
    "Settings",
    "Unavailable",
    "UnknownOperation",
    "UpstreamTimeout",
    "Worker",
    "load_settings",
]
