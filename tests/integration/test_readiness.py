"""`up`'s readiness wait against real NATS: an op is ready once its queue group answers."""

from __future__ import annotations

from typing import Any

import pytest

from nexus_bus import Operations, RequestContext, Settings, Unavailable, Worker
from nexus_bus.readiness import Probe, op_probes, wait_ready


def pricing(op: str, calls: list[str]) -> Operations:
    ops = Operations(op)

    @ops.action("ping", public=True)
    async def ping(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        calls.append("ping")  # a probe must never run a handler
        return {}

    @ops.action("quote")
    async def quote(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        calls.append("quote")
        return {}

    return ops


def test_a_probe_asks_a_non_public_action_when_there_is_one() -> None:
    [probe] = op_probes([pricing("rp", []), Operations("empty")])
    assert probe == Probe("rp", subject="nexus.rp.quote")
    only_public = Operations("pub")

    @only_public.action("ping", public=True)
    async def ping(req: dict[str, Any], ctx: RequestContext) -> dict[str, Any]:
        return {}

    assert op_probes([only_public]) == [Probe("pub", subject="nexus.pub.ping")]


async def test_ready_once_the_queue_group_answers_and_no_handler_runs(
    settings: Settings, uid: str
) -> None:
    calls: list[str] = []
    groups = [pricing(f"r{uid}", calls)]
    public_probe = Probe("public", subject=f"nexus.r{uid}.ping")
    worker = Worker(settings, groups)
    await worker.start()
    reports: list[list[str]] = []
    try:
        await wait_ready(
            settings.nats, [*op_probes(groups), public_probe], timeout_s=10,
            report=reports.append,
        )
    finally:
        await worker.drain(1)
    assert reports == [[f"r{uid}", "public"]]
    assert calls == []


async def test_waiting_names_what_did_not_answer(settings: Settings, uid: str) -> None:
    reports: list[list[str]] = []
    with pytest.raises(Unavailable, match=f"r{uid}"):
        await wait_ready(
            settings.nats, op_probes([pricing(f"r{uid}", [])]), timeout_s=0.3,
            report=reports.append,
        )
    assert reports == [[f"r{uid}"]]
    with pytest.raises(Unavailable, match="exited"):
        await wait_ready(
            settings.nats, op_probes([pricing(f"r{uid}", [])]), timeout_s=10,
            report=reports.append, alive=lambda: False,
        )
