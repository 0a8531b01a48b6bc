"""`nexus-bus up`: the embedded stack on one machine with nothing else installed.

Starts a real nats-server (JetStream) and redis-server with data under the state directory,
then worker processes (and, where available, the HTTP shim); records the addresses in
`<state_dir>/stack.json` so `nexus-bus call` finds them; stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nexus_bus.config import Settings
from nexus_bus.embedded import ServerProcess, free_port, nats_server, port_is_free, redis_server

STACK_FILE = "stack.json"


@dataclass
class Stack:
    """The processes `up` started, in start order."""

    state_dir: Path
    servers: list[ServerProcess] = field(default_factory=list)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def stop(self) -> None:
        """Stop children (SIGTERM, they drain), then servers; leave no process behind."""
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in self.children:
            try:
                child.wait(15)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(5)
        for server in reversed(self.servers):
            server.stop()
        (self.state_dir / STACK_FILE).unlink(missing_ok=True)


def _port(preferred: int) -> int:
    """The preferred port when free (0: any free port), else a free one."""
    return preferred if preferred and port_is_free(preferred) else free_port()


def start_stack(
    settings: Settings,
    *,
    workers: int = 1,
    extra: list[list[str]] | None = None,
    nats_port: int = 4222,
    redis_port: int = 6379,
    http_port: int | None = None,
) -> Stack:
    """Start NATS, Redis and `workers` worker processes (plus any `extra` nexus-bus commands).

    With `http_port` (or any free port when it is taken) the HTTP shim's port is passed to every
    child (and recorded in stack.json) as `NEXUS_HTTP__PORT`.

    Raises:
        Unavailable: a server binary is missing or did not start.
    """
    state = settings.state_dir.resolve()
    stack = Stack(state)
    try:
        nats = nats_server(state / "nats", _port(nats_port)).start()
        stack.servers.append(nats)
        redis = redis_server(state / "redis", _port(redis_port)).start()
        stack.servers.append(redis)
        stack.env = {
            "NEXUS_NATS__URL": nats.url,
            "NEXUS_REDIS__URL": redis.url + "/0",
            "NEXUS_STATE_DIR": str(state),
        }
        if http_port is not None:  # the shim's port, for an `extra` shim and for clients
            stack.env["NEXUS_HTTP__PORT"] = str(_port(http_port))
        env = {**os.environ, **stack.env}
        commands = [["worker"]] * workers + (extra or [])
        for args in commands:
            stack.children.append(
                subprocess.Popen([sys.executable, "-m", "nexus_bus", *args], env=env)
            )
        (state / STACK_FILE).write_text(
            json.dumps({**stack.env, "pids": [c.pid for c in stack.children]}, indent=2)
        )
    except BaseException:
        stack.stop()
        raise
    return stack


def stack_env(state_dir: Path) -> dict[str, str]:
    """The addresses a running `up` stack recorded, or {} when none is running."""
    path = state_dir / STACK_FILE
    try:
        doc = json.loads(path.read_text())
        pids = doc.pop("pids", [])
    except (OSError, ValueError):
        return {}
    for pid in pids:
        try:
            os.kill(pid, 0)
        except OSError:
            return {}
    return {k: v for k, v in doc.items() if isinstance(v, str)}


def wait_forever(stack: Stack) -> None:
    """Block until Ctrl-C / SIGTERM or until a child dies, then stop the stack."""
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while not stopping:
            if any(c.poll() is not None for c in stack.children):
                print("a stack process exited; stopping", file=sys.stderr)
                break
            time.sleep(0.2)
    finally:
        stack.stop()
