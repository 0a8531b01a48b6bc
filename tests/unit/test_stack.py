"""`up`'s hold on its state folder: the lock one `up` at a time takes, and stopping what an
`up` killed outright left running, by pid and start time (never a reused pid)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus_bus import embedded
from nexus_bus.stack import (
    LOCK_FILE,
    Stack,
    claim_state_dir,
    lock_holder,
    process_start,
    stop_leftovers,
)
from nexus_bus.stackfile import STACK_FILE


def test_one_claim_at_a_time_released_when_its_file_closes(tmp_path: Path) -> None:
    state = tmp_path / ".nexus"
    first = claim_state_dir(state)
    assert first is not None
    assert lock_holder(state) == str(os.getpid())
    assert claim_state_dir(state) is None  # a second open file: flock excludes it too
    first.close()
    again = claim_state_dir(state)
    assert again is not None
    again.close()
    assert (state / LOCK_FILE).read_text() == f"{os.getpid()}\n"  # rewritten, not appended


def test_a_process_is_known_by_its_start_time(tmp_path: Path) -> None:
    assert process_start(os.getpid()) is not None
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert process_start(done.pid) is None


def test_leftovers_are_stopped_and_a_reused_pid_is_not(tmp_path: Path) -> None:
    # A leftover that ignores SIGTERM, as a stuck server would: SIGKILL ends it.
    stuck = subprocess.Popen(
        [sys.executable, "-c", "import signal, time\n"
         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, start_new_session=True,
    )
    assert stuck.stdout is not None and stuck.stdout.readline()  # its handler is in place
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                              start_new_session=True)
    try:
        doc = {
            "children": [{"name": "worker-1", "pid": polite.pid,
                          "started": process_start(polite.pid)}],
            "servers": [
                {"name": "nats-server", "pid": stuck.pid, "started": process_start(stuck.pid)},
                # this test's own pid, recorded with another start time: a pid reused since
                {"name": "redis-server", "pid": os.getpid(), "started": "1"},
            ],
        }
        (tmp_path / STACK_FILE).write_text(json.dumps(doc))
        stopped = stop_leftovers(tmp_path, timeout_s=0.5)
        assert stopped == [f"worker-1 (pid {polite.pid})", f"nats-server (pid {stuck.pid})"]
        assert polite.wait(5) == -15 and stuck.wait(5) == -9
        assert not (tmp_path / STACK_FILE).exists()
        assert stop_leftovers(tmp_path) == []  # nothing recorded: nothing to do
    finally:
        for proc in (stuck, polite):
            proc.kill()
            proc.wait(5)
        stuck.stdout.close()


def test_a_redis_clusters_nodes_get_port_pairs_apart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each node listens on its port and its port + 10000 (the cluster bus). Chosen while
    both were free, one node's bus port was another's client port, and the node that started
    second failed with "Address already in use" (a make test run, 2026-12-07)."""
    offered = iter([30000, 40000, 30000, 20000, 30001, 31000])  # what the kernel hands out
    monkeypatch.setattr(embedded, "free_port", lambda host="127.0.0.1": next(offered))
    monkeypatch.setattr(embedded, "port_is_free", lambda port, host="127.0.0.1": True)
    nodes = embedded.redis_cluster(tmp_path, masters=3).nodes
    ports = [node.port for node in nodes]
    assert ports == [30000, 30001, 31000]
    listening = [p for port in ports for p in (port, port + 10000)]
    assert len(set(listening)) == len(listening)


def test_a_child_whose_drain_hangs_is_aborted_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Before: a child still draining after 15 s was SIGKILLed without a word, so a hung
    drain left no trace of where it hung. Now `up` names it and aborts it, and the child
    (run with PYTHONFAULTHANDLER, as `_spawn` runs workers and shim) prints its stacks."""
    hangs = ("import signal, sys, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
             "print('ready', file=sys.stderr, flush=True)\ndef drain():\n    time.sleep(60)\n"
             "drain()\n")
    err = tmp_path / "child.err"
    with err.open("wb") as out:
        child = subprocess.Popen([sys.executable, "-c", hangs], stderr=out,
                                 env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    deadline = time.monotonic() + 10
    while "ready" not in err.read_text():  # SIGTERM ignored from here on
        assert time.monotonic() < deadline and child.poll() is None
        time.sleep(0.01)
    Stack(tmp_path, children=[child], names=["worker-1"], stop_s=0.5).stop()
    assert child.returncode == -signal.SIGABRT
    assert f"worker-1 (pid {child.pid}) still running" in capsys.readouterr().err
    assert "line 5 in drain" in err.read_text()  # where it hung
