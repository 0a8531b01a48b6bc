"""Every literal name of the wire contract, once: subjects, headers, streams, metrics."""

from typing import Final

# Subjects
SUBJECT_ROOT: Final = "nexus"
RESERVED_OPS: Final = frozenset({"auth", "jobs", "dlq", "events", "sys"})
BUILTIN_RESERVED_OPS: Final = frozenset({"auth"})  # reserved, but served by nexus-bus itself
# `$(?!\n)`, not `$`: this pattern is also exported into JSON Schema and OpenAPI, whose regex
# dialect (ECMA-262) has no `\Z`, and a Python `$` alone matches before a final newline.
TOKEN: Final = r"[a-z][a-z0-9_-]{0,63}"  # one subject token, to build patterns from
TOKEN_PATTERN: Final = rf"^{TOKEN}$(?!\n)"
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
# Operation registry (docs/registry.md): one key per op and worker, `<op>.<instance>`.
OPS_BUCKET: Final = "nexus_ops"
# Revoked token ids (docs/auth.md): one key per revoked `jti`, kept as long as a token can live.
AUTH_REVOKED_BUCKET: Final = "nexus_auth_revoked"

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
M_SPEEDUPS_UNAVAILABLE: Final = "nexus_speedups_unavailable"  # enabled, not installed
M_CACHE_REQUESTS: Final = "nexus_cache_requests"  # labels cache, result
M_CACHE_HIT_RATIO: Final = "nexus_cache_hit_ratio"  # label cache
M_CIRCUIT_STATE: Final = "nexus_circuit_state"  # label name; 0 closed, 1 half-open, 2 open

# The label value for names a client invented (unknown ops and actions): bounded series.
UNKNOWN_LABEL: Final = "_other"

# Transports, as the `transport` metric label
T_NATS: Final = "nats"
T_CLIENT: Final = "client"
T_HTTP: Final = "http"
T_TEST: Final = "test"  # nexus_bus.testing's in-memory harness

PROBLEM_TYPE_BASE: Final = "https://nexus-bus.dev/problems/"

# Token service (docs/auth.md)
AUTH_OP: Final = "auth"
AUTH_ALGORITHM: Final = "EdDSA"  # Ed25519 signatures; the only algorithm ever accepted
AUTH_REVOKED_SUBJECT: Final = "nexus.sys.auth.revoked"  # revocation notices to every worker
AUTH_REVOKED_KEY: Final = "nexus:auth:{revocations}"  # Redis: a hash, a field per revoked jti
AUTH_PRIVATE_KEY_SUFFIX: Final = ".pem"
AUTH_PUBLIC_KEY_SUFFIX: Final = ".pub.pem"
AUTH_KEYS_DIR: Final = "keys"  # under the state directory when auth.keys_dir is unset
AUTH_SCHEME: Final = "Bearer"

# Jobs (docs/jobs.md)
JOBS_CONSUMER_PREFIX: Final = "nexus_jobs_"  # durable pull consumer per op: nexus_jobs_<op>
# Effect records live in the data bucket's stream under their own subject tree, so the KV API
# (and `data.list`) never sees them while atomic batches can still cover effect + record.
# A job's are `<prefix>.<job id>.<n>`; a keyed request's `<prefix>.idem.<scope digest>.<n>`.
EFFECTS_PREFIX: Final = "nexus.sys.effects"
EFFECTS_IDEMPOTENCY_TOKEN: Final = "idem"
T_JOBS: Final = "jobs"
H_JOB_ID: Final = "Nexus-Job-Id"
H_DLQ_ERROR_CODE: Final = "Nexus-Dlq-Error-Code"
H_DLQ_ERROR_STATUS: Final = "Nexus-Dlq-Error-Status"
H_DLQ_ERROR: Final = "Nexus-Dlq-Error"
H_DLQ_ATTEMPTS: Final = "Nexus-Dlq-Attempts"
H_DLQ_SUBJECT: Final = "Nexus-Dlq-Subject"
H_DLQ_STREAM_SEQ: Final = "Nexus-Dlq-Stream-Seq"
H_DLQ_ENQUEUED_AT: Final = "Nexus-Dlq-Enqueued-At"
H_DLQ_FAILED_AT: Final = "Nexus-Dlq-Failed-At"
H_DLQ_BODY_DROPPED: Final = "Nexus-Dlq-Body-Dropped"  # too large to keep with its headers
DLQ_HEADER_PREFIX: Final = "Nexus-Dlq-"
NATS_HEADER_PREFIX: Final = "Nats-"
H_NATS_BATCH_ID: Final = "Nats-Batch-Id"
H_NATS_BATCH_SEQUENCE: Final = "Nats-Batch-Sequence"
H_NATS_BATCH_COMMIT: Final = "Nats-Batch-Commit"
H_NATS_EXPECTED_LAST_SUBJECT_SEQ: Final = "Nats-Expected-Last-Subject-Sequence"
H_NATS_TTL: Final = "Nats-TTL"
H_KV_OPERATION: Final = "KV-Operation"
KV_SUBJECT_PREFIX: Final = "$KV"
KV_STREAM_PREFIX: Final = "KV_"
M_JOBS_REDELIVERED: Final = "nexus_jobs_redelivered"
M_JOBS_DEAD_LETTERED: Final = "nexus_jobs_dead_lettered"
M_JOBS_COMPLETED: Final = "nexus_jobs_completed"

# HTTP shim (docs/http.md)
H_RETRY_AFTER: Final = "Retry-After"
H_WWW_AUTHENTICATE: Final = "WWW-Authenticate"
H_LOCATION: Final = "Location"
H_PREFER: Final = "Prefer"
H_LAST_EVENT_ID: Final = "Last-Event-ID"
H_FORWARDED_FOR: Final = "X-Forwarded-For"
PREFER_ASYNC: Final = "respond-async"
CT_EVENT_STREAM: Final = "text/event-stream"
SSE_END_EVENT: Final = "end"  # the last SSE event of a stream the shim ends (token gone)
HTTP_API_PREFIX: Final = "/v1"
HTTP_HEALTHZ: Final = "/healthz"
HTTP_READYZ: Final = "/readyz"
HTTP_METRICS: Final = "/metrics"
HTTP_OPENAPI: Final = "/openapi.json"
HTTP_ASYNCAPI: Final = "/asyncapi.json"
HTTP_DOCS: Final = "/docs"
HTTP_OPS: Final = "/v1/ops"
SSE_TICKET_PATH: Final = "ticket"  # POST /v1/events/{topic}/ticket
SSE_TICKET_QUERY: Final = "ticket"  # GET /v1/events/{topic}?ticket=...
SSE_TICKET_KEY_PREFIX: Final = "nexus:sse:ticket:"  # Redis: one key per unused ticket (hash)
AUTH_REALM: Final = "nexus-bus"

# Cache (docs/cache.md)
CACHE_KEY_PREFIX: Final = "nexus:cache"  # Redis: <prefix>:<namespace>:{<key>}
CACHE_LEASE_SUFFIX: Final = ":lease"  # Redis: the load lease of an entry, same hash slot
CACHE_HOLDERS_SUFFIX: Final = ":holders"  # Redis: L1 read leases of an entry, same hash slot
CACHE_EPOCH_SUFFIX: Final = ":epoch"  # Redis: <prefix>:epoch, when this Redis's state began
CACHE_DATA_NAMESPACE: Final = "data"  # the namespace (and metric label) of `data.*` records
CACHE_DEFAULT_NAMESPACE: Final = "default"  # `get_or_set` without a namespace
CACHE_INVALIDATE_SUBJECT: Final = "nexus.sys.cache.invalidate"  # broadcast to every worker
CACHE_FENCE_SUBJECT: Final = "nexus.sys.cache.fence"  # request: fence an entry in Redis
CACHE_REVOKE_SUBJECT: Final = "nexus.sys.cache.revoke"  # .<origin>: drop a key from your L1
CACHE_BREAKER: Final = "redis_cache"  # the breaker's `name` label

# Discovery (docs/discovery.md): Consul service names and the NATS micro ($SRV) protocol
SERVICE_PREFIX: Final = "nexus-"  # Consul and $SRV service names: nexus-shim, nexus-<op>
SHIM_SERVICE: Final = "nexus-shim"
CONSUL_TAG: Final = "nexus-bus"  # every registration carries it
CONSUL_META_VERSION: Final = "version"
CONSUL_META_OPS: Final = "ops"
CONSUL_META_QUEUE_GROUP: Final = "queue_group"
CONSUL_META_ACTIONS: Final = "actions"
CONSUL_META_INSTANCE: Final = "instance"
MICRO_META_SCHEMA_REQUEST: Final = "schema_request"  # $SRV endpoint metadata
MICRO_META_SCHEMA_REPLY: Final = "schema_reply"
MICRO_META_OP: Final = "op"
MICRO_META_ADDRESS: Final = "address"
# Resilience on the request path (docs/resilience.md)
H_STALE_AGE: Final = "Nexus-Stale-Age"  # seconds; the answer came from the cache on failure
H_IDEMPOTENT_REPLAYED: Final = "Idempotent-Replayed"  # "true": the first reply, replayed
H_RATELIMIT: Final = "RateLimit"
H_RATELIMIT_POLICY: Final = "RateLimit-Policy"
BREAKERS_KEY: Final = "nexus:breakers"  # Redis hash: op -> open until (epoch ms)
IDEMPOTENCY_KEY_PREFIX: Final = "nexus:idem:"  # Redis: one record per (subject, op, key)
RATELIMIT_KEY_PREFIX: Final = "nexus:rl:"  # Redis: one GCRA state per (subject, op)
M_RETRIES: Final = "nexus_retries"  # labels op, action, reason
M_RETRY_BUDGET_EXHAUSTED: Final = "nexus_retry_budget_exhausted"  # labels op, action
M_CIRCUIT_REJECTED: Final = "nexus_circuit_rejected"  # label op: answered 503 circuit_open
M_STALE_ANSWERS: Final = "nexus_stale_answers"  # labels op, action
M_SHARED_STATE_FAILURES: Final = "nexus_shared_state_failures"  # label store
M_IDEMPOTENT_REPLAYS: Final = "nexus_idempotent_replays"  # label op
M_RATE_LIMITED: Final = "nexus_rate_limited"  # label op
M_TRACE_SPANS_DROPPED: Final = "nexus_trace_spans_dropped"  # spans the exporter could not send
