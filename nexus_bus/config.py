"""One settings object, read from `NEXUS_*` environment variables and an optional TOML file.

Only the process edge (CLI, app factories) calls `load_settings`; components receive their own
section. Nested fields use a double underscore: `NEXUS_NATS__URL`, `NEXUS_WORKER__CONCURRENCY`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from nexus_bus.errors import InvalidRequest


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
    reconnect_wait_s: float = Field(0.5, gt=0)
    max_reconnect_attempts: int = -1  # forever: a worker must outlive a broker restart
    # Bounded so that a long outage cannot replay minutes of stale requests (TRAPS.md).
    pending_size_bytes: int = Field(2 * 1024 * 1024, gt=0)
    inbox_prefix: str = "_INBOX"

    @property
    def servers(self) -> list[str]:
        """The comma-separated URL as a list, for clustered deployments."""
        return [u.strip() for u in self.url.split(",") if u.strip()]


class RedisSettings(BaseModel):
    """The Redis cache connection; short timeouts so a sick Redis never stalls requests."""

    url: str = "redis://127.0.0.1:6379/0"
    cluster: bool = False  # the URL names one node of a Redis Cluster
    password: SecretStr | None = None
    tls: TLSSettings = Field(default_factory=TLSSettings)
    socket_timeout_s: float = Field(0.1, gt=0)
    connect_timeout_s: float = Field(0.2, gt=0)


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


class ClientSettings(BaseModel):
    """The gateway client."""

    default_timeout_ms: int = Field(5_000, gt=0)


class LogSettings(BaseModel):
    """Logging: JSON lines by default."""

    level: Literal["TRACE", "DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = True


class Settings(BaseSettings):
    """Everything configurable, one object; load it with `load_settings()`."""

    model_config = SettingsConfigDict(
        env_prefix="NEXUS_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    service: str = "nexus-bus"
    state_dir: Path = Path(".nexus")
    nats: NatsSettings = Field(default_factory=NatsSettings)
    redis: RedisSettings = Field(default_factory=RedisSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    jetstream: JetStreamSettings = Field(default_factory=JetStreamSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    client: ClientSettings = Field(default_factory=ClientSettings)
    log: LogSettings = Field(default_factory=LogSettings)

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


class ConfigError(InvalidRequest):
    """The configuration is invalid; the message lists every problem at once."""

    code, title = "invalid_config", "Invalid configuration"


def load_settings(**overrides: object) -> Settings:
    """Read settings from the environment (and `NEXUS_CONFIG` TOML file), once, at the edge.

    Raises:
        ConfigError: listing every invalid or unknown setting.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from exc
