"""The compose stack's monitoring, checked with the real tools from Debian's packages.

There is no Docker engine here, so the compose stack itself is not started. Instead:
`promtool` checks the Prometheus config and rules and runs the rule unit tests, `amtool`
checks the Alertmanager config, the compose file is validated against the Compose
specification's JSON schema, and a real Prometheus scrapes a real shim, a worker,
redis_exporter and node_exporter — every target must be `up`, and every query of the Grafana
dashboard must run on it and name only metrics that those processes really export.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from nexus_bus import Settings
from nexus_bus.embedded import free_port
from tests.conftest import shared_keys_dir

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
PROMETHEUS_DIR = COMPOSE / "prometheus"
DASHBOARDS = sorted((COMPOSE / "grafana" / "dashboards").glob("*.json"))

# Debian's packages (`make system-deps` installs them).
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
REDIS_EXPORTER = shutil.which("prometheus-redis-exporter")
NODE_EXPORTER = shutil.which("prometheus-node-exporter")

# The Compose specification's schema, extracted by `make install` (see the Makefile).
COMPOSE_SPEC = Path(sys.prefix) / "share" / "compose-spec" / "compose_spec.json"

# prometheus-nats-exporter has no Debian package and there is no Docker engine here, so its
# metrics cannot be scraped live: the dashboard may name only these, from its documentation.
NATS_EXPORTER_METRICS = frozenset(
    {"gnatsd_varz_connections", "gnatsd_varz_in_msgs", "jetstream_stream_total_messages"}
)
PROMQL_WORDS = frozenset({"and", "or", "unless", "bool", "offset"})


def need(*tools: str | None) -> None:
    if not all(tools):
        pytest.skip("Debian's prometheus packages are not installed (make test installs them)")


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every provisioned dashboard."""
    queries = []
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                queries.append((f"{path.name}: {panel['title']}", target["expr"]))
    return queries


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, labels and ranges removed)."""
    bare = re.sub(r'"[^"]*"', "", expr)
    bare = re.sub(r"\{[^}]*\}", "", bare)
    bare = re.sub(r"\[[^\]]*\]", "", bare)
    bare = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", bare)
    names = set()
    for match in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", bare):
        if not match.group(2) and match.group(1) not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can carry, including those with no sample yet."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_count", f"{name}_sum"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def http_get(url: str, timeout: float = 3.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body: bytes = response.read()
    return body.decode()


def wait_for(url: str, deadline_s: float = 30.0) -> str:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            return http_get(url)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


# --- configuration files, checked by the real tools ---------------------------------------


def test_prometheus_config_and_rules_pass_promtool(tmp_path: Path) -> None:
    need(PROMTOOL)
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    # The config names the rules where compose mounts them; point promtool at the repo's copy.
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules.yml")]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    checked = run(PROMTOOL, "check", "config", str(local))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout + checked.stderr
    rules = run(PROMTOOL, "check", "rules", str(PROMETHEUS_DIR / "rules.yml"))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_every_alert_has_a_passing_rule_unit_test() -> None:
    need(PROMTOOL)
    result = run(PROMTOOL, "test", "rules", "rules.test.yml", cwd=PROMETHEUS_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules.test.yml").read_text())["tests"]
    tested = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")  # a test that expects the alert to fire
    }
    assert alerts and alerts == tested, f"alerts without a firing test: {alerts - tested}"


def test_alertmanager_config_passes_amtool_and_routes_every_severity() -> None:
    need(AMTOOL)
    path = COMPOSE / "alertmanager" / "alertmanager.yml"
    result = run(AMTOOL, "check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    expected = {"page": "pager", "ticket": "tickets", "info": "tickets"}
    for severity in {a["labels"]["severity"] for a in alerts}:
        routed = run(
            AMTOOL, "config", "routes", "test", "--config.file", str(path), f"severity={severity}"
        )
        assert routed.stdout.strip() == expected[severity], routed.stdout + routed.stderr
    prometheus = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = prometheus["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert targets == ["alertmanager:9093"]


ALERTMANAGER = shutil.which("prometheus-alertmanager")


def fired_alerts() -> list[dict[str, str]]:
    """The label sets of what the rules' tests expect to fire (as Prometheus sends them)."""
    tests = yaml.safe_load((PROMETHEUS_DIR / "rules.test.yml").read_text())["tests"]
    return [
        {"alertname": case["alertname"], **alert["exp_labels"]}
        for test in tests
        for case in test.get("alert_rule_test", [])
        for alert in case.get("exp_alerts", [])
    ]


def test_a_process_down_leaves_the_error_rate_and_latency_alerts_active(tmp_path: Path) -> None:
    """A real Alertmanager with the compose config, sent the alerts with the labels the rules
    give them. docs/monitoring.md said a process that is down inhibits its own error-rate and
    latency alerts, but those alerts are per operation across replicas, with no `instance`
    label, and the inhibit rule (`equal: [instance]`) matched none: they were never
    inhibited. The rule is gone and the page says what happens."""
    need(ALERTMANAGER)
    assert ALERTMANAGER
    port = free_port()
    with started(
        [
            ALERTMANAGER,
            f"--config.file={COMPOSE / 'alertmanager' / 'alertmanager.yml'}",
            f"--storage.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        tmp_path / "alertmanager.log",
    ):
        base = f"http://127.0.0.1:{port}/api/v2/alerts"
        wait_for(f"http://127.0.0.1:{port}/-/ready")
        down = {"alertname": "NexusProcessDown", "severity": "page",
                "job": "nexus-worker", "instance": "10.0.0.5:9100"}  # fmt: skip
        by_name = {a["alertname"]: a for a in fired_alerts()}
        sent = [down, by_name["NexusHighErrorRate"], by_name["NexusHighLatency"]]
        request = urllib.request.Request(
            base,
            data=json.dumps([{"labels": labels} for labels in sent]).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=5):
            pass
        states = {a["labels"]["alertname"]: a["status"] for a in json.loads(http_get(base))}
    assert {name: state["state"] for name, state in states.items()} == {
        "NexusProcessDown": "active",
        "NexusHighErrorRate": "active",
        "NexusHighLatency": "active",
    }
    config = yaml.safe_load((COMPOSE / "alertmanager" / "alertmanager.yml").read_text())
    assert "inhibit_rules" not in config  # none that could never match


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    if not COMPOSE_SPEC.exists():
        pytest.skip(f"{COMPOSE_SPEC} is missing (make install extracts it)")
    validator = jsonschema.Draft7Validator(json.loads(COMPOSE_SPEC.read_text()))
    doc = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    errors = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
    assert not errors, errors
    # The schema is strict enough to catch a misspelt key.
    doc["services"]["redis"]["helthcheck"] = {}
    assert not validator.is_valid(doc)


def test_compose_runs_every_exporter_prometheus_scrapes() -> None:
    services = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host == "localhost" or host in services, f"{job['job_name']}: {host}"
        for sd in job.get("dns_sd_configs", []):
            assert all(name in services for name in sd["names"])
    assert {"alertmanager", "redis-exporter", "node-exporter", "grafana"} <= set(services)


def test_dashboard_is_provisioned_and_its_panels_have_queries() -> None:
    assert DASHBOARDS, "no dashboard under compose/grafana/dashboards"
    provider = yaml.safe_load(
        (COMPOSE / "grafana" / "provisioning" / "dashboards" / "nexus.yml").read_text()
    )
    grafana = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())["services"]["grafana"]
    mounted = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounted[provider["providers"][0]["options"]["path"]] == "./grafana/dashboards"
    titles = " ".join(title for title, _ in dashboard_queries()).lower()
    for subject in (
        "request rate",
        "errors by code",
        "p99",
        "cache hit ratio",
        "circuit",
        "dead-letter",
        "nats",
        "redis",
    ):
        assert subject in titles, subject


# --- a real Prometheus scraping real processes ---------------------------------------------


@contextlib.contextmanager
def started(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A process for the test's duration, its output in `log` (read it when a test fails)."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


@pytest.fixture
def scraped_stack(settings: Settings, tmp_path: Path) -> Iterator[dict[str, str]]:
    """A shim, a worker and the exporters as separate processes: job name -> /metrics URL."""
    need(PROMETHEUS, REDIS_EXPORTER, NODE_EXPORTER)
    assert PROMETHEUS and REDIS_EXPORTER and NODE_EXPORTER
    ports = {job: free_port() for job in ("nexus-shim", "nexus-worker", "redis", "node")}
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env |= {
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": settings.redis.url,
        "NEXUS_AUTH__KEYS_DIR": str(shared_keys_dir()),
        "NEXUS_LOG__LEVEL": "WARNING",
        "NEXUS_WORKER__METRICS_PORT": str(ports["nexus-worker"]),
    }
    nexus = [sys.executable, "-m", "nexus_bus"]
    redis_address = settings.redis.url.rsplit("/", 1)[0]
    with (
        started([*nexus, "worker", "--ops", "data"], tmp_path / "worker.log", env),
        started(
            [*nexus, "shim", "--host", "127.0.0.1", "--port", str(ports["nexus-shim"])],
            tmp_path / "shim.log",
            env,
        ),
        started(
            [
                REDIS_EXPORTER,
                f"--redis.addr={redis_address}",
                f"--web.listen-address=127.0.0.1:{ports['redis']}",
            ],
            tmp_path / "redis_exporter.log",
        ),
        started(
            [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{ports['node']}"],
            tmp_path / "node_exporter.log",
        ),
    ):
        urls = {job: f"http://127.0.0.1:{port}/metrics" for job, port in ports.items()}
        for url in urls.values():
            wait_for(url)
        yield urls


@pytest.fixture
def prometheus(scraped_stack: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """A real Prometheus with the compose config's jobs, pointed at the local processes."""
    assert PROMETHEUS
    config: dict[str, Any] = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["rule_files"] = [str(PROMETHEUS_DIR / "rules.yml")]
    config.pop("alerting")
    jobs = []
    for job in config["scrape_configs"]:
        if job["job_name"] in scraped_stack:
            netloc = urllib.parse.urlsplit(scraped_stack[job["job_name"]]).netloc
            jobs.append({"job_name": job["job_name"], "static_configs": [{"targets": [netloc]}]})
    config["scrape_configs"] = jobs
    assert {j["job_name"] for j in jobs} == set(scraped_stack), "a compose job was renamed"
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    with started(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        tmp_path / "prometheus.log",
    ):
        base = f"http://127.0.0.1:{port}"
        wait_for(f"{base}/-/ready")
        yield base


def query(base: str, promql: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    try:
        doc: dict[str, Any] = json.loads(http_get(url))
    except urllib.error.HTTPError as exc:  # 400 with the parser's error in the body
        doc = json.loads(exc.read())
    return doc


@pytest.mark.slow
def test_real_prometheus_scrapes_every_process_and_runs_every_dashboard_query(
    prometheus: str, scraped_stack: dict[str, str]
) -> None:
    deadline = time.monotonic() + 30
    while True:
        targets = json.loads(http_get(f"{prometheus}/api/v1/targets"))["data"]["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        if set(health) == set(scraped_stack) and set(health.values()) == {"up"}:
            break
        assert time.monotonic() < deadline, f"targets not all up: {targets}"
        time.sleep(0.5)

    exported = set().union(*(exported_names(http_get(url)) for url in scraped_stack.values()))
    assert "nexus_request_duration_seconds_bucket" in exported and "redis_up" in exported
    for title, expr in dashboard_queries():
        unknown = metric_names(expr) - exported - NATS_EXPORTER_METRICS - {"up"}
        assert not unknown, f"{title}: {expr} names metrics nothing exports: {unknown}"
        live = expr.replace("$__rate_interval", "1m").replace("$op", ".*")
        result = query(prometheus, live)
        assert result["status"] == "success", f"{title}: {result}"


def test_the_server_errors_panel_counts_a_handlers_own_5xx_code(tmp_path: Path) -> None:
    """A handler's own NexusError subclass (here `payment_failed`, 502) is a server error
    the NexusHighErrorRate alert counts, by status. The "Server errors" panel listed five
    codes by name instead, and showed nothing for it."""
    need(PROMTOOL)
    [expr] = [e for title, e in dashboard_queries() if title.endswith(": Server errors")]
    live = expr.replace("$__rate_interval", "1m").replace("$op", ".*")
    (tmp_path / "none.yml").write_text("groups: []\n")
    # What a worker exports after answering 60 requests a minute with that error.
    tests = {
        "rule_files": ["none.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'nexus_error_rate_total{op="shop", code="payment_failed"}',
                        "values": "0+60x5",
                    },
                    {
                        "series": 'nexus_request_duration_seconds_count{op="shop", action="pay",'
                        ' status="502", transport="nats"}',
                        "values": "0+60x5",
                    },
                ],
                "promql_expr_test": [
                    {"expr": f"({live}) > bool 0", "eval_time": "5m",
                     "exp_samples": [{"labels": '{transport="nats"}', "value": 1}]},
                ],
            }
        ],
    }
    (tmp_path / "panel.test.yml").write_text(yaml.safe_dump(tests))
    result = run(PROMTOOL, "test", "rules", "panel.test.yml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
