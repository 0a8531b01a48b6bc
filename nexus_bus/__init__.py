"""nexus-bus: an event-driven message-bus gateway on NATS, Redis and JetStream."""

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
from nexus_bus.gateway import Gateway
from nexus_bus.operations import Operation, Operations
from nexus_bus.worker import Worker

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
