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
from nexus_bus.stackfile import STACK_FILE


@dataclass
class Stack:
    """The processes `up` started, in start order."""

    state_dir: Path
    servers: list[ServerProcess] = field(default_factory=list)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Each process's own /metrics endpoint, by process name ("worker-1", ..., "shim").
    metrics: dict[str, str] = field(default_factory=dict)

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
    worker_args: list[str] | None = None,
    metrics_port: int | None = None,
) -> Stack:
    """Start NATS, Redis and `workers` worker processes (plus any `extra` nexus-bus commands).

    With `http_port` (or any free port when it is taken) the HTTP shim's port is passed to every
    child (and recorded in stack.json) as `NEXUS_HTTP__PORT`. `worker_args` are added to each
    `nexus-bus worker` command. With `metrics_port` every worker serves its own `/metrics`:
    worker i on `metrics_port + i - 1` when that is free (0 or taken: any free port), so
    several workers never fight over one port; the shim's are on its HTTP port.

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
        host = settings.worker.metrics_host
        chosen: set[int] = set()
        for i in range(1, workers + 1):
            child_env = env
            if metrics_port is not None:
                port = _port(metrics_port + i - 1 if metrics_port else 0)
                while port in chosen:  # free until its worker binds it: never hand it out twice
                    port = free_port()
                chosen.add(port)
                child_env = {**env, "NEXUS_WORKER__METRICS_PORT": str(port)}
                stack.metrics[f"worker-{i}"] = f"http://{host}:{port}/metrics"
            stack.children.append(_spawn(["worker", *(worker_args or [])], child_env))
        for args in extra or []:
            stack.children.append(_spawn(args, env))
        if "NEXUS_HTTP__PORT" in stack.env and any(a[:1] == ["shim"] for a in extra or []):
            shim_url = f"http://{settings.http.host}:{stack.env['NEXUS_HTTP__PORT']}"
            stack.metrics["shim"] = f"{shim_url}/metrics"
        doc = {**stack.env, "metrics": stack.metrics, "pids": [c.pid for c in stack.children]}
        (state / STACK_FILE).write_text(json.dumps(doc, indent=2))
    except BaseException:
        stack.stop()
        raise
    return stack


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "nexus_bus", *args], env=env)


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
