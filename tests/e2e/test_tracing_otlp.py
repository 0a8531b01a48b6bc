"""One request through real NGINX → shim process → worker process → Redis is one trace,
exported by both processes over OTLP/HTTP (protobuf) to a receiver that decodes it.

The receiver is a plain HTTP server in the test that speaks the OTLP/HTTP trace endpoint
(`POST /v1/traces`, `application/x-protobuf`) with the official protobuf types from
`opentelemetry-proto`; nothing of the exporters is replaced.
"""

from __future__ import annotations

import gzip
import http.server
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from nexus_bus.embedded import ServerProcess, free_port
from tests.conftest import issue_test_token, shared_keys_dir
from tests.e2e.test_nginx import CONFIG, NGINX, render_config, stop

pytestmark = pytest.mark.skipif(
    NGINX is None, reason="nginx is not installed (make test installs Debian's nginx)"
)

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"


@dataclass(frozen=True)
class ExportedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str
    attributes: dict[str, Any]
    events: list[str]


class OtlpReceiver(http.server.ThreadingHTTPServer):
    """Collects the spans POSTed to /v1/traces."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _OtlpHandler)
        self.spans: list[ExportedSpan] = []
        self.lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/traces"


class _OtlpHandler(http.server.BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        if self.path != "/v1/traces" or self.headers["Content-Type"] != "application/x-protobuf":
            self.send_error(415)
            return
        request = ExportTraceServiceRequest.FromString(body)
        decoded = []
        for resource_spans in request.resource_spans:
            resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    decoded.append(
                        ExportedSpan(
                            service=resource["service.name"],
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            events=[e.name for e in span.events],
                        )
                    )
        with self.server.lock:
            self.server.spans.extend(decoded)
        reply = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    server = OtlpReceiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "a process exited; see its log in tmp_path"
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


@pytest.mark.slow
def test_one_request_through_nginx_is_one_exported_trace(
    receiver: OtlpReceiver,
    local_nats: ServerProcess,
    local_redis: ServerProcess,
    tmp_path: Path,
    uid: str,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEXUS_", "OTEL_"))}
    env |= {
        "NEXUS_NATS__URL": local_nats.url,
        "NEXUS_REDIS__URL": local_redis.url + "/0",
        "NEXUS_AUTH__KEYS_DIR": str(shared_keys_dir()),
        "NEXUS_HTTP__TRUSTED_PROXIES": '["127.0.0.1/32"]',
        "NEXUS_HTTP__DRAIN_DELAY_S": "0",
        "NEXUS_LOG__LEVEL": "WARNING",
        "NEXUS_TRACING__OTLP_ENDPOINT": receiver.endpoint,
        "NEXUS_TRACING__BATCH_DELAY_S": "0.05",  # export within 50 ms instead of 1 s
        # The read crosses to the worker: a shim answering it from the cache makes no
        # worker spans (test_tracing.py follows that path).
        "NEXUS_HTTP__CACHED_READS": "false",
    }
    nexus = [sys.executable, "-m", "nexus_bus"]
    shim_port, edge_port = free_port(), free_port()
    worker = start([*nexus, "worker", "--ops", "data"], env, tmp_path / "worker.log")
    shim = start([*nexus, "shim", "--port", str(shim_port)], env, tmp_path / "shim.log")
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_config(CONFIG.read_text(), tmp_path, edge_port, [shim_port]))
    assert NGINX is not None
    nginx = start(
        [NGINX, "-p", str(tmp_path), "-c", str(conf), "-g", "daemon off;"],
        {},
        tmp_path / "nginx.stderr",
    )
    try:
        wait_ready(f"http://127.0.0.1:{shim_port}/readyz", shim)
        wait_ready(f"http://127.0.0.1:{edge_port}/healthz", nginx)
        auth = {"Authorization": f"Bearer {issue_test_token()}"}
        edge = f"http://127.0.0.1:{edge_port}"
        deadline = time.monotonic() + 20  # the worker may still be subscribing
        while True:
            put = httpx.post(f"{edge}/v1/data/put", json={"key": uid, "value": 7}, headers=auth)
            if put.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert put.status_code == 200, put.text
        got = httpx.post(
            f"{edge}/v1/data/get",
            json={"key": uid},
            headers={**auth, "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"},
        )
        assert got.status_code == 200 and got.json()["value"] == 7

        def trace() -> list[ExportedSpan]:
            with receiver.lock:
                return [s for s in receiver.spans if s.trace_id == TRACE_ID]

        # The request's spans end in two processes and leave in their batches: wait for all.
        expected = {"POST /v1/{op}/{action}", "request nexus.data.get", "process nexus.data.get"}
        deadline = time.monotonic() + 10
        while not (
            expected <= {s.name for s in trace()}
            and any(s.attributes.get("db.system") == "redis" for s in trace())
        ):
            assert time.monotonic() < deadline, [s.name for s in trace()]
            time.sleep(0.05)
        spans = trace()
    finally:
        for proc in (nginx, shim, worker):
            stop(proc)

    by_parent: dict[str, list[ExportedSpan]] = {}
    for span in spans:
        by_parent.setdefault(span.parent_id, []).append(span)

    def only_child(parent: ExportedSpan | str, name: str) -> ExportedSpan:
        parent_id = parent if isinstance(parent, str) else parent.span_id
        found = [s for s in by_parent.get(parent_id, []) if s.name == name]
        assert len(found) == 1, (name, [(s.name, s.parent_id) for s in spans])
        return found[0]

    http_span = only_child(CALLER_SPAN, "POST /v1/{op}/{action}")
    request = only_child(http_span, "request nexus.data.get")
    process = only_child(request, "process nexus.data.get")
    handle = only_child(process, "handle")
    assert (http_span.service, request.service) == ("nexus-shim", "nexus-shim")
    assert process.service == handle.service == "nexus-worker-data"
    assert http_span.attributes["http.route"] == "/v1/{op}/{action}"
    assert request.attributes["messaging.destination.name"] == "nexus.data.get"
    redis_spans = [s for s in by_parent.get(handle.span_id, []) if s.attributes.get("db.system")]
    assert redis_spans and all(s.service == "nexus-worker-data" for s in redis_spans)
    assert {s.name for s in by_parent[process.span_id]} == {"handle"}
    assert process.events == ["authenticate", "validate"]  # the steps before the handler
