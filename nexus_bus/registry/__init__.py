"""The operation registry: workers declare their ops in NATS KV (docs/registry.md)."""

from nexus_bus.registry.core import (
    ActionDeclaration,
    Declaration,
    OperationListing,
    OperationsListing,
    RegistryView,
    declare,
)
from nexus_bus.registry.publish import Registration, register
from nexus_bus.registry.watch import OpsRegistry

__all__ = [
    "ActionDeclaration",
    "Declaration",
    "OperationListing",
    "OperationsListing",
    "OpsRegistry",
    "Registration",
    "RegistryView",
    "declare",
    "register",
]
