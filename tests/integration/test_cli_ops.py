"""`nexus-bus ops` over real servers: what the workers declared, and whether they serve it."""

from __future__ import annotations

import json
import os

from nexus_bus import Settings, Worker
from nexus_bus.resilience.policy import PolicySettings
from tests.integration.registry_ops import register_and_stop
from tests.integration.test_cli import run_cli_async


def env_for(settings: Settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEXUS_")}
    env.update(NEXUS_NATS__URL=settings.nats.url, NEXUS_LOG__LEVEL="WARNING")
    return env


def rows_of(table: str) -> dict[str, list[str]]:
    """A printed table's rows by their first cell (header excluded)."""
    return {line.split()[0]: line.split() for line in table.splitlines()[1:]}


async def test_ops_lists_declared_operations(settings: Settings, worker: Worker, uid: str) -> None:
    stopped = f"clistopped{uid}"
    # This worker limits its op and leases keys for 1.5 s; the CLI's own settings do neither.
    worker_side = settings.model_copy(update={"resilience": settings.resilience.model_copy(
        update={"ops": {stopped: PolicySettings(rate_limit_per_s=7)}, "idempotency_lease_ms": 1500}
    )})
    await register_and_stop(worker_side, stopped)
    env = env_for(settings)
    env["NEXUS_RESILIENCE__DEFAULTS__ATTEMPTS"] = "2"  # the gateway half is the CLI's own
    table = await run_cli_async("ops", env=env)
    assert table.returncode == 0, table.stderr
    operations, policies, note = table.stdout.split("\n\n")
    rows = rows_of(operations)
    assert rows["data.get"][1:3] == ["data:get", "yes"]
    assert rows["data.get"][-2:] == ["GetRequest", "GetReply"]
    assert rows[f"{stopped}.hello"][2] == "no"
    assert policies.splitlines()[0].split() == [
        "OPERATION", "TIMEOUT", "ATTEMPTS", "BACKOFF", "BUDGET", "BREAKER", "STALE",
        "RATE-LIMIT", "IDEMPOTENCY",
    ]
    policy_rows = rows_of(policies)
    assert policy_rows["data.get"][1:] == [
        "30s", "2,timeouts", "50ms-1s,x2", "20%,min1/s", "5fails,1s-30s", "5m", "-",
        "24h,lease30s",
    ]
    assert policy_rows[f"{stopped}.hello"][2:] == [
        "2", "50ms-1s,x2", "20%,min1/s", "5fails,1s-30s", "-", "7/s,burst7", "24h,lease1.5s"
    ]
    assert "RATE-LIMIT, IDEMPOTENCY" in note
    listed = json.loads((await run_cli_async("ops", "--json", env=env)).stdout)
    by_op = {o["op"]: o for o in listed["operations"]}
    assert by_op["data"]["served"] and by_op["data"]["declared_by"] == "registry"
    assert by_op[stopped]["served"] is False
    (hello,) = by_op[stopped]["actions"]
    assert hello["scope"] == f"{stopped}:hello" and hello["schema"]["$defs"]["request"]
    assert hello["policy"]["gateway"]["attempts"] == 2
    assert hello["policy"]["worker"] == {
        "enabled": True, "rate_limit_per_s": 7.0, "rate_limit_burst": 7,
        "idempotency_retention_s": 86400.0, "idempotency_lease_ms": 1500,
    }
