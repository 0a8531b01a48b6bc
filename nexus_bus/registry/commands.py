"""`nexus-bus ops`: every declared operation, its scope, schema and policy, and who serves it.

    nexus-bus ops [--app mod:ops] [--json]

Reads the `nexus_ops` registry over NATS (docs/registry.md): the same listing as the shim's
`GET /v1/ops`, without HTTP or a token (whoever reaches NATS may read the bucket). A second
table shows each action's resolved policy: the gateway half from this process's settings
(what `nexus-bus call` gets), the worker half as the serving workers declared it.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import msgspec

from nexus_bus.bus.connection import connect_nats
from nexus_bus.config import Settings
from nexus_bus.registry.core import ActionDeclaration, OperationsListing
from nexus_bus.registry.watch import OpsRegistry
from nexus_bus.schemas.registry import ActionPolicy, GatewayPolicy, WorkerPolicy

_HEADER: Final = ("OPERATION", "SCOPE", "SERVED", "PUBLIC", "REQUEST", "REPLY")
_POLICY_HEADER: Final = (
    "OPERATION", "TIMEOUT", "ATTEMPTS", "BACKOFF", "BUDGET", "BREAKER", "STALE", "RATE-LIMIT",
    "IDEMPOTENCY",
)
_POLICY_NOTE: Final = (
    "TIMEOUT to STALE: what a gateway with this process's settings applies (the shim's own\n"
    "may differ); RATE-LIMIT, IDEMPOTENCY: as the serving workers declared them (?: none did)."
)


def type_name(action: ActionDeclaration, part: str) -> str:
    """The name of an action's request or reply type in its schema (`any` when untyped)."""
    schema = (action.schema or {}).get("$defs", {}).get(part)
    if not isinstance(schema, dict):
        return "?"
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return ref.rsplit("/", 1)[-1]
    kind = schema.get("type")
    return kind if isinstance(kind, str) else "any"


def format_table(listing: OperationsListing) -> str:
    """The listing as an aligned text table, one row per action."""
    rows: list[tuple[str, ...]] = [_HEADER]
    for entry in listing.operations:
        if entry.served:
            served = f"yes ({entry.instances})"
        else:
            served = "no (not registered)" if entry.declared_by == "code" else "no"
        for action in entry.actions:
            rows.append((
                f"{entry.op}.{action.action}",
                "-" if action.public else action.scope,
                served,
                "yes" if action.public else "no",
                type_name(action, "request"),
                type_name(action, "reply"),
            ))
    return _aligned(rows)


def format_policies(listing: OperationsListing) -> str:
    """Each action's resolved policy as an aligned text table, then what its halves mean."""
    rows: list[tuple[str, ...]] = [_POLICY_HEADER]
    for entry in listing.operations:
        for action in entry.actions:
            policy = action.policy or ActionPolicy()
            rows.append((
                f"{entry.op}.{action.action}",
                *_gateway_cells(policy.gateway),
                *_worker_cells(policy.worker),
            ))
    return f"{_aligned(rows)}\n\n{_POLICY_NOTE}"


def duration(ms: float) -> str:
    """A duration for a table cell: `0`, `50ms`, `1.5s`, `30s`, `5m`, `24h`."""
    ms = round(ms)
    for unit, size in (("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms / 1000:g}s" if ms >= 1000 else f"{ms}ms" if ms else "0"


def _gateway_cells(policy: GatewayPolicy | None) -> tuple[str, ...]:
    if policy is None:
        return ("off",) * 6  # no policy layer: one attempt, no breaker, no stale answers
    timeout = duration(policy.timeout_ms)
    if policy.attempt_timeout_ms:
        timeout += f"({duration(policy.attempt_timeout_ms)}/try)"
    return (
        timeout,
        f"{policy.attempts},timeouts" if policy.idempotent else str(policy.attempts),
        f"{duration(policy.backoff_base_ms)}-{duration(policy.backoff_max_ms)},"
        f"x{policy.backoff_factor:g}",
        f"{policy.retry_budget_ratio:.0%},min{policy.retry_budget_min_per_s:g}/s",
        f"{policy.breaker_failures}fails,{duration(policy.breaker_reset_ms)}-"
        f"{duration(policy.breaker_reset_max_ms)}",
        duration(policy.stale_if_error_s * 1000) if policy.cacheable else "-",
    )


def _worker_cells(policy: WorkerPolicy | None) -> tuple[str, str]:
    if policy is None:
        return ("?", "?")
    if not policy.enabled:
        return ("off", "off")
    limit = "-"
    if policy.rate_limit_per_s > 0:
        limit = f"{policy.rate_limit_per_s:g}/s,burst{policy.rate_limit_burst}"
    retention = duration(policy.idempotency_retention_s * 1000)
    return (limit, f"{retention},lease{duration(policy.idempotency_lease_ms)}")


def _aligned(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in rows]
    return "\n".join(lines)


async def read_listing(settings: Settings, groups: list[Any]) -> OperationsListing:
    """The registry's listing, plus `groups` (known here) that no worker registered.

    Raises:
        Unavailable: NATS or JetStream cannot be reached.
    """
    nc = await connect_nats(settings.nats, name=f"{settings.service}-cli")
    registry = OpsRegistry(nc, settings, groups)
    try:
        return await registry.listing()
    finally:
        await registry.close()
        await nc.close()


def cmd_ops(args: Any, settings: Settings) -> int:
    """Print every declared operation and its policy (tables, or `--json` as `GET /v1/ops`)."""
    from nexus_bus.apps import load_groups

    listing = asyncio.run(read_listing(settings, load_groups(None, args.app)))
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(listing).decode()))
    else:
        print(format_table(listing))
        print()
        print(format_policies(listing))
    return 0


def add_commands(sub: Any) -> None:
    """Register `ops` on the CLI's subparsers."""
    p = sub.add_parser(
        "ops", help="list declared operations: scopes, schemas, whether a worker serves them"
    )
    p.add_argument("--app", action="append", default=[], help="module:attr of your Operations")
    p.add_argument("--json", action="store_true", help="JSON (as GET /v1/ops) instead of a table")
    p.set_defaults(func=cmd_ops)
