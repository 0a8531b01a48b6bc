"""What the `nexus-bus` command prints about itself: the command it names in `up`'s banner,
and a quiet end when its reader goes away (`nexus-bus ops | head`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from nexus_bus import cli
from nexus_bus.apps import load_groups
from nexus_bus.handlers import BUILTIN


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


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder holding `mypkg` with a group `pricing:ops` and a module whose import fails."""
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "pricing.py").write_text(
        "from nexus_bus import Operations\nops = Operations('pricing')\n"
    )
    (tmp_path / "mypkg" / "broken.py").write_text("import mypkg.helpers  # not written yet\n")
    (tmp_path / "mypkg" / "sync.py").write_text(
        "from nexus_bus import Operations\nops = Operations('sync')\n"
        "@ops.action('go')\ndef go(req: dict, ctx: object) -> dict:\n    return req\n"
    )
    (tmp_path / "mypkg" / "mydata.py").write_text(
        "from nexus_bus import Operations\nops = Operations('data')\n"
        "@ops.action('get', public=True)\nasync def get(req: dict, ctx: object) -> dict:\n"
        "    return req\n"
    )
    (tmp_path / "mypkg" / "ours.py").write_text(
        "import msgspec\nfrom nexus_bus import Operations\n"
        "class NexusRequestHeaders(msgspec.Struct):\n    x: int\n"
        "ops = Operations('ours')\n@ops.action('go')\n"
        "async def go(req: NexusRequestHeaders, ctx: object) -> dict:\n    return {}\n"
    )
    (tmp_path / "mypkg" / "bare.py").write_text(
        "from nexus_bus import Operations\nops = Operations('bare')\n"
        "@ops.action\nasync def go(req: dict, ctx: object) -> dict:\n    return req\n"
    )
    (tmp_path / "mypkg" / "dotted.py").write_text(
        "from nexus_bus import Operations\nops = Operations('my.ops')\n"
    )
    return tmp_path


def run_in(
    folder: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}, **(env or {})}
    env["NEXUS_STATE_DIR"] = str(folder / ".nexus")
    return subprocess.run(
        [sys.executable, "-m", "nexus_bus", *args], cwd=folder, env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["worker", "--app", "mypkg.pricng:ops"],
         "--app mypkg.pricng:ops: No module named 'mypkg.pricng'"),
        (["worker", "--app", "mypkg.pricing:opz"],
         "--app mypkg.pricing:opz: module 'mypkg.pricing' has no attribute 'opz'"),
        (["worker", "--app", "mypkg.pricing:Operations"],
         "--app mypkg.pricing:Operations: not an Operations group (or a list of them)"),
        (["worker", "--ops", "dta"],
         "--ops dta: unknown built-in ops: dta; have data, stream, ai, auth"),
        (["up", "--app", "nopkg.pricing"], "--app nopkg.pricing: No module named 'nopkg'"),
        (["ops", "--app", ":ops"], "--app :ops: expected module:attribute, e.g. mypkg.pricing:ops"),
    ],
)
def test_a_typo_in_app_or_ops_is_one_line(project: Path, args: list[str], said: str) -> None:
    done = run_in(project, *args)
    assert (done.returncode, done.stderr, done.stdout) == (2, f"error: {said}\n", "")


@pytest.mark.parametrize(
    ("module", "said"),
    [
        ("sync", "sync.py:3: sync.go: the handler must be an async function"),
        # Before: "bare: action name <function go at 0x7f...>: use lowercase letters, ..."
        ("bare", 'bare.py:3: bare.go: the action needs its name: @ops.action("go"), not'
         " @ops.action"),
        ("dotted", "dotted.py:2: op name 'my.ops': use lowercase letters, digits, '_' and '-',"
         " starting with a letter, at most 64 characters (it is a NATS subject token)"),
    ],
)
def test_an_operation_declared_wrongly_is_one_line_naming_it(
    project: Path, module: str, said: str
) -> None:
    """Before: a traceback ending in ValueError (exit 1), or "error: invalid_request: ..." as
    if a request had been refused (exit 1)."""
    done = run_in(project, "worker", "--app", f"mypkg.{module}:ops")
    where = project / "mypkg"
    assert (done.returncode, done.stderr, done.stdout) == (
        2, f"error: --app mypkg.{module}:ops: {where}/{said}\n", "",
    )


@pytest.mark.parametrize(
    "args",
    [
        ["worker", "--app", "mypkg.mydata:ops", "--app", "mypkg.pricing:ops", "--ops", "data"],
        ["up", "--app", "mypkg.mydata:ops", "--app", "mypkg.pricing:ops"],
        ["shim", "--app", "mypkg.mydata:ops", "--app", "mypkg.pricing:ops"],
    ],
)
def test_your_op_named_like_another_served_with_it_is_refused(
    project: Path, args: list[str]
) -> None:
    """Before: `up` served both groups in one worker, whose dispatcher kept the last one, so
    the built-in data.put answered 404 and data.get was your public handler."""
    done = run_in(project, *args)
    said = (
        "error: --app mypkg.mydata:ops --app mypkg.pricing:ops: op 'data' is declared by two"
        " groups; one worker serves one group per op (built-in ops included): rename one, or"
        " merge their actions\n"
    )
    assert (done.returncode, done.stderr, done.stdout) == (2, said, "")


def test_your_type_named_like_one_of_ours_is_one_line(project: Path) -> None:
    """Before: `schemas export` (and `ops`) ended in a traceback from the spec builder."""
    done = run_in(project, "schemas", "export", "--dir", "out", "--app", "mypkg.ours:ops")
    said = "error: two different schemas are named 'NexusRequestHeaders'; rename one type\n"
    assert (done.returncode, done.stderr) == (2, said)


def test_an_import_failing_inside_your_module_shows_your_traceback(project: Path) -> None:
    done = run_in(project, "worker", "--app", "mypkg.broken:ops")
    assert done.returncode == 1
    assert f'File "{project / "mypkg" / "broken.py"}", line 1' in done.stderr, done.stderr
    assert done.stderr.endswith("ModuleNotFoundError: No module named 'mypkg.helpers'\n")


@pytest.mark.parametrize(
    ("args", "chosen"),
    [
        (["--app", "mypkg.pricing:ops"], "--app mypkg.pricing:ops"),
        (["--ops", "data"], "--ops data"),
    ],
)
def test_a_selection_of_groups_is_not_exported_over_the_built_in_documents(
    project: Path, args: list[str], chosen: str
) -> None:
    """Before: `schemas export --app mypkg.pricing:ops` (how a new user gets documents for
    their op) wrote pricing's into the package's own schemas/ and deleted every built-in
    group's there; `--check` (used here: it writes nothing) called them all stale."""
    from nexus_bus.specs import default_directory

    done = run_in(project, "schemas", "export", "--check", *args)
    said = (f"error: {chosen}: give --dir for these documents; the default,"
            f" {default_directory()}, holds those of every built-in group\n")
    assert (done.returncode, done.stderr, done.stdout) == (2, said, "")
    assert run_in(project, "schemas", "export", "--dir", "out", *args).returncode == 0
    assert (project / "out" / "openapi.json").is_file()


def test_the_help_opens_with_what_the_command_is_for(tmp_path: Path) -> None:
    """Before: `nexus-bus --help` opened with the module's docstring, "The `nexus-bus`
    command: the only place that loads settings and wires processes." (a note on the code)."""
    done = run_in(tmp_path, "--help")
    description = " ".join(done.stdout.split("\n\n")[1].split())
    assert description.startswith("An event-driven message-bus gateway"), done.stdout
    assert "`nexus-bus up`" in description and "`nexus-bus call data.get" in description


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["call"], "--token TOKEN bearer token (default: $NEXUS_TOKEN, else the admin token of"
         " the stack `up` started)"),
        (["call"], "--timeout TIMEOUT seconds (default: client.default_timeout_ms, 5 s)"),
        (["dlq", "list"], "--limit LIMIT at most this many entries (default: 100)"),
        (["jobs", "show"], "--wait WAIT seconds to wait for it to finish (default: 0, not at all)"),
    ],
)
def test_the_help_gives_the_defaults_a_command_uses(
    tmp_path: Path, command: list[str], said: str
) -> None:
    """Before: `call --token` named $NEXUS_TOKEN only, though `call` falls back to the admin
    token `up` left (the README's tour relies on it), and --timeout, --limit and --wait gave
    no default."""
    done = run_in(tmp_path, *command, "--help")
    assert said in " ".join(done.stdout.split()), done.stdout


@pytest.mark.parametrize("command", [["worker"], ["schemas", "export"]])
def test_the_help_of_ops_says_that_app_leaves_the_built_in_ones_out(
    tmp_path: Path, command: list[str]
) -> None:
    """Before: `--ops ... (default: all)`, while `--app` alone serves (and describes) the
    app's groups only: a new user serving their group expected data.* beside it."""
    assert [g.op for g in load_groups(None, [])] == list(BUILTIN)
    assert [g.op for g in load_groups(None, ["tests.integration.runtime_ops:ops"])] == [
        "slowpoke"
    ]
    done = run_in(tmp_path, *command, "--help")
    assert done.returncode == 0, done.stderr
    assert "(default: all; none when --app is given)" in " ".join(done.stdout.split())


ABOVE_0 = "not a number above 0"
AT_LEAST_1 = "not a whole number of at least 1"
NOT_NEGATIVE = "not a number of 0 or more"
NOT_A_PORT = "not a port (0-65535)"


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["call", "data.get", "--timeout", "-1"], f"argument --timeout: '-1': {ABOVE_0}"),
        (["call", "data.get", "--timeout", "nan"], f"argument --timeout: 'nan': {ABOVE_0}"),
        (["up", "--workers", "0"], f"argument --workers: '0': {AT_LEAST_1}"),
        (["up", "--ready-timeout", "0"], f"argument --ready-timeout: '0': {ABOVE_0}"),
        (["up", "--nats-port", "70000"], f"argument --nats-port: '70000': {NOT_A_PORT}"),
        (["up", "--http-port", "-1"], f"argument --http-port: '-1': {NOT_A_PORT}"),
        (["shim", "--port", "70000"], f"argument --port: '70000': {NOT_A_PORT}"),
        (["dlq", "list", "--limit", "-5"], f"argument --limit: '-5': {AT_LEAST_1}"),
        (["jobs", "show", "0" * 32, "--wait", "-3"], f"argument --wait: '-3': {NOT_NEGATIVE}"),
        (["services", "--wait", "-1"], f"argument --wait: '-1': {NOT_NEGATIVE}"),
    ],
)
def test_a_number_out_of_range_is_a_usage_error(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """Before: `up --nats-port 70000` ended in an OverflowError traceback, `up --workers 0`
    waited for workers it never started, `call --timeout -1` sent a request already timed
    out (504), `shim --port 70000` listened on another port."""
    done = run_in(tmp_path, *args)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.splitlines()[-1].endswith(f"error: {said}"), done.stderr


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--scopes", "bogus"], "argument --scopes: invalid scope 'bogus': use op:action, op:*"
         " or *"),
        (["--scopes", " , "], "argument --scopes: no scopes given"),
        (["--scopes", "data:get", "--ttl", "5x"],
         "argument --ttl: invalid duration '5x': use e.g. 90s, 15m, 1h or 7d"),
        (["--scopes", "data:get", "--ttl", "0"],
         "argument --ttl: invalid duration '0': use e.g. 90s, 15m, 1h or 7d"),
    ],
)
def test_a_malformed_scope_or_lifetime_is_a_usage_error(
    tmp_path: Path, args: list[str], said: str
) -> None:
    """Before: `error: invalid_request: invalid scope ...`, exit 1, as if a worker had refused
    a request; nothing is sent anywhere, it is the command line that is wrong."""
    done = run_in(tmp_path, "token", "issue", "--sub", "me", *args)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == f"nexus-bus token issue: error: {said}", done.stderr


def test_a_payload_that_is_not_json_is_one_error_line_naming_it(tmp_path: Path) -> None:
    """Before: "payload is not JSON: JSON is malformed: ...", the one usage error of `call`
    without the "error: " every other one starts with."""
    done = run_in(tmp_path, "call", "data.get", "{key: 1}")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "error: payload '{key: 1}': not JSON (JSON is malformed: object keys must be strings"
        " (byte 1))\n"
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["jobs", "show", "nope"],
         "nexus-bus jobs show: error: argument id: 'nope': not a job id (32 lowercase hex"
         " characters)"),
        (["dlq", "replay", "abc"],
         "nexus-bus dlq replay: error: argument id: 'abc': neither a DLQ sequence number (from"
         " `dlq list`) nor a job id (32 lowercase hex characters)"),
    ],
)
def test_a_malformed_job_id_is_a_usage_error(tmp_path: Path, args: list[str], said: str) -> None:
    """Before: "error: invalid_request: invalid job id: ...", exit 1, as if refused by a
    server; or, nothing listening, "connection refused" about an id that could not be
    right anyway."""
    from nexus_bus.embedded import free_port

    done = run_in(tmp_path, *args, env={"NEXUS_NATS__URL": f"nats://127.0.0.1:{free_port()}"})
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.splitlines()[-1] == said, done.stderr


@pytest.mark.parametrize(
    "args",
    [["keys", "generate", "--dir", "/proc/nexus"], ["schemas", "export", "--dir", "/proc/nexus"]],
)
def test_a_folder_that_cannot_be_written_is_one_line(tmp_path: Path, args: list[str]) -> None:
    """Before: a FileNotFoundError traceback."""
    done = run_in(tmp_path, *args)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("error: cannot write") and "/proc/nexus" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr
