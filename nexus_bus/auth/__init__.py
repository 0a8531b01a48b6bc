"""Authentication and authorization of every request (docs/auth.md)."""

from nexus_bus.auth.authenticator import TokenAuthenticator, bearer_token
from nexus_bus.auth.base import Authenticator, NoAuthentication
from nexus_bus.auth.cache import VerificationCache
from nexus_bus.auth.keys import Keyring, generate_key, keys_dir_of, load_keyring
from nexus_bus.auth.limiter import FailureLimiter
from nexus_bus.auth.revocation import (
    MemoryRevocationStore,
    RevocationStore,
    RevocationStoreWithCache,
)
from nexus_bus.auth.scopes import allows, covers, parse_duration, parse_scopes
from nexus_bus.auth.service import (
    TokenService,
    create_authenticator,
    create_shim_authenticator,
    create_token_service,
    token_service_of,
)
from nexus_bus.auth.tokens import Claims, SignedToken, TokenCodec, TokenPolicy
from nexus_bus.auth.verifier import TokenVerifier

__all__ = [
    "Authenticator",
    "Claims",
    "FailureLimiter",
    "Keyring",
    "MemoryRevocationStore",
    "NoAuthentication",
    "RevocationStore",
    "RevocationStoreWithCache",
    "SignedToken",
    "TokenAuthenticator",
    "TokenCodec",
    "TokenPolicy",
    "TokenService",
    "TokenVerifier",
    "VerificationCache",
    "allows",
    "bearer_token",
    "covers",
    "create_authenticator",
    "create_shim_authenticator",
    "create_token_service",
    "generate_key",
    "keys_dir_of",
    "load_keyring",
    "parse_duration",
    "parse_scopes",
    "token_service_of",
]
