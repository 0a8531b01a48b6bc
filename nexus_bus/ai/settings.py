"""Settings of the `ai.*` operations: model backends, chosen per model name (docs/ai.md).

    NEXUS_AI__BACKENDS__OPENAI__KIND=openai
    NEXUS_AI__BACKENDS__OPENAI__BASE_URL=https://api.openai.com/v1
    NEXUS_AI__BACKENDS__OPENAI__API_KEY_ENV=OPENAI_API_KEY
    NEXUS_AI__BACKENDS__OPENAI__MODELS='["gpt-4o-mini", "text-embedding-3-small"]'
    NEXUS_AI__DEFAULT_COMPLETE_MODEL=gpt-4o-mini

The settings classes live in `nexus_bus.config` with every other section (config imports
nothing above it); this module holds the names and the key reading. The API key itself is
never a setting's value in a file that could be logged: it is read from the environment
variable or the file the settings name, when the backend is created, and kept in a
`SecretStr`.
"""

from __future__ import annotations

from typing import Final

from pydantic import SecretStr

from nexus_bus.config import AISettings, BackendSettings, BudgetSettings

__all__ = [
    "HASH_MODEL",
    "LOCAL_MINILM",
    "AISettings",
    "BackendSettings",
    "BudgetSettings",
    "read_api_key",
]

HASH_MODEL: Final = "hash-256"
LOCAL_MINILM: Final = "all-MiniLM-L6-v2"


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
