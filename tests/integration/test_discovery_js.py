"""`$SRV` checked by a client nobody here wrote: the official JavaScript `@nats-io/services`.

The session fixture installs the npm packages of tests/js (package-lock.json) into
tests/js/node_modules once; it skips only when the npm registry cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from nexus_bus import Worker
from tests.conftest import make_settings
from tests.integration.discovery_ops import discovery_ops

JS_DIR = Path(__file__).resolve().parents[1] / "js"
# What npm prints when it cannot reach its registry (no network, DNS, proxy refusing).
_OFFLINE = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ETIMEDOUT", "ECONNRESET", "ENETUNREACH")


@pytest.fixture(scope="session")
def js_client() -> Path:
    """tests/js with its npm dependencies installed; the path of the client script."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail("node and npm are required for the $SRV check with @nats-io/services")
    if not (JS_DIR / "node_modules" / "@nats-io" / "services").is_dir():
        result = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if result.returncode != 0:
            if any(code in result.stderr for code in _OFFLINE):
                pytest.skip(f"the npm registry cannot be reached: {result.stderr[-300:]}")
            pytest.fail(f"npm ci failed: {result.stderr[-2000:]}")
    return JS_DIR / "srv_client.mjs"


@pytest.fixture
async def js_worker(nats_url: str, redis_url: str, uid: str) -> AsyncIterator[Worker]:
    """A worker serving its own group `js<uid>`."""
    worker = Worker(make_settings(nats_url, redis_url), [discovery_ops(f"js{uid}")])
    await worker.start()
    yield worker
    await worker.drain(1)


async def run_js(script: Path, *args: str) -> dict[str, Any]:
    """Run the node client without blocking the event loop the worker serves on."""
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(script),
        *args,
        cwd=script.parent,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    doc: dict[str, Any] = json.loads(out)
    return doc


async def test_the_official_js_services_client_pings_infos_and_stats_a_worker(
    js_client: Path, js_worker: Worker, nats_url: str, uid: str
) -> None:
    op, name = f"js{uid}", f"nexus-js{uid}"
    assert js_worker.discovery is not None
    instance = js_worker.discovery.instance
    nc = await nats.connect(nats_url)
    try:
        for _ in range(2):
            await nc.request(f"nexus.{op}.ok", b'{"note": "n"}', timeout=2)
        await nc.request(f"nexus.{op}.fail", b"{}", timeout=2)
    finally:
        await nc.close()

    seen = await run_js(js_client, nats_url, name, instance)

    assert any(p["name"] == name and p["id"] == instance for p in seen["ping_all"])
    [ping] = seen["ping"]
    assert ping["type"] == "io.nats.micro.v1.ping_response" and ping["version"]
    [info] = seen["info"]
    assert (info["type"], info["name"], info["id"]) == (
        "io.nats.micro.v1.info_response",
        name,
        instance,
    )
    endpoints = {e["name"]: e for e in info["endpoints"]}
    assert set(endpoints) == {"ok", "fail"}
    assert endpoints["ok"]["subject"] == f"nexus.{op}.ok"
    assert endpoints["ok"]["queue_group"] == f"nexus.{op}"
    assert endpoints["ok"]["metadata"]["schema_request"].endswith(f"{op}.ok.json#/$defs/request")
    [stats] = seen["stats"]
    assert stats["type"] == "io.nats.micro.v1.stats_response"
    counts = {e["name"]: e for e in stats["endpoints"]}
    assert (counts["ok"]["num_requests"], counts["ok"]["num_errors"]) == (2, 0)
    assert (counts["fail"]["num_requests"], counts["fail"]["num_errors"]) == (1, 1)
    assert counts["fail"]["last_error"].startswith("409:")
    assert counts["ok"]["processing_time"] > 0
