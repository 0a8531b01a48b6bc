"""The `nexus-bus` command over real servers: `call`, and `up` bringing the stack up and down."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from nexus_bus import Settings, Worker

ROOT = Path(__file__).resolve().parents[2]


def run_cli(
    *args: str, env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_bus", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.fixture
def cli_env(settings: Settings, admin_token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(
        NEXUS_NATS__URL=settings.nats.url,
        NEXUS_REDIS__URL=settings.redis.url,
        NEXUS_LOG__LEVEL="WARNING",
    )
    if admin_token:
        env["NEXUS_TOKEN"] = admin_token
    return env


async def run_cli_async(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Like run_cli, without blocking the event loop the in-process worker serves on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "nexus_bus",
        *args,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


async def test_call_prints_the_reply_and_exits_nonzero_with_the_problem(
    worker: Worker, cli_env: dict[str, str], uid: str
) -> None:
    run_cli = run_cli_async
    put = await run_cli(
        "call", "data.put", json.dumps({"key": f"cli.{uid}", "value": [1]}), env=cli_env
    )
    assert put.returncode == 0, put.stderr
    assert json.loads(put.stdout)["key"] == f"cli.{uid}"
    got = await run_cli("call", "data.get", json.dumps({"key": f"cli.{uid}"}), env=cli_env)
    assert json.loads(got.stdout)["value"] == [1]
    missing = await run_cli("call", "data.get", json.dumps({"key": f"none.{uid}"}), env=cli_env)
    assert missing.returncode == 1 and json.loads(missing.stdout)["code"] == "not_found"
    bad = await run_cli("call", "data.get", "{not json", env=cli_env)
    assert bad.returncode == 2 and "not JSON" in bad.stderr
    for name in ("data.get key", "pricing", "data.get.x", "Data.get"):  # refused before connecting
        shape = await run_cli("call", name, "{}", env={**cli_env, "NEXUS_NATS__URL": "nats://-"})
        assert (shape.returncode, shape.stdout) == (2, ""), shape
        assert shape.stderr == (
            f"error: operation {name!r}: expected op.action, e.g. data.get (each a lowercase"
            " letter, then up to 63 of a-z, 0-9, _ and -)\n"
        )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie awaiting its parent's wait() is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_up_starts_the_stack_serves_calls_and_stops_cleanly(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_LOG__LEVEL"] = "WARNING"
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nexus_bus",
            "up",
            "--workers",
            "1",
            "--nats-port",
            "0",
            "--redis-port",
            "0",
            "--http-port",
            "0",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert up.stdout is not None
        lines: list[str] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = up.stdout.readline()
            lines.append(line)
            if "export NEXUS_TOKEN=" in line or not line:
                break
        text = "".join(lines)
        assert "nexus-bus is up" in text, text
        stack = json.loads((tmp_path / ".nexus" / "stack.json").read_text())
        pids = stack["pids"]
        assert "waiting for shim, data, stream, ai, auth" in text, text
        # `call` finds the running stack by itself (state dir), token included; the banner
        # came once the worker answered, so the first call is served.
        put = run_cli(
            "call", "data.put", '{"key": "hello", "value": {"n": 1}}', env=env, cwd=tmp_path
        )
        assert put.returncode == 0, put.stdout + put.stderr
        got = run_cli("call", "data.get", '{"key": "hello"}', env=env, cwd=tmp_path)
        assert json.loads(got.stdout)["value"] == {"n": 1}
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0
        assert not any(_alive(pid) for pid in pids)
        nats_port = int(stack["NEXUS_NATS__URL"].rsplit(":", 1)[1])
        redis_port = int(stack["NEXUS_REDIS__URL"].rsplit(":", 1)[1].split("/")[0])
        from nexus_bus.embedded import port_is_free

        assert port_is_free(nats_port) and port_is_free(redis_port)
        assert not (tmp_path / ".nexus" / "stack.json").exists()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait(10)
        if up.stdout is not None:
            up.stdout.close()


def test_up_says_which_ports_it_found_taken(
    tmp_path: Path, nats_url: str, redis_url: str
) -> None:
    """`make up` on a machine already running NATS on 4222 and Redis on 6379 (a developer's,
    say): `up` takes free ports instead. Before: the banner showed the other ports without a
    word, and `up --help` said nothing of it."""
    import socket

    taken = {"nats": int(nats_url.rsplit(":", 1)[1]),
             "redis": int(redis_url.rsplit(":", 1)[1].split("/")[0])}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_LOG__LEVEL"] = "WARNING"
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        taken["http"] = held.getsockname()[1]
        argv = [sys.executable, "-m", "nexus_bus", "up", "--workers", "1", "--nats-port",
                str(taken["nats"]), "--redis-port", str(taken["redis"]), "--http-port",
                str(taken["http"])]
        up = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            assert up.stdout is not None
            lines: list[str] = []
            while not lines or "state " not in lines[-1]:  # the banner's last line
                line = up.stdout.readline()
                assert line, "".join(lines)  # (readline: up's own 60 s ready timeout bounds it)
                lines.append(line)
            said = {line.split()[0]: line for line in lines if line.startswith("  ")}
            assert said["NATS"].endswith(f"  ({taken['nats']} was taken)\n"), said
            assert said["Redis"].endswith(f"  ({taken['redis']} was taken)\n"), said
            assert said["HTTP"].endswith(f"  ({taken['http']} was taken)\n"), said
            assert "was taken" not in said["state"]
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(30)
            if up.stdout is not None:
                up.stdout.close()
    helped = run_cli("up", "--help", env=env)
    assert "taken by another process: any free port" in " ".join(helped.stdout.split())


async def test_a_one_shot_call_prints_only_its_result_and_loads_no_server_code(
    worker: Worker, cli_env: dict[str, str], uid: str
) -> None:
    """No log lines on stderr, and no FastStream or HTTP server imported: what keeps the CLI's
    own CPU time (mostly imports) small. That time is printed, not bounded: a timed assertion
    fails on a slow machine (1.24 s on one 2.4x slower than usual, 0.3 s on a quiet one)."""
    env = {**cli_env, "NEXUS_LOG__LEVEL": "INFO"}  # the servers' level: not a one-shot's
    probe = (
        "import resource, sys\n"
        "from nexus_bus.cli import main\n"
        "code = main(sys.argv[1:])\n"
        "heavy = [m for m in ('faststream', 'uvicorn', 'nexus_bus.runtime.worker')\n"
        "         if m in sys.modules]\n"
        "usage = resource.getrusage(resource.RUSAGE_SELF)\n"
        "print(heavy, usage.ru_utime + usage.ru_stime, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", probe, "call", "data.put",
        json.dumps({"key": f"quick.{uid}", "value": 1}),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert json.loads(out)["key"] == f"quick.{uid}"
    [line] = err.decode().splitlines()  # nothing but the probe's own line
    heavy, cpu_s = line.rsplit(" ", 1)
    assert heavy == "[]"
    print(f"one-shot call: {float(cpu_s):.2f} s of CPU")
    verbose = await run_cli_async("-v", "call", "data.get", json.dumps({"key": "x"}), env=env)
    assert "nats disconnected" in verbose.stderr  # -v: the INFO lines are back


def test_up_serves_your_operations_and_describes_them(tmp_path: Path) -> None:
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "pricing.py").write_text(
        "from typing import Any\n"
        "from nexus_bus import Operations, RequestContext\n"
        "ops = Operations('pricing')\n"
        "@ops.action('quote')\n"
        "async def quote(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:\n"
        "    return {'cents': (await ctx.services.records.get('price.' + req['sku'])).json()}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_LOG__LEVEL"] = "WARNING"
    argv = ["up", "--workers", "1", "--nats-port", "0", "--redis-port", "0", "--http-port", "0",
            "--app", "mypkg.pricing:ops"]
    with (tmp_path / "up.out").open("wb") as out:
        up = subprocess.Popen(
            [str(Path(sys.executable).parent / "nexus-bus"), *argv], cwd=tmp_path, env=env,
            stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "Ctrl-C stops" not in (text := (tmp_path / "up.out").read_text()):
            assert time.monotonic() < deadline and up.poll() is None, text
            time.sleep(0.05)
        assert "ops: data, stream, ai, auth, pricing" in text
        assert "waiting for shim, data, stream, ai, auth, pricing" in text
        url = dict(re.findall(r"export (NEXUS_\w+)=(\S+)", text))["NEXUS_URL"]
        with urllib.request.urlopen(f"{url}/openapi.json", timeout=5) as response:
            assert "/v1/pricing/quote" in json.loads(response.read())["paths"]
        put = run_cli("call", "data.put", '{"key": "price.apple", "value": 120}',
                      env=env, cwd=tmp_path)
        assert put.returncode == 0, put.stdout + put.stderr
        token = (tmp_path / ".nexus" / "admin.token").read_text()
        request = urllib.request.Request(
            f"{url}/v1/pricing/quote", data=b'{"sku": "apple"}',
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert json.loads(response.read()) == {"cents": 120}
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(30)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)


def test_a_worker_whose_metrics_port_is_taken_says_so(cli_env: dict[str, str]) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = {**cli_env, "NEXUS_WORKER__METRICS_PORT": str(taken.getsockname()[1])}
        done = run_cli("worker", "--ops", "data", env=env)
    assert done.returncode == 2
    assert done.stderr.strip().endswith("Address already in use"), done.stderr


def test_a_one_shot_command_without_a_stack_says_so_at_once(tmp_path: Path) -> None:
    """No stack: not ten seconds of retries, twenty warning lines and `TimeoutError()`, but
    the refusal, where the stack file was looked for, and no log line unless -v."""
    from nexus_bus.embedded import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(
        NEXUS_NATS__URL=f"nats://127.0.0.1:{free_port()}",  # nothing listens there
        NEXUS_STATE_DIR=str(tmp_path),
        NEXUS_NATS__INITIAL_CONNECT_TIMEOUT_S="60",  # the bound for any other failure
    )
    started = time.monotonic()
    done = run_cli("call", "data.get", '{"key": "k"}', env=env)
    assert time.monotonic() - started < 15  # (1 s of refusals, plus the CLI's start)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    detail = json.loads(done.stdout)["detail"]
    assert detail == (
        f"cannot connect to NATS at {env['NEXUS_NATS__URL']}: connection refused"
        f" — is `nexus-bus up` running? (no stack file: {tmp_path / 'stack.json'})"
    )
    listed = run_cli("ops", env=env)  # the other one-shot commands: one line on stderr
    assert listed.returncode == 1 and listed.stdout == ""
    assert listed.stderr == f"error: unavailable: {detail}\n"
    verbose = run_cli("-v", "call", "data.get", '{"key": "k"}', env=env)
    assert "nats connect attempt failed" in verbose.stderr


def test_a_stale_nats_url_beside_a_running_stack_names_its_url(
    tmp_path: Path, nats_url: str
) -> None:
    """Export lines pasted from an `up` that has since been restarted: where another NATS
    holds 4222 each `up` picks a new port, and the exported URL wins over the stack file.
    Before: "connection refused — is `nexus-bus up` running? (stack file: ...)" while it was."""
    from nexus_bus.embedded import free_port

    stack = {"NEXUS_NATS__URL": nats_url, "NEXUS_STATE_DIR": str(tmp_path), "pids": [os.getpid()]}
    (tmp_path / "stack.json").write_text(json.dumps(stack))  # a live process: a running stack
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_NATS__URL=f"nats://127.0.0.1:{free_port()}", NEXUS_STATE_DIR=str(tmp_path))
    done = run_cli("call", "data.get", '{"key": "k"}', env=env)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert json.loads(done.stdout)["detail"] == (
        f"cannot connect to NATS at {env['NEXUS_NATS__URL']}: connection refused — the stack"
        f" running from {tmp_path} is at {nats_url}: unset NEXUS_NATS__URL, or paste the"
        " `export` lines `up` printed last"
    )


def test_a_worker_without_a_nats_says_so_as_a_one_shot_command_does(tmp_path: Path) -> None:
    """`nexus-bus worker --app ...` from your own folder without `up`'s export lines, nothing
    on the default port. Before: a WARNING line per attempt ("nats connection error: [Errno
    111] Connection refused", twenty in the ten seconds), then "cannot connect to NATS at
    ...: TimeoutError()"; now the attempts at INFO and the refusal with where to look."""
    from nexus_bus.embedded import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(
        NEXUS_NATS__URL=f"nats://127.0.0.1:{free_port()}",  # nothing listens there
        NEXUS_STATE_DIR=str(tmp_path),
        NEXUS_NATS__INITIAL_CONNECT_TIMEOUT_S="1.5",  # a server waits this long for NATS
    )
    done = run_cli("worker", "--ops", "data", env=env)
    assert done.returncode == 1
    *logged, said = done.stderr.splitlines()
    assert said == (
        f"error: unavailable: cannot connect to NATS at {env['NEXUS_NATS__URL']}: connection"
        f" refused — is `nexus-bus up` running? (no stack file: {tmp_path / 'stack.json'})"
    ), done.stderr
    levels = {json.loads(line)["level"] for line in logged}
    assert levels <= {"INFO"}, done.stderr


def test_a_shim_without_a_nats_says_so_as_a_worker_does(tmp_path: Path) -> None:
    """Before: the detail bare, then uvicorn's "Application startup failed. Exiting." and exit
    3; now the worker's one line (where to look included) and exit 1."""
    from nexus_bus.embedded import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(
        NEXUS_NATS__URL=f"nats://127.0.0.1:{free_port()}",  # nothing listens there
        NEXUS_STATE_DIR=str(tmp_path),
        NEXUS_NATS__INITIAL_CONNECT_TIMEOUT_S="1.5",
        NEXUS_LOG__LEVEL="WARNING",
    )
    done = run_cli("shim", "--port", "0", env=env)
    said = (
        f"error: unavailable: cannot connect to NATS at {env['NEXUS_NATS__URL']}: connection"
        f" refused — is `nexus-bus up` running? (no stack file: {tmp_path / 'stack.json'})"
    )
    assert (done.returncode, done.stderr.splitlines()[-1]) == (1, said), done.stderr
    assert done.stderr.count("cannot connect to NATS") == 1, done.stderr


def test_an_operation_nobody_serves_names_the_nats_when_no_stack_was_found(
    nats_url: str, tmp_path: Path
) -> None:
    """From a folder outside the stack's, without its `export` lines, `call` asks whatever
    NATS listens on the default port; on this machine another NATS held 4222, so `up` had
    moved its own elsewhere. Before: only "data.get is not a declared operation", as if the
    stack lacked it, with nothing to say that this was not the stack's server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_NATS__URL=nats_url, NEXUS_STATE_DIR=str(tmp_path))  # NATS, no stack
    where = f" at {nats_url} — is `nexus-bus up` running there? (no stack file:" \
        f" {tmp_path / 'stack.json'})"
    done = run_cli("call", "nobody.get", '{"key": "k"}', env=env)
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert json.loads(done.stdout)["detail"] == f"nobody.get is not a declared operation{where}"
    # With the stack file there, the op's absence is the stack's: said as before.
    (tmp_path / "stack.json").write_text("{}")
    done = run_cli("call", "nobody.get", '{"key": "k"}', env=env)
    assert json.loads(done.stdout)["detail"] == "nobody.get is not a declared operation"


async def test_a_server_still_waits_for_a_nats_that_starts_late(
    tmp_path: Path, settings: Settings
) -> None:
    """Refusals alone end only a one-shot's first connect: a shim or `up` started beside
    NATS outwaits it (nats.initial_connect_timeout_s) as before."""
    from nexus_bus.bus.connection import connect_nats
    from nexus_bus.embedded import free_port, nats_server
    from nexus_bus.errors import Unavailable

    port = free_port()
    late = settings.nats.model_copy(update={"url": f"nats://127.0.0.1:{port}"})
    with pytest.raises(Unavailable, match=r"connection refused$"):
        await connect_nats(late.model_copy(update={"initial_refused_timeout_s": 0.5}))
    server = nats_server(tmp_path / "nats", port)
    connecting = asyncio.ensure_future(connect_nats(late))
    try:
        await asyncio.sleep(1.5)  # three refused attempts
        assert not connecting.done()
        await asyncio.to_thread(server.start)
        nc = await asyncio.wait_for(connecting, 10)
        assert nc.is_connected
        await nc.close()
    finally:
        connecting.cancel()
        server.stop()


def first_instance(env: dict[str, str]) -> str:
    """The `instance` of a worker's first log line, the worker being pid 1 of a namespace of
    its own, as in a container (here with the host's name, as with host networking)."""
    with subprocess.Popen(
        ["unshare", "--pid", "--mount-proc", "--kill-child", sys.executable, "-m", "nexus_bus",
         "worker", "--ops", "data"],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    ) as worker:
        try:
            assert worker.stderr is not None
            for line in worker.stderr:
                if line.startswith("{") and "instance" in json.loads(line):
                    return str(json.loads(line)["instance"])
            raise AssertionError("the worker logged no instance")
        finally:
            worker.kill()


@pytest.mark.skipif(os.geteuid() != 0, reason="a pid namespace needs root")
def test_two_workers_that_are_pid_1_on_one_host_are_told_apart(
    cli_env: dict[str, str], settings: Settings
) -> None:
    """Two containers sharing the host's name (host networking: `docker run --network host`,
    Kubernetes hostNetwork pods) each run the worker as pid 1. Their log lines' `instance`,
    also the traces' `service.instance.id`, was host-pid: the same for both."""
    env = {**cli_env, "NEXUS_LOG__LEVEL": "INFO",
           "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir)}
    one, other = first_instance(env), first_instance(env)
    assert one.startswith(f"{os.uname().nodename}-1")
    assert one != other
