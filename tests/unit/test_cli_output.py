"""What the `nexus-bus` command prints about itself: the command it names in `up`'s banner,
and a quiet end when its reader goes away (`nexus-bus ops | head`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_bus import cli


def test_the_banner_names_the_command_as_it_was_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / ".venv" / "bin" / "nexus-bus"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [".venv/bin/nexus-bus", "up"])
    assert cli._this_command() == ".venv/bin/nexus-bus"  # `make up` from the project folder
    monkeypatch.setattr(sys, "argv", [str(script), "up"])
    assert cli._this_command() == str(script)


def test_a_command_path_that_does_not_work_from_here_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # no .venv here
    monkeypatch.setattr(sys, "argv", [".venv/bin/nexus-bus", "up"])
    assert cli._this_command() == f"{sys.executable} -m nexus_bus"
    monkeypatch.setattr(sys, "argv", ["/x/nexus_bus/__main__.py", "up"])  # python -m nexus_bus
    assert cli._this_command() == f"{sys.executable} -m nexus_bus"


def test_a_closed_pipe_ends_the_command_quietly(tmp_path: Path) -> None:
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line is written
    env = {**os.environ, "NEXUS_STATE_DIR": "/nonexistent"}
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nexus_bus", "schemas", "export", "--dir", str(tmp_path)],
            stdout=write, stderr=subprocess.PIPE, env=env, timeout=60, check=False,
        )
    finally:
        os.close(write)
    assert done.stderr == b""
    assert done.returncode == 141
