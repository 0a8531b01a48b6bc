"""`nexus-bus ops` over real servers: what the workers declared, and whether they serve it."""

from __future__ import annotations

import json
import os

from nexus_bus import Settings, Worker
from tests.integration.registry_ops import register_and_stop
from tests.integration.test_cli import run_cli_async


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_NATS__URL=settings.nats.url, NEXUS_LOG__LEVEL="WARNING")
    return env


async def test_ops_lists_declared_operations(settings: Settings, worker: Worker, uid: str) -> None:
    stopped = f"clistopped{uid}"
    await register_and_stop(settings, stopped)
    env = env_for(settings)
    table = await run_cli_async("ops", env=env)
    assert table.returncode == 0, table.stderr
    rows = {line.split()[0]: line.split() for line in table.stdout.splitlines()[1:]}
    assert rows["data.get"][1:3] == ["data:get", "yes"]
    assert rows["data.get"][-2:] == ["GetRequest", "GetReply"]
    assert rows[f"{stopped}.hello"][2] == "no"
    listed = json.loads((await run_cli_async("ops", "--json", env=env)).stdout)
    by_op = {o["op"]: o for o in listed["operations"]}
    assert by_op["data"]["served"] and by_op["data"]["declared_by"] == "registry"
    assert by_op[stopped]["served"] is False
    (hello,) = by_op[stopped]["actions"]
    assert hello["scope"] == f"{stopped}:hello" and hello["schema"]["$defs"]["request"]
