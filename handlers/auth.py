"""`auth.*`: the token service as operations.

- `auth.issue` (scope `auth:issue`): mints a token for any subject, with scopes the caller
  holds itself (a caller with `auth:issue` alone cannot mint `*`), expiring no later than the
  caller's own token. Never without a caller
  (a worker running with auth disabled refuses it; `nexus-bus token issue` is for operators).
- `auth.verify` (scope `auth:verify`): checks a token given in the body and returns its
  claims; 401 `invalid_token` when it is not valid. Not public: an open verification oracle
  would let anyone test stolen or guessed tokens without being rate limited.
- `auth.revoke` (scope `auth:revoke`): revokes a token id everywhere.
"""

from __future__ import annotations

from nexus_bus import Operations, RequestContext
from nexus_bus.auth import token_service_of
from nexus_bus.constants import AUTH_OP
from nexus_bus.errors import Forbidden, InvalidToken
from nexus_bus.schemas.auth import (
    IssueReply,
    IssueRequest,
    RevokeReply,
    RevokeRequest,
    VerifyReply,
    VerifyRequest,
)

ops = Operations(AUTH_OP, description="The token service: issue, verify, revoke.", _builtin=True)


@ops.action("issue", idempotent=False)
async def issue(req: IssueRequest, ctx: RequestContext) -> IssueReply:
    """Sign a token for `subject` with `scopes` (each held by the caller) for `ttl_s`."""
    if ctx.principal is None:
        # Only on a worker running without authentication: minting there would hand out
        # tokens that real (enforcing) workers sharing the keys accept. Use the CLI instead.
        raise Forbidden("auth.issue needs an authenticated caller")
    service = await token_service_of(ctx.services)
    signed = service.issue(req.subject, frozenset(req.scopes), req.ttl_s, issuer=ctx.principal)
    return IssueReply(token=signed.token, expires_at=signed.claims.exp, jti=signed.claims.jti)


@ops.action("verify")
async def verify(req: VerifyRequest, ctx: RequestContext) -> VerifyReply:
    """The claims of a valid token; 401 `invalid_token` when it is not valid now."""
    service = await token_service_of(ctx.services)
    try:
        principal = await service.verify(req.token)
    except InvalidToken as exc:
        raise InvalidToken(f"the token to verify is not valid: {exc.detail}") from None
    return VerifyReply(
        subject=principal.subject,
        scopes=sorted(principal.scopes),
        expires_at=principal.expires_at or 0,
        jti=principal.jti or "",
    )


@ops.action("revoke")
async def revoke(req: RevokeRequest, ctx: RequestContext) -> RevokeReply:
    """Revoke token id `jti` on every worker (idempotent)."""
    service = await token_service_of(ctx.services)
    await service.revoke(req.jti)
    return RevokeReply(jti=req.jti, revoked=True)
