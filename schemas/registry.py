"""The operation registry (docs/registry.md): entries in the `nexus_ops` KV bucket, and the
listing `GET /v1/ops` and `nexus-bus ops --json` answer with."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

WorkerState = Literal["serving", "stopped"]


class GatewayPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What a gateway (the HTTP shim, a Python `Gateway`) applies to calls of an action.

    Field names and units are the `resilience` settings' (docs/resilience.md); the `breaker_*`
    fields are the op's (one breaker per op).
    """

    timeout_ms: int  # the most a call may take, retries included
    attempt_timeout_ms: int  # 0: each attempt may use the whole remaining budget
    attempts: int  # tries in total, the first included
    backoff_base_ms: int
    backoff_max_ms: int
    backoff_factor: float
    retry_budget_ratio: float  # retries stay under this share of requests
    retry_budget_min_per_s: float
    idempotent: bool  # timeouts are retried without an Idempotency-Key
    breaker_failures: int  # consecutive failed attempts that open the op's breaker
    breaker_reset_ms: int
    breaker_reset_max_ms: int
    cacheable: bool  # answered from the cache when the op fails
    stale_if_error_s: float  # the oldest cached answer served then


class WorkerPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """What the workers serving an action enforce themselves (declared in their entries)."""

    enabled: bool  # false: no rate limit, and Idempotency-Key is not honoured
    rate_limit_per_s: float  # per token subject; 0: no limit (scope limits may still apply)
    rate_limit_burst: int  # the burst in force (0 in settings means one second's worth)
    idempotency_retention_s: float  # how long a keyed request's first reply is replayed
    idempotency_lease_ms: int  # how long a running keyed request holds its key


class ActionPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """An action's resolved policy, by who applies it."""

    # Filled in by whoever answers the listing (the shim: its own; the CLI: its settings');
    # None: that process has no policy layer (`resilience.enabled` false).
    gateway: GatewayPolicy | None = None
    # As the newest worker entry declares it; None: no worker declared one.
    worker: WorkerPolicy | None = None


class ActionDeclaration(msgspec.Struct, frozen=True, kw_only=True):
    """One action as a worker declares it."""

    action: str
    scope: str
    public: bool = False
    idempotent: bool = True
    description: str = ""
    # The action's JSON Schema document: request at `#/$defs/request`, reply at
    # `#/$defs/reply` (the same document `schemas/jsonschema/<op>.<action>.json` holds).
    schema: dict[str, Any] | None = None
    # Workers declare `worker`; the listing adds the answering gateway's `gateway`.
    policy: ActionPolicy | None = None


class Declaration(msgspec.Struct, frozen=True, kw_only=True):
    """A registry entry (key `<op>.<instance>`): one op as one worker instance serves it."""

    op: str
    instance: str
    state: WorkerState = "serving"
    heartbeat_s: float
    description: str = ""
    version: str = ""
    actions: list[ActionDeclaration] = msgspec.field(default_factory=list)


class OperationListing(msgspec.Struct, frozen=True, kw_only=True):
    """One op in `GET /v1/ops`: its actions, and whether a worker serves it now."""

    op: str
    description: str = ""
    served: bool
    instances: int  # workers serving it now
    # "code": known to the answering process (its groups) but never registered by a worker
    declared_by: Literal["registry", "code"]
    actions: list[ActionDeclaration]


class OperationsListing(msgspec.Struct, frozen=True, kw_only=True):
    """The body of `GET /v1/ops` (and `nexus-bus ops --json`)."""

    operations: list[OperationListing]
