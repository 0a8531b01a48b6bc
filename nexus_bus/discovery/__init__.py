"""Service discovery: Consul registration and the NATS micro protocol (`$SRV`).

See docs/discovery.md. Pure builders (`documents`, `endpoint_stats`), the `ServiceRegistry`
seam with its Consul adapter (`registry`), the task keeping a process registered
(`lifecycle`), the `$SRV` responder (`micro`), per-process wiring (`processes`) and the
`nexus-bus services` inventory (`inventory`).
"""

from nexus_bus.discovery.documents import (
    CheckDefinition,
    ServiceRegistration,
    go_duration,
    service_name,
    shim_registration,
    worker_registrations,
)
from nexus_bus.discovery.endpoint_stats import ActionCounters, EndpointStats
from nexus_bus.discovery.lifecycle import Registration, RegistrationState
from nexus_bus.discovery.processes import ShimDiscovery, WorkerDiscovery
from nexus_bus.discovery.registry import (
    CheckStatus,
    ConsulRegistry,
    Instance,
    NotRegistered,
    RegistryUnavailable,
    ServiceRegistry,
)

__all__ = [
    "ActionCounters",
    "CheckDefinition",
    "CheckStatus",
    "ConsulRegistry",
    "EndpointStats",
    "Instance",
    "NotRegistered",
    "Registration",
    "RegistrationState",
    "RegistryUnavailable",
    "ServiceRegistration",
    "ServiceRegistry",
    "ShimDiscovery",
    "WorkerDiscovery",
    "go_duration",
    "service_name",
    "shim_registration",
    "worker_registrations",
]
