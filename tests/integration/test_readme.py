"""The README's snippets, run as written against a real stack started as the README says.

`make up` is `nexus-bus up`; here on free ports (`--nats-port 0 --redis-port 0 --http-port
0`), in a folder of its own with `.venv/bin/nexus-bus` linked to this environment's, so the
tour's commands run verbatim. Each fenced block follows a `<!-- readme-test: NAME -->`
marker; the test fails when a marked block disappears, so the README cannot rot.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nexus_bus.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
_BLOCK = re.compile(r"<!-- readme-test: (\S+) -->\n```\w+\n(.*?)```", re.S)
_EXPORT = re.compile(r"^\s*export (NEXUS_\w+)=(\S+)$", re.M)


def readme_blocks() -> dict[str, str]:
    return dict(_BLOCK.findall((ROOT / "README.md").read_text()))


@dataclass
class UpStack:
    """A running `nexus-bus up` and what it printed."""

    folder: Path
    proc: subprocess.Popen[bytes]
    banner: str
    env: dict[str, str]  # the environment plus the banner's `export` lines

    def stderr(self) -> str:
        return (self.folder / "up.err").read_text()


def wait_for_banner(folder: Path, proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    out = folder / "up.out"
    while time.monotonic() < deadline:
        text = out.read_text()
        if "Ctrl-C stops everything." in text:
            return text
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"no banner:\n{out.read_text()}\n{(folder / 'up.err').read_text()}")


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UpStack]:
    folder = tmp_path_factory.mktemp("readme")
    (folder / ".venv" / "bin").mkdir(parents=True)
    (folder / ".venv" / "bin" / "nexus-bus").symlink_to(BIN / "nexus-bus")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env["NEXUS_WORKER__METRICS_PORT"] = str(free_port())  # two workers must not clash on it
    argv = [".venv/bin/nexus-bus", "up", "--nats-port", "0", "--redis-port", "0",
            "--http-port", "0"]
    with (folder / "up.out").open("wb") as out, (folder / "up.err").open("wb") as err:
        proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=out, stderr=err)
    try:
        banner = wait_for_banner(folder, proc, 90)
        env.pop("NEXUS_WORKER__METRICS_PORT")
        yield UpStack(folder, proc, banner, {**env, **dict(_EXPORT.findall(banner))})
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def run(command: str, stack: UpStack, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**stack.env, "PATH": f"{BIN}{os.pathsep}{stack.env.get('PATH', '')}"}
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd or stack.folder, env=env, capture_output=True,
        text=True, timeout=30, check=False,
    )


def expected_exit(line: str) -> int:
    found = re.search(r"# exits (\d+)", line)
    return int(found.group(1)) if found else 0


def commands_of(block: str) -> list[str]:
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_up_prints_its_banner_once_every_process_answers(up: UpStack) -> None:
    # The very first command after the banner is served: no retry, no 503 no_responders.
    first = run(commands_of(readme_blocks()["tour"])[0], up)
    assert first.returncode == 0, first.stdout + first.stderr
    waited = [line for line in up.stderr().splitlines() if line.startswith("waiting for")]
    assert waited and "shim" in waited[0] and "data" in waited[0], up.stderr()
    for name in ("NEXUS_URL", "NEXUS_NATS__URL", "NEXUS_STATE_DIR", "NEXUS_TOKEN"):
        assert name in up.env, up.banner


def test_the_tour_runs_as_written(up: UpStack) -> None:
    for line in commands_of(readme_blocks()["tour"]):
        done = run(line, up)
        assert done.returncode == expected_exit(line), (line, done.stdout, done.stderr)
        assert done.stderr == "", (line, done.stderr)  # a one-shot call prints its result only
    got = run(".venv/bin/nexus-bus call data.get '{\"key\": \"hello\"}'", up)
    assert json.loads(got.stdout)["value"] == {"n": 1}


def test_the_python_and_curl_snippets_run_as_written(up: UpStack, tmp_path: Path) -> None:
    blocks = readme_blocks()
    run(".venv/bin/nexus-bus call data.put '{\"key\": \"hello\", \"value\": {\"n\": 1}}'", up)
    for name in ("nats-py", "gateway"):
        script = tmp_path / f"{name}.py"
        script.write_text(blocks[name])
        done = run(f"{shlex.quote(sys.executable)} {script}", up, cwd=tmp_path)
        assert done.returncode == 0, (name, done.stdout, done.stderr)
        assert done.stderr == "", (name, done.stderr)
    assert run(f"{sys.executable} {tmp_path / 'nats-py.py'}", up).stdout.startswith("200 ")
    gateway = run(f"{sys.executable} {tmp_path / 'gateway.py'}", up, cwd=tmp_path).stdout
    assert gateway.splitlines()[-1] == "not_found 404", gateway
    curl = run(blocks["curl"], up)
    assert json.loads(curl.stdout)["value"] == {"n": 1}, curl.stdout


def test_your_own_operations_run_from_another_folder(up: UpStack, tmp_path: Path) -> None:
    """A worker of yours, in a folder of yours outside the stack's: imports and keys found."""
    blocks = readme_blocks()
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "pricing.py").write_text(blocks["mypkg/pricing.py"])
    worker_line, *calls = commands_of(blocks["worker"])
    assert worker_line.endswith("&")
    env = {**up.env, "PATH": f"{BIN}{os.pathsep}{up.env.get('PATH', '')}"}
    with (tmp_path / "worker.err").open("wb") as err:
        worker = subprocess.Popen(
            shlex.split(worker_line.rstrip("& ")), cwd=tmp_path, env=env, stderr=err
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and worker.poll() is None:  # until it subscribed
            if "no_responders" not in run(calls[-1], up, cwd=tmp_path).stdout:
                break
            time.sleep(0.1)
        for line in calls:
            done = run(line, up, cwd=tmp_path)
            assert done.returncode == 0, (line, done.stdout, (tmp_path / "worker.err").read_text())
        assert json.loads(done.stdout) == {"sku": "apple", "cents": 120}
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(15)


def metric_values(url: str, name: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines() if line.startswith(name)
    }


def post(stack: UpStack, action: str, body: object) -> int:
    """POST /v1/data/<action> through the shim; the status."""
    request = urllib.request.Request(
        f"{stack.env['NEXUS_URL']}/v1/data/{action}", data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {stack.env['NEXUS_TOKEN']}",
                 "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_every_process_exposes_its_own_metrics(up: UpStack) -> None:
    endpoints = dict(re.findall(r"(worker-\d|shim)\s+(http://\S+/metrics)", up.banner))
    assert set(endpoints) == {"worker-1", "worker-2", "shim"}, up.banner
    assert len(set(endpoints.values())) == 3
    post(up, "put", {"key": "m", "value": 1})
    for _ in range(8):  # both workers of the queue group serve some of these
        post(up, "get", {"key": "m"})
        post(up, "get", {"key": "absent"})
    errors: dict[str, float] = {}
    ratios: dict[str, float] = {}
    for name in ("worker-1", "worker-2"):
        errors.update(metric_values(endpoints[name], "nexus_error_rate_total"))
        ratios.update(metric_values(endpoints[name], "nexus_cache_hit_ratio"))
    assert errors.get('nexus_error_rate_total{code="not_found",op="data"}', 0) >= 1, errors
    assert 'nexus_cache_hit_ratio{cache="data"}' in ratios, ratios
    url = up.env["NEXUS_URL"] + "/v1/data/get"
    request = urllib.request.Request(url, data=b"k=v", method="POST")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(request, timeout=5)  # 415: refused by the shim itself
    shim_errors = metric_values(endpoints["shim"], "nexus_error_rate_total")
    assert any("unsupported_media_type" in k for k in shim_errors), shim_errors



def test_the_compose_preparation_runs_as_written(tmp_path: Path) -> None:
    """The compose block's own steps, in a copy of compose/; `docker compose` needs a Docker
    engine (none here): its file is checked by test_monitoring and test_compose_configs."""
    import shutil

    shutil.copytree(ROOT / "compose", tmp_path / "compose")
    (tmp_path / ".venv" / "bin").mkdir(parents=True)
    (tmp_path / ".venv" / "bin" / "nexus-bus").symlink_to(BIN / "nexus-bus")
    steps = [line for line in commands_of(readme_blocks()["compose"]) if "docker" not in line]
    assert len(steps) == 3, steps
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    done = subprocess.run(
        ["bash", "-ec", "\n".join(steps)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "compose" / ".env").read_text().startswith("# Copy to compose/.env")
    keys = tmp_path / "compose" / "secrets" / "keys"
    assert any(keys.iterdir()), "no signing key was generated"
    # The containers run as the keys' owner (the key is readable by its owner alone).
    env_lines = (tmp_path / "compose" / ".env").read_text().splitlines()
    assert env_lines[-2:] == [f"NEXUS_UID={os.getuid()}", f"NEXUS_GID={os.getgid()}"]
