"""The `nexus-bus` command: the only place that loads settings and wires processes."""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from nexus_bus import arguments
from nexus_bus.apps import AppNotFound, load_groups
from nexus_bus.bus.replies import problem_of
from nexus_bus.config import ConfigError, Settings, load_settings
from nexus_bus.constants import TOKEN
from nexus_bus.errors import NexusError, NoResponders, Unavailable, UnknownOperation
from nexus_bus.observability import configure_logging
from nexus_bus.observability.process import process_name, start_observability
from nexus_bus.operations import DeclarationError, Operations
from nexus_bus.stackfile import NATS_URL_VAR, STACK_FILE, read_stack

if TYPE_CHECKING:
    from pathlib import Path

    from nexus_bus.stack import Stack

Command = Callable[[argparse.Namespace, Settings], int]

_SERVERS = frozenset({"worker", "shim", "up"})  # long-running: they log at the configured level
# A one-shot command stops retrying its first NATS connect once it has been refused this long:
# nothing listens (servers keep retrying for nats.initial_connect_timeout_s).
_ONE_SHOT_REFUSED_S = 1.0
_OPERATION = re.compile(rf"{TOKEN}\.{TOKEN}")  # what `call` takes: op.action
_VERBOSE_HELP = "log at INFO (-v) or DEBUG (-vv); one-shot commands log warnings only"
_TAKEN = "taken by another process: any free port (the banner says so)"
# What `nexus-bus --help` opens with (the module's docstring is for its readers, not users).
_DESCRIPTION = """\
An event-driven message-bus gateway: operations nexus.<op>.<action> served by
workers over NATS, and over HTTP by the shim. Start a local stack with
`nexus-bus up`, then call one from this folder:
`nexus-bus call data.get '{"key": "k"}'`."""


def _run_async(coro: Any) -> Any:
    try:
        import uvloop

        return uvloop.run(coro)
    except ImportError:
        return asyncio.run(coro)


def cmd_worker(args: argparse.Namespace, settings: Settings) -> int:
    """Serve operations until SIGTERM (the worker's FastStream app; `Worker.run`)."""
    # Imported here: FastStream takes a third of a second to import; one-shot commands
    # (`call`, `token`...) must not pay for it.
    from nexus_bus.runtime.factory import create_worker

    if settings.worker.metrics_port:
        from prometheus_client import start_http_server

        try:
            start_http_server(settings.worker.metrics_port, settings.worker.metrics_host)
        except OSError as exc:  # one port per worker: `up` gives each its own
            port = settings.worker.metrics_port
            print(f"error: worker.metrics_port {port}: {exc.strerror}", file=sys.stderr)
            return 2
    worker = create_worker(settings, args.ops, args.app)

    async def serve() -> None:
        await worker.run()
        if worker.stuck:
            # Handlers that ignored their cancellation: asyncio.run would cancel them once
            # more and wait for them forever. The drain is done; leave without them.
            os._exit(1)

    _run_async(serve())
    return 0


def cmd_shim(args: argparse.Namespace, settings: Settings) -> int:
    """Serve the HTTP shim until SIGTERM; exit 0 after draining in-flight requests."""
    from nexus_bus.http import serve

    start_observability(settings, process_name(settings, "shim"))
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    if overrides:
        settings = settings.model_copy(
            update={"http": settings.http.model_copy(update=overrides)}
        )
    # Your groups next to the built-in ones: the shim lets their public actions through
    # without a token on the routes it authorizes itself (docs/http.md).
    from nexus_bus.handlers import BUILTIN

    groups = load_groups(",".join(BUILTIN), args.app) if args.app else None
    return serve(settings, groups)


def cmd_call(args: argparse.Namespace, settings: Settings) -> int:
    """Call one operation and print its reply (or its problem document, exiting 1)."""
    from nexus_bus.client.gateway import Gateway
    from nexus_bus.stackfile import read_dev_token

    if _OPERATION.fullmatch(args.operation) is None:  # said here, before connecting
        print(f"error: operation {args.operation!r}: expected op.action, e.g. data.get (each a"
              " lowercase letter, then up to 63 of a-z, 0-9, _ and -)", file=sys.stderr)
        return 2
    op, _, action = args.operation.partition(".")
    try:
        payload = msgspec.json.decode(args.payload.encode())
    except msgspec.DecodeError as exc:
        print(f"error: payload {args.payload[:40]!r}: not JSON ({exc})", file=sys.stderr)
        return 2

    async def call() -> Any:
        async with await Gateway.connect(settings) as gw:
            return await gw.request(
                op, action, payload,
                token=args.token or os.environ.get("NEXUS_TOKEN")
                or read_dev_token(settings.state_dir),
                timeout=args.timeout, idempotency_key=args.idempotency_key,
            )

    try:
        reply = _run_async(call())
    except NexusError as exc:
        problem = problem_of(_explained(exc, settings), None)
        print(msgspec.json.format(msgspec.json.encode(problem).decode()))
        return 1
    print(msgspec.json.format(msgspec.json.encode(reply).decode()))
    return 0


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    """Start the embedded stack in the foreground until Ctrl-C (or SIGTERM, or SIGHUP: its
    terminal closed); say so once it all answers. One `up` at a time per state directory."""
    from nexus_bus.stack import claim_state_dir, lock_holder, stop_leftovers
    from nexus_bus.stackfile import read_stack

    state = settings.state_dir.resolve()
    claim = claim_state_dir(state)  # held while this stack runs, released however `up` ends
    if claim is None:
        holder = lock_holder(state)
        by = f" (nexus-bus up, pid {holder})" if holder else ""
        print(f"a stack is already running from {state}{by}", file=sys.stderr)
        return 1
    with claim:
        stopped = stop_leftovers(state)  # what an `up` killed outright left running here
        if stopped:
            print(f"stopped what an earlier `up` left running from {state}: "
                  f"{', '.join(stopped)}", file=sys.stderr)
        if read_stack(state):  # live processes recorded without start times: not ours to stop
            print(f"a stack is already running from {state}", file=sys.stderr)
            return 1
        return _up(args, settings)


def _up(args: argparse.Namespace, settings: Settings) -> int:
    from nexus_bus.auth.operator import dev_admin_token
    from nexus_bus.handlers import BUILTIN
    from nexus_bus.readiness import Probe, op_probes, wait_ready
    from nexus_bus.stack import on_stop_signals, start_stack, wait_forever

    groups = load_groups(",".join(BUILTIN), args.app)  # your ops import here or fail at once
    app_args = [arg for ref in args.app for arg in ("--app", ref)]
    created_kid, admin = dev_admin_token(settings)  # before workers start: they load the keys
    # Until wait_forever takes over, SIGTERM and SIGHUP stop the stack as Ctrl-C does (below).
    on_stop_signals(signal.default_int_handler)
    if args.consul:  # the children inherit it (docs/discovery.md)
        os.environ.update(NEXUS_CONSUL__ENABLED="true", NEXUS_CONSUL__ADDRESS=args.consul)
    http_asked = settings.http.port if args.http_port is None else args.http_port
    stack = start_stack(
        settings, workers=args.workers, nats_port=args.nats_port, redis_port=args.redis_port,
        http_port=http_asked,
        worker_args=["--ops", ",".join(BUILTIN), *app_args] if args.app else [],
        extra=[["shim", *app_args]], metrics_port=settings.worker.metrics_port,
    )
    env = stack.env
    http_url = f"http://{settings.http.host}:{env['NEXUS_HTTP__PORT']}"
    probes = [Probe("shim", url=f"{http_url}/readyz"), *op_probes(groups)]
    try:
        try:
            _run_async(
                wait_ready(
                    settings.nats.model_copy(update={"url": env["NEXUS_NATS__URL"]}), probes,
                    timeout_s=args.ready_timeout,
                    report=lambda names: print(f"waiting for {', '.join(names)}", file=sys.stderr),
                    alive=lambda: all(c.poll() is None for c in stack.children),
                )
            )
        except NexusError as exc:
            stack.stop()
            print(f"error: {exc.detail}; stopped the stack", file=sys.stderr)
            return 1
        _say_up(args, stack, groups, http_url, http_asked, created_kid, admin.token)
        wait_forever(stack)
    except KeyboardInterrupt:  # Ctrl-C (or SIGTERM, SIGHUP) before wait_forever took over
        return 130
    finally:
        # However `up` leaves, its stack goes (done already when wait_forever returned); a
        # second Ctrl-C meanwhile does not cut the stopping short, leaving processes behind.
        on_stop_signals(lambda signum, frame: None)
        stack.stop()
    return 0


def _say_up(
    args: argparse.Namespace, stack: Stack, groups: list[Operations], http_url: str,
    http_asked: int, created_kid: str | None, token: str,
) -> None:
    """The banner and the lines to paste, once every process answers."""
    env = stack.env
    print(_banner(args, stack, groups, http_url, http_asked), flush=True)
    print(
        (f"\nCreated dev signing key {created_kid}.\n" if created_kid else "\n")
        + "Paste into another terminal (the admin token has all scopes for 24 h; in this"
        + " folder\nthe CLI finds the stack and the token without them):\n"
        + f"  export NEXUS_URL={http_url}\n"
        + f"  export NEXUS_NATS__URL={env['NEXUS_NATS__URL']}\n"
        + f"  export NEXUS_STATE_DIR={stack.state_dir}\n"
        + f"  export NEXUS_TOKEN={token}\n\n"
        + "Then try:\n"
        + f"  {_this_command()} call data.put '{{\"key\": \"hello\", \"value\": {{\"n\": 1}}}}'\n"
        + '  curl -s "$NEXUS_URL/v1/data/get" -H "Authorization: Bearer $NEXUS_TOKEN" \\\n'
        + "       -H 'Content-Type: application/json' -d '{\"key\": \"hello\"}'\n\n"
        + AI_HINT
        + "Ctrl-C stops everything.",
        flush=True,
    )


def _this_command() -> str:
    """How to run `nexus-bus` again from here: as it was started when that path works from
    the current folder (`.venv/bin/nexus-bus` after `make up`), else its absolute path."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "nexus-bus" and os.access(argv0, os.X_OK):
        return argv0 if os.sep in argv0 else "nexus-bus"  # found on PATH
    return f"{sys.executable} -m nexus_bus"


# How to point `ai.*` at a local Ollama (docs/ai.md); `up` prints it. No `export` words: the
# lines above are the ones to paste into another terminal; these go into `up`'s environment.
AI_HINT = (
    "ai.* serves only `hash-256` (a lexical embedding) until a model backend is set; a model\n"
    "no backend serves is 400 invalid_request naming the setting. For a local Ollama (ollama\n"
    "serve), start `up` with these in its environment (docs/ai.md also has OpenAI, vLLM, local\n"
    "MiniLM):\n"
    "  NEXUS_AI__BACKENDS__OLLAMA__BASE_URL=http://127.0.0.1:11434/v1\n"
    "  NEXUS_AI__BACKENDS__OLLAMA__MODELS='[\"llama3.2\", \"nomic-embed-text\"]'\n"
    "  NEXUS_AI__DEFAULT_COMPLETE_MODEL=llama3.2\n\n"
)


def _banner(
    args: argparse.Namespace, stack: Stack, groups: list[Operations], url: str, http_asked: int
) -> str:
    """What `up` started, once every process answers; which port it took for a busy one."""
    metrics = ("\n" + " " * 20).join(f"{n:<9} {e}" for n, e in stack.metrics.items())
    nats, redis = stack.env["NEXUS_NATS__URL"], stack.env["NEXUS_REDIS__URL"]
    return (
        "nexus-bus is up\n"
        f"  NATS (JetStream)  {nats}{_was_taken(args.nats_port, nats)}\n"
        f"  Redis             {redis}{_was_taken(args.redis_port, redis.rsplit('/', 1)[0])}\n"
        f"  HTTP shim         {url}  (OpenAPI: {url}/openapi.json)"
        f"{_was_taken(http_asked, url)}\n"
        f"  workers           {args.workers} (ops: {', '.join(g.op for g in groups)})\n"
        f"  metrics           {metrics}\n"
        f"  state             {stack.state_dir}"
    )


def _was_taken(asked: int, url: str) -> str:
    """`  (<port> was taken)` when `up` chose another port than the one asked for."""
    return f"  ({asked} was taken)" if asked and not url.endswith(f":{asked}") else ""


def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    """Generate a signing key pair; the newest key signs, older ones still verify."""
    from pathlib import Path

    from nexus_bus.auth import generate_key, keys_dir_of

    directory = Path(args.dir) if args.dir else keys_dir_of(settings)
    try:
        kid = generate_key(directory, kid=args.kid)
    except (ValueError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        return _cannot_write(directory, exc)
    print(kid)
    print(f"wrote {directory}/{kid}.pem (private, 0600) and {kid}.pub.pem", file=sys.stderr)
    return 0


def cmd_token(args: argparse.Namespace, settings: Settings) -> int:
    """Issue a token with the local signing key, or revoke one by its id."""
    from datetime import UTC, datetime

    from nexus_bus.auth.operator import issue_token, revoke_token

    if args.token_command == "revoke":
        _run_async(revoke_token(settings, args.jti))
        print(f"revoked {args.jti}", file=sys.stderr)
        return 0
    signed = issue_token(settings, args.sub, args.scopes, args.ttl)
    expires = datetime.fromtimestamp(signed.claims.exp, UTC).isoformat()
    print(signed.token)
    print(f"jti {signed.claims.jti}  kid {signed.kid}  expires {expires}", file=sys.stderr)
    return 0


def cmd_schemas(args: argparse.Namespace, settings: Settings) -> int:
    """Write the contract documents (JSON Schema, AsyncAPI, OpenAPI); `--check` only compares."""
    from pathlib import Path

    from nexus_bus import specs

    directory = Path(args.dir) if args.dir else specs.default_directory()
    if not args.dir and (args.ops or args.app):
        # The default folder holds the documents of every built-in group: exported there, a
        # selection would delete the others' (and --check would call them all stale).
        chosen = " ".join([*(["--ops", args.ops] if args.ops else []),
                           *(a for ref in args.app for a in ("--app", ref))])
        print(f"error: {chosen}: give --dir for these documents; the default, {directory},"
              " holds those of every built-in group", file=sys.stderr)
        return 2
    groups = load_groups(args.ops, args.app)
    if args.check:
        outdated = specs.stale(directory, groups)
        if outdated:
            print(f"stale contract documents in {directory} (run `make schemas`):", file=sys.stderr)
            for name in outdated:
                print(f"  {name}", file=sys.stderr)
            return 1
        print(f"contract documents in {directory} are up to date")
        return 0
    try:
        written = specs.export(directory, groups)
    except OSError as exc:
        return _cannot_write(directory, exc)
    for path in written:
        print(path)
    return 0


def _cannot_write(directory: Path, exc: OSError) -> int:
    """One line for a folder the command cannot write in (exit 1)."""
    print(f"error: cannot write in {directory}: {exc.strerror or exc}", file=sys.stderr)
    return 1


def _scopes(text: str) -> frozenset[str]:
    """`token issue --scopes`: a malformed scope is a usage error (exit 2), not a request
    refused (`error: invalid_request`, exit 1): nothing was sent anywhere."""
    from nexus_bus.auth import parse_scopes

    try:
        return parse_scopes(text)
    except NexusError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def _duration(text: str) -> int:
    """`token issue --ttl`: seconds; anything else is a usage error, as for `--scopes`."""
    from nexus_bus.auth import parse_duration

    try:
        return parse_duration(text)
    except NexusError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="nexus-bus", description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,  # its lines as written
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE_HELP)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("worker", help="serve operations (queue group per op)")
    p.add_argument("--ops", help="built-in ops to serve, comma-separated (default: all;"
                   " none when --app is given)")
    p.add_argument("--app", action="append", default=[], help="module:attr of your Operations")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("shim", help="serve the HTTP shim (POST /v1/{op}/{action}, SSE, probes)")
    p.add_argument("--host", help="address to listen on (default: http.host)")
    p.add_argument("--port", type=arguments.port, help="port to listen on (default: http.port)")
    p.add_argument("--app", action="append", default=[], help="module:attr of your Operations")
    p.set_defaults(func=cmd_shim)

    p = sub.add_parser("call", help="call one operation, e.g. call data.get '{\"key\":\"k\"}'")
    p.add_argument("operation", help="op.action")
    p.add_argument("payload", nargs="?", default="{}", help="JSON request body")
    p.add_argument("--token", help="bearer token (default: $NEXUS_TOKEN, else the admin token"
                   " of the stack `up` started)")
    p.add_argument("--timeout", type=arguments.seconds, default=None,
                   help="seconds (default: client.default_timeout_ms, 5 s)")
    p.add_argument("--idempotency-key")
    # SUPPRESS: absent here, the top-level `nexus-bus -v call ...` count is kept.
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help=_VERBOSE_HELP)
    p.set_defaults(func=cmd_call)

    p = sub.add_parser("up", help="start the embedded stack: NATS, Redis, workers, HTTP shim")
    p.add_argument("--workers", type=arguments.count, default=2,
                   help="worker processes (default: 2)")
    p.add_argument("--nats-port", type=arguments.port, default=4222,
                   help=f"default: 4222; 0, or {_TAKEN}")
    p.add_argument("--redis-port", type=arguments.port, default=6379,
                   help=f"default: 6379; 0, or {_TAKEN}")
    p.add_argument("--http-port", type=arguments.port,
                   help=f"the shim's port (default: http.port, 8080); 0, or {_TAKEN}")
    p.add_argument("--app", action="append", default=[], help="module:attr of your Operations")
    p.add_argument("--ready-timeout", type=arguments.seconds, default=60.0,
                   help="seconds to wait for every process to answer (default: 60)")
    p.add_argument("--consul", metavar="ADDR", help="register everything with this Consul agent")
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("keys", help="signing keys for the token service")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    p = keys_sub.add_parser("generate", help="write a new Ed25519 key pair (newest signs)")
    p.add_argument("--dir", help="keys directory (default: auth.keys_dir or <state_dir>/keys)")
    p.add_argument("--kid", help="key id (default: creation time + random suffix)")
    p.set_defaults(func=cmd_keys)

    p = sub.add_parser("token", help="issue or revoke tokens")
    token_sub = p.add_subparsers(dest="token_command", required=True)
    p = token_sub.add_parser("issue", help="sign a token with the local key; prints it")
    p.add_argument("--sub", required=True, help="the subject (who the token stands for)")
    p.add_argument("--scopes", required=True, type=_scopes,
                   help="e.g. data:get,data:put or data:* or *")
    p.add_argument("--ttl", type=_duration,
                   help="lifetime: 90s, 15m, 1h, 7d (default: auth.default_ttl_s)")
    p.set_defaults(func=cmd_token)
    p = token_sub.add_parser("revoke", help="revoke a token id on every worker")
    p.add_argument("jti", help="the token id (`jti`) to revoke")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("schemas", help="the generated contract documents")
    schemas_sub = p.add_subparsers(dest="schemas_command", required=True)
    p = schemas_sub.add_parser(
        "export", help="write JSON Schema, AsyncAPI and OpenAPI documents into schemas/"
    )
    p.add_argument("--dir", help="target folder (default: the source tree's schemas/, for all"
                   " built-in groups only: --ops and --app need --dir)")
    p.add_argument("--check", action="store_true", help="only compare; exit 1 when stale")
    p.add_argument("--ops", help="built-in ops to describe, comma-separated (default: all;"
                   " none when --app is given)")
    p.add_argument("--app", action="append", default=[], help="module:attr of your Operations")
    p.set_defaults(func=cmd_schemas)

    from nexus_bus.jobs.commands import add_commands as add_job_commands

    add_job_commands(sub)  # dlq list|replay|purge, jobs show (docs/jobs.md)
    from nexus_bus.registry.commands import add_commands as add_ops_commands

    add_ops_commands(sub)  # ops [--json] (docs/registry.md)
    from nexus_bus.discovery.commands import add_commands as add_discovery_commands

    add_discovery_commands(sub)  # services (docs/discovery.md)
    return parser


def _settings_for(command: str) -> Settings:
    """Settings; every command but `up` finds a running `up` stack (`stackfile.py`), and a
    one-shot command gives up on a NATS that refuses it after `_ONE_SHOT_REFUSED_S`."""
    settings = load_settings(discover=command != "up")
    if command in _SERVERS or settings.nats.initial_refused_timeout_s is not None:
        return settings
    nats = settings.nats.model_copy(update={"initial_refused_timeout_s": _ONE_SHOT_REFUSED_S})
    return settings.model_copy(update={"nats": nats})


def _explained(exc: NexusError, settings: Settings) -> NexusError:
    """`exc`, saying where to look when NATS refused the connection: no stack runs there;
    or, with no stack file found, which NATS said that nobody serves the operation: from a
    folder outside the stack's, without its `export` lines, that is whatever listens on the
    default port (`up` moved its NATS elsewhere when another one held it)."""
    path = settings.state_dir.resolve() / STACK_FILE
    if isinstance(exc, Unavailable) and isinstance(exc.__cause__, ConnectionRefusedError):
        running = read_stack(path.parent).get(NATS_URL_VAR)
        if running and running != settings.nats.url:
            # A stack runs there, elsewhere: the URL configured is an older `up`'s (its NATS
            # port was taken, so each `up` picks another), and an explicit URL always wins.
            where = NATS_URL_VAR if NATS_URL_VAR in os.environ else "the NATS URL configured"
            exc.detail += (f" — the stack running from {path.parent} is at {running}: unset"
                           f" {where}, or paste the `export` lines `up` printed last")
        else:
            found = "stack file" if path.exists() else "no stack file"
            exc.detail += f" — is `nexus-bus up` running? ({found}: {path})"
    elif isinstance(exc, UnknownOperation | NoResponders) and not path.exists():
        exc.detail += (
            f" at {settings.nats.url} — is `nexus-bus up` running there? (no stack file: {path})"
        )
    return exc


def _log_level(args: argparse.Namespace, settings: Settings) -> str:
    """Servers log at the configured level; one-shot commands at WARNING unless `-v`."""
    if args.command in _SERVERS:
        return settings.log.level
    return ("WARNING", "INFO", "DEBUG")[min(args.verbose, 2)]


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `nexus-bus` console script."""
    try:
        return _main(argv)
    except BrokenPipeError:  # `nexus-bus ops | head`: the reader has all it wanted
        # Python's documented recipe: point stdout at devnull so the exit flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command ended by it


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = _settings_for(args.command)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    level = _log_level(args, settings)
    configure_logging(process_name(settings, "cli"), level, json_lines=settings.log.json_lines)
    try:
        code: int = args.func(args, settings)
    except NexusError as exc:
        print(f"error: {exc.code}: {_explained(exc, settings).detail}", file=sys.stderr)
        return 1
    # A typo in --app or --ops, or a type of yours named like one of ours: no traceback.
    except (AppNotFound, DeclarationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code
