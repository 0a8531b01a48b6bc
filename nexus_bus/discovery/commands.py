"""`nexus-bus services`: what is running, from `$SRV` and Consul; registered by `cli.py`.

nexus-bus services [--json] [--expect OPS] [--consul ADDR] [--wait SECONDS]

Exits 1 when an expected op (`--expect`, else `worker.ops` from settings, else every op
seen) has no healthy instance, when nothing runs at all, or when Consul does not answer (the
`$SRV` rows are printed still), so a deployment can wait on it.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

import msgspec

from nexus_bus import arguments
from nexus_bus.bus.connection import connect_nats
from nexus_bus.config import Settings
from nexus_bus.discovery.inventory import ServiceRow, missing_ops, render_table
from nexus_bus.discovery.registry import ConsulRegistry
from nexus_bus.discovery.survey import survey


def _consul_settings(args: argparse.Namespace, settings: Settings) -> Settings:
    if not args.consul:
        return settings
    consul = settings.consul.model_copy(update={"enabled": True, "address": args.consul})
    return settings.model_copy(update={"consul": consul})


async def _rows(settings: Settings, wait_s: float) -> tuple[list[ServiceRow], str | None]:
    nc = await connect_nats(settings.nats, name=f"{settings.service}-cli")
    registry = ConsulRegistry(settings.consul) if settings.consul.enabled else None
    try:
        return await survey(nc, registry, wait_s=wait_s)
    finally:
        if registry is not None:
            await registry.close()
        await nc.drain()


def cmd_services(args: argparse.Namespace, settings: Settings) -> int:
    """Print every running instance; exit 1 when an expected op has no healthy one (or
    nothing runs)."""
    settings = _consul_settings(args, settings)
    rows, consul_problem = asyncio.run(_rows(settings, args.wait))
    if consul_problem is not None:  # said first: the health column lacks Consul's view
        print(f"consul unreachable, showing $SRV answers only: {consul_problem}", file=sys.stderr)
    if args.expect:
        expected = [o.strip() for o in args.expect.split(",") if o.strip()]
    else:  # the ops settings declare, else every op seen: each needs a healthy instance
        expected = list(settings.worker.ops) or sorted({r.op for r in rows if r.op != "-"})
    missing = missing_ops(rows, expected)
    if args.json:
        doc = {"services": [r.to_json() for r in rows], "missing": missing}
        print(msgspec.json.format(msgspec.json.encode(doc).decode()))
    else:
        print(render_table(rows) if rows else "no nexus-bus services found")
        if missing:
            print(f"no healthy instance of: {', '.join(missing)}", file=sys.stderr)
    return 1 if missing or not rows or consul_problem is not None else 0


def add_commands(sub: Any) -> None:
    """Register `services` on the CLI's subparsers."""
    p = sub.add_parser("services", help="what is running: $SRV and Consul, one table")
    p.add_argument("--json", action="store_true", help="JSON instead of a table")
    p.add_argument("--expect", help="ops that must have a healthy instance (default: worker.ops)")
    p.add_argument("--consul", help="also ask this Consul agent (default: consul.* settings)")
    p.add_argument(
        "--wait", type=arguments.wait_seconds, default=2.0, help="seconds to collect $SRV answers"
    )
    p.set_defaults(func=cmd_services)
