"""The `nexus-bus` command: the only place that loads settings and wires processes."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from nexus_bus.config import ConfigError, Settings, load_settings
from nexus_bus.errors import NexusError
from nexus_bus.observability import configure_logging
from nexus_bus.operations import Operations
from nexus_bus.replies import problem_of

Command = Callable[[argparse.Namespace, Settings], int]


def _run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def load_groups(ops: str | None, apps: Sequence[str]) -> list[Operations]:
    """Built-in groups named in `ops` plus user groups from `module:attribute` references.

    An attribute may be an `Operations` or a list of them.

    Raises:
        ValueError: an unknown built-in op, or a reference that is not operations.
    """
    from nexus_bus.handlers import builtin_groups

    names = [n.strip() for n in ops.split(",") if n.strip()] if ops else []
    groups = builtin_groups(names) if (names or not apps) else []
    for ref in apps:
        module_name, _, attr = ref.partition(":")
        found = getattr(importlib.import_module(module_name), attr or "ops")
        items = found if isinstance(found, list | tuple) else [found]
        if not all(isinstance(g, Operations) for g in items):
            raise ValueError(f"{ref} is not an Operations group (or a list of them)")
        groups.extend(items)
    return groups


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Serve operations until SIGTERM."""
    from nexus_bus.worker import Worker

    ops = args.ops or ",".join(settings.worker.ops) or None
    worker = Worker(settings, load_groups(ops, args.app))
    _run_async(worker.run())
    return 0


def cmd_call(args: argparse.Namespace, settings: Settings) -> int:
    """Call one operation and print its reply (or its problem document, exiting 1)."""
    from nexus_bus.gateway import Gateway

    op, _, action = args.operation.partition(".")
    try:
        payload = msgspec.json.decode(args.payload.encode())
    except msgspec.DecodeError as exc:
        print(f"payload is not JSON: {exc}", file=sys.stderr)
        return 2

    async def call() -> Any:
        async with await Gateway.connect(settings) as gw:
            return await gw.request(
                op, action, payload, token=args.token or os.environ.get("NEXUS_TOKEN"),
                timeout=args.timeout, idempotency_key=args.idempotency_key,
            )

    try:
        reply = _run_async(call())
    except NexusError as exc:
        print(msgspec.json.format(msgspec.json.encode(problem_of(exc, None)).decode()))
        return 1
    print(msgspec.json.format(msgspec.json.encode(reply).decode()))
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Start the embedded stack in the foreground until Ctrl-C."""
    from nexus_bus.stack import start_stack, wait_forever

    stack = start_stack(settings, workers=args.workers)
    env = stack.env
    print(
        "nexus-bus is up\n"
        f"  NATS (JetStream)  {env['NEXUS_NATS__URL']}\n"
        f"  Redis             {env['NEXUS_REDIS__URL']}\n"
        f"  workers           {args.workers} (ops: data, stream, ai)\n"
        f"  state             {stack.state_dir}\n\n"
        "Try it from another terminal in this folder:\n"
        "  .venv/bin/nexus-bus call data.put '{\"key\": \"hello\", \"value\": {\"n\": 1}}'\n"
        "  .venv/bin/nexus-bus call data.get '{\"key\": \"hello\"}'\n\n"
        "Ctrl-C stops everything.",
        flush=True,
    )
    wait_forever(stack)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(prog="nexus-bus", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="serve operations (queue group per op)")
    p.add_argument("--ops", help="built-in ops to serve, comma-separated (default: all)")
    p.add_argument("--app", action="append", default=[], help="module:attr of your Operations")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("call", help="call one operation, e.g. call data.get '{\"key\":\"k\"}'")
    p.add_argument("operation", help="op.action")
    p.add_argument("payload", nargs="?", default="{}", help="JSON request body")
    p.add_argument("--token", help="bearer token (default: $NEXUS_TOKEN)")
    p.add_argument("--timeout", type=float, default=None, help="seconds")
    p.add_argument("--idempotency-key")
    p.set_defaults(func=cmd_call)

    p = sub.add_parser("up", help="start the embedded stack: NATS, Redis, workers")
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(func=cmd_up)
    return parser


def _settings_for(command: str) -> Settings:
    """Settings; clients find a running `up` stack when no NATS URL is configured."""
    settings = load_settings()
    if command != "up" and "NEXUS_NATS__URL" not in os.environ:
        from nexus_bus.stack import stack_env

        found = stack_env(settings.state_dir)
        if found:
            os.environ.update(found)
            settings = load_settings()
    return settings


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nexus-bus` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_for(args.command)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    configure_logging(settings.service, settings.log.level, json_lines=settings.log.json_lines)
    try:
        code: int = args.func(args, settings)
    except NexusError as exc:
        print(f"error: {exc.code}: {exc.detail}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return code
