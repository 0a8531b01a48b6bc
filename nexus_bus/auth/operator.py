"""What an operator holding the keys does from the command line, without any worker.

- `issue_token`: sign a token with the local keyring (how the first admin token is made:
  `auth.issue` itself needs a token).
- `revoke_token`: record a revocation in the JetStream KV bucket and in Redis, and send the
  notice on NATS, exactly as `auth.revoke` does.
- `dev_admin_token`: for `nexus-bus up`, create a dev signing key in the state directory when
  there is none and sign an all-scopes token with it.
"""

from __future__ import annotations

import os
import time
from typing import Final

from nexus_bus.auth.keys import generate_key, keys_dir_of, load_keyring
from nexus_bus.auth.scopes import WILDCARD, check_scope
from nexus_bus.auth.service import new_jti, revocation_store
from nexus_bus.auth.tokens import SignedToken, TokenCodec, TokenPolicy
from nexus_bus.bus.connection import connect_nats
from nexus_bus.config import Settings
from nexus_bus.constants import (
    AUTH_PRIVATE_KEY_SUFFIX,
    AUTH_PUBLIC_KEY_SUFFIX,
    AUTH_REVOKED_SUBJECT,
)
from nexus_bus.errors import InvalidRequest
from nexus_bus.redis_client import create_redis
from nexus_bus.stackfile import DEV_TOKEN_FILE, read_dev_token

DEV_ADMIN_SUBJECT: Final = "dev-admin"
DEV_ADMIN_TTL_S: Final = 24 * 3600


def issue_token(
    settings: Settings, subject: str, scopes: frozenset[str], ttl_s: int | None = None
) -> SignedToken:
    """Sign a token with the active key under the configured keys directory.

    Raises:
        InvalidRequest: an empty subject, a malformed scope, or a lifetime over the maximum.
        ConfigError: no usable keys.
        Unavailable: the keys directory holds public keys only.
    """
    policy = TokenPolicy.from_settings(settings.auth)
    ttl = ttl_s or settings.auth.default_ttl_s
    if not subject or len(subject) > 256:
        raise InvalidRequest("subject must be 1 to 256 characters")
    if ttl > policy.max_ttl_s:
        raise InvalidRequest(f"ttl {ttl}s exceeds auth.max_ttl_s ({policy.max_ttl_s}s)")
    for scope in scopes:
        check_scope(scope)
    codec = TokenCodec(load_keyring(settings), policy)
    return codec.issue(subject, scopes, ttl, now=int(time.time()), jti=new_jti())


async def revoke_token(settings: Settings, jti: str) -> None:
    """Revoke `jti` in the shared store and notify every worker.

    Raises:
        InvalidRequest: an empty or oversized id.
        Unavailable: NATS or JetStream cannot be reached (nothing was revoked), or Redis
            cannot (recorded, but not yet seen by lookups: run it again).
    """
    if not 0 < len(jti) <= 128:
        raise InvalidRequest("jti must be 1 to 128 characters")
    nc = await connect_nats(settings.nats, name=f"{settings.service}-cli")
    redis = create_redis(settings.redis)
    try:
        await revocation_store(settings, redis, nc).revoke(jti)
        await nc.publish(AUTH_REVOKED_SUBJECT, jti.encode())
    finally:
        await redis.aclose()
        await nc.drain()


def dev_admin_token(settings: Settings) -> tuple[str, SignedToken]:
    """An all-scopes token for a local stack, creating a dev signing key when none exists.

    The token is also written to `<state_dir>/admin.token` (mode 0600), where `nexus-bus call`
    finds it when no other token is given.

    Returns:
        The kid of a key created now ("" when one existed) and the token.

    Raises:
        ConfigError: the keys directory holds unusable files.
    """
    directory = keys_dir_of(settings)
    has_private = directory.is_dir() and any(
        f.name.endswith(AUTH_PRIVATE_KEY_SUFFIX) and not f.name.endswith(AUTH_PUBLIC_KEY_SUFFIX)
        for f in directory.iterdir()
    )
    created = "" if has_private else generate_key(directory)
    signed = issue_token(settings, DEV_ADMIN_SUBJECT, frozenset({WILDCARD}), DEV_ADMIN_TTL_S)
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    path = settings.state_dir / DEV_TOKEN_FILE
    path.unlink(missing_ok=True)  # recreated, so the 0600 mode holds even for an old file
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(signed.token)
    return created, signed


def dev_token(settings: Settings) -> str | None:
    """The token `nexus-bus up` left in the state directory, if any."""
    return read_dev_token(settings.state_dir)
