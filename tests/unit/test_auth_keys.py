"""Key files: generation, loading, the active signer, rotation and retirement."""

from __future__ import annotations

import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from nexus_bus.auth.keys import Keyring, generate_key, keys_dir_of, new_kid
from nexus_bus.auth.operator import dev_admin_token, dev_token
from nexus_bus.auth.tokens import TokenCodec
from nexus_bus.config import ConfigError, load_settings
from nexus_bus.errors import InvalidToken

NOW = 1_800_000_000


def test_generate_writes_a_private_key_only_its_owner_reads(tmp_path: Path) -> None:
    kid = generate_key(tmp_path / "keys", kid="k1")
    private = tmp_path / "keys" / "k1.pem"
    assert kid == "k1"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert (tmp_path / "keys" / "k1.pub.pem").exists()
    with pytest.raises(FileExistsError):
        generate_key(tmp_path / "keys", kid="k1")  # never overwrite a key in use
    with pytest.raises(ValueError, match="kid"):
        generate_key(tmp_path / "keys", kid="../evil")


def test_kids_sort_by_creation_time() -> None:
    early = new_kid(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC), "ffff")
    late = new_kid(datetime(2026, 1, 2, 3, 4, 6, tzinfo=UTC), "0000")
    assert early == "20260102T030405Z-ffff"
    assert early < late


def test_newest_private_key_signs_and_every_key_verifies(tmp_path: Path) -> None:
    old = generate_key(tmp_path, now=datetime(2026, 1, 1, tzinfo=UTC))
    old_token = TokenCodec(Keyring.from_dir(tmp_path)).issue(
        "svc", frozenset({"*"}), 60, now=NOW, jti="a"
    )
    new = generate_key(tmp_path, now=datetime(2026, 2, 1, tzinfo=UTC))
    ring = Keyring.from_dir(tmp_path)
    assert ring.active_kid == new and ring.kids == sorted([old, new])
    codec = TokenCodec(ring)
    assert codec.issue("svc", frozenset({"*"}), 60, now=NOW, jti="b").kid == new
    assert codec.verify(old_token.token, NOW)[1] == old  # rotation: old tokens still pass
    pinned = Keyring.from_dir(tmp_path, active_kid=old)
    assert pinned.active_kid == old
    # Retiring the old key (deleting its files) makes its tokens invalid.
    for file in tmp_path.glob(f"{old}*"):
        file.unlink()
    with pytest.raises(InvalidToken, match="key id"):
        TokenCodec(Keyring.from_dir(tmp_path)).verify(old_token.token, NOW)


def test_public_key_files_give_a_verify_only_keyring(tmp_path: Path) -> None:
    kid = generate_key(tmp_path / "full")
    (tmp_path / "pub").mkdir()
    pub = tmp_path / "full" / f"{kid}.pub.pem"
    (tmp_path / "pub" / pub.name).write_bytes(pub.read_bytes())
    ring = Keyring.from_dir(tmp_path / "pub")
    assert ring.kids == [kid] and ring.active_kid is None
    token = TokenCodec(Keyring.from_dir(tmp_path / "full")).issue(
        "svc", frozenset({"*"}), 60, now=NOW, jti="a"
    )
    assert TokenCodec(ring).verify(token.token, NOW)[0].sub == "svc"


def test_missing_or_empty_key_dir_fails_at_start(tmp_path: Path) -> None:
    for path in (tmp_path / "absent", tmp_path):
        with pytest.raises(ConfigError, match="nexus-bus keys generate"):
            Keyring.from_dir(path)


def test_bad_key_files_are_all_reported_without_their_content(tmp_path: Path) -> None:
    (tmp_path / "junk.pem").write_text("-----BEGIN PRIVATE KEY-----\nSECRETSTUFF\n")
    ec = generate_private_key(SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "ec.pem").write_bytes(ec)
    (tmp_path / "bad name!.pem").write_bytes(ec)
    with pytest.raises(ConfigError) as info:
        Keyring.from_dir(tmp_path)
    message = str(info.value)
    assert "junk.pem" in message and "ec.pem: not an Ed25519" in message
    assert "bad name!.pem" in message
    assert "SECRETSTUFF" not in message and "PRIVATE KEY" not in message


def test_mismatched_public_file_is_refused(tmp_path: Path) -> None:
    generate_key(tmp_path, kid="k1")
    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (tmp_path / "k1.pub.pem").write_bytes(other)
    with pytest.raises(ConfigError, match="does not match"):
        Keyring.from_dir(tmp_path)


def test_active_kid_must_have_a_private_key(tmp_path: Path) -> None:
    generate_key(tmp_path, kid="k1")
    with pytest.raises(ConfigError, match="active_kid"):
        Keyring.from_dir(tmp_path, active_kid="k2")


def test_repr_shows_kids_not_keys() -> None:
    ring = Keyring({}, {"k1": Ed25519PrivateKey.generate()})
    assert repr(ring) == "Keyring(kids=['k1'], active_kid='k1')"


def test_keys_dir_defaults_under_the_state_dir(tmp_path: Path) -> None:
    assert keys_dir_of(load_settings(state_dir=tmp_path)) == tmp_path / "keys"
    explicit = load_settings(state_dir=tmp_path, auth={"keys_dir": str(tmp_path / "k")})
    assert keys_dir_of(explicit) == tmp_path / "k"


def test_dev_admin_token_creates_a_key_once_and_leaves_a_private_token(tmp_path: Path) -> None:
    settings = load_settings(state_dir=tmp_path / "state")
    created, first = dev_admin_token(settings)
    assert created and (tmp_path / "state" / "keys" / f"{created}.pem").exists()
    assert first.claims.scopes == {"*"} and first.kid == created
    token_file = tmp_path / "state" / "admin.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert dev_token(settings) == first.token
    again, second = dev_admin_token(settings)
    assert again == "" and second.kid == created  # the existing key is reused
    assert dev_token(settings) == second.token
    assert TokenCodec(Keyring.from_dir(tmp_path / "state" / "keys")).verify(
        second.token, second.claims.iat
    )[0].sub == "dev-admin"
    assert dev_token(load_settings(state_dir=tmp_path / "elsewhere")) is None
