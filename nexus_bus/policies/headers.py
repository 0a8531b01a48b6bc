"""Reply headers of the policy layer that the HTTP shim passes on to its clients."""

from __future__ import annotations

from typing import Final

from nexus_bus.constants import H_IDEMPOTENT_REPLAYED, H_RATELIMIT, H_RATELIMIT_POLICY, H_STALE_AGE

_PASSED: Final = tuple(
    (name, name.lower().encode())
    for name in (H_STALE_AGE, H_IDEMPOTENT_REPLAYED, H_RATELIMIT_POLICY, H_RATELIMIT)
)


def passed_headers(reply_headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    """The policy headers a reply carries, as HTTP header pairs (usually none)."""
    found: list[tuple[bytes, bytes]] = []
    for name, http_name in _PASSED:
        value = reply_headers.get(name)
        if value is not None:
            found.append((http_name, value.encode("latin-1", "replace")))
    return found
