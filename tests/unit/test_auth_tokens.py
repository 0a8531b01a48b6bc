"""Token signing and checking: every way a token can be bad is refused (no I/O)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexus_bus.auth.keys import Keyring
from nexus_bus.auth.tokens import TokenCodec, TokenPolicy, unverified_subject
from nexus_bus.errors import InvalidToken, Unavailable

NOW = 1_800_000_000
KEY = Ed25519PrivateKey.generate()
OTHER = Ed25519PrivateKey.generate()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, object], claims: dict[str, object], sign: object = None) -> str:
    """A token built by hand, signed by `sign(signing_input) -> bytes` (or not at all)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = sign(signing_input.encode()) if callable(sign) else b""
    return f"{signing_input}.{b64(signature)}" if signature else f"{signing_input}."


def good_claims(**changes: object) -> dict[str, object]:
    claims: dict[str, object] = {
        "iss": "nexus-bus", "aud": "nexus-bus", "sub": "svc", "scope": "data:get",
        "iat": NOW, "nbf": NOW, "exp": NOW + 600, "jti": "j1",
    }
    claims.update(changes)
    return claims


@pytest.fixture
def codec() -> TokenCodec:
    return TokenCodec(Keyring({}, {"k1": KEY}), TokenPolicy(leeway_s=5, max_ttl_s=3600))


def test_issue_then_verify_round_trips(codec: TokenCodec) -> None:
    signed = codec.issue("svc", frozenset({"data:get", "data:put"}), 600, now=NOW, jti="abc")
    claims, kid = codec.verify(signed.token, NOW + 1)
    assert kid == "k1" == signed.kid
    assert claims.sub == "svc" and claims.jti == "abc"
    assert claims.scopes == {"data:get", "data:put"}
    assert (claims.iat, claims.nbf, claims.exp) == (NOW, NOW, NOW + 600)
    header = jwt.get_unverified_header(signed.token)
    assert header["alg"] == "EdDSA" and header["kid"] == "k1"


def test_issue_refuses_a_lifetime_verifiers_would_refuse(codec: TokenCodec) -> None:
    with pytest.raises(ValueError, match="ttl_s"):
        codec.issue("svc", frozenset({"*"}), 3601, now=NOW, jti="x")


def test_verify_only_keyring_cannot_sign() -> None:
    codec = TokenCodec(Keyring({"k1": KEY.public_key()}))
    with pytest.raises(Unavailable):
        codec.issue("svc", frozenset({"*"}), 60, now=NOW, jti="x")


def test_tampered_payload_is_refused(codec: TokenCodec) -> None:
    token = codec.issue("svc", frozenset({"data:get"}), 600, now=NOW, jti="j").token
    header, _, signature = token.split(".")
    forged = b64(json.dumps(good_claims(scope="*")).encode())
    with pytest.raises(InvalidToken, match="signature"):
        codec.verify(f"{header}.{forged}.{signature}", NOW)


def test_tampered_signature_is_refused(codec: TokenCodec) -> None:
    token = codec.issue("svc", frozenset({"data:get"}), 600, now=NOW, jti="j").token
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    with pytest.raises(InvalidToken):
        codec.verify(flipped, NOW)


@pytest.mark.parametrize("cut", [1, 10, 40, -1])
def test_truncated_token_is_refused(codec: TokenCodec, cut: int) -> None:
    token = codec.issue("svc", frozenset({"data:get"}), 600, now=NOW, jti="j").token
    with pytest.raises(InvalidToken):
        codec.verify(token[:cut] if cut > 0 else token[:cut * 20], NOW)


def test_oversized_token_is_refused_before_parsing(codec: TokenCodec) -> None:
    with pytest.raises(InvalidToken, match="larger than 4096"):
        codec.verify("a" * 2000 + "." + "b" * 2000 + "." + "c" * 200, NOW)


@pytest.mark.parametrize(
    "garbage", ["", "abc", "a.b", "a.b.c.d", "ey J.x.y", "é.é.é", "Bearer x.y.z", "...."]
)
def test_malformed_tokens_are_refused(codec: TokenCodec, garbage: str) -> None:
    with pytest.raises(InvalidToken):
        codec.verify(garbage, NOW)


def test_token_signed_by_another_key_with_our_kid_is_refused(codec: TokenCodec) -> None:
    token = TokenCodec(Keyring({}, {"k1": OTHER})).issue(
        "svc", frozenset({"*"}), 600, now=NOW, jti="j"
    ).token
    with pytest.raises(InvalidToken, match="signature"):
        codec.verify(token, NOW)


def test_unknown_or_missing_kid_is_refused(codec: TokenCodec) -> None:
    token = TokenCodec(Keyring({}, {"k9": OTHER})).issue(
        "svc", frozenset({"*"}), 600, now=NOW, jti="j"
    ).token
    with pytest.raises(InvalidToken, match="key id"):
        codec.verify(token, NOW)
    no_kid = craft({"alg": "EdDSA"}, good_claims(), KEY.sign)
    with pytest.raises(InvalidToken, match="key id"):
        codec.verify(no_kid, NOW)
    list_kid = craft({"alg": "EdDSA", "kid": ["k1"]}, good_claims(), KEY.sign)
    with pytest.raises(InvalidToken):
        codec.verify(list_kid, NOW)


def test_alg_none_is_refused(codec: TokenCodec) -> None:
    unsigned = craft({"alg": "none", "kid": "k1"}, good_claims())
    with pytest.raises(InvalidToken, match="malformed"):
        codec.verify(unsigned, NOW)  # the empty signature segment of alg=none
    with pytest.raises(InvalidToken, match="algorithm"):
        codec.verify(unsigned + "AAAA", NOW)


def test_hmac_with_the_public_key_as_secret_is_refused(codec: TokenCodec) -> None:
    # The classic algorithm confusion: HS256 keyed with the (public) verification key.
    public_pem = KEY.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    for secret in (public_pem, KEY.public_key().public_bytes_raw()):
        token = craft(
            {"alg": "HS256", "kid": "k1"},
            good_claims(scope="*"),
            lambda data, s=secret: hmac.new(s, data, hashlib.sha256).digest(),
        )
        with pytest.raises(InvalidToken, match="algorithm"):
            codec.verify(token, NOW)


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA ", "eddsa", "Ed25519", ""])
def test_any_other_alg_is_refused(codec: TokenCodec, alg: str) -> None:
    token = craft({"alg": alg, "kid": "k1"}, good_claims(), KEY.sign)
    with pytest.raises(InvalidToken, match="algorithm"):
        codec.verify(token, NOW)


def test_expired_not_yet_valid_and_future_tokens_are_refused(codec: TokenCodec) -> None:
    token = codec.issue("svc", frozenset({"data:get"}), 600, now=NOW, jti="j").token
    codec.verify(token, NOW + 600 + 4)  # within the 5 s leeway
    with pytest.raises(InvalidToken, match="expired"):
        codec.verify(token, NOW + 600 + 5)
    codec.verify(token, NOW - 5)
    with pytest.raises(InvalidToken, match="not yet valid"):
        codec.verify(token, NOW - 6)
    future_iat = craft({"alg": "EdDSA", "kid": "k1"}, good_claims(iat=NOW + 100), KEY.sign)
    with pytest.raises(InvalidToken, match="future"):
        codec.verify(future_iat, NOW)


def test_lifetime_over_the_maximum_is_refused(codec: TokenCodec) -> None:
    token = craft({"alg": "EdDSA", "kid": "k1"}, good_claims(exp=NOW + 3601), KEY.sign)
    with pytest.raises(InvalidToken, match="lifetime"):
        codec.verify(token, NOW)
    backwards = craft({"alg": "EdDSA", "kid": "k1"}, good_claims(exp=NOW), KEY.sign)
    with pytest.raises(InvalidToken, match="lifetime"):
        codec.verify(backwards, NOW)


@pytest.mark.parametrize("missing", ["sub", "jti", "exp", "nbf", "iat", "scope", "iss", "aud"])
def test_every_claim_is_required(codec: TokenCodec, missing: str) -> None:
    claims = good_claims()
    del claims[missing]
    with pytest.raises(InvalidToken, match="claims"):
        codec.verify(craft({"alg": "EdDSA", "kid": "k1"}, claims, KEY.sign), NOW)


def test_claims_must_have_the_right_types(codec: TokenCodec) -> None:
    token = craft({"alg": "EdDSA", "kid": "k1"}, good_claims(exp=str(NOW + 60)), KEY.sign)
    with pytest.raises(InvalidToken, match="claims"):
        codec.verify(token, NOW)


def test_wrong_issuer_or_audience_is_refused(codec: TokenCodec) -> None:
    for changes in ({"iss": "someone-else"}, {"aud": "another-api"}):
        token = craft({"alg": "EdDSA", "kid": "k1"}, good_claims(**changes), KEY.sign)
        with pytest.raises(InvalidToken, match="issuer or audience"):
            codec.verify(token, NOW)


def test_unverified_subject_is_best_effort(codec: TokenCodec) -> None:
    token = codec.issue("alice", frozenset({"*"}), 60, now=NOW, jti="j").token
    assert unverified_subject(token, 4096) == "alice"
    assert unverified_subject("garbage", 4096) is None
    assert unverified_subject(token, 10) is None
    assert unverified_subject(craft({"alg": "x"}, {"sub": 5}), 4096) is None


def test_revocations_outlive_every_token_they_can_kill(codec: TokenCodec) -> None:
    policy = codec.policy
    assert policy.revocation_ttl_s == policy.max_ttl_s + policy.leeway_s
    # The latest a token issued "now" can still pass is now + max_ttl + leeway.
    token = codec.issue("svc", frozenset({"*"}), policy.max_ttl_s, now=NOW, jti="j").token
    codec.verify(token, NOW + policy.revocation_ttl_s - 1)
    with pytest.raises(InvalidToken):
        codec.verify(token, NOW + policy.revocation_ttl_s)
