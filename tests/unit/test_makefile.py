"""The Makefile's install steps run one at a time: two `make up` at once in a fresh clone would
otherwise run venv and pip on one .venv together. Run on a copy of the Makefile, with a
stand-in `python3` whose venv's python logs each pip call (and takes a while over it)."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STAMP = ".venv/.installed"
FAKE_PYTHON = """#!/bin/sh
if [ "$1 $2" = "-m venv" ]; then  # the venv: this script again, as its bin/python
    mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && exit 0
fi
echo "start $$ $*" >> "$CALLS"; sleep 0.3; echo "end $$" >> "$CALLS"
"""


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    if shutil.which("make") is None or shutil.which("flock") is None:
        pytest.skip("needs make and util-linux flock")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return tmp_path


def make(clone: Path, *, wait: bool = True) -> subprocess.Popen[str]:
    env = {**os.environ, "CALLS": str(clone / "calls.log")}
    for name in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):  # when pytest itself runs under make
        env.pop(name, None)
    proc = subprocess.Popen(
        ["make", "--no-print-directory", f"PYTHON={clone / 'python3'}", STAMP], cwd=clone,
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    if wait:
        proc.communicate(timeout=60)
    return proc


def calls(clone: Path) -> list[str]:
    path = clone / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def test_two_makes_at_once_install_once_one_step_at_a_time(clone: Path) -> None:
    both = [make(clone, wait=False), make(clone, wait=False)]
    outputs = [proc.communicate(timeout=60)[0] for proc in both]
    assert [proc.returncode for proc in both] == [0, 0], outputs
    log = calls(clone)
    assert len(log) == 6, log  # pip upgrade, torch, the package: once, not once per make
    for start, end in zip(log[::2], log[1::2], strict=True):  # never two at once
        assert start.startswith("start ") and end == f"end {start.split()[1]}", log
    assert (clone / STAMP).exists()


def test_an_installed_venv_takes_no_lock(clone: Path) -> None:
    assert make(clone).returncode == 0
    before = calls(clone)
    with (clone / ".venv.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a make installing elsewhere would hold it
        started = time.monotonic()
        done = make(clone, wait=False)
        out = done.communicate(timeout=10)[0]
        assert time.monotonic() - started < 5, out
    assert done.returncode == 0, out
    assert calls(clone) == before
