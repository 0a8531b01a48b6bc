"""Signed tokens: compact JWS (JWT) with Ed25519, signed and checked without I/O.

PyJWT does the format and the signature; this module pins the policy around it:

- The algorithm is fixed server-side (`EdDSA`). The library instance knows no other
  algorithm, and a header naming any other (`none`, `HS256` with the public key as an HMAC
  secret, `RS256`...) is refused before a key is even chosen.
- The key is chosen only by `kid` from our keyring; `jku`/`jwk`/`x5u` headers are ignored.
- Size and shape are checked before parsing, so an oversized or garbage header costs nothing.
- Claims decode into a strict Struct: `iss`, `aud`, `sub`, `scope`, `iat`, `nbf`, `exp`,
  `jti`, all required and typed. A lifetime longer than `max_ttl_s` is refused, which is what
  lets a revocation record expire safely (see `revocation.py`).
- Time checks take `now` as an argument (with `leeway_s` for clock skew).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

import jwt
import msgspec

from nexus_bus.auth.keys import Keyring
from nexus_bus.config import AuthSettings
from nexus_bus.constants import AUTH_ALGORITHM
from nexus_bus.errors import InvalidToken

# A JWS instance that knows only our algorithm: nothing the token says can select another.
_JWS: Final = jwt.PyJWS(algorithms=[AUTH_ALGORITHM])
# Matched with fullmatch(): a `$` anchor would let a final newline through.
_SHAPE: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")


class Claims(msgspec.Struct, frozen=True, kw_only=True):
    """The claims every nexus-bus token carries (RFC 7519 names; `scope` as in RFC 9068)."""

    iss: str
    aud: str
    sub: str
    scope: str  # space-separated scopes
    iat: int
    nbf: int
    exp: int
    jti: str

    @property
    def scopes(self) -> frozenset[str]:
        """The granted scopes as a set."""
        return frozenset(self.scope.split())


_encode_claims: Final = msgspec.json.Encoder().encode
_decode_claims: Final = msgspec.json.Decoder(Claims).decode


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a token must satisfy besides its signature."""

    issuer: str = "nexus-bus"
    audience: str = "nexus-bus"
    leeway_s: int = 10
    max_ttl_s: int = 30 * 24 * 3600
    max_token_bytes: int = 4096

    @property
    def revocation_ttl_s(self) -> int:
        """How long a revocation must last: past the latest expiry any accepted token can have."""
        return self.max_ttl_s + self.leeway_s

    @classmethod
    def from_settings(cls, auth: AuthSettings) -> TokenPolicy:
        """The policy configured in `auth`."""
        return cls(
            issuer=auth.issuer,
            audience=auth.audience,
            leeway_s=auth.leeway_s,
            max_ttl_s=auth.max_ttl_s,
            max_token_bytes=auth.max_token_bytes,
        )


@dataclass(frozen=True, slots=True)
class SignedToken:
    """A freshly issued token with its claims and key id."""

    token: str
    claims: Claims
    kid: str


class TokenCodec:
    """Issues and checks tokens against one keyring and policy."""

    def __init__(self, keyring: Keyring, policy: TokenPolicy | None = None) -> None:
        self.keyring = keyring
        self.policy = policy or TokenPolicy()

    def issue(
        self, subject: str, scopes: frozenset[str], ttl_s: int, *, now: int, jti: str
    ) -> SignedToken:
        """Sign a token for `subject` with `scopes`, valid from `now` for `ttl_s` seconds.

        Raises:
            ValueError: `ttl_s` outside 1..max_ttl_s (verifiers would refuse such a token,
                so asking for one is the caller's bug; callers validate input first).
            Unavailable: this keyring holds no signing key.
        """
        if not 0 < ttl_s <= self.policy.max_ttl_s:
            raise ValueError(f"ttl_s must be within 1..{self.policy.max_ttl_s}")
        kid, key = self.keyring.signing_key()
        claims = Claims(
            iss=self.policy.issuer,
            aud=self.policy.audience,
            sub=subject,
            scope=" ".join(sorted(scopes)),
            iat=now,
            nbf=now,
            exp=now + ttl_s,
            jti=jti,
        )
        token = _JWS.encode(
            _encode_claims(claims), key, algorithm=AUTH_ALGORITHM, headers={"kid": kid}
        )
        return SignedToken(token, claims, kid)

    def decode(self, token: str) -> tuple[Claims, str]:
        """Check size, shape, algorithm, key id, signature and claims (not times).

        A token's signature never changes its validity, so callers may remember this result
        and redo only `check_times` and the revocation check.

        Returns:
            The claims and the kid that verified them.

        Raises:
            InvalidToken: too large, malformed, wrong algorithm, unknown kid, bad signature,
                wrong issuer or audience, or a lifetime over the maximum.
        """
        policy = self.policy
        if len(token) > policy.max_token_bytes:
            raise InvalidToken(f"token larger than {policy.max_token_bytes} bytes")
        if not _SHAPE.fullmatch(token):
            raise InvalidToken("malformed token")
        try:
            header = _JWS.get_unverified_header(token)
        except jwt.PyJWTError:
            raise InvalidToken("malformed token header") from None
        if header.get("alg") != AUTH_ALGORITHM:
            raise InvalidToken("token algorithm not allowed")
        kid = header.get("kid")
        key = self.keyring.verification_key(kid) if isinstance(kid, str) else None
        if key is None:
            raise InvalidToken("unknown token key id")
        try:
            payload = _JWS.decode(token, key, algorithms=[AUTH_ALGORITHM])
        except jwt.InvalidSignatureError:
            raise InvalidToken("bad token signature") from None
        except jwt.PyJWTError:
            raise InvalidToken("malformed token") from None
        try:
            claims = _decode_claims(payload)
        except msgspec.MsgspecError:
            raise InvalidToken("malformed token claims") from None
        if claims.iss != policy.issuer or claims.aud != policy.audience:
            raise InvalidToken("token issuer or audience not accepted")
        if not claims.nbf < claims.exp or claims.exp - claims.iat > policy.max_ttl_s:
            raise InvalidToken("token lifetime not accepted")
        return claims, kid  # type: ignore[return-value]  # kid is a str: its key was found

    def check_times(self, claims: Claims, now: float) -> None:
        """Refuse a token outside its validity window at `now` (epoch seconds).

        Raises:
            InvalidToken: expired, not yet valid, or issued in the future.
        """
        leeway = self.policy.leeway_s
        if now >= claims.exp + leeway:
            raise InvalidToken("token expired")
        if now + leeway < claims.nbf:
            raise InvalidToken("token not yet valid")
        if now + leeway < claims.iat:
            raise InvalidToken("token issued in the future")

    def verify(self, token: str, now: float) -> tuple[Claims, str]:
        """`decode` and `check_times` together (no revocation check: that needs I/O).

        Raises:
            InvalidToken: see `decode` and `check_times`.
        """
        claims, kid = self.decode(token)
        self.check_times(claims, now)
        return claims, kid


def unverified_subject(token: str, max_bytes: int) -> str | None:
    """The `sub` a token claims, WITHOUT checking it: only to group failures by client.

    Never use the result for a decision other than rate limiting.
    """
    if len(token) > max_bytes or not _SHAPE.fullmatch(token):
        return None
    try:
        payload = jwt.utils.base64url_decode(token.split(".", 2)[1])
        sub = msgspec.json.decode(payload, type=dict[str, object]).get("sub")
    except (ValueError, msgspec.MsgspecError):
        return None
    return sub[:256] if isinstance(sub, str) else None
