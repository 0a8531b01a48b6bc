"""`nexus-bus keys generate`, `token issue` and `token revoke`, run as the real command."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from pathlib import Path

import pytest

from nexus_bus import Gateway, InvalidToken
from tests.conftest import shared_keys_dir


async def nexus_bus(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "nexus_bus", *args,
        env={**os.environ, **env}, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode().strip(), err.decode().strip()


async def test_keys_generate_writes_a_new_key(tmp_path: Path) -> None:
    code, kid, err = await nexus_bus("keys", "generate", "--dir", "k", env={}, cwd=tmp_path)
    assert code == 0, err
    private = tmp_path / "k" / f"{kid}.pem"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert "PRIVATE" not in err and "PRIVATE" not in kid  # never prints key material
    code, _, err = await nexus_bus("keys", "generate", "--dir", "k", "--kid", kid, env={},
                                   cwd=tmp_path)
    assert code == 2 and "exists" in err


async def test_token_issue_and_revoke_work_against_real_workers(
    gateway: Gateway, tmp_path: Path, uid: str
) -> None:
    env = {
        "NEXUS_AUTH__KEYS_DIR": str(shared_keys_dir()),
        "NEXUS_NATS__URL": gateway.settings.nats.url,
        "NEXUS_REDIS__URL": gateway.settings.redis.url,
        "NEXUS_LOG__LEVEL": "WARNING",
    }
    code, token, err = await nexus_bus(
        "token", "issue", "--sub", f"cli-{uid}", "--scopes", "data:get,data:put", "--ttl", "1h",
        env=env, cwd=tmp_path,
    )
    assert code == 0, err
    jti = err.split("jti ", 1)[1].split()[0]
    key = f"cli-{uid}"
    await gateway.request("data", "put", {"key": key, "value": "v"}, token=token)
    assert (await gateway.request("data", "get", {"key": key}, token=token))["value"] == "v"

    code, _, err = await nexus_bus("token", "revoke", jti, env=env, cwd=tmp_path)
    assert code == 0, err
    with pytest.raises(InvalidToken, match="revoked"):
        await gateway.request("data", "get", {"key": key}, token=token)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scopes", "data:get", "--ttl", "400d"], "exceeds"),
        (["--scopes", "Data", "--ttl", "1h"], "invalid scope"),
        (["--scopes", "data:get", "--ttl", "soon"], "invalid duration"),
    ],
)
async def test_token_issue_refuses_bad_input(
    tmp_path: Path, args: list[str], message: str
) -> None:
    env = {"NEXUS_AUTH__KEYS_DIR": str(shared_keys_dir())}
    code, out, err = await nexus_bus("token", "issue", "--sub", "x", *args, env=env, cwd=tmp_path)
    assert code != 0 and message in err and out == ""
