"""Settings of the `ai.*` operations: model backends, chosen per model name (docs/ai.md).

    NEXUS_AI__BACKENDS__OPENAI__KIND=openai
    NEXUS_AI__BACKENDS__OPENAI__BASE_URL=https://api.openai.com/v1
    NEXUS_AI__BACKENDS__OPENAI__API_KEY_ENV=OPENAI_API_KEY
    NEXUS_AI__BACKENDS__OPENAI__MODELS='["gpt-4o-mini", "text-embedding-3-small"]'
    NEXUS_AI__DEFAULT_COMPLETE_MODEL=gpt-4o-mini

Pure: pydantic only. The API key itself is never a setting's value in a file that could be
logged: it is read from the environment variable or the file the settings name, when the
backend is created, and kept in a `SecretStr`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

HASH_MODEL: Final = "hash-256"
LOCAL_MINILM: Final = "all-MiniLM-L6-v2"


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

    requests_per_min: float = Field(0.0, ge=0)
    tokens_per_min: float = Field(0.0, ge=0)  # estimated: prompt chars / 4 + max_tokens


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


def read_api_key(backend: BackendSettings, environ: dict[str, str]) -> SecretStr | None:
    """The backend's API key, from its environment variable or secret file (None: no key).

    Raises:
        ValueError: the variable is unset or the file cannot be read (naming which, never
            the value).
    """
    if backend.api_key_env:
        value = environ.get(backend.api_key_env)
        if not value:
            raise ValueError(f"environment variable {backend.api_key_env} is not set")
        return SecretStr(value.strip())
    if backend.api_key_file:
        try:
            return SecretStr(backend.api_key_file.read_text().strip())
        except OSError as exc:
            raise ValueError(f"cannot read api_key_file {backend.api_key_file}: {exc}") from exc
    return None
