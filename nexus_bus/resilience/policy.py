"""Resilience policies per operation: settings, seed defaults, and the resolved table. Pure.

Settings name policies by `op.action` or by `op`; a field left unset falls back to the op's
policy, then to `defaults` (which carry the seed's values: 30 s timeout, 3 attempts,
exponential backoff, a 20% retry budget). Resolution happens once, at start; a bad policy
fails start-up with one error listing every problem (`problems_of`).

    table = PolicyTable.from_settings(settings.resilience)
    policy = table.get("data", "get")          # a dict lookup per request
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Final

from pydantic import BaseModel, Field, model_validator

from nexus_bus.constants import TOKEN

_NAME: Final = re.compile(rf"{TOKEN}(\.{TOKEN})?")


class PolicySettings(BaseModel):
    """One operation's policy as configured; None means "inherit" (op, then defaults)."""

    timeout_ms: int | None = None  # the most a call may take, retries included
    attempt_timeout_ms: int | None = None  # 0: each attempt may use the whole remaining budget
    attempts: int | None = None  # total tries, the first included
    backoff_base_ms: int | None = None
    backoff_max_ms: int | None = None
    backoff_factor: float | None = None
    retry_budget_ratio: float | None = None  # retries stay under this share of requests
    retry_budget_min_per_s: float | None = None  # retries always allowed at this rate
    idempotent: bool | None = None  # timeouts may be retried without an Idempotency-Key
    breaker_failures: int | None = None  # consecutive failures that open the breaker
    breaker_reset_ms: int | None = None  # first probe after opening; doubles per failed probe
    breaker_reset_max_ms: int | None = None
    cacheable: bool | None = None  # answers from the cache on failure (stale-if-error)
    stale_if_error_s: float | None = None  # the oldest cached answer served on failure
    rate_limit_per_s: float | None = None  # per token subject; 0: no limit
    rate_limit_burst: int | None = None  # requests allowed at once above the steady rate


def _seed_defaults() -> PolicySettings:
    return PolicySettings(
        timeout_ms=30_000,
        attempt_timeout_ms=0,
        attempts=3,
        backoff_base_ms=50,
        backoff_max_ms=1_000,
        backoff_factor=2.0,
        retry_budget_ratio=0.2,
        retry_budget_min_per_s=1.0,
        idempotent=False,
        breaker_failures=5,
        breaker_reset_ms=1_000,
        breaker_reset_max_ms=30_000,
        cacheable=False,
        stale_if_error_s=300.0,
        rate_limit_per_s=0.0,
        rate_limit_burst=0,
    )


_SEED: Final = _seed_defaults()


def _seed_ops() -> dict[str, PolicySettings]:
    # Reads are safe to repeat; `data.get` may also be answered from the cache on failure.
    return {
        "data.get": PolicySettings(idempotent=True, cacheable=True),
        "data.list": PolicySettings(idempotent=True),
        "stream.read": PolicySettings(idempotent=True),
        "auth.verify": PolicySettings(idempotent=True),
        "ai.embed": PolicySettings(idempotent=True),
        "ai.similar": PolicySettings(idempotent=True),
    }


class ScopeLimit(BaseModel):
    """A rate limit for tokens holding a scope, on every operation (per subject and op)."""

    rate_limit_per_s: float
    rate_limit_burst: int = 0


class ResilienceSettings(BaseModel):
    """The policy layer of the gateway client and shim (docs/resilience.md).

    `defaults` fields left unset keep the seed values (`_seed_defaults`).
    """

    enabled: bool = True
    defaults: PolicySettings = Field(default_factory=_seed_defaults)
    # Keyed `op.action` or `op`; merged over the seed entries, so adding one keeps the rest.
    ops: dict[str, PolicySettings] = Field(default_factory=dict)
    # Breaker state shared through Redis: how often each replica reads it (ms).
    shared_breakers: bool = True
    sync_interval_ms: int = 250
    # Idempotency-Key on the synchronous path (enforced by workers).
    idempotency_retention_s: float = 24 * 3600.0
    idempotency_lease_ms: int = 30_000  # a running first execution holds the key this long
    # Rate limits shared through Redis; the per-call timeout before failing open.
    rate_limit_timeout_ms: int = 50
    # Per token scope (e.g. {"tier:free": {"rate_limit_per_s": 5}}): a token holding one of
    # these scopes gets its limit on every op instead of the op's (the highest rate wins).
    scope_limits: dict[str, ScopeLimit] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self) -> ResilienceSettings:
        problems = problems_of(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def merged_ops(self) -> dict[str, PolicySettings]:
        """The seed per-op entries with the configured ones laid over them, field by field."""
        merged = _seed_ops()
        for name, configured in self.ops.items():
            seeded = merged.get(name)
            if seeded is None:
                merged[name] = configured
            else:
                update = configured.model_dump(exclude_none=True)
                merged[name] = seeded.model_copy(update=update)
        return merged


@dataclass(frozen=True, slots=True, kw_only=True)
class OperationPolicy:
    """A resolved policy: every field set. Times in seconds."""

    timeout_s: float
    attempt_timeout_s: float  # 0: the whole remaining budget
    attempts: int
    backoff_base_s: float
    backoff_max_s: float
    backoff_factor: float
    retry_budget_ratio: float
    retry_budget_min_per_s: float
    idempotent: bool
    breaker_failures: int
    breaker_reset_s: float
    breaker_reset_max_s: float
    cacheable: bool
    stale_if_error_s: float
    rate_limit_per_s: float
    rate_limit_burst: int

    def as_dict(self) -> dict[str, float | int | bool]:
        """The policy as plain values (for `GET /v1/ops` and `nexus-bus ops`)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _layered(*layers: PolicySettings | None) -> dict[str, object]:
    values: dict[str, object] = {}
    for layer in layers:
        if layer is not None:
            values.update(layer.model_dump(exclude_none=True))
    return values


def _resolve(values: dict[str, object]) -> OperationPolicy:
    def ms(name: str) -> float:
        return float(values[name]) / 1000  # type: ignore[arg-type]

    return OperationPolicy(
        timeout_s=ms("timeout_ms"),
        attempt_timeout_s=ms("attempt_timeout_ms"),
        attempts=int(values["attempts"]),  # type: ignore[call-overload]
        backoff_base_s=ms("backoff_base_ms"),
        backoff_max_s=ms("backoff_max_ms"),
        backoff_factor=float(values["backoff_factor"]),  # type: ignore[arg-type]
        retry_budget_ratio=float(values["retry_budget_ratio"]),  # type: ignore[arg-type]
        retry_budget_min_per_s=float(values["retry_budget_min_per_s"]),  # type: ignore[arg-type]
        idempotent=bool(values["idempotent"]),
        breaker_failures=int(values["breaker_failures"]),  # type: ignore[call-overload]
        breaker_reset_s=ms("breaker_reset_ms"),
        breaker_reset_max_s=ms("breaker_reset_max_ms"),
        cacheable=bool(values["cacheable"]),
        stale_if_error_s=float(values["stale_if_error_s"]),  # type: ignore[arg-type]
        rate_limit_per_s=float(values["rate_limit_per_s"]),  # type: ignore[arg-type]
        rate_limit_burst=int(values["rate_limit_burst"]),  # type: ignore[call-overload]
    )


_RULES: Final[tuple[tuple[str, str, float, float], ...]] = (
    # field, what it must be, lowest allowed, highest allowed
    ("timeout_ms", "1 ms to 1 hour", 1, 3_600_000),
    ("attempt_timeout_ms", "0 to 1 hour", 0, 3_600_000),
    ("attempts", "1 to 10", 1, 10),
    ("backoff_base_ms", "0 to 60 s", 0, 60_000),
    ("backoff_max_ms", "0 to 10 minutes", 0, 600_000),
    ("backoff_factor", "1 to 10", 1, 10),
    ("retry_budget_ratio", "0 to 1", 0, 1),
    ("retry_budget_min_per_s", "0 to 1000", 0, 1000),
    ("breaker_failures", "1 to 10000", 1, 10_000),
    ("breaker_reset_ms", "1 ms to 10 minutes", 1, 600_000),
    ("breaker_reset_max_ms", "1 ms to 1 hour", 1, 3_600_000),
    ("stale_if_error_s", "0 to 30 days", 0, 30 * 24 * 3600),
    ("rate_limit_per_s", "0 (off) to 1e6", 0, 1e6),
    ("rate_limit_burst", "0 to 1e6", 0, 1e6),
)


_PAIRS: Final = (
    # (lower, upper): upper must not be below lower
    ("backoff_base_ms", "backoff_max_ms"),
    ("breaker_reset_ms", "breaker_reset_max_ms"),
    ("attempt_timeout_ms", "timeout_ms"),
)


def _policy_problems(where: str, values: dict[str, object], own: set[str]) -> list[str]:
    """Problems of the fields set at `where` (`own`); inherited ones are reported once."""
    problems: list[str] = []
    for name, rule, low, high in _RULES:
        value = values.get(name)
        if name in own and isinstance(value, int | float) and not low <= value <= high:
            problems.append(f"{where}.{name}: {value} is outside {rule}")
    for lower, upper in _PAIRS:
        small, large = values.get(lower), values.get(upper)
        if not own & {lower, upper} or not isinstance(small, int) or not isinstance(large, int):
            continue
        if upper == "timeout_ms" and small == 0:
            continue  # 0: each attempt may use the whole remaining budget
        if large < small:
            problems.append(f"{where}: {upper} ({large}) must not be below {lower} ({small})")
    return problems


def problems_of(settings: ResilienceSettings) -> list[str]:
    """Every problem of the configured policies, each as `resilience.<where>.<field>: why`."""
    problems: list[str] = []
    if not 10 <= settings.sync_interval_ms <= 10_000:
        problems.append("resilience.sync_interval_ms: must be 10 to 10000")
    if settings.idempotency_retention_s <= 0:
        problems.append("resilience.idempotency_retention_s: must be positive")
    if settings.idempotency_lease_ms <= 0:
        problems.append("resilience.idempotency_lease_ms: must be positive")
    if not 1 <= settings.rate_limit_timeout_ms <= 10_000:
        problems.append("resilience.rate_limit_timeout_ms: must be 1 to 10000")
    for scope, limit in settings.scope_limits.items():
        if not 0 < limit.rate_limit_per_s <= 1e6 or not 0 <= limit.rate_limit_burst <= 1e6:
            problems.append(
                f"resilience.scope_limits[{scope!r}]: rate must be above 0 and at most 1e6, "
                "burst 0 to 1e6"
            )
    base = _layered(_SEED, settings.defaults)
    own_defaults = set(settings.defaults.model_dump(exclude_none=True))
    problems += _policy_problems("resilience.defaults", base, own_defaults)
    merged = settings.merged_ops()
    for name, configured in merged.items():
        where = f"resilience.ops[{name!r}]"
        if not _NAME.fullmatch(name):
            problems.append(f"{where}: name must be `op` or `op.action` (lowercase tokens)")
            continue
        op = name.split(".", 1)[0]
        layers = [_SEED, settings.defaults, merged.get(op) if "." in name else None, configured]
        own = set(configured.model_dump(exclude_none=True))
        problems += _policy_problems(where, _layered(*layers), own)
    return problems


class PolicyTable:
    """Resolved policies: `get(op, action)` is a dict lookup, cached per pair."""

    def __init__(self, settings: ResilienceSettings) -> None:
        """Resolve every configured policy (settings were validated when they were built)."""
        self._settings = settings
        self._ops = settings.merged_ops()
        self.default = _resolve(_layered(_SEED, settings.defaults))
        self._resolved: dict[tuple[str, str], OperationPolicy] = {}

    @classmethod
    def from_settings(cls, settings: ResilienceSettings) -> PolicyTable:
        """The table for `settings.resilience`."""
        return cls(settings)

    def get(self, op: str, action: str) -> OperationPolicy:
        """The policy of `op.action` (its own entry, then its op's, then the defaults)."""
        found = self._resolved.get((op, action))
        if found is not None:
            return found
        own = self._ops.get(f"{op}.{action}")
        group = self._ops.get(op)
        if own is None and group is None:
            found = self.default
        else:
            found = _resolve(_layered(_SEED, self._settings.defaults, group, own))
        if len(self._resolved) < 4096:  # names were validated; still, stay bounded
            self._resolved[(op, action)] = found
        return found

    def longest_timeout_s(self, op: str) -> float:
        """The longest `timeout_s` of any action of `op`: no call of the op has a longer
        budget (the guard caps every caller's at its action's)."""
        longest = self.get(op, "").timeout_s  # the op's entry, or the defaults
        prefix = f"{op}."
        for name in self._ops:
            if name.startswith(prefix):
                longest = max(longest, self.get(op, name[len(prefix) :]).timeout_s)
        return longest

    def named(self) -> dict[str, OperationPolicy]:
        """Every explicitly configured entry, resolved (for docs and `GET /v1/ops`)."""
        result: dict[str, OperationPolicy] = {"*": self.default}
        for name in sorted(self._ops):
            op, _, action = name.partition(".")
            result[name] = self.get(op, action) if action else _resolve(
                _layered(_SEED, self._settings.defaults, self._ops[name])
            )
        return result
