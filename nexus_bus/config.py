"""One settings object, read from `NEXUS_*` environment variables and an optional TOML file.

Only the process edge (CLI, app factories) calls `load_settings`; components receive their own
section. Nested fields use a double underscore: `NEXUS_NATS__URL`, `NEXUS_WORKER__CONCURRENCY`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import tomllib
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from nexus_bus import stackfile
from nexus_bus.constants import CACHE_KEY_PREFIX
from nexus_bus.errors import ConfigError as ConfigError  # re-exported: its home was here
from nexus_bus.resilience.policy import ResilienceSettings
from nexus_bus.setting_paths import unknown_env_names, unknown_keys


def _check_port(url: str) -> None:
    """Raises ValueError (a setting's message) for a URL whose port is not a number."""
    try:
        urlsplit(url).port  # noqa: B018  # parsing it is the check
    except ValueError as exc:
        raise ValueError(f"{url!r}: {exc}") from None


class TLSSettings(BaseModel):
    """TLS material for a client connection; all paths, never inline secrets."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    verify: bool = True

    @property
    def enabled(self) -> bool:
        """Whether any TLS material is configured."""
        return any((self.ca_file, self.cert_file, self.key_file))


class NatsSettings(BaseModel):
    """How every process connects to NATS."""

    url: str = "nats://127.0.0.1:4222"
    name: str = "nexus-bus"
    user: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    creds_file: Path | None = None
    nkey_seed_file: Path | None = None
    tls: TLSSettings = Field(default_factory=TLSSettings)
    connect_timeout_s: float = Field(2.0, gt=0)
    initial_connect_timeout_s: float = Field(10.0, gt=0)  # then fail at start, not hang
    # Sooner while every attempt is refused (nothing listens): one-shot CLI commands use 1 s;
    # None: as any other failure. Servers keep None, to outwait a NATS that is starting too.
    initial_refused_timeout_s: float | None = Field(None, gt=0)
    reconnect_wait_s: float = Field(0.5, gt=0)
    max_reconnect_attempts: int = -1  # forever: a worker must outlive a broker restart
    # A connection whose server stopped answering (a partition, a host gone without closing
    # its sockets) is declared stale and replaced, by another cluster node if there is one,
    # once `max_outstanding_pings` PINGs sent `ping_interval_s` apart went unanswered: within
    # 30 s here, where nats-py's defaults (120 s, 2) take up to 6 minutes.
    ping_interval_s: int = Field(10, ge=1)
    max_outstanding_pings: int = Field(2, ge=1)
    # Bounded so that a long outage cannot replay minutes of stale requests: nats-py
    # flushes this buffer after reconnecting, maybe after the caller already got a 504.
    pending_size_bytes: int = Field(2 * 1024 * 1024, gt=0)
    inbox_prefix: str = "_INBOX"
    # Opt-in speedups over nats-py internals, per connection (nexus_bus/bus/_speedups).
    speedups: bool = False

    @property
    def servers(self) -> list[str]:
        """The comma-separated URL as a list, for clustered deployments."""
        return [u.strip() for u in self.url.split(",") if u.strip()]

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        for server in url.split(","):  # nats-py takes host, host:port or a nats|tls|ws|wss URL
            scheme, sep, _ = server.strip().partition("://")
            if sep and scheme not in ("nats", "tls", "ws", "wss"):
                raise ValueError(f"{server.strip()!r}: use nats://, tls://, ws:// or wss://")
            _check_port(server.strip() if sep else f"nats://{server.strip()}")
        return url


class RedisSettings(BaseModel):
    """The Redis cache connection; short timeouts so a sick Redis never stalls requests."""

    # `redis+cluster://host:port` (or `rediss+cluster://`) names one node of a Redis Cluster;
    # `cluster = true` with a plain URL means the same.
    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False
    password: SecretStr | None = None
    tls: TLSSettings = Field(default_factory=TLSSettings)
    socket_timeout_s: float = Field(0.1, gt=0)
    connect_timeout_s: float = Field(0.2, gt=0)

    @model_validator(mode="after")
    def _cluster_from_url(self) -> RedisSettings:
        scheme, sep, rest = self.url.partition("://")
        if sep and scheme in ("redis+cluster", "rediss+cluster"):
            self.url = f"{scheme.removesuffix('+cluster')}://{rest}"
            self.cluster = True
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        # Checked here, not by redis-py as the shim or a worker starts (a traceback).
        scheme = url.partition("://")[0]
        if scheme not in ("redis", "rediss", "unix", "redis+cluster", "rediss+cluster"):
            raise ValueError("use redis://, rediss://, redis+cluster://, rediss+cluster:// or unix://")
        db = urlsplit(url).path.strip("/")
        if scheme != "unix" and not (db == "" or db.isdecimal()):
            raise ValueError(f"the database {db!r} is not a number")
        _check_port(url)
        return url


class CacheSettings(BaseModel):
    """The Redis cache in front of the `data` system of record (docs/cache.md)."""

    enabled: bool = True
    key_prefix: str = CACHE_KEY_PREFIX
    # Names the Redis in cache notices between workers ("": host:port/db of `redis.url`).
    # Workers that reach the same Redis under different URLs must set the same scope.
    scope: str = ""
    ttl_s: float = Field(3600.0, gt=0)  # how long a value is fresh
    negative_ttl_s: float = Field(30.0, ge=0)  # "not found" and tombstones; 0: not cached
    stale_s: float = Field(30.0, ge=0)  # served stale while one worker reloads; 0: off
    jitter: float = Field(0.1, ge=0, lt=1)  # TTLs spread by up to this fraction either way
    lease_s: float = Field(2.0, gt=0)  # one loader per key holds the lease this long at most
    wait_s: float = Field(0.5, ge=0)  # others wait this long for it, then load themselves
    # Per Redis call, connecting included; past it the request fails open to the KV.
    timeout_ms: int = Field(150, gt=0, le=10_000)
    fence_timeout_ms: int = Field(200, gt=0, le=10_000)  # waiting for a peer to fence
    fence_ttl_s: float = Field(60.0, gt=0)
    # A versioned fill later than this after the read that missed (on Redis's clock) is
    # refused: the tombstone it raced with may be gone (an unversioned, cache-aside fill
    # needs its lease instead).
    max_fill_age_s: float = Field(5.0, gt=0)
    breaker_failures: int = Field(5, ge=1)  # consecutive failures that open the breaker
    breaker_reset_s: float = Field(0.5, gt=0)  # first probe after opening; doubles per failure
    breaker_reset_max_s: float = Field(10.0, gt=0)
    # The L1 of `data`: values kept in process under read leases this long (0: off). A write
    # waits at most this long for a worker that holds the key and does not answer.
    local_ttl_s: float = Field(1.0, ge=0, le=60)
    local_max_entries: int = Field(10_000, ge=1)  # L1 bounds, for every policy with an L1
    local_max_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    max_floors: int = Field(100_000, ge=1)  # unfenced writes remembered before distrusting

    @model_validator(mode="after")
    def _check_fill_age(self) -> CacheSettings:
        # Tombstones, values and fences must outlive every fill that may still race with
        # them, at the shortest life their jittered TTLs give them.
        shortest = 1 - self.jitter
        if self.negative_ttl_s and self.negative_ttl_s * shortest <= self.max_fill_age_s:
            raise ValueError(
                "negative_ttl_s must be 0 or, less its jitter, longer than max_fill_age_s"
            )
        if self.ttl_s * shortest + self.stale_s <= self.max_fill_age_s:
            raise ValueError(
                "ttl_s less its jitter, plus stale_s, must be longer than max_fill_age_s"
            )
        if self.fence_ttl_s <= self.max_fill_age_s:
            raise ValueError("fence_ttl_s must be longer than max_fill_age_s")
        if self.breaker_reset_max_s < self.breaker_reset_s:
            raise ValueError("breaker_reset_max_s must be at least breaker_reset_s")
        return self


class LimitSettings(BaseModel):
    """Input bounds enforced before anything reaches NATS or a handler."""

    max_body_bytes: int = Field(512 * 1024, gt=0)
    max_header_bytes: int = Field(8 * 1024, gt=0)
    max_header_value_bytes: int = Field(4 * 1024, gt=0)
    max_depth: int = Field(32, gt=0, le=512)


class JetStreamSettings(BaseModel):
    """Replicas and storage for every stream and bucket nexus-bus creates."""

    replicas: int = Field(1, ge=1, le=5)
    storage: Literal["file", "memory"] = "file"
    events_max_age_s: float = Field(7 * 24 * 3600, gt=0)
    dedup_window_s: float = Field(120, gt=0)


class WorkerSettings(BaseModel):
    """The worker runtime."""

    ops: list[str] = Field(default_factory=list)  # empty: every registered op
    concurrency: int = Field(64, ge=1, le=10_000)
    drain_grace_s: float = Field(10.0, ge=0)
    clock_skew_ms: int = Field(250, ge=0)
    default_timeout_ms: int = Field(5_000, gt=0)
    metrics_port: int = Field(0, ge=0, le=65535)  # 0: no /metrics endpoint of its own
    metrics_host: str = "127.0.0.1"
    micro: bool = True  # answer the NATS micro protocol ($SRV.PING|INFO|STATS; docs/discovery.md)


class JobsSettings(BaseModel):
    """Asynchronous jobs on JetStream: consumers, retries and dead-lettering (docs/jobs.md)."""

    enabled: bool = True  # workers run job consumers for the ops they serve
    max_deliver: int = Field(5, ge=1, le=1000)  # attempts before dead-lettering
    # Retry delay after failed attempt n: min(max, base * multiplier**(n-1)), jittered
    # (resilience.backoff): "equal" keeps at least half of it, so retries of a burst spread
    # out without ever retrying at once; "full" spreads most; "none" is exact.
    backoff_base_s: float = Field(1.0, gt=0)
    backoff_max_s: float = Field(300.0, gt=0)
    backoff_multiplier: float = Field(2.0, ge=1)
    backoff_jitter: Literal["none", "full", "equal"] = "equal"
    ack_wait_s: float = Field(30.0, gt=0)  # a crashed worker's job is redelivered after this
    heartbeat_s: float = Field(10.0, gt=0)  # `in_progress` interval; must be below ack_wait_s
    concurrency: int = Field(16, ge=1, le=10_000)  # jobs in flight per op per worker
    timeout_s: float = Field(300.0, gt=0)  # a job's handler budget (jobs have no caller deadline)
    status_ttl_s: float = Field(7 * 24 * 3600, gt=0)  # job status documents expire after this
    dlq_max_age_s: float = Field(14 * 24 * 3600, gt=0)
    # Effect records must outlive every possible redelivery or replay of their job.
    effect_ttl_s: float = Field(15 * 24 * 3600, gt=0)

    @model_validator(mode="after")
    def _check_timings(self) -> JobsSettings:
        if self.heartbeat_s >= self.ack_wait_s:
            raise ValueError("heartbeat_s must be below ack_wait_s, or long jobs are redelivered")
        if self.effect_ttl_s < self.dlq_max_age_s:
            raise ValueError("effect_ttl_s must be at least dlq_max_age_s (replays need records)")
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError("backoff_max_s must be at least backoff_base_s")
        return self


class ClientSettings(BaseModel):
    """The gateway client."""

    default_timeout_ms: int = Field(5_000, gt=0)


class AuthSettings(BaseModel):
    """The token service and the authentication every worker enforces (docs/auth.md)."""

    enabled: bool = True  # production default is enforcing; False only for local experiments
    # Ed25519 keys as PEM files named `<kid>.pem` (private) or `<kid>.pub.pem` (verify only).
    # None: `<state_dir>/keys`, where `nexus-bus up` and `nexus-bus keys generate` write.
    keys_dir: Path | None = None
    active_kid: str | None = None  # None: the newest private key (kids sort by creation time)
    issuer: str = "nexus-bus"
    audience: str = "nexus-bus"
    default_ttl_s: int = Field(3600, ge=1)
    max_ttl_s: int = Field(30 * 24 * 3600, ge=1)
    leeway_s: int = Field(10, ge=0, le=300)  # clock skew allowed on exp / nbf / iat
    max_token_bytes: int = Field(4096, ge=256, le=65536)
    # A cached verification is trusted this long without asking the revocation store again:
    # the bound on how long a revoked token can still pass when a revocation notice is lost.
    cache_ttl_s: float = Field(5.0, ge=0, le=60)  # 0 disables the verification cache
    cache_size: int = Field(10_000, ge=1)
    rate_limit_failures: int = Field(20, ge=1)  # auth failures per client per window
    rate_limit_window_s: float = Field(10.0, gt=0)
    rate_limit_clients: int = Field(10_000, ge=1)  # clients tracked at once (memory bound)


class HttpSettings(BaseModel):
    """The HTTP shim (docs/http.md); body size comes from `limits.max_body_bytes`."""

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    backlog: int = Field(2048, ge=1)
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # request line + headers; over: 431
    read_timeout_s: float = Field(10.0, gt=0)  # a body must arrive within this (else 408)
    # Connections and requests at once; beyond, uvicorn answers 503 (`limit_concurrency`).
    max_connections: int = Field(2048, ge=1)
    # Idle keep-alive; above NGINX's upstream `keepalive_timeout` (60 s) so NGINX always
    # closes first and never writes a request onto a connection the shim is closing.
    keep_alive_s: float = Field(75.0, gt=0)
    max_timeout_ms: int = Field(60_000, gt=0)  # cap on a client's Nexus-Timeout-Ms
    grace_s: float = Field(10.0, ge=0)  # in-flight requests get this long after SIGTERM
    drain_delay_s: float = Field(1.0, ge=0)  # not-ready but serving, before the listener closes
    retry_after_s: int = Field(1, ge=0)  # Retry-After on 429/503 when the reply names none
    # CIDRs whose X-Forwarded-For is believed (NGINX's address); empty: the peer is the client.
    trusted_proxies: list[str] = Field(default_factory=list)
    sse_heartbeat_s: float = Field(15.0, gt=0)
    sse_retry_ms: int = Field(2_000, ge=0)  # EventSource reconnect delay sent to clients
    sse_max_streams: int = Field(1_000, ge=1)  # open event streams per shim process
    # ... and per caller (token subject, else client address): 429 beyond.
    sse_max_streams_per_caller: int = Field(100, ge=1)
    # A stream whose client takes none of a frame for this long is closed: once its socket
    # is full, not even a heartbeat reaches it, so nothing else would notice a stalled client.
    sse_send_timeout_s: float = Field(30.0, gt=0)
    # Lifetime of a browser stream ticket (POST /v1/events/{topic}/ticket); single use.
    sse_ticket_ttl_s: float = Field(60.0, gt=0, le=600)
    # The shim answers a `data.get` the cache holds fresh itself, under its own read lease,
    # as a worker would (docs/cache.md, "The shim's cached reads"); false: workers answer all.
    cached_reads: bool = True
    # Each answer written in one call, not uvicorn's two (head, body): `http/transport.py`;
    # false: uvicorn's own httptools protocol, unchanged.
    join_writes: bool = True

    @model_validator(mode="after")
    def _check_proxies(self) -> HttpSettings:
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"trusted_proxies: {cidr!r} is not an address or CIDR") from exc
        return self


class RegistrySettings(BaseModel):
    """The operation registry workers publish into NATS KV (docs/registry.md)."""

    enabled: bool = True
    # Workers re-put their declarations this often; 3 missed beats: not served any more.
    heartbeat_s: float = Field(10.0, gt=0, le=3600)
    # A declaration no worker refreshed for this long is forgotten: its op becomes unknown
    # (404) instead of unserved (503). The bucket's max age.
    forget_after_s: float = Field(24 * 3600.0, gt=0)
    # How long a shim or client waits for its view to catch up; past it, 503 stays 503.
    sync_timeout_s: float = Field(0.5, gt=0, le=10)

    @model_validator(mode="after")
    def _check_timings(self) -> RegistrySettings:
        if self.forget_after_s <= 3 * self.heartbeat_s:
            raise ValueError("forget_after_s must be longer than three heartbeats")
        return self


class ConsulSettings(BaseModel):
    """Registration with Consul (docs/discovery.md); off unless enabled."""

    enabled: bool = False
    address: str = "http://127.0.0.1:8500"  # scheme://host:port of the local agent
    token: SecretStr | None = None  # ACL token; or `token_file` (never logged either way)
    token_file: Path | None = None
    tls: TLSSettings = Field(default_factory=TLSSettings)
    datacenter: str | None = None
    # The address others reach this process at ("": the shim's listen host, or this host's
    # address when it listens on every interface).
    service_address: str = ""
    tags: list[str] = Field(default_factory=list)
    check_interval_s: float = Field(5.0, gt=0)  # the shim's HTTP check on /readyz
    check_timeout_s: float = Field(3.0, gt=0)
    deregister_after_s: float = Field(60.0, ge=1)  # DeregisterCriticalServiceAfter
    ttl_s: float = Field(10.0, gt=0)  # workers' TTL check; passed every ttl_s / 3
    request_timeout_s: float = Field(2.0, gt=0)  # per call to the agent
    retry_base_s: float = Field(0.5, gt=0)  # registration retries back off from here ...
    retry_max_s: float = Field(30.0, gt=0)  # ... up to this

    @model_validator(mode="after")
    def _check_consul(self) -> ConsulSettings:
        if self.check_timeout_s > self.check_interval_s:
            raise ValueError("check_timeout_s must not exceed check_interval_s")
        if self.token is not None and self.token_file is not None:
            raise ValueError("set token or token_file, not both")
        scheme, sep, _ = self.address.partition("://")
        if sep and scheme not in ("http", "https"):
            raise ValueError("address must be http://host:port or https://host:port")
        return self


class LogSettings(BaseModel):
    """Logging: JSON lines by default."""

    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = True
    access: bool = True  # one INFO line per request (observability/access.py)


class TracingSettings(BaseModel):
    """OpenTelemetry tracing (docs/observability.md): off unless an endpoint is set."""

    otlp_endpoint: str | None = None  # e.g. http://otel-collector:4318/v1/traces
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)  # for traces that start here
    export_timeout_s: float = Field(default=5.0, gt=0)  # a batch's export, retries included
    batch_delay_s: float = Field(default=1.0, gt=0)  # how often ended spans are sent
    max_batch: int = Field(default=2048, ge=1)  # spans per export (sent at once when reached)
    max_queue: int = Field(default=8192, ge=1)  # spans waiting; more are dropped and counted


# The `ai.*` operations (docs/ai.md); `nexus_bus.ai.settings` has their names and key reading.


class BackendSettings(BaseModel):
    """One model server (or the local model), and the guards around calls to it."""

    model_config = ConfigDict(defer_build=True)

    kind: Literal["openai", "local"] = "openai"
    models: list[str] = Field(default_factory=list)  # the model names this backend serves
    base_url: str = ""  # openai: e.g. https://api.openai.com/v1, http://127.0.0.1:11434/v1
    api_key_env: str | None = None  # the environment variable holding the API key
    api_key_file: Path | None = None  # or a file holding it (a mounted secret)
    timeout_s: float = Field(30.0, gt=0)  # per upstream call, capped by the caller's deadline
    connect_timeout_s: float = Field(3.0, gt=0)
    max_concurrency: int = Field(16, ge=1, le=10_000)  # bulkhead: upstream calls at once
    breaker_failures: int = Field(5, ge=1)  # consecutive failures that open the breaker
    breaker_reset_s: float = Field(1.0, gt=0)  # first probe after opening; doubles per failure
    breaker_reset_max_s: float = Field(30.0, gt=0)
    max_batch: int = Field(64, ge=1, le=2048)  # embedding texts per upstream call
    max_connections: int = Field(32, ge=1)  # httpx connection pool

    @model_validator(mode="after")
    def _check(self) -> BackendSettings:
        if self.kind == "openai" and not self.base_url.startswith(("http://", "https://")):
            raise ValueError("an openai backend needs base_url (http:// or https://)")
        if self.api_key_env and self.api_key_file:
            raise ValueError("set api_key_env or api_key_file, not both")
        if not self.models:
            raise ValueError("models: list the model names this backend serves")
        return self


class BudgetSettings(BaseModel):
    """Per token subject, across every replica (Redis GCRA): 0 turns a limit off."""

    model_config = ConfigDict(defer_build=True)

    requests_per_min: float = Field(0.0, ge=0)  # below 1: one request every 1/n minutes
    tokens_per_min: float = Field(0.0, ge=0)  # estimated: prompt chars / 4 + max_tokens

    @field_validator("tokens_per_min")
    @classmethod
    def _check_tokens(cls, value: float) -> float:
        # A request is estimated at a token or more: over a smaller minute's budget, every
        # one would be refused (400, docs/ai.md).
        if 0 < value < 1:
            raise ValueError("must be 0 (off) or at least 1: every request counts 1 token or more")
        return value


class AISettings(BaseModel):
    """The `ai` section: backends by name, default models, cache and budget."""

    model_config = ConfigDict(defer_build=True)

    backends: dict[str, BackendSettings] = Field(default_factory=dict)
    default_embed_model: str | None = None  # used when a request names no model
    default_complete_model: str | None = None
    cache_ttl_s: float = Field(7 * 24 * 3600.0, gt=0)  # embeddings and opted-in completions
    local_cache_ttl_s: float = Field(300.0, ge=0)  # L1 for embeddings (immutable by content)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    similar_max_scan: int = Field(1000, ge=1, le=10_000)  # `ai.similar`: keys read at most
    graphs: list[str] = Field(default_factory=list)  # `module:attr` graph registries (ai.run)

    @model_validator(mode="after")
    def _check(self) -> AISettings:
        seen: dict[str, str] = {}
        for name, backend in self.backends.items():
            for model in backend.models:
                if model in seen:
                    raise ValueError(f"model {model!r} is served by both {seen[model]} and {name}")
                seen[model] = name
        return self


class Settings(BaseSettings):
    """Everything configurable, one object; load it with `load_settings()`."""

    model_config = SettingsConfigDict(
        env_prefix="NEXUS_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    # Prefix of every process's name: logs, traces and NATS connections say `<service>-shim`,
    # `<service>-worker-<ops>`, `<service>-cli`.
    service: str = "nexus"
    state_dir: Path = Path(".nexus")
    nats: NatsSettings = Field(default_factory=NatsSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    cache: CacheSettings = Field(default_factory=CacheSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    jetstream: JetStreamSettings = Field(default_factory=JetStreamSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    jobs: JobsSettings = Field(default_factory=JobsSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    registry: RegistrySettings = Field(default_factory=RegistrySettings)
    consul: ConsulSettings = Field(default_factory=ConsulSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    tracing: TracingSettings = Field(default_factory=TracingSettings)
    resilience: ResilienceSettings = Field(default_factory=ResilienceSettings)
    ai: AISettings = Field(default_factory=AISettings)  # model backends (docs/ai.md)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Precedence: explicit arguments, then environment, then the TOML file."""
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml_path = os.environ.get("NEXUS_CONFIG")
        if toml_path:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=Path(toml_path)))
        return tuple(sources)


def load_settings(*, discover: bool = True, **overrides: object) -> Settings:
    """Read settings from the environment (and `NEXUS_CONFIG` TOML file), once, at the edge.

    With `discover`, a stack started by `nexus-bus up` fills in what is not configured
    explicitly: its NATS and Redis URLs, HTTP port and state directory (`stackfile.py`).

    Raises:
        ConfigError: listing every invalid or unknown setting.
    """
    unknown = unknown_env_names(Settings, os.environ)
    toml_path = os.environ.get("NEXUS_CONFIG")
    if toml_path:  # a file that cannot be read or parsed is the TOML source's error, below
        with contextlib.suppress(OSError, tomllib.TOMLDecodeError):
            document = tomllib.loads(Path(toml_path).read_text())
            unknown += [f"{k} (in {toml_path})" for k in unknown_keys(Settings, document)]
    if unknown:
        raise ConfigError(
            "invalid configuration: " + "; ".join(f"unknown setting {n}" for n in unknown)
        )
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
        if discover:
            found = _stack_values(settings)
            if found:
                settings = Settings(**stackfile.merge(found, overrides))
        return settings
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
    except SettingsError as exc:  # a list or table setting whose value is not JSON
        raise ConfigError(f"invalid configuration: {exc} (expected JSON)") from exc


def _stack_values(settings: Settings) -> dict[str, Any]:
    """What a running `up` stack contributes to `settings` (explicit values win)."""
    explicit_dir = settings.state_dir if "state_dir" in settings.model_fields_set else None
    found = stackfile.find_stack(explicit_dir, Path.cwd())
    if not found:
        return {}
    url_set = "nats" in settings.model_fields_set and "url" in settings.nats.model_fields_set
    return stackfile.stack_overrides(found, os.environ, settings.nats.url if url_set else None)
