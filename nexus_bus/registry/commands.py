"""`nexus-bus ops`: every declared operation, its scope and schema, and who serves it now.

    nexus-bus ops [--app mod:ops] [--json]

Reads the `nexus_ops` registry over NATS (docs/registry.md): the same listing as the shim's
`GET /v1/ops`, without HTTP or a token (whoever reaches NATS may read the bucket).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import msgspec

from nexus_bus.bus.connection import connect_nats
from nexus_bus.config import Settings
from nexus_bus.registry.core import ActionDeclaration, OperationsListing
from nexus_bus.registry.watch import OpsRegistry

_HEADER: Final = ("OPERATION", "SCOPE", "SERVED", "PUBLIC", "REQUEST", "REPLY")


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
    widths = [max(len(row[i]) for row in rows) for i in range(len(_HEADER))]
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
    """Print every declared operation (a table, or `--json` as `GET /v1/ops` answers)."""
    from nexus_bus.apps import load_groups

    listing = asyncio.run(read_listing(settings, load_groups(None, args.app)))
    if args.json:
        print(msgspec.json.format(msgspec.json.encode(listing).decode()))
    else:
        print(format_table(listing))
    return 0


def add_commands(sub: Any) -> None:
    """Register `ops` on the CLI's subparsers."""
    p = sub.add_parser(
        "ops", help="list declared operations: scopes, schemas, whether a worker serves them"
    )
    p.add_argument("--app", action="append", default=[], help="module:attr of your Operations")
    p.add_argument("--json", action="store_true", help="JSON (as GET /v1/ops) instead of a table")
    p.set_defaults(func=cmd_ops)
