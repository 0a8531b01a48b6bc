"""A Consul agent DOUBLE for tests: a real HTTP server speaking the agent API nexus-bus calls.

No Consul binary can be installed on these machines, so this double stands in for
the local agent. It is not a mock: it is an HTTP server on a real port, called by py-consul
over the network, and it really *runs* the health checks it is given:

- HTTP checks: `GET <HTTP>` every `Interval` (counted, as Consul does, from the end of the
  previous run) with the registered `Timeout` (Consul's default 10 s when absent); 2xx is
  passing, 429 warning, anything else or no answer in time critical. The first run starts
  at once (Consul staggers it randomly within the interval).
- TTL checks: critical once `TTL` passes without a pass/warn/fail update.
- `DeregisterCriticalServiceAfter`: a service whose check stays critical that long is removed.

Endpoints, with the JSON shapes of Consul's API documentation (field names as Consul writes
them; request bodies are read case-insensitively, as Consul reads them):

    PUT /v1/agent/service/register[?replace-existing-checks=true]
    PUT /v1/agent/service/deregister/<service id>
    PUT /v1/agent/check/pass|warn|fail/<check id>[?note=...]
    PUT /v1/agent/check/update/<check id>          {"Status", "Output"}
    GET /v1/agent/services
    GET /v1/agent/checks
    GET /v1/catalog/services                       (X-Consul-Index)
    GET /v1/health/service/<name>[?passing]        (X-Consul-Index)

Service meta beyond Consul's limits (64 pairs, keys of 128 characters, values of 512) is
refused with 400, as the agent does. With `acl_token` set, every request must carry it in
`X-Consul-Token` (403 otherwise). With `tls`, it speaks HTTPS.
Anything else answers 404. `runs` records every HTTP check run (for interval/timeout
assertions) and `requests` every request line with its token header.
"""

from __future__ import annotations

import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

NODE = "double-node"
DATACENTER = "dc1"
_DURATION = re.compile(r"([\d.]+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DEFAULT_HTTP_TIMEOUT_S = 10.0
_TICK_S = 0.02
_TTL_EXPIRED = "TTL expired"


def parse_duration(text: str) -> float:
    """A Go duration (`5s`, `500ms`, `1m30s`) in seconds.

    Raises:
        ValueError: not a Go duration.
    """
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"invalid duration {text!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _lower_keys(value: Any) -> Any:
    """Consul decodes request bodies case-insensitively; so does the double."""
    if isinstance(value, dict):
        return {str(k).lower(): v for k, v in value.items()}
    return value


@dataclass
class CheckRun:
    """One run of an HTTP check."""

    check_id: str
    started: float  # time.monotonic()
    elapsed: float
    timeout: float
    status: str
    http_status: int | None


@dataclass
class Check:
    """A registered check and its live state."""

    check_id: str
    name: str
    service_id: str
    service_name: str
    service_tags: list[str]
    kind: str  # "http" or "ttl"
    http: str = ""
    interval: float = 0.0
    interval_text: str = ""
    timeout: float = _DEFAULT_HTTP_TIMEOUT_S
    timeout_text: str = ""
    ttl: float = 0.0
    deregister_after: float | None = None
    status: str = "critical"  # Consul's initial status of a new check
    output: str = ""
    notes: str = ""
    ttl_deadline: float = 0.0
    critical_since: float | None = field(default_factory=time.monotonic)
    definition: dict[str, Any] = field(default_factory=dict)

    def set_status(self, status: str, output: str) -> None:
        """Change the status, tracking since when the check is critical."""
        if status == "critical" and self.status != "critical":
            self.critical_since = time.monotonic()
        elif status != "critical":
            self.critical_since = None
        self.status, self.output = status, output

    def to_json(self) -> dict[str, Any]:
        """The check as GET /v1/agent/checks and /v1/health/service show it."""
        return {
            "Node": NODE,
            "CheckID": self.check_id,
            "Name": self.name,
            "Status": self.status,
            "Notes": self.notes,
            "Output": self.output,
            "ServiceID": self.service_id,
            "ServiceName": self.service_name,
            "ServiceTags": list(self.service_tags),
            "Type": self.kind,
            "Interval": self.interval_text,
            "Timeout": self.timeout_text,
            "ExposedPort": 0,
            "Definition": self.definition,
            "CreateIndex": 0,
            "ModifyIndex": 0,
        }


class BadRequest(Exception):
    """A request the real agent refuses with 400."""


class InvalidMeta(BadRequest):
    """Service meta beyond Consul's limits (`structs.ValidateServiceMetadata`)."""


_META_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _validate_meta(meta: dict[str, Any]) -> None:
    """Consul's limits: 64 pairs, keys of 128 characters of [A-Za-z0-9_-], values of 512."""
    if len(meta) > 64:
        raise InvalidMeta("Invalid Service Meta: cannot contain more than 64 key/value pairs")
    for key, value in meta.items():
        problem = (
            "Key cannot be blank" if not key
            else "Key is too long (limit: 128 characters)" if len(key) > 128
            else "Key contains invalid characters" if not _META_KEY.fullmatch(key)
            else "Value is too long (limit: 512 characters)" if len(str(value)) > 512
            else None
        )
        if problem:
            raise InvalidMeta(
                f"Invalid Service Meta: Couldn't load metadata pair ('{key}', '{value}'): {problem}"
            )


class ConsulAgentDouble:
    """The double: `start()`, point clients at `address`, `stop()`."""

    def __init__(
        self, port: int = 0, *, acl_token: str | None = None, tls: ssl.SSLContext | None = None
    ) -> None:
        self._lock = threading.RLock()
        self._stopped = threading.Event()
        self.acl_token = acl_token
        self.services: dict[str, dict[str, Any]] = {}
        self.checks: dict[str, Check] = {}
        self.runs: list[CheckRun] = []
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, token header
        self.index = 1
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        if tls is not None:  # HTTPS (the agent's https port), with `tls`'s client-cert policy
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        """The port the double listens on."""
        return int(self._server.server_address[1])

    @property
    def address(self) -> str:
        """The agent's address as `consul.address` takes it."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ConsulAgentDouble:
        """Serve and run checks in background threads."""
        for target in (self._server.serve_forever, self._tick):
            thread = threading.Thread(target=target, daemon=True, name="consul-double")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop serving and running checks."""
        self._stopped.set()
        self._server.shutdown()
        self._server.server_close()
        for thread in self._threads:
            thread.join(5)

    def __enter__(self) -> ConsulAgentDouble:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # What tests read

    def service_ids(self) -> set[str]:
        """The ids of the registered services."""
        with self._lock:
            return set(self.services)

    def check_of(self, service_id: str) -> Check | None:
        """The (first) check of a service."""
        with self._lock:
            return next((c for c in self.checks.values() if c.service_id == service_id), None)

    def runs_of(self, check_id: str) -> list[CheckRun]:
        """Every HTTP run of a check so far."""
        with self._lock:
            return [r for r in self.runs if r.check_id == check_id]

    def forget(self, service_id: str) -> None:
        """Drop a service and its checks, as an agent restarted without its state does."""
        self._deregister(service_id)

    # Agent state

    def _register(self, body: dict[str, Any], replace_checks: bool) -> None:
        doc = _lower_keys(body)
        name = doc.get("name")
        if not name:
            raise BadRequest("Missing service name")
        service_id = doc.get("id") or name
        _validate_meta(dict(doc.get("meta") or {}))
        tags = list(doc.get("tags") or [])
        service = {
            "ID": service_id,
            "Service": name,
            "Tags": tags,
            "Meta": dict(doc.get("meta") or {}),
            "Port": int(doc.get("port") or 0),
            "Address": doc.get("address") or "",
            "Weights": doc.get("weights") or {"Passing": 1, "Warning": 1},
            "EnableTagOverride": bool(doc.get("enabletagoverride", False)),
            "Datacenter": DATACENTER,
        }
        definitions = list(doc.get("checks") or [])
        if doc.get("check"):
            definitions.insert(0, doc["check"])
        checks = [
            self._check(_lower_keys(d), service_id, name, tags, n, len(definitions))
            for n, d in enumerate(definitions, 1)
        ]
        with self._lock:
            self.services[service_id] = service
            if replace_checks:
                for check_id in [c.check_id for c in self.checks.values()]:
                    if self.checks[check_id].service_id == service_id:
                        del self.checks[check_id]
            for check in checks:
                previous = self.checks.get(check.check_id)
                if previous is not None:  # Consul keeps a re-registered check's status
                    check.status, check.output = previous.status, previous.output
                    check.critical_since = previous.critical_since
                self.checks[check.check_id] = check
                if check.kind == "http":
                    self._spawn(check)
            self.index += 1

    def _check(
        self, doc: dict[str, Any], service_id: str, name: str, tags: list[str], n: int, of: int
    ) -> Check:
        default_id = f"service:{service_id}" if of == 1 else f"service:{service_id}:{n}"
        check = Check(
            check_id=doc.get("checkid") or doc.get("id") or default_id,
            name=doc.get("name") or f"Service '{name}' check",
            service_id=service_id,
            service_name=name,
            service_tags=tags,
            kind="http" if doc.get("http") else "ttl",
            notes=doc.get("notes") or "",
            definition=doc,
        )
        try:
            if doc.get("http"):
                check.http = doc["http"]
                check.interval_text = doc.get("interval") or ""
                check.interval = parse_duration(check.interval_text)
                if doc.get("timeout"):
                    check.timeout_text = doc["timeout"]
                    check.timeout = parse_duration(check.timeout_text)
            elif doc.get("ttl"):
                check.ttl = parse_duration(doc["ttl"])
                check.ttl_deadline = time.monotonic() + check.ttl
            else:
                raise BadRequest("Invalid check: TTL or HTTP+Interval must be specified")
            after = doc.get("deregistercriticalserviceafter")
            check.deregister_after = parse_duration(after) if after else None
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        if doc.get("status"):
            check.set_status(doc["status"], "")
        return check

    def _deregister(self, service_id: str) -> bool:
        with self._lock:
            if self.services.pop(service_id, None) is None:
                return False
            for check_id in [c for c, v in self.checks.items() if v.service_id == service_id]:
                del self.checks[check_id]
            self.index += 1
            return True

    def _update(self, check_id: str, status: str, output: str) -> str | None:
        """Set a TTL check; the agent's error text, or None."""
        with self._lock:
            check = self.checks.get(check_id)
            if check is None:
                return "unknown"
            if check.kind != "ttl":
                return "not ttl"
            check.set_status(status, output)
            check.ttl_deadline = time.monotonic() + check.ttl
            self.index += 1
            return None

    # Running checks

    def _spawn(self, check: Check) -> None:
        thread = threading.Thread(target=self._run_http, args=(check,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _run_http(self, check: Check) -> None:
        while not self._stopped.is_set():
            with self._lock:
                if self.checks.get(check.check_id) is not check:
                    return  # deregistered or replaced
            started = time.monotonic()
            status, code, output = self._get(check)
            elapsed = time.monotonic() - started
            with self._lock:
                self.runs.append(
                    CheckRun(check.check_id, started, elapsed, check.timeout, status, code)
                )
                if self.checks.get(check.check_id) is check:
                    check.set_status(status, output)
            if self._stopped.wait(check.interval):
                return

    @staticmethod
    def _get(check: Check) -> tuple[str, int | None, str]:
        request = urllib.request.Request(check.http, headers={"User-Agent": "Consul Health Check"})
        try:
            with urllib.request.urlopen(request, timeout=check.timeout) as response:
                code = response.status
                body = response.read(4096).decode(errors="replace")
        except urllib.error.HTTPError as exc:
            code, body = exc.code, exc.read(4096).decode(errors="replace")
        except (OSError, TimeoutError) as exc:
            text = f"Get {check.http!r}: {exc!r} (Client.Timeout exceeded?)"
            return "critical", None, text
        status = "passing" if 200 <= code < 300 else "warning" if code == 429 else "critical"
        return status, code, f"HTTP GET {check.http}: {code} Output: {body}"

    def _tick(self) -> None:
        while not self._stopped.wait(_TICK_S):
            now = time.monotonic()
            with self._lock:
                for check in list(self.checks.values()):
                    expired = check.kind == "ttl" and now > check.ttl_deadline
                    if expired and check.output != _TTL_EXPIRED:
                        check.set_status("critical", _TTL_EXPIRED)
                    since = check.critical_since
                    after = check.deregister_after
                    if after is not None and since is not None and now - since > after:
                        self._deregister(check.service_id)

    # HTTP

    def _answer(
        self, method: str, path: str, query: dict[str, list[str]], body: bytes
    ) -> tuple[int, Any]:
        routes: list[tuple[str, str, Callable[[str], tuple[int, Any]]]] = [
            ("PUT", "/v1/agent/service/register", lambda _: self._put_register(query, body)),
            ("PUT", "/v1/agent/service/deregister/", self._put_deregister),
            ("PUT", "/v1/agent/check/pass/", lambda c: self._put_ttl(c, "passing", query)),
            ("PUT", "/v1/agent/check/warn/", lambda c: self._put_ttl(c, "warning", query)),
            ("PUT", "/v1/agent/check/fail/", lambda c: self._put_ttl(c, "critical", query)),
            ("PUT", "/v1/agent/check/update/", lambda c: self._put_check_update(c, body)),
            ("GET", "/v1/agent/services", lambda _: (200, self._services_json())),
            ("GET", "/v1/agent/checks", lambda _: (200, self._checks_json())),
            ("GET", "/v1/catalog/services", lambda _: (200, self._catalog_json())),
            ("GET", "/v1/health/service/", lambda n: (200, self._health_json(n, query))),
        ]
        for verb, prefix, route in routes:
            exact = not prefix.endswith("/")
            if verb == method and (path == prefix if exact else path.startswith(prefix)):
                rest = urllib.parse.unquote(path[len(prefix) :])
                if not exact and not rest:
                    break
                return route(rest)
        return 404, "404 page not found"

    def _put_register(self, query: dict[str, list[str]], body: bytes) -> tuple[int, Any]:
        try:
            doc = json.loads(body or b"{}")
            self._register(doc, query.get("replace-existing-checks", ["false"])[0] == "true")
        except InvalidMeta as exc:
            return 400, str(exc)
        except (BadRequest, ValueError) as exc:
            return 400, f"Request decode failed: {exc}"
        return 200, None

    def _put_deregister(self, service_id: str) -> tuple[int, Any]:
        if not self._deregister(service_id):
            return 404, f'Unknown service ID "{service_id}". Ensure that the service ID is passed'
        return 200, None

    def _put_ttl(self, check_id: str, status: str, query: dict[str, list[str]]) -> tuple[int, Any]:
        note = query.get("note", [""])[0]
        return self._ttl_answer(check_id, self._update(check_id, status, note))

    def _put_check_update(self, check_id: str, body: bytes) -> tuple[int, Any]:
        doc = _lower_keys(json.loads(body or b"{}"))
        status = doc.get("status", "")
        if status not in ("passing", "warning", "critical"):
            return 400, f"Invalid check status: {status!r}"
        return self._ttl_answer(check_id, self._update(check_id, status, doc.get("output", "")))

    @staticmethod
    def _ttl_answer(check_id: str, error: str | None) -> tuple[int, Any]:
        if error == "unknown":
            return 404, f'Unknown check ID "{check_id}". Ensure that the check ID is passed'
        if error == "not ttl":
            return 500, f"CheckID {check_id!r} does not have associated TTL"
        return 200, None

    def _services_json(self) -> dict[str, Any]:
        with self._lock:
            return {k: dict(v) for k, v in self.services.items()}

    def _checks_json(self) -> dict[str, Any]:
        with self._lock:
            return {k: v.to_json() for k, v in self.checks.items()}

    def _catalog_json(self) -> dict[str, Any]:
        with self._lock:
            found: dict[str, list[str]] = {"consul": []}
            for service in self.services.values():
                tags = found.setdefault(service["Service"], [])
                tags.extend(t for t in service["Tags"] if t not in tags)
            return found

    def _health_json(self, name: str, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        node = {"ID": "", "Node": NODE, "Address": "127.0.0.1", "Datacenter": DATACENTER}
        serf = {
            "Node": NODE,
            "CheckID": "serfHealth",
            "Name": "Serf Health Status",
            "Status": "passing",
            "ServiceID": "",
            "ServiceName": "",
            "Type": "",
        }
        entries = []
        with self._lock:
            for service in self.services.values():
                if service["Service"] != name:
                    continue
                checks = [
                    c.to_json() for c in self.checks.values() if c.service_id == service["ID"]
                ]
                if "passing" in query and any(c["Status"] != "passing" for c in checks):
                    continue
                entries.append({"Node": node, "Service": dict(service), "Checks": [serf, *checks]})
        return entries

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return  # quiet: tests read `requests` instead

            def _handle(self, method: str) -> None:
                url = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                token = self.headers.get("X-Consul-Token")
                with double._lock:
                    double.requests.append((method, url.path, token))
                if double.acl_token is not None and token != double.acl_token:
                    status, answer = 403, "Permission denied: token with AccessorID '' lacks"
                else:
                    query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
                    status, answer = double._answer(method, url.path, query, body)
                is_text = isinstance(answer, str)
                text = "" if answer is None else answer if is_text else json.dumps(answer)
                data = text.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if is_text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                with double._lock:
                    self.send_header("X-Consul-Index", str(double.index))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._handle("GET")

            def do_PUT(self) -> None:
                self._handle("PUT")

        return Handler
