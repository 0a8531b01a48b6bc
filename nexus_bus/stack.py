"""`nexus-bus up`: the embedded stack on one machine with nothing else installed.

Starts a real nats-server (JetStream) and redis-server with data under the state directory,
then worker processes (and, where available, the HTTP shim); records the addresses in
`<state_dir>/stack.json` so `nexus-bus call` finds them; stops everything on Ctrl-C, SIGTERM
or SIGHUP (a closed terminal).

One `up` per state directory: it holds an exclusive lock on `<state_dir>/up.lock` while its
stack runs. stack.json also records every process of the stack (pid and start time), so an
`up` that died without stopping them (SIGKILL, a crash) leaves nothing the next `up` of that
directory cannot find and stop.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, TextIO

from nexus_bus.config import Settings
from nexus_bus.embedded import ServerProcess, free_port, nats_server, port_is_free, redis_server
from nexus_bus.stackfile import STACK_FILE

LOCK_FILE: Final = "up.lock"  # under the state dir, locked by the `up` whose stack runs there
# Signals that stop the stack as Ctrl-C does: SIGTERM, and SIGHUP when the terminal closes.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Beyond the children's own drain grace, how long `Stack.stop` waits before aborting them.
STOP_MARGIN_S: Final = 5.0


@dataclass
class Stack:
    """The processes `up` started, in start order."""

    state_dir: Path
    servers: list[ServerProcess] = field(default_factory=list)
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # the children's: "worker-1", ..., "shim"
    env: dict[str, str] = field(default_factory=dict)
    # Each process's own /metrics endpoint, by process name ("worker-1", ..., "shim").
    metrics: dict[str, str] = field(default_factory=dict)
    stop_s: float = 15.0  # children's drain grace plus STOP_MARGIN_S (start_stack sets it)

    def stop(self) -> None:
        """Stop children (SIGTERM, they drain), then servers; leave no process behind.

        A child still running `stop_s` after SIGTERM (its drain hung) is aborted, which
        prints its threads' Python stacks to `up`'s stderr (children run with
        PYTHONFAULTHANDLER), so the hang says where it was; SIGKILL if even that does not end it.
        """
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.stop_s
        for i, child in enumerate(self.children):
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                name = self.names[i] if i < len(self.names) else "a child"  # (still starting)
                print(f"{name} (pid {child.pid}) still running {self.stop_s:.0f} s "
                      "after SIGTERM: aborting it (its Python stacks follow)", file=sys.stderr)
                child.send_signal(signal.SIGABRT)
                try:
                    child.wait(5)
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
    # The shim stays not-ready but serving for `drain_delay_s` before its grace begins.
    grace_s = max(settings.worker.drain_grace_s,
                  settings.http.drain_delay_s + settings.http.grace_s)
    stack = Stack(state, stop_s=grace_s + STOP_MARGIN_S)
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
            stack.names.append(f"worker-{i}")
        for args in extra or []:
            stack.children.append(_spawn(args, env))
            stack.names.append(args[0])
        if "NEXUS_HTTP__PORT" in stack.env and any(a[:1] == ["shim"] for a in extra or []):
            shim_url = f"http://{settings.http.host}:{stack.env['NEXUS_HTTP__PORT']}"
            stack.metrics["shim"] = f"{shim_url}/metrics"
        doc = {
            **stack.env, "metrics": stack.metrics, "pids": [c.pid for c in stack.children],
            "servers": [_record(s.name, s.proc.pid) for s in stack.servers if s.proc],
            "children": [
                _record(n, c.pid) for n, c in zip(stack.names, stack.children, strict=True)
            ],
        }
        (state / STACK_FILE).write_text(json.dumps(doc, indent=2))
    except BaseException:
        stack.stop()
        raise
    return stack


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # A session of its own, as the servers have: Ctrl-C (SIGINT to the terminal's whole
    # foreground group) reaches `up` alone, which stops its children with SIGTERM. In `up`'s
    # group, a child still importing died of it on the spot with "Fatal Python error:
    # init_import_site" or a KeyboardInterrupt traceback.
    # PYTHONFAULTHANDLER: a child that `Stack.stop` has to abort prints where it hung.
    return subprocess.Popen(
        [sys.executable, "-m", "nexus_bus", *args], env={**env, "PYTHONFAULTHANDLER": "1"},
        start_new_session=True,
    )


def _record(name: str, pid: int) -> dict[str, object]:
    return {"name": name, "pid": pid, "started": process_start(pid)}


def process_start(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, from /proc/<pid>/stat), or None when
    it is gone or a zombie: a pid with the start time recorded for it is still that process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # gone, or no /proc here (then nothing recorded ever matches)
        return None
    fields = stat.rsplit(")", 1)[-1].split()  # after "pid (command)": the command may hold ")"
    return None if fields[0] == "Z" else fields[19]


def claim_state_dir(state_dir: Path) -> TextIO | None:
    """This `up`'s exclusive lock on `<state_dir>/up.lock`, or None when another `up` has it.

    Held until the returned file is closed or this process exits, however it ends; the stack's
    processes do not inherit it (Python opens files non-inheritable). The holder's pid is
    written into the file (`lock_holder`).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = (state_dir / LOCK_FILE).open("a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    lock.truncate(0)
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def lock_holder(state_dir: Path) -> str:
    """The pid written by the `up` holding `state_dir`'s lock ("" when not written yet)."""
    try:
        return (state_dir / LOCK_FILE).read_text().strip()
    except OSError:
        return ""


def stop_leftovers(state_dir: Path, timeout_s: float = 15.0) -> list[str]:
    """Stop the processes that an earlier `up` of `state_dir` recorded and left running.

    An `up` ended by SIGKILL or a crash stops nothing: its servers run on in sessions of their
    own (NATS still on the JetStream store a new nats-server would take), its workers and shim
    until they are signalled. Call this holding the state dir's lock (no `up` runs there
    then). A recorded process counts only while its pid has the recorded start time, never a
    reused pid. Workers and shim first (SIGTERM: they drain), then the servers; SIGKILL for
    any still there after `timeout_s`. The stale stack.json goes.

    Returns:
        "name (pid N)" for each process stopped.
    """
    path = state_dir / STACK_FILE
    try:
        doc = json.loads(path.read_text())
        groups = [
            [(str(p["name"]), int(p["pid"]), p["started"]) for p in doc.get(key, [])]
            for key in ("children", "servers")
        ]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return []  # none, or not one this version wrote (read_stack still guards those)
    stopped = []
    for group in groups:
        running = [p for p in group if p[2] is not None and process_start(p[1]) == p[2]]
        _end([(pid, started) for _, pid, started in running], timeout_s)
        stopped += [f"{name} (pid {pid})" for name, pid, _ in running]
    path.unlink(missing_ok=True)
    return stopped


def _end(processes: list[tuple[int, object]], timeout_s: float) -> None:
    """SIGTERM `processes` (pid, start time), SIGKILL those left after `timeout_s`; return once
    all are gone (not our children: we cannot wait() for them)."""
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait_s
        for pid, _ in processes:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        while (processes := [(pid, st) for pid, st in processes if process_start(pid) == st]) \
                and time.monotonic() < deadline:
            time.sleep(0.05)


def on_stop_signals(handler: Callable[[int, FrameType | None], Any]) -> None:
    """Install `handler` for every stop signal but one ignored when `up` started: SIGHUP
    stays ignored under `nohup nexus-bus up &`, so closing that terminal stops nothing."""
    for signum in STOP_SIGNALS:
        if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
            continue
        signal.signal(signum, handler)


def wait_forever(stack: Stack) -> None:
    """Block until Ctrl-C / SIGTERM / SIGHUP or until a child dies, then stop the stack."""
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    on_stop_signals(request_stop)
    try:
        while not stopping:
            if any(c.poll() is not None for c in stack.children):
                print("a stack process exited; stopping", file=sys.stderr)
                break
            time.sleep(0.2)
    finally:
        stack.stop()
