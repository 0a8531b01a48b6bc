"""`ai.run`: the docs' example graph end to end over real NATS (a server of this test's own,
so the built-in `data`, `ai` and `stream` names are served only by this worker), with auth
enforced on every tool call, node events published to a topic, and the model provider DOUBLE.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nexus_bus import Gateway, Worker
from nexus_bus.embedded import ServerProcess
from nexus_bus.handlers import builtin_groups
from tests.conftest import issue_test_token
from tests.integration.ai_serving import ai_settings, openai_backend
from tests.model_provider_double import ProviderDouble, provider_double

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def provider() -> AsyncIterator[ProviderDouble]:
    async with provider_double() as double:
        yield double


@pytest.fixture
async def stack(
    local_nats: ServerProcess, redis_url: str, provider: ProviderDouble
) -> AsyncIterator[Gateway]:
    section = {
        "backends": {"double": openai_backend(provider.base_url, ["chat-1"])},
        "default_complete_model": "chat-1",
        "graphs": ["tests.ai_graph_example:graphs"],
    }
    settings = ai_settings(local_nats.url, redis_url, section)
    worker = Worker(settings, builtin_groups(["data", "ai", "stream"]))
    await worker.start()
    admin = await Gateway.connect(settings, token=issue_test_token())
    try:
        yield admin
    finally:
        await admin.close()
        await worker.drain(1)


async def test_example_graph_runs_over_the_bus_and_streams_node_events(
    stack: Gateway, provider: ProviderDouble, uid: str
) -> None:
    await stack.request("data", "put", {"key": f"doc.{uid}", "value": "Paris is in France."})
    token = issue_test_token(("ai:run", "data:get", "ai:complete", "stream:publish"))
    reply = await stack.request("ai", "run", {
        "graph": "answer", "input": {"key": f"doc.{uid}", "question": "Where is Paris?"},
        "topic": f"run{uid}",
    }, token=token, timeout=10)
    assert reply["status"] == "succeeded" and reply["error"] is None
    assert reply["steps"] == ["fetch", "answer"]
    assert reply["output"]["document"] == "Paris is in France."
    assert reply["output"]["answer"].startswith("echo: Document: Paris is in France.")
    (sent,) = provider.calls("chat/completions")
    assert "Where is Paris?" in sent["messages"][0]["content"]
    events = await stack.request("stream", "read", {"topic": f"run{uid}"})
    nodes = [e["event"]["node"] for e in events["events"]]
    assert nodes == ["fetch", "answer", "__end__"]
    assert events["events"][0]["event"]["update"] == {"document": "Paris is in France."}


async def test_a_tool_call_without_its_scope_fails_inside_the_run_with_403(
    stack: Gateway, provider: ProviderDouble, uid: str
) -> None:
    await stack.request("data", "put", {"key": f"doc.{uid}", "value": "secret"})
    token = issue_test_token(("ai:run", "ai:complete"))  # no data:get
    reply = await stack.request("ai", "run", {
        "graph": "answer", "input": {"key": f"doc.{uid}", "question": "?"},
    }, token=token, timeout=10)
    assert reply["status"] == "failed" and reply["steps"] == []
    assert reply["error"]["status"] == 403 and reply["error"]["code"] == "forbidden"
    assert reply["error"]["call"] == "data.get"
    assert "document" not in reply["output"]
    assert provider.calls("chat/completions") == []  # the run stopped at the refused call


async def test_a_failed_run_publishes_its_end_event_with_the_error(
    stack: Gateway, provider: ProviderDouble, uid: str
) -> None:
    await stack.request("data", "put", {"key": f"doc.{uid}", "value": "Paris is in France."})
    provider.fail(500)  # the `answer` node's ai.complete
    token = issue_test_token(("ai:run", "data:get", "ai:complete", "stream:publish"))
    run = {"graph": "answer", "input": {"key": f"doc.{uid}", "question": "Where?"}}
    reply = await stack.request("ai", "run", {**run, "topic": f"run{uid}"}, token=token,
                                timeout=10)
    assert reply["status"] == "failed" and reply["steps"] == ["fetch"]
    events = await stack.request("stream", "read", {"topic": f"run{uid}"})
    assert [e["event"]["node"] for e in events["events"]] == ["fetch", "__end__"]
    assert events["events"][1]["event"]["update"] == {"status": "failed", "error": reply["error"]}
    assert reply["error"]["code"] == "unavailable" and reply["error"]["call"] == "ai.complete"
    # An end event that cannot be published leaves the run's own error in the reply.
    token = issue_test_token(("ai:run", "ai:complete", "stream:publish"))  # no data:get
    reply = await stack.request("ai", "run", {**run, "topic": f"run{uid}"}, token=token,
                                timeout=10)
    assert reply["status"] == "failed" and reply["error"]["call"] == "data.get"
    token = issue_test_token(("ai:run", "ai:complete"))  # and no stream:publish
    reply = await stack.request("ai", "run", {**run, "topic": f"run{uid}"}, token=token,
                                timeout=10)
    assert reply["status"] == "failed" and reply["error"]["call"] == "data.get"
    assert reply["error"]["code"] == "forbidden"
    events = await stack.request("stream", "read", {"topic": f"run{uid}"})
    assert [e["event"]["node"] for e in events["events"]] == ["fetch", "__end__", "__end__"]


async def test_an_unknown_graph_is_404(stack: Gateway) -> None:
    from nexus_bus.errors import NotFound

    with pytest.raises(NotFound, match="registered: answer"):
        await stack.request("ai", "run", {"graph": "nope"})


def test_the_docs_show_the_example_graph_as_tested() -> None:
    docs = (ROOT / "docs" / "ai.md").read_text()
    block = re.search(r"<!-- example-graph -->\n```python\n(.*?)```", docs, re.S)
    assert block is not None, "docs/ai.md lost its example graph"
    source = (ROOT / "tests" / "ai_graph_example.py").read_text()
    body = source.split('"""', 2)[2].lstrip("\n")
    assert block.group(1) == body
