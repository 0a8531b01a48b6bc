"""The worker is a FastStream application: one subscriber per op in its queue group, and
`faststream run nexus_bus.runtime.app:app` serves what `nexus-bus worker` serves."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from faststream import FastStream
from faststream.nats import NatsBroker

from nexus_bus import Gateway, Settings, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.errors import NexusError
from nexus_bus.handlers import builtin_groups
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]
FASTSTREAM = Path(sys.executable).with_name("faststream")


def test_each_op_is_a_faststream_subscriber_in_its_queue_group(settings: Settings) -> None:
    worker = Worker(settings, builtin_groups(["data", "stream"]))
    assert isinstance(worker.app, FastStream) and isinstance(worker.broker, NatsBroker)
    found = sorted(
        (sub.subject.template, sub.queue)  # the subscribers FastStream serves and documents
        for sub in worker.broker.subscribers
    )
    assert found == [("nexus.data.*", "nexus.data"), ("nexus.stream.*", "nexus.stream")]


async def test_faststream_run_serves_the_worker_app(
    local_nats: ServerProcess, redis_url: str, admin_token: str | None, uid: str, tmp_path: Path
) -> None:
    """On a NATS of its own: the answers can only come from the `faststream run` process."""
    settings = make_settings(local_nats.url, redis_url)
    env = {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_REDIS__URL": settings.redis.url,
        "NEXUS_AUTH__KEYS_DIR": str(settings.auth.keys_dir),
        "NEXUS_WORKER__OPS": '["data"]',
        "NEXUS_WORKER__MICRO": "false",
        "NEXUS_LOG__LEVEL": "ERROR",
        "PYTHONPATH": str(ROOT),
    }
    log = tmp_path / "faststream.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(  # noqa: ASYNC220 - started once, waited on in a thread
            [str(FASTSTREAM), "run", "nexus_bus.runtime.app:app"],
            env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT,
        )
    gw = await Gateway.connect(settings, token=admin_token)
    try:
        key = f"fsrun.{uid}"
        for _ in range(150):
            try:
                await gw.request("data", "put", {"key": key, "value": 7}, timeout=1)
                break
            except NexusError:
                assert proc.poll() is None, log.read_text()
                await asyncio.sleep(0.1)
        assert (await gw.request("data", "get", {"key": key}))["value"] == 7
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        await gw.close()


@pytest.mark.parametrize("ops", ["", '["data"]'])
def test_the_worker_app_module_builds_from_settings(ops: str, settings: Settings) -> None:
    env = {
        **os.environ,
        "NEXUS_NATS__URL": settings.nats.url,
        "NEXUS_WORKER__OPS": ops or "[]",
        "PYTHONPATH": str(ROOT),
    }
    script = (
        "from nexus_bus.runtime.app import app\n"
        "print(sorted(s.subject.template for s in app.broker.subscribers))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    subjects = eval(out.stdout)  # a printed list of str
    assert ("nexus.data.*" in subjects) and (len(subjects) == 1) == bool(ops)
