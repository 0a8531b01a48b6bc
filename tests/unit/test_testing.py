"""nexus_bus.testing: operations served in memory through FastStream's TestNatsBroker, with the
worker's request path (context, auth, validation, error mapping), and the README's example."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest

from nexus_bus import Operations, RequestContext
from nexus_bus.constants import H_REQUEST_ID, H_STATUS
from nexus_bus.errors import Conflict, Forbidden, InvalidRequest, InvalidToken, NotFound
from nexus_bus.testing import MemoryEventLog, MemoryRecordStore, OperationsHarness

ROOT = Path(__file__).resolve().parents[2]


class Note(msgspec.Struct, frozen=True, kw_only=True):
    key: str
    text: str = ""


ops = Operations("notes", description="Test notes.")


@ops.action("put")
async def put(req: Note, ctx: RequestContext) -> dict[str, Any]:
    revision = await ctx.services.records.put(req.key, msgspec.json.encode(req.text))
    return {"revision": revision, "by": ctx.principal.subject if ctx.principal else None}


@ops.action("get")
async def get(req: Note, ctx: RequestContext) -> dict[str, Any]:
    record = await ctx.services.records.get(req.key)  # NotFound becomes a 404 reply
    return {"text": record.json(), "request_id": ctx.request_id}


@ops.action("ping", public=True)
async def ping(req: Note, ctx: RequestContext) -> dict[str, str]:
    return {"op": ctx.op, "action": ctx.action}


async def test_a_request_takes_the_workers_path_with_a_real_context() -> None:
    async with OperationsHarness(ops) as harness:
        token = harness.token("notes:*", subject="ann")
        assert await harness.request("notes", "put", {"key": "a", "text": "hi"}, token=token) == {
            "revision": 1, "by": "ann",
        }
        got = await harness.request(
            "notes", "get", {"key": "a"}, token=token, headers={H_REQUEST_ID: "req-1"}
        )
        assert got == {"text": "hi", "request_id": "req-1"}
        assert await harness.request("notes", "ping", {"key": "x"}) == {
            "op": "notes", "action": "ping",
        }


async def test_auth_validation_and_errors_are_mapped() -> None:
    async with OperationsHarness(ops) as harness:
        with pytest.raises(InvalidToken):
            await harness.request("notes", "get", {"key": "a"})
        with pytest.raises(InvalidToken):
            await harness.request("notes", "get", {"key": "a"}, token="not-a-token")
        with pytest.raises(Forbidden):
            await harness.request("notes", "put", {"key": "a"}, token=harness.token("notes:get"))
        token = harness.token("*")
        with pytest.raises(InvalidRequest, match="key"):
            await harness.request("notes", "get", {"text": "no key"}, token=token)
        with pytest.raises(InvalidRequest):
            await harness.request("notes", "get", b"{not json", token=token)
        with pytest.raises(NotFound):
            await harness.request("notes", "get", {"key": "missing"}, token=token)
        raw = await harness.request_raw("notes", "nope", b"{}")
        assert raw.status == 404 and raw.headers[H_STATUS] == "404"
        assert msgspec.json.decode(raw.body)["code"] == "unknown_operation"


async def test_auth_can_be_off() -> None:
    async with OperationsHarness(ops, auth=False) as harness:
        assert (await harness.request("notes", "put", {"key": "k"}))["by"] is None


async def test_memory_twins_behave_like_the_stores() -> None:
    records = MemoryRecordStore()
    first = await records.put("k", b"1", expected_revision=0)
    with pytest.raises(Conflict):
        await records.put("k", b"2", expected_revision=0)
    assert await records.put("k", b"2", expected_revision=first) > first
    assert await records.keys("k") == ["k"] and await records.delete("k")
    with pytest.raises(NotFound):
        await records.get("k")
    events = MemoryEventLog()
    a = await events.append("t", b"1", event_id="e1")
    assert (await events.append("t", b"1", event_id="e1")).duplicate
    assert not (await events.append("u", b"1", event_id="e1")).duplicate  # ids are per topic
    b = await events.append("t", b"2")
    assert [e.seq for e in await events.read("t")] == [a.seq, b.seq]
    assert [e.seq for e in await events.read("t", after_seq=a.seq)] == [b.seq]


def test_the_readme_example_runs(tmp_path: Path) -> None:
    """The README's `mypkg/pricing.py` and its test, run by pytest as a user's project runs
    them: in a folder of its own, with the README's `pyproject.toml` (asyncio auto mode).
    Before: it passed with a PytestDeprecationWarning on every run (the fixture loop scope
    pytest-asyncio asks to be set)."""
    text = (ROOT / "README.md").read_text()
    blocks = dict(re.findall(r"<!-- readme-test: (\S+) -->\n```\w+\n(.*?)```", text, re.S))
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "pricing.py").write_text(blocks["mypkg/pricing.py"])
    (tmp_path / "pyproject.toml").write_text(blocks["pyproject.toml"])
    (tmp_path / "test_pricing.py").write_text(blocks["testing"])
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_pricing.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    # And nothing else: no PytestDeprecationWarning about a setting the snippet leaves unset.
    assert run.stdout.splitlines()[-1].startswith("1 passed in "), run.stdout + run.stderr
    assert run.stderr == ""
