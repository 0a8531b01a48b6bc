"""The compose stack (compose/docker-compose.yml) brought up for real, wherever Docker answers.

testcontainers' `DockerCompose` runs the very compose file plus an override generated here,
which changes only what a test run must: the project is named `nexus-bus-compose-test`; every
published port goes to an ephemeral host port (`!override`), so a developer's own stack or
anything else on :8080 never collides; and the shims and workers get a verify-only keys
directory made for the run (see `keys`). The images are pulled first, and when they cannot be
the tests skip, naming what failed; then the nexus image is built from compose/Dockerfile and
`docker compose up --wait` returns once every healthcheck passes. Checked end to end:

- a token-authenticated `data.put` / `data.get` through NGINX answers 200 (and 401 without);
- Prometheus has every target of compose/prometheus/prometheus.yml `up`, and its Alertmanager;
- the traced request's spans reach Jaeger from the shim and the data worker;
- Loki holds the shim's access line for that trace id, with no trace id among its labels;
- Consul lists every shim and worker replica, passing;
- Grafana has the provisioned data sources and dashboard.

`docker compose down --volumes` runs before (what an interrupted run left) and always after.

A run takes minutes (about 2 GB of images the first time, the image build, a 3-node JetStream
cluster), so it is opt-in: `make test-compose` sets NEXUS_TEST_COMPOSE=1. Without a Docker
engine (these CI machines) the stack tests skip, saying so;
`test_the_compose_file_still_has_what_this_test_relies_on` always runs, so this module cannot
drift from the compose file unnoticed.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from testcontainers.compose import DockerCompose
from testcontainers.core.docker_client import DockerClient

from nexus_bus.auth import Keyring, TokenCodec, generate_key
from nexus_bus.constants import AUTH_PUBLIC_KEY_SUFFIX, SHIM_SERVICE
from nexus_bus.discovery.documents import service_name
from tests import servers

COMPOSE = Path(__file__).resolve().parents[2] / "compose"
PROJECT = "nexus-bus-compose-test"
OPT_IN = "NEXUS_TEST_COMPOSE"
MIN_COMPOSE = (2, 24, 4)  # the first Docker Compose that reads the override's `!override`
KEYS_IN_CONTAINER = "/run/secrets/nexus-keys"
# The services the checks talk to, by the container port each publishes.
ENDPOINTS = {
    "nginx": 8080,
    "prometheus": 9090,
    "jaeger": 16686,
    "loki": 3100,
    "consul": 8500,
    "grafana": 3000,
}
TRACED_SERVICES = {SHIM_SERVICE, "nexus-worker-data"}
STACK_TIMEOUT_S = 1800  # pulls and the image build on a cold machine; a warm run is minutes
POLL_S = 1.0

# Every test, the always-run one too: the stack's setup falls in the first test to use it,
# and its `down --volumes` in the module's last test, whichever that is.
pytestmark = pytest.mark.timeout(STACK_TIMEOUT_S)

T = TypeVar("T")


def compose_doc() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    return doc


def replicas(service: dict[str, Any]) -> int:
    return int(service.get("deploy", {}).get("replicas", 1))


def nexus_services(doc: dict[str, Any]) -> list[str]:
    """The shims and workers: the services built from compose/Dockerfile."""
    return [name for name, service in doc["services"].items() if "build" in service]


def image_services(doc: dict[str, Any]) -> list[str]:
    return [name for name, service in doc["services"].items() if "image" in service]


def container_port(spec: str) -> str:
    """`"8080:8080"` -> `"8080"`, `"8600:8600/udp"` -> `"8600/udp"`: published anywhere."""
    return spec.rsplit(":", 1)[-1]


def interpolated_variables() -> set[str]:
    """What the compose file takes from `.env` (`${NAME}`; `$$NAME` is the container's)."""
    text = (COMPOSE / "docker-compose.yml").read_text()
    return set(re.findall(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)", text))


def base_image() -> str:
    """The nexus image's base (its FROM): pulled up front, like the stack's own images."""
    [image] = re.findall(r"^FROM\s+(\S+)", (COMPOSE / "Dockerfile").read_text(), re.MULTILINE)
    return str(image)


def expected_targets(doc: dict[str, Any]) -> dict[str, int]:
    """How many targets each Prometheus job must have: its static targets, plus every replica
    of the services its DNS service discovery names."""
    config = yaml.safe_load((COMPOSE / "prometheus" / "prometheus.yml").read_text())
    counts: dict[str, int] = {}
    for job in config["scrape_configs"]:
        static = sum(len(group["targets"]) for group in job.get("static_configs", []))
        discovered = sum(
            replicas(doc["services"][name])
            for sd in job.get("dns_sd_configs", [])
            for name in sd["names"]
        )
        counts[job["job_name"]] = static + discovered
    return counts


def expected_registrations(doc: dict[str, Any]) -> dict[str, int]:
    """Consul service name -> instances: every shim replica as `nexus-shim`, every worker
    replica under `nexus-<op>` for each op it serves (docs/discovery.md)."""
    counts: dict[str, int] = {}
    for name in nexus_services(doc):
        service = doc["services"][name]
        command = service["command"]
        if command[0] == "shim":
            names = [SHIM_SERVICE]
        else:
            names = [service_name(op) for op in command[command.index("--ops") + 1].split(",")]
        for registered in names:
            counts[registered] = counts.get(registered, 0) + replicas(service)
    return counts


def override_text(doc: dict[str, Any], keys_dir: Path) -> str:
    """The run's override file: project name, ephemeral host ports, the run's keys."""
    nexus = set(nexus_services(doc))
    lines = [f"name: {PROJECT}", "services:"]
    for name, service in doc["services"].items():
        entries = []
        if "ports" in service:
            ports = [container_port(spec) for spec in service["ports"]]
            entries.append(f"    ports: !override {json.dumps(ports)}")
        if name in nexus:  # merged by target: replaces ./secrets/keys
            entries.append(f"    volumes: {json.dumps([f'{keys_dir}:{KEYS_IN_CONTAINER}:ro'])}")
        if entries:
            lines += [f"  {name}:", *entries]
    return "\n".join(lines) + "\n"


def tail(text: str | bytes | None, lines: int = 3) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    kept = [line for line in (text or "").splitlines() if line.strip()]
    return "\n".join(kept[-lines:]) or "(no output)"


def describe(seen: object) -> str:
    if isinstance(seen, httpx.Response):
        return f"HTTP {seen.status_code} {seen.text[:500]}"
    return repr(seen)[:2000]


def last_logs(compose: DockerCompose, lines: int = 80) -> str:
    try:
        stdout, stderr = compose.get_logs()
    except subprocess.CalledProcessError as exc:
        return f"(`docker compose logs` failed: {tail(exc.stderr)})"
    return tail(stdout + stderr, lines)


def wait_for(check: Callable[[], tuple[bool, T]], what: str, timeout_s: float) -> T:
    """Poll `check` until it reports done, and return what it saw; fail after `timeout_s`
    showing the last thing seen (an HTTP error counts as not yet: services are starting)."""
    deadline = time.monotonic() + timeout_s
    seen: object = None
    while True:
        try:
            done, value = check()
        except (httpx.HTTPError, ValueError) as exc:
            seen = exc
        else:
            if done:
                return value
            seen = value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s; last seen: {describe(seen)}")
        time.sleep(POLL_S)


def get_json(url: str, **kwargs: Any) -> Any:
    response = httpx.get(url, timeout=10, **kwargs)
    response.raise_for_status()
    return response.json()


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=COMPOSE, capture_output=True, text=True, timeout=STACK_TIMEOUT_S, check=False
    )


@dataclass(frozen=True)
class Stack:
    doc: dict[str, Any]
    env: dict[str, str]  # what the compose file interpolates: the run's random secrets
    urls: dict[str, str]  # ENDPOINTS' service -> base URL on the Docker host
    token: str  # scopes data:put and data:get, signed with the run's key


@dataclass(frozen=True)
class Exchange:
    """One put and one traced get through NGINX, shared by the checks that follow them."""

    key: str
    value: Any
    trace_id: str
    put: httpx.Response
    got: httpx.Response
    anonymous: httpx.Response


def keys(tmp: Path) -> tuple[Path, str]:
    """A verify-only keys directory for the containers, and a token signed on this side.

    The containers run as the image's `nexus` user, which cannot read a `<kid>.pem` written
    mode 0600 by whoever runs the tests; shims and workers need only `<kid>.pub.pem` to verify
    (docs/auth.md, "verify-only deployments"), and the token is issued here.
    """
    private = tmp / "keys-private"
    kid = generate_key(private, kid="compose-test")
    mounted = tmp / "keys"
    mounted.mkdir()
    public = private / f"{kid}{AUTH_PUBLIC_KEY_SUFFIX}"
    shutil.copy(public, mounted / public.name)
    (mounted / public.name).chmod(0o644)
    mounted.chmod(0o755)
    codec = TokenCodec(Keyring.from_dir(private))
    signed = codec.issue(
        "compose-test",
        frozenset({"data:put", "data:get"}),
        3600,
        now=int(time.time()),
        jti=uuid.uuid4().hex,
    )
    return mounted, signed.token


def require_compose_cli(binary: str) -> None:
    """Skip, saying why, unless `docker compose` runs and reads `!override`."""
    if shutil.which(binary) is None:
        pytest.skip(f"a Docker engine answers but the `{binary}` command is not installed")
    result = run([binary, "compose", "version", "--short"])
    if result.returncode != 0:
        pytest.skip(f"`{binary} compose` does not run (Compose v2 needed): {tail(result.stderr)}")
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", result.stdout)
    found = tuple(int(part) for part in match.groups()) if match else None
    if found is None or found < MIN_COMPOSE:
        needed = ".".join(map(str, MIN_COMPOSE))
        pytest.skip(
            f"docker compose {result.stdout.strip()!r} is older than {needed}, the first that "
            "reads the `!override` tag of the run's override file"
        )


def pull_or_skip(compose: DockerCompose, doc: dict[str, Any]) -> None:
    """Pull every image the stack runs, and the nexus image's base; skip if one cannot be
    reached, but fail when the registry answers that a tag does not exist (a compose bug)."""
    command = compose.docker_compose_command()
    pulls = {
        "`docker compose pull`": [*command, "pull", *image_services(doc)],
        f"`{command[0]} pull {base_image()}` (compose/Dockerfile's base)": [
            command[0],
            "pull",
            base_image(),
        ],
    }
    for what, pull in pulls.items():
        result = run(pull)
        if result.returncode == 0:
            continue
        if "manifest unknown" in result.stderr:
            pytest.fail(f"{what}: the registry has no such image: {tail(result.stderr)}")
        pytest.skip(
            f"cannot pull the stack's images (no registry access?): {what} failed: "
            f"{tail(result.stderr)}"
        )


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The whole compose stack, up and healthy; `down --volumes` afterwards, whatever
    happened."""
    if not servers.docker_engine_answers():
        pytest.skip(
            "no Docker engine answers: the compose stack cannot run here "
            "(tests/integration/test_compose_configs.py and test_monitoring.py check its files)"
        )
    if os.environ.get(OPT_IN) != "1":
        pytest.skip(
            "the compose stack takes minutes (image pulls, the nexus image build, a 3-node "
            f"JetStream cluster): run it with `make test-compose` ({OPT_IN}=1)"
        )
    doc = compose_doc()
    tmp = tmp_path_factory.mktemp("compose")
    keys_dir, token = keys(tmp)
    override = tmp / "override.yml"
    override.write_text(override_text(doc, keys_dir))
    env = {name: secrets.token_hex(16) for name in sorted(interpolated_variables())}
    # Not secrets: the containers run as the owner of the keys folder (made by this process).
    env.update(NEXUS_UID=str(os.getuid()), NEXUS_GID=str(os.getgid()))
    env_file = tmp / "stack.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in env.items()))
    compose = DockerCompose(
        COMPOSE,
        compose_file_name=["docker-compose.yml", str(override)],
        env_file=str(env_file),
        build=True,
        wait=True,
    )
    require_compose_cli(compose.docker_compose_command()[0])
    with pytest.MonkeyPatch.context() as patch:
        # The shell outranks the env file and the override's `name`: a COMPOSE_PROJECT_NAME
        # of the caller's would have `down --volumes` take the caller's own stack with it.
        patch.setenv("COMPOSE_PROJECT_NAME", PROJECT)
        for name, value in env.items():
            patch.setenv(name, value)
        pull_or_skip(compose, doc)
        compose.stop()  # `down --volumes`: whatever an interrupted run left behind
        try:
            try:
                compose.start()  # `up --build --wait`
            except subprocess.CalledProcessError as exc:
                pytest.fail(
                    f"`{' '.join(exc.cmd)}` failed:\n{tail(exc.stderr, 30)}\n"
                    f"--- the containers' last log lines ---\n{last_logs(compose)}"
                )
            host = DockerClient().host()
            urls = {
                name: f"http://{host}:{compose.get_service_port(name, port)}"
                for name, port in ENDPOINTS.items()
            }
            yield Stack(doc=doc, env=env, urls=urls, token=token)
        finally:
            compose.stop()


@pytest.fixture(scope="module")
def exchange(stack: Stack) -> Exchange:
    edge = stack.urls["nginx"]
    auth = {"Authorization": f"Bearer {stack.token}"}
    key, value = f"compose.{uuid.uuid4().hex}", {"n": 1, "via": "nginx"}

    def put() -> tuple[bool, httpx.Response]:
        body = {"key": key, "value": value}
        response = httpx.post(f"{edge}/v1/data/put", json=body, headers=auth, timeout=10)
        return response.status_code == 200, response

    # Right after `up --wait` the data workers may still be subscribing: 503 until then.
    put_response = wait_for(put, "data.put through NGINX answering 200", 120)
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"  # sampled: recorded at any ratio
    got = httpx.post(
        f"{edge}/v1/data/get",
        json={"key": key},
        headers={**auth, "traceparent": traceparent},
        timeout=10,
    )
    anonymous = httpx.post(f"{edge}/v1/data/get", json={"key": key}, timeout=10)
    return Exchange(key, value, trace_id, put_response, got, anonymous)


def test_a_token_authenticated_put_and_get_through_nginx_answer_200(exchange: Exchange) -> None:
    assert exchange.put.status_code == 200
    assert exchange.got.status_code == 200, exchange.got.text
    assert exchange.got.json()["value"] == exchange.value
    assert exchange.anonymous.status_code == 401, exchange.anonymous.text


def test_prometheus_has_every_scrape_target_up(stack: Stack) -> None:
    prometheus = stack.urls["prometheus"]
    expected = expected_targets(stack.doc)

    def targets() -> tuple[bool, object]:
        active = get_json(f"{prometheus}/api/v1/targets", params={"state": "active"})
        active = active["data"]["activeTargets"]
        counts: dict[str, int] = {}
        for target in active:
            counts[target["scrapePool"]] = counts.get(target["scrapePool"], 0) + 1
        down = [
            (t["scrapePool"], t["labels"].get("instance"), t["health"], t["lastError"])
            for t in active
            if t["health"] != "up"
        ]
        return counts == expected and not down, {"targets": counts, "not up": down}

    # Worker targets come from DNS service discovery, refreshed every 30 s.
    wait_for(targets, f"Prometheus scraping {expected}, every target up", 180)
    alertmanagers = get_json(f"{prometheus}/api/v1/alertmanagers")["data"]
    assert alertmanagers["activeAlertmanagers"], alertmanagers


def test_the_traced_request_reaches_jaeger_from_the_shim_and_the_worker(
    stack: Stack, exchange: Exchange
) -> None:
    assert exchange.got.status_code == 200, exchange.got.text
    url = f"{stack.urls['jaeger']}/api/traces/{exchange.trace_id}"

    def trace() -> tuple[bool, list[dict[str, Any]]]:
        response = httpx.get(url, timeout=10)
        if response.status_code != 200:  # 404 until the first span arrives
            return False, []
        found = response.json()["data"] or []
        spans = [
            {
                "service": trace["processes"][span["processID"]]["serviceName"],
                "name": span["operationName"],
                "tags": {tag["key"]: tag["value"] for tag in span["tags"]},
                "logs": [
                    field["value"]
                    for log in span.get("logs") or []
                    for field in log["fields"]
                    if field["key"] == "event"
                ],
            }
            for trace in found
            for span in trace["spans"]
        ]
        names = {(span["service"], span["name"]) for span in spans}
        return (SHIM_SERVICE, "POST /v1/{op}/{action}") in names and (
            "nexus-worker-data",
            "process nexus.data.get",
        ) in names, spans

    # Processes export their spans every second (NEXUS_TRACING__BATCH_DELAY_S).
    spans = wait_for(trace, f"Jaeger holding trace {exchange.trace_id}", 90)
    assert {span["service"] for span in spans} == TRACED_SERVICES
    names = {span["name"] for span in spans}
    assert {"request nexus.data.get", "process nexus.data.get", "handle"} <= names
    (process,) = [span for span in spans if span["name"] == "process nexus.data.get"]
    assert process["logs"][:2] == ["authenticate", "validate"], process  # span events
    assert any(span["tags"].get("db.system") == "redis" for span in spans), spans


def test_loki_holds_the_shims_access_line_for_the_trace(stack: Stack, exchange: Exchange) -> None:
    query = f'{{service=~"shim-.+"}} |= "{exchange.trace_id}"'

    def streams() -> tuple[bool, Any]:
        response = httpx.get(
            f"{stack.urls['loki']}/loki/api/v1/query_range",
            params={"query": query, "limit": 100},
            timeout=10,
        )
        if response.status_code != 200:  # Loki's ingester turns ready after ~15 s
            return False, response
        result = response.json()["data"]["result"]
        return bool(result), result

    # promtail discovers containers through the Docker socket (every minute by default).
    found = wait_for(streams, f"Loki holding a shim line with trace id {exchange.trace_id}", 150)
    for stream in found:
        labels = stream["stream"]
        assert labels["service"] in {"shim-1", "shim-2"}, labels
        assert "trace_id" not in labels and "correlation_id" not in labels, labels
    records = [json.loads(line) for stream in found for _, line in stream["values"]]
    assert any(
        record.get("service") == SHIM_SERVICE and record.get("trace_id") == exchange.trace_id
        for record in records
    ), records


def test_consul_lists_every_shim_and_worker_replica_passing(stack: Stack) -> None:
    expected = expected_registrations(stack.doc)

    def passing() -> tuple[bool, dict[str, int]]:
        counts = {
            name: len(get_json(f"{stack.urls['consul']}/v1/health/service/{name}?passing=true"))
            for name in expected
        }
        return counts == expected, counts

    wait_for(passing, f"Consul listing {expected} passing", 90)


def test_grafana_has_the_provisioned_data_sources_and_dashboard(stack: Stack) -> None:
    grafana = stack.urls["grafana"]
    auth = ("admin", stack.env["GRAFANA_ADMIN_PASSWORD"])
    provisioning = COMPOSE / "grafana" / "provisioning" / "datasources" / "datasources.yml"
    sources = {source["name"] for source in yaml.safe_load(provisioning.read_text())["datasources"]}
    dashboards = sorted((COMPOSE / "grafana" / "dashboards").glob("*.json"))
    uids = {json.loads(path.read_text())["uid"] for path in dashboards}

    def provisioned() -> tuple[bool, object]:
        listed = httpx.get(f"{grafana}/api/datasources", auth=auth, timeout=10)
        if listed.status_code != 200:  # still migrating its database
            return False, listed
        names = {source["name"] for source in listed.json()}
        found = {
            uid
            for uid in uids
            if httpx.get(f"{grafana}/api/dashboards/uid/{uid}", auth=auth, timeout=10).status_code
            == 200
        }
        return sources <= names and found == uids, {"data sources": names, "dashboards": found}

    wait_for(provisioned, f"Grafana with data sources {sources} and dashboards {uids}", 120)


def test_the_compose_file_still_has_what_this_test_relies_on(tmp_path: Path) -> None:
    """Always runs (no Docker needed): the names, ports and files the stack tests use."""
    doc = compose_doc()
    services = doc["services"]
    for name, port in ENDPOINTS.items():
        assert name in services, f"the test talks to {name}, which compose no longer defines"
        published = [container_port(spec) for spec in services[name].get("ports", [])]
        assert str(port) in published, f"{name} no longer publishes {port}"
    nexus = nexus_services(doc)
    assert {"shim-1", "shim-2", "worker-data"} <= set(nexus)
    for name in nexus:
        service = services[name]
        assert service["build"]["dockerfile"] == "compose/Dockerfile", name
        assert service["environment"]["NEXUS_AUTH__KEYS_DIR"] == KEYS_IN_CONTAINER, name
        targets = [volume.split(":")[1] for volume in service["volumes"]]
        assert KEYS_IN_CONTAINER in targets, name
    assert set(services["nginx"]["depends_on"]) == {n for n in nexus if n.startswith("shim-")}
    assert urlparse(doc["x-nexus-env"]["NEXUS_TRACING__OTLP_ENDPOINT"]).hostname == "jaeger"
    assert base_image()

    # Every variable the stack interpolates is one the run fills in and .env.example documents.
    example = (COMPOSE / ".env.example").read_text()
    documented = set(re.findall(r"^([A-Z_][A-Z0-9_]*)=", example, re.MULTILINE))
    variables = interpolated_variables()
    assert "GRAFANA_ADMIN_PASSWORD" in variables and variables <= documented, variables

    # What the stack tests will count: every Prometheus job has targets, two shims and every
    # worker group register in Consul.
    counts = expected_targets(doc)
    assert all(counts.values()) and counts["nexus-worker"] >= 4, counts
    registrations = expected_registrations(doc)
    assert registrations[SHIM_SERVICE] == 2 and registrations[service_name("data")] >= 1

    # The generated override: valid YAML, every port published ephemerally, the run's keys.
    text = override_text(doc, tmp_path / "keys")
    port_lines = [line for line in text.splitlines() if line.strip().startswith("ports:")]
    assert port_lines and all("ports: !override [" in line for line in port_lines)
    override = yaml.safe_load(text.replace("!override ", ""))
    assert override["name"] == PROJECT
    for name, service in override["services"].items():
        assert name in services
        for spec in service.get("ports", []):
            assert ":" not in spec, spec  # container port only: the host picks a free one
        for volume in service.get("volumes", []):
            assert volume == f"{tmp_path / 'keys'}:{KEYS_IN_CONTAINER}:ro"
    assert {n for n, s in override["services"].items() if "volumes" in s} == set(nexus)
    assert {n for n, s in override["services"].items() if "ports" in s} == {
        n for n, s in services.items() if "ports" in s
    }
