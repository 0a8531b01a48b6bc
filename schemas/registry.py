"""The operation registry (docs/registry.md): entries in the `nexus_ops` KV bucket, and the
listing `GET /v1/ops` and `nexus-bus ops --json` answer with."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

WorkerState = Literal["serving", "stopped"]


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
