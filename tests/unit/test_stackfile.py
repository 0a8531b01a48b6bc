"""Finding the stack `nexus-bus up` started: one mechanism for the CLI and `load_settings()`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_bus import load_settings
from nexus_bus.stackfile import (
    DEV_TOKEN_FILE,
    STACK_FILE,
    find_stack,
    read_dev_token,
    read_stack,
    stack_overrides,
)

STACK_VARS = {
    "NEXUS_NATS__URL": "nats://127.0.0.1:14222",
    "NEXUS_REDIS__URL": "redis://127.0.0.1:16379/0",
    "NEXUS_HTTP__PORT": "18080",
}


def write_stack(folder: Path, pids: list[int]) -> Path:
    """A stack.json as `up` writes it, under `folder/.nexus`."""
    state = folder / ".nexus"
    state.mkdir(parents=True)
    doc = {**STACK_VARS, "NEXUS_STATE_DIR": str(state), "metrics": {}, "pids": pids}
    (state / STACK_FILE).write_text(json.dumps(doc))
    return state


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No NEXUS_* variables, and the current folder inside `tmp_path`."""
    for name in list(os.environ):
        if name.startswith("NEXUS_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_load_settings_finds_the_stack_of_this_folder_or_a_parent(clean_env: Path) -> None:
    state = write_stack(clean_env, [os.getpid()])
    nested = clean_env / "mypkg" / "sub"
    nested.mkdir(parents=True)
    os.chdir(nested)
    settings = load_settings()
    assert settings.nats.url == STACK_VARS["NEXUS_NATS__URL"]
    assert settings.redis.url == STACK_VARS["NEXUS_REDIS__URL"]
    assert settings.http.port == 18080
    assert settings.state_dir == state  # so keys and the dev token are found from here too


def test_explicit_environment_wins_and_another_nats_means_another_stack(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_stack(clean_env, [os.getpid()])
    monkeypatch.setenv("NEXUS_HTTP__PORT", "9999")
    monkeypatch.setenv("NEXUS_NATS__URL", STACK_VARS["NEXUS_NATS__URL"])  # the same stack
    settings = load_settings()
    assert settings.http.port == 9999 and settings.redis.url == STACK_VARS["NEXUS_REDIS__URL"]
    monkeypatch.setenv("NEXUS_NATS__URL", "nats://elsewhere:4222")
    settings = load_settings()
    assert settings.nats.url == "nats://elsewhere:4222"
    assert settings.redis.url == "redis://127.0.0.1:6379/0"  # nothing taken from the stack
    monkeypatch.delenv("NEXUS_NATS__URL")
    assert load_settings().redis.url == STACK_VARS["NEXUS_REDIS__URL"]
    by_argument = load_settings(nats={"url": "nats://other:4222"})  # as tests configure
    assert by_argument.redis.url == "redis://127.0.0.1:6379/0"


def test_a_stopped_stack_and_discover_false_are_ignored(clean_env: Path) -> None:
    write_stack(clean_env, [os.getpid(), dead_pid()])
    assert read_stack(clean_env / ".nexus") == {}
    assert load_settings().nats.url == "nats://127.0.0.1:4222"


def test_discovery_can_be_turned_off_and_follows_an_explicit_state_dir(
    clean_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = write_stack(clean_env / "repo", [os.getpid()])
    assert load_settings().nats.url == "nats://127.0.0.1:4222"  # not below this folder
    monkeypatch.setenv("NEXUS_STATE_DIR", str(state))
    assert load_settings().nats.url == STACK_VARS["NEXUS_NATS__URL"]
    assert load_settings(discover=False).nats.url == "nats://127.0.0.1:4222"
    assert find_stack(Path("elsewhere"), clean_env) == {}


def test_stack_overrides_keep_what_the_environment_sets() -> None:
    found = {**STACK_VARS, "NEXUS_STATE_DIR": "/s"}
    values = stack_overrides(found, {"NEXUS_REDIS__URL": "redis://mine"}, None)
    assert values == {
        "nats": {"url": STACK_VARS["NEXUS_NATS__URL"]},
        "http": {"port": "18080"},
        "state_dir": "/s",
    }
    assert stack_overrides(found, {}, "nats://other:4222") == {}


def test_the_dev_token_is_read_from_the_state_dir(tmp_path: Path) -> None:
    assert read_dev_token(tmp_path) is None
    (tmp_path / DEV_TOKEN_FILE).write_text("tok\n")
    assert read_dev_token(tmp_path) == "tok"
