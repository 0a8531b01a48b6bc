"""`nexus-bus up`'s life in one state folder, with real processes: a closed terminal (SIGHUP
to its process group) stops everything, two `up` at the same instant start one stack, and an
`up` killed outright leaves nothing that the next `up` there does not stop."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

UP = [sys.executable, "-m", "nexus_bus", "up", "--workers", "1", "--nats-port", "0",
      "--redis-port", "0", "--http-port", "0"]
BANNER_END = "Ctrl-C stops everything."


def processes_in(folder: Path) -> dict[int, str]:
    """Every live process working in `folder` or below, or naming it on its command line:
    the stack's servers (their data folders) and its workers and shim (`up`'s folder)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:  # gone, or a zombie
            continue
        if cwd == str(folder) or cwd.startswith(f"{folder}/") or str(folder) in cmdline:
            found[int(entry.name)] = cmdline
    return found


@pytest.fixture
def folder(tmp_path: Path) -> Iterator[Path]:
    """A folder to run `up` in; whatever still runs there at the end is killed (so a failing
    test leaves no server behind either)."""
    yield tmp_path
    for pid in processes_in(tmp_path):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_LOG__LEVEL"] = "WARNING"
    return env


def start_up(folder: Path, name: str) -> subprocess.Popen[bytes]:
    """`up` in `folder`, in a process group of its own as in a terminal, output to files."""
    with (folder / f"{name}.out").open("wb") as out, (folder / f"{name}.err").open("wb") as err:
        return subprocess.Popen(UP, cwd=folder, env=environment(), stdout=out, stderr=err,
                                start_new_session=True)


def output(folder: Path, name: str) -> str:
    return (folder / f"{name}.out").read_text() + (folder / f"{name}.err").read_text()


def wait_for_banner(folder: Path, name: str, up: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 45
    while BANNER_END not in output(folder, name):
        assert time.monotonic() < deadline and up.poll() is None, output(folder, name)
        time.sleep(0.05)


def stop(up: subprocess.Popen[bytes]) -> int:
    if up.poll() is None:
        up.send_signal(signal.SIGINT)
    return up.wait(30)


def test_closing_the_terminal_stops_every_process_and_removes_the_stack_file(
    folder: Path,
) -> None:
    up = start_up(folder, "up")
    try:
        wait_for_banner(folder, "up", up)
        stack = json.loads((folder / ".nexus" / "stack.json").read_text())
        running = processes_in(folder)
        assert any("nats-server" in c for c in running.values()), running
        assert any("redis-server" in c for c in running.values()), running
        os.killpg(up.pid, signal.SIGHUP)  # what the terminal does to its foreground group
        try:
            up.wait(45)  # the children's grace is 10 s; they take about 1 s
        except subprocess.TimeoutExpired:
            pytest.fail(f"up still running 45 s after SIGHUP: {processes_in(folder)}\n"
                        f"{output(folder, 'up')}")
        assert "after SIGTERM: aborting" not in output(folder, "up"), output(folder, "up")
        deadline = time.monotonic() + 10  # the servers are `up`'s to stop: it has returned
        while processes_in(folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_in(folder) == {}
        assert not (folder / ".nexus" / "stack.json").exists()
        from nexus_bus.embedded import port_is_free

        assert port_is_free(int(stack["NEXUS_NATS__URL"].rsplit(":", 1)[1]))
    finally:
        stop(up)


def test_ctrl_c_while_the_stack_starts_stops_it_without_a_traceback(folder: Path) -> None:
    """Ctrl-C is SIGINT to the terminal's whole foreground group. Before: the workers and the
    shim were in that group too and, still importing, each died of it on the spot, printing
    "Fatal Python error: init_import_site" or a KeyboardInterrupt traceback; now `up` alone
    gets it and stops them with SIGTERM, as it does once the stack is up."""
    up = start_up(folder, "up")
    try:
        deadline = time.monotonic() + 45
        while "waiting for" not in output(folder, "up"):  # the children have just started
            assert time.monotonic() < deadline and up.poll() is None, output(folder, "up")
            time.sleep(0.01)
        in_its_group = []
        for pid, command in processes_in(folder).items():
            with contextlib.suppress(OSError):  # (gone meanwhile)
                if pid != up.pid and os.getpgid(pid) == up.pid:
                    in_its_group.append(command)
        assert in_its_group == []  # what a Ctrl-C in the terminal reaches besides `up`
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(30) == 130
        said = output(folder, "up")
        assert "Traceback" not in said and "Fatal Python error" not in said, said
        deadline = time.monotonic() + 10
        while processes_in(folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_in(folder) == {}
        assert not (folder / ".nexus" / "stack.json").exists()
    finally:
        stop(up)


def test_ctrl_c_while_the_banner_prints_stops_the_stack(folder: Path) -> None:
    """Ctrl-C just as `up` says it is up. Before: between the readiness wait and the loop that
    waits for Ctrl-C, the KeyboardInterrupt left `up` (exit 130) without stopping anything:
    NATS, Redis, the workers and the shim ran on, the shim on the HTTP port. Held still here:
    `up`'s stdout is a pipe kept full, so it blocks writing the banner until read."""
    import threading

    read, write = os.pipe()
    fcntl.fcntl(write, fcntl.F_SETPIPE_SZ, 4096)
    os.write(write, b"." * fcntl.fcntl(write, fcntl.F_GETPIPE_SZ))  # full: a write blocks
    with (folder / "up.err").open("wb") as err:
        up = subprocess.Popen(UP, cwd=folder, env=environment(), stdout=write, stderr=err,
                              start_new_session=True)
    os.close(write)
    def drain() -> None:
        while os.read(read, 65536):
            pass

    reader = threading.Thread(target=drain)
    try:
        deadline = time.monotonic() + 45
        while "pipe_write" not in Path(f"/proc/{up.pid}/wchan").read_text():  # the banner
            said = (folder / "up.err").read_text()
            assert time.monotonic() < deadline and up.poll() is None, said
            time.sleep(0.02)
        os.killpg(up.pid, signal.SIGINT)
        reader.start()  # from now on nothing blocks on the pipe
        assert up.wait(30) == 130
        deadline = time.monotonic() + 15
        while processes_in(folder) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_in(folder) == {}
        assert not (folder / ".nexus" / "stack.json").exists()
    finally:
        if reader.ident is None:
            reader.start()
        stop(up)
        for pid in processes_in(folder):  # (before: the stack `up` left; EOF needs them gone)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        reader.join(30)
        os.close(read)


def test_two_ups_at_the_same_instant_start_one_stack(folder: Path) -> None:
    ups = [start_up(folder, "first"), start_up(folder, "second")]
    try:
        deadline = time.monotonic() + 45
        while (all(BANNER_END not in output(folder, n) for n in ("first", "second"))
               and time.monotonic() < deadline):
            time.sleep(0.05)
        winner = 0 if BANNER_END in output(folder, "first") else 1
        loser = ups[1 - winner]
        assert loser.wait(30) == 1
        said = output(folder, ("first", "second")[1 - winner])
        # (the pid, unless read in the instant between the winner's lock and its writing it)
        assert re.fullmatch(rf"a stack is already running from {re.escape(str(folder))}/.nexus"
                            rf"( \(nexus-bus up, pid {ups[winner].pid}\))?\n", said), said
        servers = [c for c in processes_in(folder).values() if "nats-server" in c]
        assert len(servers) == 1, servers
        assert stop(ups[winner]) == 0
        assert processes_in(folder) == {}
    finally:
        for up in ups:
            stop(up)


def test_an_up_refuses_while_another_is_still_starting(folder: Path) -> None:
    """The moment the race above turns on, held still: another `up` has the state folder but
    has not written stack.json yet (it starts the servers first)."""
    state = folder / ".nexus"
    state.mkdir()
    with (state / "up.lock").open("a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        up = start_up(folder, "up")
        try:
            assert up.wait(30) == 1
        finally:
            stop(up)
    said = output(folder, "up")
    assert said == f"a stack is already running from {state} (nexus-bus up, pid {os.getpid()})\n"
    assert processes_in(folder) == {} and not (state / "stack.json").exists()
    assert not (state / "admin.token").exists()  # the other `up`'s token is not replaced


def test_the_next_up_stops_what_an_up_killed_outright_left_running(folder: Path) -> None:
    first = start_up(folder, "first")
    try:
        wait_for_banner(folder, "first", first)
        left = processes_in(folder)
        first.kill()  # SIGKILL to `up` alone: its servers, workers and shim run on
        first.wait(10)
        assert set(processes_in(folder)) == set(left) - {first.pid}
    finally:
        stop(first)
    second = start_up(folder, "second")
    try:
        wait_for_banner(folder, "second", second)
        said = output(folder, "second")
        assert "stopped what an earlier `up` left running from" in said, said
        for name in ("nats-server", "redis-server", "worker-1", "shim"):
            assert name in said, said
        assert not set(processes_in(folder)) & set(left)
        servers = [c for c in processes_in(folder).values() if "nats-server" in c]
        assert len(servers) == 1, servers
        env = {**environment(), "NEXUS_STATE_DIR": str(folder / ".nexus")}
        put = subprocess.run(
            [sys.executable, "-m", "nexus_bus", "call", "data.put", '{"key": "k", "value": 1}'],
            env=env, capture_output=True, text=True, timeout=30, check=False,
        )
        assert put.returncode == 0, put.stdout + put.stderr
        assert stop(second) == 0
        assert processes_in(folder) == {}
    finally:
        stop(second)
