"""Signing keys: Ed25519 key pairs by key id (`kid`), loaded from files, never from code.

A keys directory holds `<kid>.pem` (a PKCS#8 private key: this process may sign) and/or
`<kid>.pub.pem` (a public key: verify only). Rotation is a file operation:

1. `nexus-bus keys generate` writes a new key; kids sort by creation time, so the newest
   private key becomes the active signer (or pin one with `auth.active_kid`).
2. Tokens signed with older keys keep verifying while their files stay.
3. Retire a key by deleting its files; its tokens then fail with `invalid_token`.

Key material never appears in a log line, an error message or a repr.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nexus_bus.config import ConfigError, Settings
from nexus_bus.constants import AUTH_KEYS_DIR, AUTH_PRIVATE_KEY_SUFFIX, AUTH_PUBLIC_KEY_SUFFIX
from nexus_bus.errors import Unavailable
from nexus_bus.observability import logger

# Matched with fullmatch(): a `$` anchor would let a final newline into a file name.
KID_PATTERN: Final = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")
_RAW: Final = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class Keyring:
    """The keys one process verifies with, and the one it signs with (if any)."""

    def __init__(
        self,
        public: Mapping[str, Ed25519PublicKey],
        private: Mapping[str, Ed25519PrivateKey] | None = None,
        *,
        active_kid: str | None = None,
    ) -> None:
        """Build a keyring.

        Args:
            public: verification keys by kid.
            private: signing keys by kid (their public halves are added to `public`).
            active_kid: the kid new tokens are signed with; default the greatest private kid.

        Raises:
            ConfigError: `active_kid` names no private key.
        """
        self._private = dict(private or {})
        self._public = dict(public)
        for kid, key in self._private.items():
            self._public[kid] = key.public_key()
        if active_kid is not None and active_kid not in self._private:
            raise ConfigError(f"auth.active_kid {active_kid!r} has no private key")
        self.active_kid = active_kid or (max(self._private) if self._private else None)

    def __repr__(self) -> str:
        return f"Keyring(kids={self.kids}, active_kid={self.active_kid!r})"

    @property
    def kids(self) -> list[str]:
        """Every kid this keyring verifies, sorted."""
        return sorted(self._public)

    def verification_key(self, kid: str) -> Ed25519PublicKey | None:
        """The public key for `kid`, or None when unknown or retired."""
        return self._public.get(kid)

    def signing_key(self) -> tuple[str, Ed25519PrivateKey]:
        """The active kid and its private key.

        Raises:
            Unavailable: this process holds no private key (a verify-only worker).
        """
        if self.active_kid is None:
            raise Unavailable("this token service holds no signing key")
        return self.active_kid, self._private[self.active_kid]

    @classmethod
    def from_dir(cls, path: Path, *, active_kid: str | None = None) -> Keyring:
        """Load every `<kid>.pem` and `<kid>.pub.pem` under `path`.

        Raises:
            ConfigError: the directory holds no usable key, or a file is not an Ed25519 key,
                or a public key does not match its private key (every problem at once).
        """
        public: dict[str, Ed25519PublicKey] = {}
        private: dict[str, Ed25519PrivateKey] = {}
        problems: list[str] = []
        files = sorted(path.iterdir()) if path.is_dir() else []
        for file in files:
            name = file.name
            try:
                if name.endswith(AUTH_PUBLIC_KEY_SUFFIX):
                    kid = _kid_of(name, AUTH_PUBLIC_KEY_SUFFIX)
                    public[kid] = _load_public(file.read_bytes())
                elif name.endswith(AUTH_PRIVATE_KEY_SUFFIX):
                    kid = _kid_of(name, AUTH_PRIVATE_KEY_SUFFIX)
                    private[kid] = _load_private(file.read_bytes())
                    _warn_if_exposed(file)
            except (ValueError, OSError) as exc:
                problems.append(f"{file}: {exc}")
        for kid in public.keys() & private.keys():
            if public[kid].public_bytes(*_RAW) != private[kid].public_key().public_bytes(*_RAW):
                problems.append(f"{kid}: public key does not match the private key")
        if not problems and not public and not private:
            problems.append(
                f"no keys in {path}: run `nexus-bus keys generate`, or to use the keys of a"
                " stack `nexus-bus up` started in another folder, set NEXUS_STATE_DIR to its"
                " state directory (`up` prints the export line)"
            )
        if problems:
            raise ConfigError("auth keys: " + "; ".join(problems))
        return cls(public, private, active_kid=active_kid)


def keys_dir_of(settings: Settings) -> Path:
    """Where this deployment's keys live: `auth.keys_dir`, else `<state_dir>/keys`."""
    return settings.auth.keys_dir or settings.state_dir / AUTH_KEYS_DIR


def load_keyring(settings: Settings) -> Keyring:
    """The keyring the settings point at.

    Raises:
        ConfigError: no usable keys (see `Keyring.from_dir`).
    """
    return Keyring.from_dir(keys_dir_of(settings), active_kid=settings.auth.active_kid)


def new_kid(now: datetime, suffix: str) -> str:
    """A kid that sorts by creation time, e.g. `20260315T101500Z-3fa2`."""
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{suffix}"


def generate_key(
    keys_dir: Path, *, kid: str | None = None, now: datetime | None = None
) -> str:
    """Write a new Ed25519 key pair as `<kid>.pem` (mode 0600) and `<kid>.pub.pem`.

    Returns:
        The new kid.

    Raises:
        ValueError: a malformed kid.
        FileExistsError: a key with that kid exists already.
    """
    kid = kid or new_kid(now or datetime.now(UTC), os.urandom(2).hex())
    if not KID_PATTERN.fullmatch(kid):
        raise ValueError(f"invalid kid {kid[:80]!r}: letters, digits, '.', '_' and '-' only")
    keys_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_new(keys_dir / f"{kid}{AUTH_PRIVATE_KEY_SUFFIX}", private_pem, 0o600)
    _write_new(keys_dir / f"{kid}{AUTH_PUBLIC_KEY_SUFFIX}", public_pem, 0o644)
    return kid


def _write_new(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite a key that signed tokens still in use; the mode is set at
    # creation so the private key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _kid_of(name: str, suffix: str) -> str:
    kid = name[: -len(suffix)]
    if not KID_PATTERN.fullmatch(kid):
        raise ValueError("file name is not a valid kid")
    return kid


def _load_private(data: bytes) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # cryptography's message never quotes the key; ours stays generic anyway.
        raise ValueError("not an unencrypted PEM private key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError("not an Ed25519 private key")
    return key


def _load_public(data: bytes) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a PEM public key") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    return key


def _warn_if_exposed(file: Path) -> None:
    if file.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning("private key file {} is readable by group or others", file)
