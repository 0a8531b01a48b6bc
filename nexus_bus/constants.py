"""Every literal name of the wire contract, once: subjects, headers, streams, metrics."""

from typing import Final

# Subjects
SUBJECT_ROOT: Final = "nexus"
RESERVED_OPS: Final = frozenset({"auth", "jobs", "dlq", "events", "sys"})
BUILTIN_RESERVED_OPS: Final = frozenset({"auth"})  # reserved, but served by nexus-bus itself
TOKEN_PATTERN: Final = r"^[a-z][a-z0-9_-]{0,63}$"
JOBS_PREFIX: Final = "nexus.jobs"
DLQ_PREFIX: Final = "nexus.dlq"
EVENTS_PREFIX: Final = "nexus.events"
SYS_PREFIX: Final = "nexus.sys"
DEFAULT_INBOX_PREFIX: Final = "_INBOX"

# JetStream
EVENTS_STREAM: Final = "NEXUS_EVENTS"
JOBS_STREAM: Final = "NEXUS_JOBS"
DLQ_STREAM: Final = "NEXUS_DLQ"
DATA_BUCKET: Final = "nexus_data"
JOBS_BUCKET: Final = "nexus_jobs"

# Request headers (NATS header names; the HTTP shim maps X-Request-Id <-> Nexus-Request-Id)
H_AUTHORIZATION: Final = "Authorization"
H_REQUEST_ID: Final = "Nexus-Request-Id"
H_HTTP_REQUEST_ID: Final = "X-Request-Id"
H_TRACEPARENT: Final = "traceparent"
H_TRACESTATE: Final = "tracestate"
H_TIMEOUT_MS: Final = "Nexus-Timeout-Ms"
H_DEADLINE: Final = "Nexus-Deadline"
H_IDEMPOTENCY_KEY: Final = "Idempotency-Key"
H_CONTENT_TYPE: Final = "Content-Type"
H_NATS_MSG_ID: Final = "Nats-Msg-Id"
# Set by the HTTP shim from the peer address (and trusted proxies); used for rate limiting.
H_CLIENT_IP: Final = "Nexus-Client-Ip"

# Reply headers
H_STATUS: Final = "Nexus-Status"
H_SERVICE_ERROR_CODE: Final = "Nats-Service-Error-Code"
H_SERVICE_ERROR: Final = "Nats-Service-Error"

# Content types
CT_JSON: Final = "application/json"
CT_MSGPACK: Final = "application/msgpack"
CT_PROBLEM: Final = "application/problem+json"

# Metrics
M_REQUEST_DURATION: Final = "nexus_request_duration_seconds"
M_ERRORS: Final = "nexus_error_rate"  # prometheus-client appends _total to counters
M_INFLIGHT: Final = "nexus_inflight_requests"
M_EXPIRED: Final = "nexus_expired_requests"
M_NATS_RECONNECTS: Final = "nexus_nats_reconnects"

# Transports, as the `transport` metric label
T_NATS: Final = "nats"
T_CLIENT: Final = "client"
T_HTTP: Final = "http"

PROBLEM_TYPE_BASE: Final = "https://nexus-bus.dev/problems/"
