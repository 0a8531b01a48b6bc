"""The authentication seam the worker runtime calls before any handler."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from nexus_bus.context import Principal
from nexus_bus.operations import Operation


class Authenticator(Protocol):
    """Establishes who sent a request and whether they may call the operation."""

    async def authenticate(
        self, headers: Mapping[str, str], operation: Operation
    ) -> Principal | None:
        """The principal, or None for a public operation called without a token.

        Raises:
            InvalidToken: missing or invalid credentials (401).
            Forbidden: valid credentials without the operation's scope (403).
            Unavailable: the token service cannot be reached (503) — never a silent allow.
        """
        ...


class NoAuthentication:
    """Accepts every request anonymously. For local development and tests only."""

    async def authenticate(
        self, headers: Mapping[str, str], operation: Operation
    ) -> Principal | None:
        """Always None: nobody is identified, everything is allowed."""
        return None
